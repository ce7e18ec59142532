"""The hostile suite's shell: every case checks what a user sees, then that nothing of ours leaked.

Leaks checked after every case, beyond the autouse fixture of tests/conftest.py: IPython's
event callbacks and AST transformers are exactly the extension's own (and none after
unload), no `on` mode is left on, no display is pending, and every tensor the namespace holds
is collectable once it is reset.
"""

from __future__ import annotations

import atexit
import gc
import sys
import weakref
from dataclasses import dataclass, field

import pytest
import torch
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

import torchmagic
from torchmagic.assignments import dispatch


def ipython_state(ip: InteractiveShell) -> dict:
    """IPython's hooks that an extension can add to: event callbacks, AST transformers, configurables."""
    return {
        "callbacks": {event: list(callbacks) for event, callbacks in ip.events.callbacks.items()},
        "ast_transformers": list(ip.ast_transformers),
        "our configurables": [c for c in ip.configurables if type(c).__module__.startswith("torchmagic")],
    }


@dataclass
class Hostile:
    ip: InteractiveShell
    capsys: pytest.CaptureFixture
    outputs: list = field(default_factory=list)

    @property
    def ns(self) -> dict:
        return self.ip.user_ns

    @property
    def session(self):
        return getattr(self.ip, "_torchmagic_session", None)

    def run(self, code: str, *, expect_error: type[BaseException] | None = None):
        """Run a cell; any error raises in the test unless it is the expected one (exactly that class)."""
        self.ip.display_pub.outputs.clear()
        result = self.ip.run_cell(code, store_history=True)
        error = result.error_before_exec or result.error_in_exec
        if expect_error is None:
            if error is not None:
                raise AssertionError(f"cell failed: {type(error).__name__}: {error}") from error
        else:
            assert type(error) is expect_error, f"expected {expect_error.__name__}, got {error!r}"
        self.outputs = list(self.ip.display_pub.outputs)
        return result

    def printed(self) -> tuple[str, str]:
        captured = self.capsys.readouterr()
        return captured.out, captured.err

    def usage_error(self, code: str) -> str:
        """Run a cell that must fail with one plain UsageError line; return that line (without the prefix)."""
        self.printed()
        self.run(code, expect_error=UsageError)
        out, err = self.printed()
        assert "Traceback" not in out + err, out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("UsageError: "), err
        return lines[0].removeprefix("UsageError: ")

    def displayed(self, mime: str = "text/plain") -> list[str]:
        return [o["data"][mime] for o in self.outputs if mime in o["data"]]

    def assert_clean(self) -> None:
        """Loaded, idle, nothing of ours active: no mode, hook, binder, transformer, pending display."""
        session = self.session
        assert session is not None, "the extension was lost"
        assert torch._C._len_torch_function_stack() == 0
        assert torch.get_default_device() == torch.device("cpu")
        assert dispatch.binders == {} and dispatch.errors == []
        assert session.instrumenter not in self.ip.ast_transformers
        assert session._pending == []
        for event in ("pre_run_cell", "post_run_cell"):
            ours = [c for c in self.ip.events.callbacks[event] if getattr(c, "__self__", None) is session]
            assert len(ours) == 1, f"{event}: {self.ip.events.callbacks[event]}"

    def assert_collectable(self, *names: str) -> None:
        """After a reset, nothing of ours (traces, reports, recordings, binders, frames) keeps these tensors alive.

        Without names: every tensor bound in the namespace.
        """
        names = names or tuple(n for n, v in self.ns.items() if issubclass(type(v), torch.Tensor) and n[:1] != "_")
        refs = {name: weakref.ref(self.ns[name]) for name in names}
        self.run("get_ipython().reset(new_session=False)")  # what %reset -f does, less its slow gc.collect()
        # IPython keeps the last exception for %debug, and with it the frames it passed through (torch's too)
        self.ip.InteractiveTB.tb = None
        for attribute in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, attribute):
                delattr(sys, attribute)
        if any(ref() is not None for ref in refs.values()):
            gc.collect()  # only reference cycles are left to the collector
        alive = [name for name, ref in refs.items() if ref() is not None]
        assert alive == [], f"still alive after a reset: {alive}"


@pytest.fixture
def hostile(capsys):
    InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    ip.display_pub = CapturingDisplayPublisher()
    ip.run_line_magic("colors", "nocolor")
    before = ipython_state(ip)
    ip.run_cell("%load_ext torchmagic")
    shell = Hostile(ip, capsys)
    reset = False
    try:
        yield shell
        if shell.session is not None:
            for line in ("%autograd_trace off", "%tensor off"):
                ip.run_cell(line)
            shell.assert_clean()
            shell.assert_collectable()
            reset = True
    finally:
        ip.run_cell("%unload_ext torchmagic")
        torchmagic._history.clear()
        torchmagic._last_conversion = None
        after = ipython_state(ip)
        if not reset:
            ip.reset()
        InteractiveShell.clear_instance()
        atexit.unregister(ip.atexit_operations)  # each shell would reset itself again at exit (seconds, for nothing)
    assert after == before, "IPython hooks leaked after unload"
