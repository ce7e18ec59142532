"""The trace core, without IPython: graph, names, gradients, reasons, hooks removed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from graphs import seed

import torchmagic
from torchmagic.trace.stats import PendingSummary, summarize, summarize_many


def test_seed_example_gives_the_textbook_gradients():
    t, x, y, z, out = seed()
    assert torch.equal(t.grad("y"), torch.full((2, 2), 4.5))
    assert torch.equal(t.grad("z"), torch.full((2, 2), 0.25))
    assert t.grad("out").item() == 1.0
    assert torch.equal(t.grad("x"), torch.full((2, 2), 4.5))
    assert torch.equal(x.grad, torch.full((2, 2), 4.5))
    # PyTorch's own view is untouched: a non-leaf keeps no grad and retains none
    assert not y.retains_grad and not z.retains_grad
    names = [n.name for n in t.nodes]
    assert names == ["x", "y", None, "z", "out"]
    assert t.node("out").is_output and not t.node("y").is_output
    assert t.node("z").grad.values == [[0.25, 0.25], [0.25, 0.25]]


def test_data_flow_order_and_inputs():
    t, *_ = seed()
    by_name = {n.name: n for n in t.nodes}
    assert [t.nodes[i].name for i in by_name["out"].inputs] == ["z"]
    mul = t.nodes[2]
    assert mul.op == "mul" and [t.nodes[i].name for i in mul.inputs] == ["y", "y"]  # y used twice
    assert by_name["x"].kind == "leaf" and by_name["x"].op == "ones"


def test_unknown_name_lists_known_names():
    t, *_ = seed()
    with pytest.raises(KeyError, match="known names: x, y, z, out"):
        t.grad("w")


def test_source_lines_point_at_the_users_code():
    t, *_ = seed()
    assert t.node("z").source.text == "z = y * y * 3"
    assert t.node("y").source.line + 1 == t.node("z").source.line


def test_results_identical_to_an_untraced_run():
    def run(traced: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        x = torch.randn(4, 8)
        if traced:
            with torchmagic.trace():
                model(x).pow(2).mean().backward()
        else:
            model(x).pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for plain, traced in zip(run(False), run(True)):
        assert torch.equal(plain, traced)


def test_parameters_are_named_by_module_path():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(2, 3)
    with torchmagic.trace() as t:
        loss = model(x).sum()
        loss.backward()
    params = {n.name: n for n in t.nodes if n.kind == "param"}
    assert set(params) == {"model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"}
    assert torch.equal(t.grad("model.0.weight"), model[0].weight.grad)
    linear_ops = [n for n in t.nodes if n.op == "linear"]
    assert [n.module for n in linear_ops] == ["model.0", "model.2"]


def test_retain_graph_twice_shows_each_pass_and_the_accumulated_grad_apart():
    with torchmagic.trace() as t:
        x = torch.ones(3, requires_grad=True)
        y = x * 2
        out = y.sum()
        out.backward(retain_graph=True)
        out.backward()
    assert len(t.passes) == 2 and not t.structure_changed
    # what flowed in each pass; PyTorch's .grad holds the sum, shown apart and labelled
    assert torch.equal(t.grad("y"), torch.ones(3))
    assert torch.equal(t.grad("x"), torch.full((3,), 2.0))
    assert torch.equal(t.grad("x", pass_index=0), torch.full((3,), 2.0))
    assert t.node("x").leaf_grad.values == [4.0, 4.0, 4.0] and torch.equal(x.grad, torch.full((3,), 4.0))
    assert "sum over the 2 passes" in t.node("x").leaf_grad_note


def test_autograd_grad_gives_leaf_and_intermediate_gradients():
    with torchmagic.trace() as t:
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        y = x**2
        out = y.sum()
        (gx,) = torch.autograd.grad(out, x)
    assert torch.equal(t.grad("x"), gx)
    assert torch.equal(t.grad("y"), torch.ones(2))
    assert x.grad is None


def test_multi_output_ops_keep_one_gradient_per_output():
    with torchmagic.trace() as t:
        x = torch.arange(4.0, requires_grad=True)
        a, b = torch.split(x, 2)
        out = (a * 3).sum() + (b * 5).sum()
        out.backward()
    assert t.node("a").op_id == t.node("b").op_id
    assert (t.node("a").output_nr, t.node("b").output_nr) == (0, 1)
    assert torch.equal(t.grad("a"), torch.full((2,), 3.0))
    assert torch.equal(t.grad("b"), torch.full((2,), 5.0))


def test_unused_output_of_unbind_has_no_gradient():
    with torchmagic.trace() as t:
        x = torch.ones(3, 2, requires_grad=True)
        first, second, third = x.unbind(0)
        out = (first * 2).sum()
        out.backward()
    assert torch.equal(t.grad("first"), torch.full((2,), 2.0))
    assert torch.equal(t.grad("x")[1], torch.zeros(2))


def test_in_place_op_is_recorded_under_its_name():
    with torchmagic.trace() as t:
        x = torch.ones(2, requires_grad=True)
        y = x * 2
        y.add_(1)
        out = y.sum()
        out.backward()
    assert t.node("y").op == "add_"
    assert torch.equal(t.grad("x"), torch.full((2,), 2.0))


def test_reasons_for_missing_gradients():
    with torchmagic.trace() as t:
        used = torch.ones(2, requires_grad=True)
        unused = torch.ones(2, requires_grad=True)  # noqa: F841 - the trace names it
        frozen = torch.ones(2, requires_grad=True)
        cut = torch.ones(2, requires_grad=True)
        with torch.no_grad():
            _ = frozen * 2
        d = cut.detach() * 3
        out = (used * 2).sum() + d.sum()
        out.backward()
    reasons = {m.name: m.reason for m in t.missing}
    assert reasons == {
        "unused": "not reachable from the output",
        "frozen": "used only under torch.no_grad()",
        "cut": "used only through .detach()",
    }


def test_graph_without_backward_shows_no_gradients_and_says_why():
    with torchmagic.trace() as t:
        x = torch.ones(2, requires_grad=True)
        out = (x * 2).sum()
    assert [n.name for n in t.nodes] == ["x", None, "out"]
    assert all(n.grad is None for n in t.nodes)
    assert t.node("x").missing_reason == "backward not called yet"
    assert "no backward yet" in t.text()
    # a later trace that only calls backward shows the gradients on the same graph
    with torchmagic.trace() as t2:
        out.backward()
    assert torch.equal(t2.grad("x"), torch.full((2,), 2.0))
    assert t2.grad("out").item() == 1.0


def test_first_nonfinite_gradient_is_marked_as_origin():
    with torchmagic.trace() as t:
        x = torch.tensor([0.0, 1.0], requires_grad=True)
        r = torch.sqrt(x)
        s = r * 2
        out = s.sum()
        out.backward()
    origin = t.nonfinite_origin
    assert origin is not None and origin.name == "x"
    assert origin.grad.inf_count == 1 and t.node("s").grad.finite
    assert "FIRST NaN/Inf" in t.text()
    assert "#ff9a9a" in t.to_dot()


def test_nan_in_an_intermediate_gradient_marks_where_it_appears():
    with torchmagic.trace() as t:
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        h = x * 0
        y = torch.log(h)
        m = y * 0  # forward nan*0 -> nan grad flows as 0*inf
        out = m.sum()
        out.backward()
    origin = t.nonfinite_origin
    assert origin is not None
    # y's gradient is finite (zeros), the log's backward makes h's gradient non-finite
    assert t.node("y").grad.finite and origin.name == "h"


def test_hooks_are_removed_and_gradients_released_after_the_trace():
    with torchmagic.trace() as t:
        x = torch.ones(2, requires_grad=True)
        y = x * 3
        out = y.sum()
        out.backward(retain_graph=True)
    engine = torch.autograd.graph._engine_run_backward
    assert engine.__module__ == "torch.autograd.graph" and torch.autograd._engine_run_backward is engine
    assert y.grad_fn.metadata == {}  # nothing was written onto the graph
    out.backward()  # outside the trace: nothing is recorded
    assert torch.equal(t.grad("y"), torch.ones(2))
    assert len(t.passes) == 1


def test_past_the_memory_budget_a_gradient_keeps_its_norm_only():
    with torchmagic.trace(memory_budget=0) as t:
        x = torch.ones(10, requires_grad=True)
        y = x * 2
        y.sum().backward()
    summary = t.node("y").grad
    assert summary.norm_only and summary.norm == pytest.approx(10 ** 0.5) and summary.finite
    assert "grad norm 3.162  (over the memory budget: only its norm was kept)" in t.text()
    row = next(line for line in t.text().splitlines() if line.startswith("  y     (10,)"))
    assert row.split()[:6] == ["y", "(10,)", "3.162", "0", "0", "test_trace.py,"]  # mean, min, max left blank
    with pytest.raises(LookupError, match="memory budget"):
        t.grad("y")
    # a leaf's gradient is its .grad: keeping it costs nothing, so the budget does not drop it
    assert torch.equal(t.grad("x"), torch.full((10,), 2.0))


def test_past_the_memory_budget_a_half_precision_norm_does_not_overflow():
    """A float16 gradient's norm past 65504 is finite: taken in float32, not reported as Inf."""
    with torchmagic.trace(memory_budget=0) as t:
        x = torch.ones(100_000, dtype=torch.float16, requires_grad=True)
        y = x * 1
        (y * 300).sum().backward()
    expected = torch.linalg.vector_norm(torch.full((100_000,), 300.0)).item()  # 94868.3, past float16's range
    summary = t.node("y").grad
    assert summary.norm_only and summary.finite and summary.norm == pytest.approx(expected, rel=1e-3)
    assert t.nonfinite_origin is None and "NaN/Inf" not in t.text().split("gradients:")[0]


