"""The Python API without the magics: bad arguments raise the package's own errors, faults leave nothing behind."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import torchmagic
from torchmagic.errors import DeviceError, MoveError, OptionError
from torchmagic.move import move_namespace


@pytest.mark.parametrize("kwargs, error, message", [
    ({"dtype": "floaty"}, OptionError, "unknown dtype 'floaty'"),
    ({"device": "gpu"}, DeviceError, "unknown device 'gpu'"),
    ({"device": "cuda:5"}, DeviceError, "available here: cpu"),
])
def test_to_tensor_refuses_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        torchmagic.to_tensor([1.0], **kwargs)


@pytest.mark.parametrize("value, note", [
    (np.array([2**64 - 1], dtype=np.uint64), "above int64's maximum"),
    ([float("inf"), 1e39], "values beyond float32's range"),
    (np.array([1, 2], dtype=object), "Python objects"),
])
def test_to_tensor_leaves_what_would_change_alone(value, note):
    conversion = torchmagic.to_tensor(value)
    assert not conversion.converted and note in conversion.note


def test_to_tensor_on_hostile_objects_runs_none_of_their_code():
    class Sly:
        def __getattribute__(self, name):
            raise RuntimeError("no attributes")

    conversion = torchmagic.to_tensor(Sly())
    assert not conversion.converted and conversion.source == "Sly"


def test_to_tensor_with_requires_grad_says_why_an_integer_tensor_does_not():
    conversion = torchmagic.to_tensor([1, 2], requires_grad=True)
    assert not conversion.tensor.requires_grad and "cannot require grad" in conversion.note


@pytest.mark.parametrize("fault", [ValueError, KeyboardInterrupt])
def test_a_fault_inside_trace_is_recorded_and_leaves_nothing(fault):
    with pytest.raises(fault):
        with torchmagic.trace() as t:
            x = torch.ones(2, requires_grad=True)
            y = x * 2  # noqa: F841 (the trace names it from the locals)
            raise fault("stop")
    assert t.error.startswith(fault.__name__) and [n.name for n in t.nodes] == ["x", "y"]


def test_a_read_trace_keeps_no_tensor_of_the_block_alive():
    """The build is lazy: an unread trace holds the graph it will draw; once read, it lets go."""
    with torchmagic.trace() as t:
        x = torch.ones(2, requires_grad=True)
        y = (x * 2).sum()
        y.backward()
    assert t.nodes  # the first read builds the trace
    refs = [weakref.ref(x), weakref.ref(y)]
    del x, y
    gc.collect()
    assert [r() for r in refs] == [None, None] and torch.equal(t.grad("x"), torch.full((2,), 2.0))


def test_move_namespace_refuses_with_the_objects_name():
    class Broken(torch.nn.Linear):
        def modules(self):
            raise RuntimeError("no modules")

    ns = {"broken": Broken(2, 2), "t": torch.ones(2)}
    with pytest.raises(MoveError, match="broken: RuntimeError: no modules"):
        move_namespace(ns, "meta")
    assert ns["t"].device.type == "cpu"


def test_move_namespace_tolerates_a_namespace_of_strangers():
    ns = {"n": 3, "s": "text", "f": len, "cls": int, "none": None, "arr": np.ones(2), "t": torch.ones(1)}
    report = move_namespace(ns, "meta")
    assert [m.name for m in report.moved] == ["t"] and ns["arr"].dtype == np.float64


def test_last_trace_and_last_conversion_before_anything():
    torchmagic._history.clear()
    torchmagic._last_conversion = None
    assert torchmagic.last_trace() is None and torchmagic.last_conversion() is None
