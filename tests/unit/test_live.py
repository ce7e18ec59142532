"""--stop-on-nan and the live view, in the core (no IPython): where a loop's NaN first appears,
and a view that stays current while the loop runs without refreshing more often than asked."""

from __future__ import annotations

import pytest
import torch

import torchmagic
from torchmagic.errors import NonFiniteGradient
from torchmagic.trace.live import LiveView


def _loop_with_a_nan_at(step_with_nan: int, steps: int = 60):
    """A loop whose loss goes through sqrt(d) with d == 0 exactly at ``step_with_nan``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    xb = torch.randn(8, 3)
    for step in range(steps):
        model.zero_grad()
        energy = model(xb).pow(2).mean()
        d = energy - energy.detach() if step == step_with_nan else energy
        s = torch.sqrt(d)
        loss = s * 2
        loss.backward()
        yield step


def test_stop_on_nan_stops_at_the_first_pass_with_one_and_names_the_op_and_line():
    steps = []
    with pytest.raises(NonFiniteGradient) as raised:
        with torchmagic.trace(stop_on_nan=True) as t:
            for step in _loop_with_a_nan_at(37):
                steps.append(step)
    assert steps[-1] == 36  # step 37's backward raised
    message = str(raised.value)
    assert message.startswith("backward pass 38 ")
    assert "backward of sqrt" in message and "s = torch.sqrt(d)" in message
    assert "fed by the gradient of" in message and "infinite at x == 0" in message
    assert t.error is not None and len(t.passes) == 38


def _loop_with_sqrt_zero_times_zero(step_with_nan: int, steps: int = 8):
    """NaN (not Inf) first: the gradient of s is 0, and sqrt's backward multiplies it by 1/(2*sqrt(0))."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    xb = torch.randn(8, 3)
    for step in range(steps):
        model.zero_grad()
        energy = model(xb).pow(2).mean()
        d = energy - energy.detach() if step == step_with_nan else energy
        s = torch.sqrt(d)
        loss = s * 0 + energy
        loss.backward()


def test_stop_on_nan_finds_the_op_detect_anomaly_finds():
    with pytest.raises(RuntimeError) as anomaly:
        with torch.autograd.detect_anomaly(check_nan=True):
            _loop_with_sqrt_zero_times_zero(5)
    with pytest.raises(NonFiniteGradient) as ours:
        with torchmagic.trace(stop_on_nan=True):
            _loop_with_sqrt_zero_times_zero(5)
    assert "SqrtBackward0" in str(anomaly.value)
    assert "backward of sqrt" in str(ours.value) and "s = torch.sqrt(d)" in str(ours.value)


def test_without_stop_on_nan_the_loop_runs_on():
    with torchmagic.trace() as t:
        steps = list(_loop_with_a_nan_at(3, steps=6))
    assert steps == list(range(6)) and len(t.passes) == 6


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_live_view_refreshes_at_most_every_interval_and_follows_the_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xb, yb = torch.randn(16, 4), torch.randn(16, 1)
    clock = Clock()
    published = []
    losses = []
    with torchmagic.trace() as t:
        view = LiveView(t._recorder, lambda v: published.append(v.text()), interval=1.0, clock=clock,
                        names=lambda: {"model": model})
        for _ in range(40):
            clock.now += 0.1  # 10 passes a second: a refresh every 10 passes
            opt.zero_grad()
            loss = (model(xb) - yb).pow(2).mean()
            losses.append(loss.item())
            loss.backward()
            opt.step()
        view.refresh()
    view.detach()
    assert len(published) == 5  # passes 1, 11, 21, 31, then the final refresh
    assert view.passes == 40 and view.losses == pytest.approx(losses)
    assert set(view.module_norms) == {"model.0", "model.2"}
    expected = [norm for _, norm in t.grad_history["model.2.weight"]]
    bias = [norm for _, norm in t.grad_history["model.2.bias"]]
    assert view.module_norms["model.2"] == pytest.approx([(w * w + b * b) ** 0.5 for w, b in zip(expected, bias)])
    assert "40 backward passes" in published[-1] and "no NaN/Inf" in published[-1]
    assert "<svg" in view.html()


def test_a_fresh_leaf_that_takes_a_dead_leafs_id_is_plotted_every_step():
    """CPython often gives a new leaf the id of one that died; the ledger then starts a new norm
    history under that id, and the view must count it from its start. (Which ids are reused is up
    to the allocator, so the reuse is made here: the second leaf's history is moved to the first's id.)"""
    with torchmagic.trace() as t:
        recorder = t._recorder
        view = LiveView(recorder, lambda v: None, interval=1e9, names=lambda: {})  # refreshed here only
        first = recorder.bind("z", torch.full((4,), 1.0, requires_grad=True))  # as the cell binder does
        (first * 1.0).sum().backward()
        view.refresh()
        second = recorder.bind("z", torch.full((4,), 2.0, requires_grad=True))
        (second * 3.0).sum().backward()
        recorder.ledger.norms(recorder.passes[-1])  # its norm taken, as a refresh would
        histories = recorder.ledger.history
        histories[id(first)] = histories.pop(id(second))  # what the ledger does when an id is reused
        view.refresh()
    view.detach()
    assert view.module_norms["z"] == pytest.approx([2.0, 6.0])