def test_past_the_memory_budget_a_nan_still_shows():
    with torchmagic.trace(memory_budget=0) as t:
        x = torch.tensor([0.0, 1.0], requires_grad=True)
        s = torch.sqrt(x)
        (s * 1).sum().backward()
    assert not t.node("x").grad.finite and t.nonfinite_origin.name == "x"


@pytest.mark.parametrize("values", [
    [1.0, -2.0, 3.0, 0.5] * 10,
    [1.0, float("nan"), float("inf"), -float("inf"), 2.0] * 4,
    [3.0e38, 3.0e38, -1.0],  # the sum overflows though every value is finite
    [],
    [2.5],
])
def test_statistics_past_the_budget_match_the_kept_ones(values):
    """Past the budget, statistics are taken in the hook; they must equal those of a kept gradient."""
    grad = torch.tensor(values, dtype=torch.float32)
    kept = summarize(grad, small_values=4)
    hooked = PendingSummary(grad, small_values=4).resolve()
    assert (hooked.shape, hooked.numel, hooked.nan_count, hooked.inf_count) == (
        kept.shape, kept.numel, kept.nan_count, kept.inf_count)
    assert hooked.values == kept.values
    for field in ("mean", "min", "max", "norm"):
        a, b = getattr(hooked, field), getattr(kept, field)
        assert (a != a and b != b) or a == pytest.approx(b, rel=1e-6), field


