"""Odd namespaces for %device --move: all or nothing, optimizers kept consistent, hostile objects left alone."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

MODEL = ("import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))\n"
         "opt = torch.optim.Adam(model.parameters())\nmodel(torch.randn(4, 2)).sum().backward()\nopt.step()\n")


def snapshot(ns: dict) -> dict:
    """Where every tensor reachable by name is, and which objects the names hold."""
    where = {}
    for name, value in ns.items():
        if name.startswith("_") or name in ("In", "Out"):
            continue
        if issubclass(type(value), torch.Tensor):
            where[name] = (id(value), str(value.device))
        elif issubclass(type(value), torch.nn.Module):
            where[name] = (id(value), sorted({str(t.device) for t in [*value.parameters(), *value.buffers()]}))
        elif issubclass(type(value), torch.optim.Optimizer):
            try:
                params = [p for group in value.param_groups for p in group["params"]]
            except RuntimeError:  # the hostile one
                where[name] = (id(value), "unreadable")
                continue
            state = sorted(str(v.device) for s in value.state.values() for v in s.values()
                           if isinstance(v, torch.Tensor))
            where[name] = (id(value), [(id(p), str(p.device)) for p in params], state)
    return where


def test_a_bare_tensor_and_its_optimizer_move_together(hostile):
    hostile.run("import torch\nw = torch.ones(3, requires_grad=True)\nopt = torch.optim.SGD([w], lr=0.1, momentum=0.9)\n"
                "(w * 2).sum().backward()\nopt.step()\nalias = w")
    hostile.run("%device meta --move")
    ns = hostile.ns
    w, opt = ns["w"], ns["opt"]
    assert w.device.type == "meta" and w.is_leaf and w.requires_grad and ns["alias"] is w
    assert opt.param_groups[0]["params"][0] is w and list(opt.state) == [w]
    assert opt.state[w]["momentum_buffer"].device.type == "meta"
    text = hostile.displayed()[0]
    assert "w " in text and "opt" in text and "optimizer state" in text
    hostile.run("%device cpu")


def test_a_module_its_buffers_and_adam_state_move_in_place(hostile):
    hostile.run(MODEL + "weight = model[0].weight\nrunning = model[1].running_mean")
    hostile.run("%device meta --move")
    ns = hostile.ns
    assert ns["model"][0].weight is ns["weight"] and ns["weight"].device.type == "meta"
    assert ns["model"][1].running_mean.device.type == "meta"
    state = ns["opt"].state[ns["weight"]]
    assert state["exp_avg"].device.type == "meta" and state["step"].device.type == "cpu"  # Adam keeps step on the CPU
    assert "running  " in hostile.displayed()[0] or "part of a module" in hostile.displayed()[0]
    hostile.run("%device cpu")


def test_an_optimizer_parameter_out_of_reach_is_reported(hostile):
    hostile.run("import torch\nopt = torch.optim.SGD([torch.ones(2, requires_grad=True)], lr=0.1)")
    hostile.run("%device meta --move")
    assert "spans two devices" in hostile.displayed()[0]
    hostile.run("%device cpu")


def test_everything_already_there_moves_nothing(hostile):
    hostile.run("import torch\nt = torch.ones(2)")
    hostile.run("%device cpu --move")
    assert hostile.displayed()[0].startswith("nothing moved to cpu")


HOSTILE_OBJECTS = {
    "getattribute raises": "class Sly:\n    def __getattribute__(self, name):\n        raise RuntimeError('no attributes')\n"
                           "sly = Sly()",
    "__class__ raises": "class Masked:\n    @property\n    def __class__(self):\n        raise RuntimeError('no class')\n"
                        "sly = Masked()",
    "__eq__ and __hash__ raise": "class Proud:\n    def __eq__(self, other):\n        raise RuntimeError('no eq')\n"
                                 "    def __hash__(self):\n        raise RuntimeError('no hash')\nsly = Proud()",
    "__bool__ raises": "class Vague:\n    def __bool__(self):\n        raise RuntimeError('no bool')\nsly = Vague()",
    "a list of tensors": "sly = [torch.ones(2), torch.ones(3)]",
}


@pytest.mark.parametrize("kind", HOSTILE_OBJECTS)
def test_objects_that_are_not_torch_objects_are_never_touched(hostile, kind):
    hostile.run("import torch\nt = torch.ones(2)\n" + HOSTILE_OBJECTS[kind])
    sly = hostile.ns["sly"]
    hostile.run("%device meta --move")
    assert hostile.ns["sly"] is sly and hostile.ns["t"].device.type == "meta"
    hostile.run("%device cpu")


FAILURES = {
    "a module whose modules() raises": "class Broken(torch.nn.Linear):\n    def modules(self):\n"
                                       "        raise RuntimeError('modules() says no')\nbroken = Broken(2, 2)",
    "a tensor subclass that refuses to move": "class Stuck(torch.Tensor):\n    def to(self, *args, **kwargs):\n"
                                              "        raise RuntimeError('cannot move')\n"
                                              "broken = torch.ones(2).as_subclass(Stuck)",
    "an optimizer whose param_groups raise": "class Odd(torch.optim.SGD):\n    @property\n    def param_groups(self):\n"
                                             "        raise RuntimeError('groups say no')\n"
                                             "broken = torch.optim.SGD([torch.ones(1, requires_grad=True)], lr=0.1)\n"
                                             "broken.__class__ = Odd",
}


@pytest.mark.parametrize("kind", FAILURES)
def test_a_failure_anywhere_leaves_everything_where_it_was(hostile, kind):
    hostile.run(MODEL + "w = torch.ones(2, requires_grad=True)\nplain = torch.zeros(3)\n" + FAILURES[kind])
    before = snapshot(hostile.ns)
    line = hostile.usage_error("%device meta --move")
    assert line.startswith("%device --move: broken: RuntimeError") and "nothing moved" in line
    assert "the default device is still cpu" in line and torch.get_default_device() == torch.device("cpu")
    assert snapshot(hostile.ns) == before
    hostile.assert_clean()


def test_out_of_memory_half_way_leaves_everything_where_it_was(hostile, monkeypatch):
    hostile.run(MODEL + "w = torch.ones(2, requires_grad=True)\nopt2 = torch.optim.SGD([w], lr=0.1)\nplain = torch.zeros(3)")
    before = snapshot(hostile.ns)
    real_to = torch.Tensor.to
    calls = {"n": 0}

    def flaky_to(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", flaky_to)
    line = hostile.usage_error("%device meta --move")
    monkeypatch.undo()
    assert "OutOfMemoryError: CUDA out of memory (simulated)" in line
    assert snapshot(hostile.ns) == before and torch.get_default_device() == torch.device("cpu")


@pytest.mark.parametrize("fault", [RuntimeError, KeyboardInterrupt])
def test_a_fault_while_swapping_undoes_every_swap(hostile, monkeypatch, fault):
    hostile.run(MODEL + "w = torch.ones(2, requires_grad=True)\nopt2 = torch.optim.SGD([w], lr=0.1)")
    before = snapshot(hostile.ns)
    real_swap = torch.utils.swap_tensors
    calls = {"n": 0}

    def flaky_swap(a, b):
        calls["n"] += 1
        if calls["n"] == 3:
            raise fault("swap failed (simulated)")
        real_swap(a, b)

    monkeypatch.setattr(torch.utils, "swap_tensors", flaky_swap)
    line = hostile.usage_error("%device meta --move")
    monkeypatch.undo()
    assert ("interrupted" in line) if fault is KeyboardInterrupt else ("every swap was undone" in line)
    assert snapshot(hostile.ns) == before and torch.get_default_device() == torch.device("cpu")


def test_an_interrupt_while_planning_moves_nothing(hostile, monkeypatch):
    hostile.run(MODEL)
    before = snapshot(hostile.ns)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.Tensor, "to", interrupted)
    line = hostile.usage_error("%device meta --move")
    monkeypatch.undo()
    assert line == "%device --move interrupted: nothing moved and the default device is still cpu"
    assert snapshot(hostile.ns) == before


def test_names_ipython_owns_are_left_alone(hostile):
    hostile.run("import torch\nt = torch.ones(2)\nt")  # Out[N], _, _N hold it too
    hostile.run("%device meta --move")
    assert hostile.ns["t"].device.type == "meta" and hostile.ns["_"].device.type == "cpu"
    hostile.run("%device cpu")


def test_a_non_leaf_keeps_its_graph(hostile):
    hostile.run("import torch\nx = torch.ones(2, requires_grad=True)\ny = x * 3")
    hostile.run("%device meta --move")
    ns = hostile.ns
    assert ns["y"].device.type == "meta" and ns["y"].grad_fn is not None and ns["x"].is_leaf
    hostile.run("%device cpu")


def test_moving_to_meta_says_the_values_are_gone(hostile):
    hostile.run("import torch\nt = torch.ones(2)")
    hostile.run("%device meta --move")
    assert "meta tensors keep shapes and dtypes only" in hostile.displayed()[0]
    hostile.run("%device cpu")


def test_a_failed_move_keeps_none_of_what_it_allocated(hostile, monkeypatch):
    """IPython keeps the last error (for %debug): it must not keep the copies a failed move made (GPU memory)."""
    hostile.run(MODEL + "w = torch.ones(2, requires_grad=True)")
    real_to = torch.Tensor.to
    copies = []

    def recording_to(self, *args, **kwargs):
        if len(copies) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        copy = real_to(self, *args, **kwargs)
        copies.append(weakref.ref(copy))
        return copy

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    hostile.usage_error("%device meta --move")
    monkeypatch.undo()
    gc.collect()
    assert len(copies) == 4 and [ref() for ref in copies] == [None] * 4
