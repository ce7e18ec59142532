"""Faults in the middle of a cell (the user's code, torch, our hooks, the build, the display), and interrupts."""

from __future__ import annotations

import _weakrefset
import os
import signal
import sys
import traceback

import pytest
import torch

import torchmagic
from torchmagic.convert import Converter
from torchmagic.trace import Recorder, Trace
from torchmagic.trace.ledger import LeafLedger

SEED = "import torch\nx = torch.ones(2, 2, requires_grad=True)\ny = x + 2\nz = (y * y * 3).mean()\nz.backward()"


def traced(hostile, body: str, mode: str, *, expect_error=None):
    """Run ``body`` traced by the cell magic or the `on` mode; return the ExecutionResult."""
    if mode == "cell":
        return hostile.run("%%autograd_trace --text\n" + body, expect_error=expect_error)
    hostile.run("%autograd_trace on --text")
    try:
        return hostile.run(body, expect_error=expect_error)
    finally:
        shown = hostile.outputs
        hostile.run("%autograd_trace off")
        hostile.outputs = shown


MODES = ["cell", "on"]


@pytest.mark.parametrize("mode", MODES)
def test_keyboard_interrupt_in_the_users_code(hostile, mode):
    traced(hostile, "import torch\na = torch.ones(2, requires_grad=True)\nb = a * 2\nraise KeyboardInterrupt",
           mode, expect_error=KeyboardInterrupt)
    trace = torchmagic.last_trace()
    assert trace.error == "KeyboardInterrupt" and [n.name for n in trace.nodes] == ["a", "b"]
    assert "the code raised KeyboardInterrupt; showing what ran" in hostile.displayed()[0]
    hostile.assert_clean()
    hostile.assert_collectable("a", "b")


@pytest.mark.parametrize("mode", MODES)
def test_keyboard_interrupt_in_a_modules_forward(hostile, mode):
    hostile.run("import torch\nclass Stop(torch.nn.Module):\n    def forward(self, x):\n        raise KeyboardInterrupt\n"
                "net = torch.nn.Sequential(torch.nn.Linear(2, 2), Stop())")
    traced(hostile, "out = net(torch.ones(1, 2))", mode, expect_error=KeyboardInterrupt)
    hostile.assert_clean()
    hostile.run("ok = torch.nn.Linear(2, 2)(torch.ones(1, 2))")  # modules still run: no module hook left


@pytest.mark.parametrize("mode", MODES)
def test_an_error_in_a_users_tensor_hook_during_backward(hostile, mode):
    body = ("import torch\nx = torch.ones(2, requires_grad=True)\ny = x * 2\n"
            "def refuse(grad):\n    raise ValueError('hook says no')\ny.register_hook(refuse)\ny.sum().backward()")
    traced(hostile, body, mode, expect_error=ValueError)
    assert torchmagic.last_trace().error == "ValueError: hook says no"
    hostile.assert_clean()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_a_fault_in_our_backward_capture(hostile, monkeypatch, fault):
    def broken(self, *args):
        raise fault("inside the recorder's capture")

    monkeypatch.setattr(LeafLedger, "accumulate", broken)
    traced(hostile, SEED, "cell", expect_error=fault)
    monkeypatch.undo()
    hostile.assert_clean()
    hostile.run("%%autograd_trace --text\n" + SEED)  # the next traced cell is whole
    assert torchmagic.last_trace().grad("x") is not None


def test_an_interrupt_while_the_trace_is_built_stops_only_the_display(hostile, monkeypatch):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trace, "fill", interrupted)
    result = hostile.run("%%autograd_trace\n" + SEED)
    monkeypatch.undo()
    out, err = hostile.printed()
    assert result.success and hostile.ns["x"].grad is not None  # the cell's own work is done
    assert err.strip() == f"torchmagic: interrupted while preparing the trace of In [{result.execution_count}]; it is not shown"
    assert torchmagic.last_trace() is None and hostile.outputs == []
    hostile.assert_clean()
    hostile.assert_collectable("x", "y", "z")