def test_large_gradients_show_statistics_not_values():
    with torchmagic.trace(small_values=4) as t:
        x = torch.ones(100, requires_grad=True)
        y = x * 2
        y.sum().backward()
    summary = t.node("x").grad
    assert summary.values is None and summary.mean == 2.0 and summary.norm == pytest.approx(20.0)
    assert "mean 2  min 2  max 2  norm 20" in t.text()


def test_loop_rebinding_labels_every_step():
    with torchmagic.trace() as t:
        x = torch.ones(2, requires_grad=True)
        h = x
        for _ in range(3):
            h = torch.tanh(h)
        h.sum().backward()
    # the API names by the frame's final bindings; every step of the loop is still drawn
    assert [n.op for n in t.nodes] == ["ones", "tanh", "tanh", "tanh", "sum"]
    assert t.node("x").kind == "leaf"


def test_an_exception_inside_the_block_still_gives_a_trace_and_cleans_up():
    with pytest.raises(ZeroDivisionError):
        with torchmagic.trace() as t:
            x = torch.ones(2, requires_grad=True)
            y = x * 2  # noqa: F841 - the trace names it
            1 / 0  # noqa: B018 - the error is the point
    assert t.error.startswith("ZeroDivisionError")
    assert [n.name for n in t.nodes] == ["x", "y"]


