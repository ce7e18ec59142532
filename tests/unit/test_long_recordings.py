"""A recording around a long loop holds what it shows, not every step: fresh leaves made each step
die with the step, hooked nodes of freed graphs are let go, norms are read back as floats in
batches, and the norms and counts that are shown stay exact."""

from __future__ import annotations

import gc
import math
import weakref

import torch

import torchmagic
from torchmagic.trace.forward import COMPACT_AT


def test_fresh_leaves_of_each_step_are_not_kept_alive():
    torch.manual_seed(0)
    w = torch.randn(4, requires_grad=True)
    first = None
    with torchmagic.trace() as t:
        recorder = t._recorder
        for _step in range(3000):
            x = torch.randn(4, requires_grad=True)  # a fresh leaf each step (an adversarial input, say)
            if first is None:
                first = weakref.ref(x)
            (w * x).sum().backward()
        gc.collect()
        assert first() is None  # the first step's leaf died with its step
        assert len(recorder.leaves) < 2100  # dead entries let go as the table grows
        assert len(recorder.ledger.history) < 2100
    assert torch.allclose(t.grad("w"), x.detach())  # the last pass: d(w*x)/dw = x
    assert torch.allclose(w.grad, sum_of_inputs(3000, seed=0))


def sum_of_inputs(steps: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    torch.randn(4)
    return sum(torch.randn(4) for _ in range(steps))


def test_norm_history_is_exact_and_read_back_as_floats():
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 2)
    expected = []
    with torchmagic.trace() as t:
        ledger = t._recorder.ledger
        for _step in range(1500):  # 1500 passes x 2 parameters: read back in batches of 1024
            model.zero_grad()
            model(torch.randn(5, 3)).pow(2).sum().backward()
            expected.append(model.weight.grad.norm().item())
        weight_history = ledger.history[id(model.weight)][1]
        assert len(weight_history.pending) < 600  # most norms already plain floats (2 x 1024 read back)
    history = dict(t.grad_history["model.weight"])
    assert len(history) == 1500
    assert all(math.isclose(history[i], expected[i], rel_tol=1e-5) for i in range(1500))


def test_hooked_nodes_are_known_by_number_and_not_held():
    torch.manual_seed(2)
    w = torch.randn(3, requires_grad=True)
    seen = []
    with torchmagic.trace() as t:
        recorder = t._recorder
        for step in range(200):
            h = w * (step + 1)
            h.register_hook(lambda g: seen.append(g.clone()))
            h.sum().backward()
        assert len(recorder.hooked) == 200 and all(type(seq) is int for seq in recorder.hooked)  # no node held
        h = w * 2
        h.register_hook(lambda g: g * 10)  # a hook that changes what flows on
        h.retain_grad()  # what PyTorch itself keeps for h, to check the trace against
        h.sum().backward(retain_graph=True)
        h.sum().backward()
    assert len(seen) == 200
    assert torch.equal(t.grad("h"), h.grad / 2)  # what flowed on from h in the last pass (h.grad: both)
    assert torch.equal(t.grad("h"), torch.full((3,), 10.0))
    assert torch.equal(w.grad, torch.full((3,), 200.0 * 201 / 2 + 40.0))


def test_the_forward_log_moves_into_arrays_and_still_attributes_every_op():
    torch.manual_seed(3)
    w = torch.randn(4, requires_grad=True)
    with torchmagic.trace() as t:
        log = t._recorder.log
        for _ in range(6000):  # 18000 ops over 6000 passes: past COMPACT_AT
            h = torch.tanh(w * 2)
            h.sum().backward()
        assert len(log.op_start) == 18000 and len(log.op_start.old) >= COMPACT_AT  # compacted between passes
        assert len(log.op_start.recent) < COMPACT_AT
    assert [n.op for n in t.nodes if n.kind != "leaf"] == ["mul", "tanh", "sum"]
    assert t.node("h").source.text.strip() == "h = torch.tanh(w * 2)"


def test_int_log_bisects_as_a_list_does():
    from bisect import bisect_right

    from torchmagic.trace.forward import IntLog

    values = sorted(torch.randint(0, 500, (300,), generator=torch.Generator().manual_seed(4)).tolist())
    log = IntLog()
    for i, value in enumerate(values):
        log.append(value)
        if i in (50, 51, 200):  # compacted part-way, as between passes
            log.compact()
    assert list(log) == values and len(log) == len(values) and [log[k] for k in range(300)] == values
    for probe in range(-1, 502):
        assert log.bisect(probe) == bisect_right(values, probe)