def test_an_error_while_the_trace_is_built_is_shown_and_the_cell_succeeds(hostile, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("build bug")

    monkeypatch.setattr(Trace, "fill", broken)
    result = hostile.run("%%autograd_trace\n" + SEED)
    monkeypatch.undo()
    out, err = hostile.printed()
    assert result.success and "RuntimeError: build bug" in out + err
    assert torchmagic.last_trace() is None
    hostile.assert_clean()


@pytest.mark.parametrize("fault", [KeyboardInterrupt, RuntimeError])
def test_a_fault_while_displaying(hostile, monkeypatch, fault):
    def broken(self, include=None, exclude=None):
        raise fault("display bug")

    monkeypatch.setattr(Trace, "_repr_mimebundle_", broken)
    result = hostile.run("%%autograd_trace\n" + SEED)
    monkeypatch.undo()
    out, err = hostile.printed()
    assert result.success and torchmagic.last_trace() is not None  # built and kept; only showing failed
    assert ("interrupted while preparing the trace" in err) if fault is KeyboardInterrupt else ("display bug" in out + err)
    hostile.assert_clean()


def test_a_recorder_that_cannot_start_in_on_mode_leaves_the_cell_running(hostile, monkeypatch):
    def refuse(self):
        raise RuntimeError("cannot start")

    hostile.run("%autograd_trace on")
    monkeypatch.setattr(Recorder, "start", refuse)
    result = hostile.run("ran = 1 + 1")
    monkeypatch.undo()
    hostile.run("%autograd_trace off")
    out, err = hostile.printed()
    assert hostile.ns["ran"] == 2 and result.success and "cannot start" in out + err
    hostile.assert_clean()


def test_a_recorder_that_cannot_start_in_a_cell_magic_runs_nothing(hostile, monkeypatch):
    monkeypatch.setattr(Recorder, "start", lambda self: (_ for _ in ()).throw(RuntimeError("cannot start")))
    hostile.run("%%autograd_trace\nran = True", expect_error=RuntimeError)
    monkeypatch.undo()
    assert "ran" not in hostile.ns
    hostile.assert_clean()


@pytest.mark.parametrize("body, error", [
    ("import torch\na = torch.ones(2, 3, requires_grad=True)\nb = a @ torch.ones(2, 3)", RuntimeError),
    ("import torch\na = torch.ones(2, requires_grad=True)\nb = (a * 2).sum()\nb.backward()\nb.backward()", RuntimeError),
    ("import torch\na = torch.ones(2, requires_grad=True)\na.add_(1)", RuntimeError),
    ("import torch\na = torch.ones(2, requires_grad=True)\nwith torch.no_grad():\n    b = a * 2\n    raise ValueError('inside no_grad')",
     ValueError),
    ("import torch\na = torch.ones(2, requires_grad=True)\ntorch.autograd.grad((a * 2).sum(), [a, torch.ones(1)])",
     RuntimeError),
])
def test_torch_errors_in_a_traced_cell(hostile, body, error):
    traced(hostile, body, "cell", expect_error=error)
    assert torchmagic.last_trace().error.startswith(error.__name__)
    hostile.assert_clean()


def test_non_finite_gradients_are_traced_to_their_origin(hostile):
    traced(hostile, "import torch\nx = torch.tensor([0.0, 1.0], requires_grad=True)\ny = torch.sqrt(x)\n"
                    "y.sum().backward()", "cell")
    assert torchmagic.last_trace().nonfinite_origin is not None
    assert "FIRST NaN/Inf" in hostile.displayed()[0]


def test_a_backward_in_another_thread(hostile):
    traced(hostile, "import torch, threading\nx = torch.ones(2, requires_grad=True)\ndef work():\n"
                    "    (x * 5).sum().backward()\nt = threading.Thread(target=work)\nt.start()\nt.join()\n"
                    "(x * 2).sum().backward()", "cell")
    assert torch.equal(hostile.ns["x"].grad, torch.tensor([7.0, 7.0]))
    hostile.assert_clean()


def test_a_users_own_function_mode_closed_in_the_cell(hostile):
    traced(hostile, "import torch\nfrom torch.overrides import TorchFunctionMode\nclass Mine(TorchFunctionMode):\n"
                    "    def __torch_function__(self, func, types, args=(), kwargs=None):\n"
                    "        return func(*args, **(kwargs or {}))\nwith Mine():\n    x = torch.ones(2, requires_grad=True)\n"
                    "    (x * 2).sum().backward()", "cell")
    assert torchmagic.last_trace().grad("x") is not None
    hostile.assert_clean()


def test_a_users_function_mode_left_open_stays_and_ours_goes(hostile):
    try:
        hostile.run("%%autograd_trace --text\nimport torch\nfrom torch.overrides import TorchFunctionMode\n"
                    "class Open(TorchFunctionMode):\n    def __torch_function__(self, func, types, args=(), kwargs=None):\n"
                    "        return func(*args, **(kwargs or {}))\nOpen().__enter__()\nx = torch.ones(2, requires_grad=True)\n"
                    "(x * 2).sum().backward()")
        stack = torch.overrides._get_current_function_mode_stack()
        assert [type(mode).__name__ for mode in stack] == ["Open"]
    finally:
        while torch._C._len_torch_function_stack():
            torch._C._pop_torch_function_stack()


def test_meta_tensors_are_traced(hostile):
    traced(hostile, "import torch\nx = torch.ones(2, device='meta', requires_grad=True)\n(x * 2).sum().backward()", "cell")
    assert [n.name for n in torchmagic.last_trace().nodes][0] == "x"


def test_a_tensor_subclass_whose_torch_function_raises(hostile):
    hostile.run("import torch\nclass Refuses(torch.Tensor):\n    @classmethod\n"
                "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
                "        raise RuntimeError('subclass says no')")
    traced(hostile, "b = torch.ones(2).as_subclass(Refuses)\nc = b + 1", "cell", expect_error=RuntimeError)
    out, err = hostile.printed()
    assert "torchmagic" not in err and torchmagic.last_trace().error == "RuntimeError: subclass says no"


def test_a_namespace_object_whose_class_attribute_raises(hostile):
    hostile.run("class Sly:\n    @property\n    def __class__(self):\n        raise RuntimeError('no class for you')")
    traced(hostile, "sly = Sly()\n" + SEED, "cell")
    out, err = hostile.printed()
    assert "torchmagic" not in err and torchmagic.last_trace().grad("x") is not None


# -- %%tensor and %%device --------------------------------------------------------------------------
def test_a_tensor_cell_that_raises_still_reports_what_it_converted(hostile):
    hostile.run("%%tensor\na = [1.0, 2.0]\nraise ValueError('later')", expect_error=ValueError)
    assert isinstance(hostile.ns["a"], torch.Tensor)
    assert [c.name for c in torchmagic.last_conversion().converted] == ["a"] and "a" in hostile.displayed()[0]
    hostile.assert_clean()


def test_an_interrupt_inside_a_conversion(hostile, monkeypatch):
    def interrupted(self, name, value):
        raise KeyboardInterrupt

    monkeypatch.setattr(Converter, "__call__", interrupted)
    hostile.run("%%tensor\na = [1.0]\nafter = True", expect_error=KeyboardInterrupt)
    monkeypatch.undo()
    assert hostile.ns["a"] == [1.0] and "after" not in hostile.ns
    hostile.assert_clean()


@pytest.mark.parametrize("fault", ["raise ValueError('x')", "raise KeyboardInterrupt"])
def test_a_device_cell_restores_the_default_device(hostile, fault):
    hostile.run(f"%%device meta\nimport torch\nm = torch.ones(2)\n{fault}",
                expect_error=ValueError if "Value" in fault else KeyboardInterrupt)
    assert hostile.ns["m"].device.type == "meta" and torch.get_default_device() == torch.device("cpu")
    hostile.assert_clean()


def test_tensor_on_mode_and_a_failing_cell(hostile):
    hostile.run("%tensor on")
    hostile.run("a = [1, 2]\n1 / 0", expect_error=ZeroDivisionError)
    hostile.run("%tensor off")
    assert isinstance(hostile.ns["a"], torch.Tensor) and torchmagic.last_conversion().converted[0].name == "a"


# -- Ctrl-C landing where Python would drop it or where torch is mid-operation ------------------------
def _stand_in(filename: str) -> str:
    """Source that defines ``land_here``: a SIGINT handled in a frame that claims to live in ``filename``."""
    return (f"_ns = {{'signal': __import__('signal')}}\n"
            f"exec(compile('def land_here(*_):\\n    signal.raise_signal(signal.SIGINT)\\n', {filename!r}, 'exec'), _ns)\n"
            f"land_here = _ns['land_here']\n")


LOOP = ("import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end:\n    pass\nfinished = True\n")


@pytest.mark.parametrize("mode", MODES)
def test_an_interrupt_in_a_weakref_callback_reaches_the_users_loop(hostile, mode):
    hostile.run(_stand_in(_weakrefset.__file__) + "import weakref\nclass Dies:\n    pass")
    body = "import torch\nx = torch.ones(2, requires_grad=True)\nd = Dies()\nr = weakref.ref(d, land_here)\ndel d\n" + LOOP
    traced(hostile, body, mode, expect_error=KeyboardInterrupt)
    assert "finished" not in hostile.ns  # without the deferral Python drops it and the loop runs to its end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    hostile.assert_clean()


@pytest.mark.parametrize("mode", MODES)
def test_an_interrupt_inside_our_code_reaches_the_users_loop(hostile, mode):
    ours = os.path.join(os.path.dirname(torchmagic.__file__), "trace", "recorder_stand_in.py")
    hostile.run(_stand_in(ours))
    traced(hostile, "land_here()\n" + LOOP, mode, expect_error=KeyboardInterrupt)
    frames = [frame.name for frame in traceback.extract_tb(sys.last_traceback)]
    assert "finished" not in hostile.ns and "land_here" not in frames  # raised in the loop, not in "our" frame
    hostile.assert_clean()


def test_no_handler_of_ours_outside_a_recording(hostile):
    hostile.run("%%autograd_trace\nimport signal\ninside = signal.getsignal(signal.SIGINT)")
    assert hostile.ns["inside"] is not signal.default_int_handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    hostile.run("%%tensor\nimport signal\nconverting = signal.getsignal(signal.SIGINT)")
    assert hostile.ns["converting"] is signal.default_int_handler


def test_a_users_own_sigint_handler_set_in_a_traced_cell_is_kept(hostile):
    hostile.run("%%autograd_trace\nimport signal\ndef mine(signum, frame):\n    pass\nsignal.signal(signal.SIGINT, mine)")
    try:
        assert signal.getsignal(signal.SIGINT) is hostile.ns["mine"]
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