def test_core_does_not_import_ipython():
    code = "import sys, torchmagic, torchmagic.trace, torchmagic.render.dot, torchmagic.render.text; " \
           "print('IPython' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_training_loop_keeps_one_graph_and_a_norm_per_pass_for_each_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data, target = torch.randn(16, 3), torch.randn(16, 1)
    with torchmagic.trace() as t:
        for _ in range(30):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(data), target)
            loss.backward()
            optimizer.step()
    assert len(t.passes) == 30 and not t.structure_changed
    assert "30 backward passes, graph of the last shown; same structure each pass" in t.title()
    # one pass's graph, not thirty: each parameter appears once
    assert [n.name for n in t.nodes if n.kind == "param"].count("model.0.weight") == 1
    history = t.grad_history["model.0.weight"]
    assert [i for i, _ in history] == list(range(30))
    assert history[-1][1] == pytest.approx(model[0].weight.grad.norm().item(), rel=1e-5)
    assert history[0][1] != history[-1][1]  # training changed the gradients
    # the table shows the last pass (what .grad holds after zero_grad), not a sum over the loop
    assert t.node("model.0.weight").grad.norm == pytest.approx(model[0].weight.grad.norm().item(), rel=1e-5)
    assert "gradient norm per backward pass" in t.html() and "<polyline" in t.html()
    assert "model.0.weight" in t.text().split("gradient norm per backward pass:")[1]


def test_a_loop_whose_graph_changes_says_so():
    with torchmagic.trace() as t:
        x = torch.ones(3, requires_grad=True)
        for depth in range(1, 4):
            h = x
            for _ in range(depth):
                h = torch.tanh(h)
            h.sum().backward()
    assert len(t.passes) == 3 and t.structure_changed
    assert "structure changed between passes" in t.title()


def test_vanishing_norms_plot_on_a_log_scale_and_nan_passes_are_marked():
    from torchmagic.render.history import scale, sparkline, sparkline_svg

    values = [10.0 ** -k for k in range(8)]
    positions, log = scale(values)
    assert log and positions[0] == 1.0 and positions[-1] == 0.0
    assert positions[3] == pytest.approx(4 / 7)  # evenly spaced in log10, not squashed near zero
    line = sparkline([1.0, 2.0, float("nan"), 4.0])
    assert line[2] == "!" and line[0] == "▁" and line[-1] == "█"
    assert 'stroke="#c00000"' in sparkline_svg([1.0, float("inf"), 2.0])
    assert len(sparkline(list(range(500)), width=40)) == 40


def test_a_long_loop_does_not_keep_earlier_passes_graphs_alive():
    import gc
    import weakref

    x = torch.ones(4, requires_grad=True)
    with torchmagic.trace() as t:
        first = None
        for step in range(5):
            loss = (x * step).tanh().sum()
            if first is None:
                first = weakref.ref(loss)
            loss.backward()
        gc.collect()
        assert first() is None  # the first pass's output (and its graph) went away mid-loop
    assert len(t.passes) == 5


def test_leaf_gradients_are_shared_with_grad_not_copied_and_later_changes_are_named():
    w = torch.ones(3, requires_grad=True)
    with torchmagic.trace() as t:
        (w * 2).sum().backward()
    assert t.grad("w").data_ptr() == w.grad.data_ptr()  # AccumulateGrad kept its buffer: no clone for the trace
    assert t.node("w").grad.norm == pytest.approx(2 * 3 ** 0.5) and t.node("w").leaf_grad is None

    v = torch.ones(3, requires_grad=True)
    with torchmagic.trace() as t:
        (v * 2).sum().backward()
        torch.nn.utils.clip_grad_norm_([v], max_norm=1.0)  # changes v.grad in place
    # the trace copied the pass's gradient before clipping changed .grad, and shows both
    assert torch.equal(t.grad("v"), torch.full((3,), 2.0))
    assert t.node("v").leaf_grad.norm == pytest.approx(1.0, rel=1e-4) and "changed in place after the pass" in t.node("v").leaf_grad_note
    assert t.grad_history["v"][0][1] == pytest.approx(2 * 3 ** 0.5)  # taken before the clipping

    s = torch.ones(3, requires_grad=True)
    with torchmagic.trace() as t:
        (s * 2).sum().backward()
    s.grad.mul_(0.5)  # after the trace, unseen by it: the shared value is no longer the pass's
    with pytest.raises(LookupError, match="changed in place"):
        t.grad("s")

    u = torch.ones(3, requires_grad=True)
    u.grad = torch.full((3,), 10.0)  # accumulating into an existing .grad: the pass's own gradient is kept
    with torchmagic.trace() as t:
        (u * 2).sum().backward()
    assert torch.equal(t.grad("u"), torch.full((3,), 2.0)) and torch.equal(u.grad, torch.full((3,), 12.0))


