"""The torchmagic_shell fixture: a real shell that raises cell errors and leaves nothing behind."""

from __future__ import annotations

import atexit
import builtins
import sys

import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell

import torchmagic
from torchmagic.testing import TorchmagicShell


def test_run_returns_the_cells_value_and_raises_its_error(torchmagic_shell):
    assert torchmagic_shell.run("x = 20\nx + 1") == 21
    assert torchmagic_shell.ns["x"] == 20
    with pytest.raises(ZeroDivisionError):
        torchmagic_shell.run("1 / 0")
    with pytest.raises(SyntaxError):
        torchmagic_shell.run("x = = 1")
    assert torchmagic_shell.run("x") == 20  # the shell goes on after a failed cell


def test_cells_written_indented_in_a_test_run_as_written(torchmagic_shell):
    torchmagic_shell.run("""
        def double(v):
            return 2 * v
    """)
    assert torchmagic_shell.run("double(4)") == 8


def test_trace_returns_the_cells_trace_with_its_cell_and_lines(torchmagic_shell):
    torchmagic_shell.run("import torch")
    t = torchmagic_shell.trace("""
        x = torch.ones(2, 2, requires_grad=True)
        y = x + 2
        out = (y * y * 3).mean()
        out.backward()
    """)
    assert t is torchmagic.last_trace()
    assert t.cell == "In [2]"  # the import was In [1]
    assert str(t.node("y").source) == "In [2], line 3: y = x + 2"  # the magic is line 1
    assert torch.equal(t.grad("y"), torch.full((2, 2), 4.5))


def test_displays_are_captured_as_a_terminal_gets_them(torchmagic_shell):
    torchmagic_shell.trace("import torch\nw = torch.ones(3, requires_grad=True)\n(w * 2).sum().backward()")
    (text,) = torchmagic_shell.displayed()
    assert text.startswith("autograd trace of In [1]") and "grad [2, 2, 2]" in text
    assert torchmagic_shell.displayed("image/svg+xml") == []  # no diagram laid out for a terminal


def test_all_formats_on_request():
    with TorchmagicShell(formats=None) as shell:
        shell.trace("import torch\nw = torch.ones(3, requires_grad=True)\n(w * 2).sum().backward()")
        (svg,) = shell.displayed("image/svg+xml")
    assert svg.startswith("<svg")


def test_close_unloads_the_extension_and_forgets_its_traces():
    history = list(torchmagic._history)
    shell = TorchmagicShell().start()
    ip = shell.ip
    assert "autograd_trace" in ip.magics_manager.magics["cell"]
    shell.trace("import torch\nw = torch.ones(3, requires_grad=True)\n(w * 2).sum().backward()")
    shell.close()
    assert "autograd_trace" not in ip.magics_manager.magics["cell"]
    assert "w" not in ip.user_ns
    assert torchmagic._history == history
    assert not InteractiveShell.initialized()
    assert ip.atexit_operations not in _atexit_callbacks()


def test_a_shell_already_running_is_put_back():
    """Tests run inside a kernel (ipytest) must get the kernel's shell back."""
    outer = InteractiveShell.instance()
    try:
        hooks = (sys.displayhook, sys.excepthook, builtins.__dict__.get("get_ipython"))
        with TorchmagicShell() as shell:
            assert InteractiveShell.instance() is shell.ip is not outer
        assert InteractiveShell.instance() is outer
        assert (sys.displayhook, sys.excepthook, builtins.__dict__.get("get_ipython")) == hooks
    finally:
        outer.atexit_operations()
        atexit.unregister(outer.atexit_operations)
        InteractiveShell.clear_instance()


def test_torch_state_left_behind_fails_the_close():
    shell = TorchmagicShell().start()
    shell.run("""
        import torch
        class PassThrough(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))
        mode = PassThrough()
        mode.__enter__()
    """)
    mode = shell.ns["mode"]
    try:
        with pytest.raises(AssertionError, match="torch function modes on the stack: 0 before, 1 after"):
            shell.close()
    finally:
        mode.__exit__(None, None, None)


def test_grad_mode_switched_off_in_a_cell_is_switched_back_on():
    with TorchmagicShell() as shell:
        shell.run("import torch\ntorch.set_grad_enabled(False)")
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()


def _atexit_callbacks() -> list:
    """The functions registered with atexit (CPython keeps them private; this reads them back)."""
    found = []

    class Probe:
        def __eq__(self, other):
            found.append(other)
            return False

    atexit.unregister(Probe())
    return found
