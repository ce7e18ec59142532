"""The assertions on a Trace: they pass on healthy code and explain, from the graph, what failed."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import torchmagic


def mlp(hidden: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def message(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value)


def test_healthy_model_passes_every_check():
    model = mlp()
    x = torch.randn(16, 4)
    with torchmagic.trace() as t:
        loss = model(x).pow(2).mean()
        loss.backward()
    t.assert_gradients_flow(model)
    t.assert_gradients_flow()  # every leaf and parameter of the trace
    t.assert_gradients_flow(model[0].weight, model[2].bias)
    t.assert_gradients_flow("model.0.weight")
    t.assert_finite()
    t.assert_grad_norm(model, max=100.0, min=1e-6)


def test_a_layer_cut_off_by_detach_is_named():
    model = mlp()
    x = torch.randn(16, 4)
    with torchmagic.trace() as t:
        h = model[0](x).detach()
        loss = model[2](torch.relu(h)).pow(2).mean()
        loss.backward()
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(model)
    text = message(excinfo)
    assert text.startswith("gradients did not flow to 2 of 4 parameters of model:")
    assert "  model.0.weight (8, 4): no gradient:" in text and "  model.0.bias (8,): no gradient:" in text
    assert "model.2.weight (1, 8):" not in text.split("what the trace shows:")[0]
    # the text view under it shows the part that did get gradients
    assert "what the trace shows:\n  autograd trace · " in text and "model.2.weight  =  parameter" in text


def test_a_layer_cut_off_by_detach_names_the_detach_and_its_line():
    model = mlp()
    x = torch.randn(16, 4)
    with torchmagic.trace() as t:
        h = model[0](x)
        h = h.detach()
        model[2](torch.relu(h)).sum().backward()
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(model)
    assert "model.0.weight (8, 4): no gradient: cut off by .detach()" in message(excinfo)
    assert re.search(r"test_checks.py, line \d+: h = h.detach\(\)", message(excinfo))


def test_a_leaf_used_only_through_detach_or_no_grad_says_so():
    with torchmagic.trace() as t:
        w = torch.ones(3, requires_grad=True)
        v = torch.ones(3, requires_grad=True)
        u = torch.ones(3, requires_grad=True)
        with torch.no_grad():
            scaled = v * 2
        (w.detach() * 3 + scaled + u).sum().backward()
    t.assert_gradients_flow(u)
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow("w", "v", "u")
    text = message(excinfo)
    assert text.startswith("gradients did not flow to 2 of 3 tensors (w, v, u):")
    # the line shown is the one with the .detach()
    assert re.search(r"  w \(3,\): no gradient: used only through .detach\(\)\n      test_checks.py, line \d+: "
                     r"\(w.detach\(\) \* 3", text)
    assert "  v (3,): no gradient: used only under torch.no_grad()" in text
    assert "u (3,)" not in text.split("what the trace shows:")[0]
    # a tensor without .grad is told by its shape, when that says which
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(w)
    assert "note: the trace has 2 leaves of shape (3,) without a gradient (w, v): pass names" in message(excinfo)


def test_a_submodule_never_used_in_the_forward_is_named():
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": nn.Linear(4, 4), "aux_head": nn.Linear(4, 2)})
    with torchmagic.trace() as t:
        model["body"](torch.randn(2, 4)).sum().backward()
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(model)
    text = message(excinfo)
    assert "  model.aux_head.weight (2, 4): no gradient: not in the graph that backward went through" in text
    assert "model.body.weight" not in text.split("what the trace shows:")[0]


def test_dead_relu_gives_exactly_zero_gradients_and_is_found():
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every hidden unit is negative: the ReLU passes nothing back
    x = torch.randn(5, 4)
    with torchmagic.trace() as t:
        loss = model(x).sum()
        loss.backward()
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(model)
    text = message(excinfo)
    assert text.startswith("gradients did not flow to 3 of 4 parameters of model:")
    assert "  model.0.weight (8, 4): gradient exactly zero (all 32 elements)\n" in text
    assert re.search(r"\n      the gradient stops at relu\(%4\) at test_checks.py, line \d+: loss = model\(x\).sum\(\)\n", text)
    assert "relu passes gradient only where its input was > 0, and it was nowhere that mattered (a dead ReLU)" in text
    # the next layer's weight multiplies the dead ReLU's zero output
    assert "  model.2.weight (1, 8): gradient exactly zero (all 8 elements)" in text
    assert "what it multiplies, relu(%4), passed no gradient back either: a dead ReLU" in text
    assert "model.2.bias (1,):" not in text.split("what the trace shows:")[0]


def test_max_zero_fraction_counts_dead_units():
    model = mlp()
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # half the hidden units dead
    x = torch.randn(5, 4)
    with torchmagic.trace() as t:
        model(x).sum().backward()
    t.assert_gradients_flow(model)  # not all zero: passes without a limit
    t.assert_gradients_flow(model[0], max_zero_fraction=0.6)
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(model[0], max_zero_fraction=0.25)
    text = message(excinfo)
    assert "  model.0.weight (8, 4): 50% of its gradient is exactly zero (16 of 32 elements), more than " \
           "max_zero_fraction=0.25\n      4 of 8 rows are entirely zero" in text
    assert "  model.0.bias (8,): 50% of its gradient is exactly zero (4 of 8 elements)" in text
    with pytest.raises(ValueError, match="between 0 and 1"):
        t.assert_gradients_flow(model, max_zero_fraction=2)


def test_max_zero_fraction_says_when_only_statistics_were_kept():
    model = mlp()
    with torchmagic.trace(memory_budget=0) as t:  # past the budget: an intermediate keeps its norm alone
        h = model[0](torch.randn(5, 4))
        model[2](model[1](h)).sum().backward()
    with pytest.raises(AssertionError, match="cannot count the zero elements of its gradient: only its statistics"):
        t.assert_gradients_flow("h", max_zero_fraction=0.5)


def test_nan_from_sqrt_of_zero_names_sqrt_and_its_line():
    with torchmagic.trace() as t:
        a = torch.tensor([0.0, 1.0], requires_grad=True)
        s = torch.sqrt(a)
        y = (s * 0).sum()
        y.backward()
    with pytest.raises(AssertionError) as excinfo:
        t.assert_finite()
    text = message(excinfo)
    assert text.startswith("gradients are not finite:\n  a (2,): the first NaN/Inf gradient: [nan, 0] (1 NaN of 2 elements)")
    assert re.search(r"\n      it came out of the backward of s = sqrt\(a\) at test_checks.py, line \d+: s = torch.sqrt\(a\)\n", text)
    assert "      fed by the gradient of s, which was finite: [0, 0]\n" in text
    assert "1/(2*sqrt(x)), is infinite at x == 0" in text
    assert "    a   =  tensor   (2,) float32  FIRST NaN/Inf" in text  # the text view's rows
    with pytest.raises(AssertionError, match=r"a \(2,\): gradient not finite \(1 NaN of 2 elements\)"):
        t.assert_gradients_flow(a)


def test_healthy_sqrt_is_finite():
    with torchmagic.trace() as t:
        a = torch.tensor([1.0, 4.0], requires_grad=True)
        torch.sqrt(a).sum().backward()
    t.assert_finite()
    t.assert_gradients_flow(a)


def test_finite_check_without_backward_fails_instead_of_passing():
    with torchmagic.trace() as t:
        a = torch.ones(2, requires_grad=True)
        _ = a * 2
    with pytest.raises(AssertionError, match="no gradient to check: backward was never called"):
        t.assert_finite()
    with pytest.raises(AssertionError, match="no gradient: backward not called yet"):
        t.assert_gradients_flow(a)


def test_nan_in_an_earlier_pass_of_a_loop_is_reported():
    w = torch.zeros(2, requires_grad=True)
    with torchmagic.trace() as t:
        for step in range(3):
            w.grad = None
            torch.sqrt(w + step).sum().backward()  # sqrt at 0 on the first pass only
    assert t.node("w").grad.finite  # the graph shown is the last pass's
    with pytest.raises(AssertionError) as excinfo:
        t.assert_finite()
    assert "  w: its gradient norm was inf in backward pass 1 of 3 (1 such pass;" in message(excinfo)


def test_grad_norm_bounds_name_the_largest_contributors():
    model = mlp()
    x = torch.randn(16, 4) * 100
    with torchmagic.trace() as t:
        model(x).pow(2).mean().backward()
    norms = {name: p.grad.norm().item() for name, p in model.named_parameters()}
    total = sum(n ** 2 for n in norms.values()) ** 0.5
    t.assert_grad_norm(model, max=total * 1.01, min=total * 0.99)
    with pytest.raises(AssertionError) as excinfo:
        t.assert_grad_norm(model, max=1.0)
    text = message(excinfo)
    assert text.startswith(f"gradient norms out of bounds:\n  model: gradient norm {total:.4g}, above max=1\n")
    largest = max(norms, key=norms.get)
    assert text.split("\n")[2] == f"      model.{largest} {tuple(model.get_parameter(largest).shape)}: norm {norms[largest]:.4g}"
    with pytest.raises(AssertionError, match=r"model.0.bias: gradient norm .*, below min=1e\+06"):
        t.assert_grad_norm("model.0.bias", min=1e6)
    with pytest.raises(ValueError, match="needs max=, min= or both"):
        t.assert_grad_norm(model)


def test_grad_norm_of_a_module_that_got_no_gradient_fails():
    model = mlp()
    with torchmagic.trace() as t:
        h = model[0](torch.randn(2, 4)).detach()
        model[2](h).sum().backward()
    with pytest.raises(AssertionError, match="no gradient reached it, so it has no norm"):
        t.assert_grad_norm(model[0], max=10.0)


def test_two_alike_modules_are_told_apart_by_their_grad():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)  # same parameter names and shapes
    x = torch.randn(3, 4)
    with torchmagic.trace() as t:
        (a(x) + 0 * b(x)).sum().backward()
    t.assert_gradients_flow(a)
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(b)
    text = message(excinfo)
    assert text.startswith("gradients did not flow to 2 of 2 parameters of b:\n  b.weight (4, 4): gradient exactly zero")


def test_a_module_absent_from_the_trace_is_not_taken_for_one_alike():
    torch.manual_seed(0)
    used, unused = nn.Linear(4, 4), nn.Linear(4, 4)
    with torchmagic.trace() as t:
        used(torch.randn(3, 4)).sum().backward()
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(unused)  # used.weight looks like unused.weight, but unused has no .grad
    text = message(excinfo)
    assert text.startswith("gradients did not flow to 2 of 2 parameters of the Linear given:")
    assert "  weight (4, 4): no gradient: not in the graph that backward went through" in text
    assert "note: used in the trace has parameters like these that did get gradients" in text


def test_names_that_cannot_be_checked_say_why():
    model = mlp()
    with torchmagic.trace() as t:
        model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="'model' is a module path, not a tensor: pass the module itself"):
        t.assert_gradients_flow("model")
    with pytest.raises(AssertionError, match="nothing named 'model.9.weight' took part in this trace"):
        t.assert_gradients_flow("model.9.weight")
    with pytest.raises(TypeError, match="cannot check int"):
        t.assert_gradients_flow(3)


def test_a_big_trace_shows_only_the_rows_concerned():
    with torchmagic.trace(fold=False) as t:
        x = torch.ones(3, requires_grad=True)
        frozen = torch.ones(3, requires_grad=True)
        with torch.no_grad():
            offset = frozen * 2
        h = x
        for _ in range(60):
            h = h * 1.01
        (h + offset).sum().backward()
    t.max_rows = 500  # every row, unfolded: a long text view
    assert len(t.text().splitlines()) > 60
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow()
    shown = message(excinfo).split("what the trace shows:\n")[1].splitlines()
    assert shown[0].startswith("  autograd trace · ")
    assert any(line.strip().startswith("frozen  (3,)  used only under torch.no_grad()") for line in shown)
    assert len(shown) < 10 and not any("mul(" in line for line in shown)


def test_a_module_reached_through_an_attribute_is_matched_by_its_grad():
    class Trainer:
        def __init__(self):
            torch.manual_seed(0)
            self.model = nn.Linear(3, 2)
            self.frozen_head = nn.Linear(2, 2)

        def step(self):
            with torchmagic.trace() as t:  # the namespace holds `self`, not the modules: no names
                out = self.model(torch.randn(4, 3))
                self.frozen_head(out.detach()).sum().backward()
            return t

    trainer = Trainer()
    t = trainer.step()
    t.assert_gradients_flow(trainer.frozen_head)
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(trainer.model)
    text = message(excinfo)
    assert "  weight (2, 3): no gradient: not reachable from the output" in text
    assert "  bias (2,): no gradient: not reachable from the output" in text


def test_a_module_the_trace_cannot_name_says_why():
    class Box:
        pass

    box = Box()  # modules reached through an attribute of a plain object: the trace cannot name them
    box.first, box.second = nn.Linear(3, 3), nn.Linear(3, 3)
    with torchmagic.trace() as t:
        h = box.first(torch.randn(2, 3)).detach()
        box.second(h).sum().backward()
    t.assert_gradients_flow(box.second)
    with pytest.raises(AssertionError) as excinfo:
        t.assert_gradients_flow(box.first)
    assert "  weight (3, 3): no gradient: not in the graph that backward went through" in message(excinfo)
    assert "note: the trace has 2 leaves without a name" in message(excinfo)


def test_nothing_to_check_fails_instead_of_passing():
    with torchmagic.trace() as t:
        torch.ones(2) * 2
    with pytest.raises(AssertionError, match="nothing to check: the trace has no leaf or parameter"):
        t.assert_gradients_flow()
    with pytest.raises(AssertionError, match="nothing to check"):
        t.assert_grad_norm(max=1.0)