@pytest.mark.parametrize("bad", [False, True])
def test_statistics_of_big_gradients_match_torch(bad):
    """Past STACK_LIMIT elements a gradient is reduced on its own, without a stacked copy."""
    from torchmagic.trace.stats import STACK_LIMIT

    torch.manual_seed(0)
    grad = torch.randn(3, STACK_LIMIT).t()  # big and not contiguous
    if bad:
        grad[5, 1], grad[7, 2], grad[9, 0] = float("nan"), float("inf"), float("-inf")
    (summary,) = summarize_many([grad])
    assert summary.shape == (STACK_LIMIT, 3) and summary.numel == 3 * STACK_LIMIT
    assert (summary.nan_count, summary.inf_count) == ((1, 2) if bad else (0, 0))
    if not bad:
        assert summary.mean == pytest.approx(grad.mean().item(), abs=1e-6)
        assert (summary.min, summary.max) == (grad.min().item(), grad.max().item())
        assert summary.norm == pytest.approx(grad.norm().item(), rel=1e-5)


def test_finite_gradients_whose_float32_norm_overflows_are_not_called_infinite():
    big = torch.full((4, 4), 3e20)
    summary = summarize(big)
    assert summary.finite and summary.norm == pytest.approx(4 * 3e20) and summary.mean == pytest.approx(3e20)
    pending = PendingSummary(big).resolve()
    assert pending.finite and pending.norm == pytest.approx(4 * 3e20)
    many = summarize_many([torch.full((100, 100), 3e20)])[0]
    assert many.finite and many.norm == pytest.approx(100 * 3e20)


@pytest.mark.parametrize("position", [0, 7, 30])
def test_one_big_gradient_among_many_small_ones_keeps_to_the_budget(position):
    """The budget check samples edges to estimate a pass's size; one big gradient it did not
    sample must still be held to the budget (its norm alone kept)."""
    def run(traced: bool):
        torch.manual_seed(0)
        a = torch.randn(3, requires_grad=True)
        h, big = a, None
        for i in range(80):
            if i == position:
                big = h.sum() * torch.ones(2_000_000)  # an 8 MB gradient, twice the budget
                if not traced:
                    big.retain_grad()
                h = h + big.mean()
            else:
                h = h * 1.0001
        h.sum().backward()
        return big

    with torchmagic.trace(memory_budget=4 * 2**20) as t:
        big = run(True)  # named in this frame
    assert t.node("big").shape == tuple(big.shape)
    summary = t.node("big").grad
    assert summary.norm_only
    assert summary.norm == pytest.approx(run(False).grad.norm().item(), rel=1e-5)


def test_a_tensor_bound_to_several_variables_answers_to_each():
    """``w = y.relu_()`` returns y itself and ``z = y`` aliases it: one tensor, three names."""
    x = torch.randn(3, requires_grad=True)
    with torchmagic.trace() as t:
        y = x * 2
        w = y.relu_()
        z = y
        z.retain_grad()
        loss = (z * 3).sum()
        loss.backward()
    assert w is y and z is y
    assert set(t.node("y").names) == {"y", "w", "z"} and t.node("w") is t.node("z")
    assert t.node("y").op == "relu_"
    assert torch.equal(t.grad("w"), z.grad)
