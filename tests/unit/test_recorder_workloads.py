"""Recorder v2 on the code users run: each reproduction of issue 10 as a test.

Every test checks two things: the traced code computes what it computes untraced, and each
gradient the trace shows equals one computed independently (``retain_grad``, ``autograd.grad``).
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.utils.checkpoint as checkpoint_module
from torch import nn
from torch.overrides import TorchFunctionMode

import torchmagic


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def test_gradient_clipping_keeps_the_pass_gradients_and_shows_the_clipped_grad_apart():
    model = _mlp()
    xb = torch.randn(16, 6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torchmagic.trace() as t:
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = model(xb).pow(2).mean() * 100
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    # the last pass's gradient, before clipping, computed independently
    reference = _mlp()
    reference.load_state_dict(model.state_dict())
    before_step = [p.detach() + 0.1 * p.grad for p in model.parameters()]  # undo the last SGD step
    with torch.no_grad():
        for p, value in zip(reference.parameters(), before_step):
            p.copy_(value)
    expected = torch.autograd.grad(reference(xb).pow(2).mean() * 100, list(reference.parameters()))
    for (name, param), grad in zip(model.named_parameters(), expected):
        shown = t.grad(f"model.{name}")
        assert shown is not None and torch.allclose(shown, grad, atol=1e-5), name
        node = t.node(f"model.{name}")
        assert node.leaf_grad is not None and "changed in place after the pass" in node.leaf_grad_note
        assert node.leaf_grad.values is None or torch.allclose(torch.tensor(node.leaf_grad.values), param.grad)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected]))
    assert total > 1.0  # the clip did change .grad
    assert len(t.grad_history["model.0.weight"]) == 3


def test_repeated_backward_through_one_graph_as_in_the_autograd_tutorial():
    with torchmagic.trace() as t:
        inp = torch.eye(4, 5, requires_grad=True)
        out = (inp + 1).pow(2).t()
        out.backward(torch.ones_like(out), retain_graph=True)
        out.backward(torch.ones_like(out), retain_graph=True)
        inp.grad.zero_()
        out.backward(torch.ones_like(out), retain_graph=True)
    expected = torch.autograd.grad(((inp + 1).pow(2).t() * torch.ones(5, 4)).sum(), inp)[0]
    assert torch.equal(t.grad("inp"), expected) and torch.equal(inp.grad, expected)
    assert t.node("inp").leaf_grad is None  # .grad equals the last pass's gradient: nothing to show apart
    assert [len(p.roots) for p in t.passes] == [1, 1, 1] and not t.structure_changed
    norms = [norm for _, norm in t.grad_history["inp"]]
    assert norms == pytest.approx([expected.norm().item()] * 3)  # the plot agrees with the table
    for index in range(3):
        assert torch.equal(t.grad("inp", pass_index=index) if index == 2 else expected, expected)


def test_a_gan_step_shows_both_passes_each_with_its_own_gradients():
    torch.manual_seed(0)
    netG = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
    netD = nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(0.2), nn.Linear(5, 1))
    real = torch.randn(6, 4)
    noise = torch.randn(6, 3)
    bce = nn.BCEWithLogitsLoss()
    with torchmagic.trace() as t:
        netD.zero_grad()
        fake = netG(noise)
        errD = bce(netD(real), torch.ones(6, 1)) + bce(netD(fake.detach()), torch.zeros(6, 1))
        errD.backward()
        grad_d_pass1 = [p.grad.clone() for p in netD.parameters()]
        netG.zero_grad()
        errG = bce(netD(fake), torch.ones(6, 1))
        errG.backward()
    assert [p.describe().split(":")[1].strip().split(" ")[0] for p in t.passes] == ["errD.backward()", "errG.backward()"]
    # G's parameters: only errG reached them
    expected_g = torch.autograd.grad(bce(netD(netG(noise)), torch.ones(6, 1)), list(netG.parameters()))
    for (name, _), grad in zip(netG.named_parameters(), expected_g):
        assert torch.allclose(t.grad(f"netG.{name}"), grad, atol=1e-6)
    # D's parameters: the last pass (errG) is shown; errD's share is there too; .grad holds the sum
    expected_d_from_g = torch.autograd.grad(bce(netD(fake.detach()), torch.ones(6, 1)), list(netD.parameters()))
    for (name, param), from_g, from_d in zip(netD.named_parameters(), expected_d_from_g, grad_d_pass1):
        assert torch.allclose(t.grad(f"netD.{name}"), from_g, atol=1e-6)
        assert torch.allclose(t.grad(f"netD.{name}", pass_index=0), from_d, atol=1e-6)
        node = t.node(f"netD.{name}")
        assert node.grad_pass == 1 and "sum over the 2 passes" in node.leaf_grad_note
        assert torch.allclose(param.grad, from_g + from_d, atol=1e-6)
    # the first pass's tensors are drawn with their gradients
    assert t.grad("errD").item() == 1.0 and t.node("errD").grad_pass == 0


def test_independent_backward_calls_and_a_scalar_leaf_each_show_their_gradient():
    with torchmagic.trace() as t:
        a = torch.ones(3, requires_grad=True)
        b = torch.ones(3, requires_grad=True)
        (a * 2).sum().backward()
        (b * 3).sum().backward()
        s = torch.tensor(5.0, requires_grad=True)
        s.backward()
    assert torch.equal(t.grad("a"), torch.full((3,), 2.0))
    assert torch.equal(t.grad("b"), torch.full((3,), 3.0))
    assert t.grad("s").item() == 1.0 and t.node("s").is_output
    assert t.missing == []


def test_tied_weights_answer_to_every_name():
    class TinyGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(10, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.wte.weight  # weight tying, as nanoGPT does

        def forward(self, idx):
            return self.lm_head(self.wte(idx))

    torch.manual_seed(0)
    model = TinyGPT()
    with torchmagic.trace() as t:
        loss = nn.functional.cross_entropy(model(torch.tensor([1, 2, 3])), torch.tensor([2, 3, 4]))
        loss.backward()
    assert torch.equal(t.grad("model.lm_head.weight"), model.wte.weight.grad)
    assert torch.equal(t.grad("model.wte.weight"), model.wte.weight.grad)
    assert set(t.node("model.wte.weight").names) >= {"model.wte.weight", "model.lm_head.weight"}


def test_reentrant_checkpoint_draws_the_recomputed_block_with_its_parameters():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4, requires_grad=True)
    with torchmagic.trace() as t:
        y = checkpoint_module.checkpoint(block, x, use_reentrant=True)
        loss = y.pow(2).sum()
        loss.backward()
    assert t.missing == []  # not "used only under torch.no_grad()"
    assert torch.equal(t.grad("block.0.weight"), block[0].weight.grad)
    assert torch.equal(t.grad("x"), x.grad)
    assert any("reentrant checkpoint" in note for note in t.notes)
    assert t.passes[0].strategy == "hooks"


def test_torch_func_transforms_run_untouched_and_the_trace_says_so():
    def f(w, x):
        return (w * x).sin().sum()

    w = torch.randn(3)
    xs = torch.randn(5, 3)
    plain_vmap = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(w, xs)
    plain_jac = torch.func.jacrev(torch.sin)(w)
    plain_vjp = torch.func.vjp(torch.sin, w)[1](torch.ones(3))
    with torchmagic.trace() as t:
        traced_vmap = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0))(w, xs)
        traced_jac = torch.func.jacrev(torch.sin)(w)
        _, vjp_fn = torch.func.vjp(torch.sin, w)
        traced_vjp = vjp_fn(torch.ones(3))  # its backward runs after the transform's level is gone
        v = torch.ones(3, requires_grad=True)
        (v * 2).sum().backward()
    assert torch.equal(plain_vmap, traced_vmap) and torch.equal(plain_jac, traced_jac)
    assert torch.equal(plain_vjp[0], traced_vjp[0])
    assert any("ran unrecorded" in note for note in t.notes)
    assert any("torch.func" in note for note in t.notes)
    assert torch.equal(t.grad("v"), torch.full((3,), 2.0))


def test_torch_compile_gives_the_same_value_traced():
    def f(x):
        y = x.sin() * 2
        if y.sum() > 0:
            return y.cos()
        return y.exp()

    x = torch.randn(5, requires_grad=True)
    plain = f(x)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager")
    with torchmagic.trace() as t:
        out = compiled(x)
        out.sum().backward()
    assert torch.allclose(out, plain)
    assert torch.allclose(t.grad("x"), x.grad) and x.grad is not None
    torch._dynamo.reset()


def test_meta_tensors_have_shapes_and_no_statistics():
    with torchmagic.trace() as t:
        w = torch.randn(3, 4, device="meta", requires_grad=True)
        loss = (w * 2).sum()
        loss.backward()
    node = t.node("w")
    assert node.shape == (3, 4) and node.grad is not None and not node.grad.has_statistics
    assert "meta" in node.grad.short()
    assert "meta" in t.text()


def test_sparse_embedding_gradients_have_honest_statistics():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    with torchmagic.trace() as t:
        loss = emb(torch.tensor([1, 2, 2])).sum()
        loss.backward()
    summary = t.node("emb.weight").grad
    dense = emb.weight.grad.to_dense()
    assert summary.min == dense.min().item() and summary.max == dense.max().item()
    assert summary.norm == pytest.approx(dense.norm().item()) and summary.mean == pytest.approx(dense.mean().item())
    assert "sparse" in summary.note


class Strict(torch.Tensor):
    """A subclass whose __torch_function__ refuses every call but the ones the user's code below makes
    (untraced), so any attribute read or statistic of ours that went through it would raise."""

    ALLOWED = {"add", "mul", "sum", "backward", "requires_grad_"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name not in cls.ALLOWED:
            raise RuntimeError(f"Strict tensors do not support {name}")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_strict_tensor_subclass_does_not_break_this_or_later_traces():
    base = torch.ones(3).as_subclass(Strict).requires_grad_()
    with torchmagic.trace() as t:
        out = (base * 2 + 1).sum()
        out.backward()
    assert torch.equal(t.grad("base").as_subclass(torch.Tensor), torch.full((3,), 2.0))
    assert "base" in t.text()
    with torchmagic.trace() as t2:
        z = torch.ones(2, requires_grad=True)
        (z * 3).sum().backward()
    assert torch.equal(t2.grad("z"), torch.full((2,), 3.0))


def test_a_pass_through_subclass_is_drawn_once_per_op():
    class Passthrough(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return super().__torch_function__(func, types, args, kwargs or {})

    p = torch.ones(3).as_subclass(Passthrough).requires_grad_()
    with torchmagic.trace() as t:
        y = p * 2
        out = y.sum()
        out.backward()
    assert [n.op for n in t.nodes if n.kind == "op"] == ["mul", "sum"]


class Hostile:
    @property
    def __class__(self):
        raise RuntimeError("no class for you")


def test_a_namespace_object_whose_class_raises_is_ignored():
    weird = Hostile()
    with torchmagic.trace() as t:
        x = torch.ones(2, requires_grad=True)
        (x * 2).sum().backward()
    assert weird is not None and torch.equal(t.grad("x"), torch.full((2,), 2.0))


def test_modules_in_other_threads_are_not_attributed_to_the_traced_code():
    background = nn.Linear(3, 3)
    stop = threading.Event()

    def run():
        with torch.no_grad():
            while not stop.is_set():
                background(torch.randn(2, 3))

    worker = threading.Thread(target=run)
    worker.start()
    try:
        model = nn.Linear(3, 1)
        with torchmagic.trace() as t:
            for _ in range(50):
                loss = model(torch.randn(4, 3)).sum()
            loss.backward()
    finally:
        stop.set()
        worker.join()
    assert [n.module for n in t.nodes if n.op == "linear"] == ["model"]
    assert {n.module for n in t.nodes} <= {None, "model"} and "background" not in t.modules


def test_a_user_mode_left_open_stays_and_ours_is_removed():
    class Counting(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    user_mode = Counting()
    with torchmagic.trace() as t:
        x = torch.ones(2, requires_grad=True)
        user_mode.__enter__()  # opened inside the traced code and never closed
        (x * 2).sum().backward()
    try:
        assert torch._C._len_torch_function_stack() == 1
        assert torch._C._get_function_stack_at(0) is user_mode
        assert torch.equal(t.grad("x"), torch.full((2,), 2.0))
    finally:
        user_mode.__exit__(None, None, None)


def test_complex_gradients_are_said_to_be_complex_and_their_norms_are_right():
    with torchmagic.trace() as t:
        z = torch.tensor([1 + 2j, 3 - 1j], requires_grad=True)
        for _ in range(2):
            z.grad = None
            loss = (z * z.conj()).real.sum()
            loss.backward()
    summary = t.node("z").grad
    assert summary.values == [complex(v) for v in z.grad.tolist()]
    assert "complex" in summary.note and "j" in summary.short()
    assert [n for _, n in t.grad_history["z"]] == pytest.approx([z.grad.abs().norm().item()] * 2)


def test_the_engine_wrapper_and_mode_are_gone_after_a_failing_block():
    original = torch.autograd.graph._engine_run_backward
    with pytest.raises(ValueError):
        with torchmagic.trace() as t:
            x = torch.ones(2, requires_grad=True)
            (x * 2).sum().backward()
            raise ValueError("boom")
    assert torch.autograd.graph._engine_run_backward is original is torch.autograd._engine_run_backward
    assert torch._C._len_torch_function_stack() == 0
    assert t.error == "ValueError: boom" and torch.equal(t.grad("x"), torch.full((2,), 2.0))


class Clamp(torch.autograd.Function):
    """A straight-through clamp: forward clamps, backward passes the gradient through."""

    @staticmethod
    def forward(ctx, a):
        return a.clamp(-1, 1)

    @staticmethod
    def backward(ctx, g):
        return g


def test_a_custom_function_is_named_and_placed_on_the_line_that_applied_it():
    with torchmagic.trace() as t:
        x = torch.linspace(-2, 2, 5, requires_grad=True)
        y = Clamp.apply(x * 3)
        out = y.sum()
        out.backward()
    node = t.node("y")
    assert node.op == "Clamp" and node.source.text == "y = Clamp.apply(x * 3)"
    assert torch.equal(t.grad("x"), torch.full((5,), 3.0))
    assert torch.autograd.Function.apply.__func__ is torch.autograd.function.Function.__dict__["apply"].__func__


def test_torch_compile_of_a_custom_function_gives_the_same_value_traced():
    def f(x):
        return Clamp.apply(x * 2).sin()

    x = torch.randn(6, requires_grad=True)
    plain = f(x)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager")
    with torchmagic.trace():
        out = compiled(x)
        out.sum().backward()
    assert torch.allclose(out, plain)
    expected = torch.autograd.grad(f(x).sum(), x)[0]
    assert torch.allclose(x.grad, expected)
    torch._dynamo.reset()


def test_an_optimizer_step_reading_grad_is_not_a_change_to_grad():
    """SGD's param.add_(grad) writes the parameter: .grad stays the last pass's gradient, shown once."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xb = torch.randn(8, 6)
    with torchmagic.trace() as t:
        for _ in range(3):
            opt.zero_grad()
            model(xb).pow(2).mean().backward()
            opt.step()
    for name, param in model.named_parameters():
        node = t.node(f"model.{name}")
        assert node.leaf_grad is None and node.leaf_grad_note is None, node.leaf_grad_note
        assert torch.equal(t.grad(f"model.{name}"), param.grad)


def test_a_views_kept_gradient_that_shares_grads_memory_is_not_changed_by_clipping_after_the_trace():
    """linear's w.t(): its backward hands w a view of t's gradient, which becomes w.grad itself."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    xb = torch.randn(5, 3)
    with torchmagic.trace() as t:
        wt = w.t()
        loss = (xb @ wt).pow(2).sum()
        loss.backward()
    expected_w = w.grad.clone()
    torch.nn.utils.clip_grad_norm_([w], max_norm=1.0)  # after the block: the trace cannot see it
    assert t.grad_history["w"] == [(0, pytest.approx(expected_w.norm().item()))]  # taken when the block ended
    with pytest.raises(LookupError, match="changed in place"):
        t.grad("wt")  # no value PyTorch did not compute: it says the kept memory changed
    with pytest.raises(LookupError, match="changed in place"):
        t.grad("w")


def test_clipping_inside_the_trace_keeps_the_views_gradient_too():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    xb = torch.randn(5, 3)
    with torchmagic.trace() as t:
        wt = w.t()
        loss = (xb @ wt).pow(2).sum()
        loss.backward()
        expected_wt = w.grad.t().clone()
        torch.nn.utils.clip_grad_norm_([w], max_norm=1.0)
    assert torch.equal(t.grad("wt"), expected_wt) and torch.equal(t.grad("w"), expected_wt.t())


def test_a_write_through_a_view_of_grad_is_seen():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    with torchmagic.trace() as t:
        loss = (w * 3).sum()
        loss.backward()
        w.grad[1:].mul_(0.0)
    assert torch.equal(t.grad("w"), torch.full((4, 3), 3.0))
    assert "changed in place" in t.node("w").leaf_grad_note


def test_a_freed_grads_address_reused_by_another_tensor_is_not_taken_for_grad():
    torch.manual_seed(0)
    w = torch.randn(100, requires_grad=True)
    with torchmagic.trace() as t:
        for _ in range(5):
            w.grad = None
            label = torch.zeros(100)  # may land where the freed .grad was
            for _ in range(2):
                loss = (w * w).sum()
                loss.backward()
                label.fill_(1.0)
    assert "changed in place" not in (t.node("w").leaf_grad_note or "")
    assert "sum over the 2 passes" in t.node("w").leaf_grad_note


def test_a_hook_put_before_the_trace_is_honoured():
    """Forward and hook in one cell, backward in the next: what flowed on is past the hook."""
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    y.register_hook(lambda g: g * 10)
    with torchmagic.trace() as t:
        z = (y ** 2).sum()
        z.backward()
    assert torch.allclose(t.grad("y"), 20 * y.detach())
    assert torch.allclose(x.grad, 40 * y.detach())


def test_a_hook_a_module_put_inside_its_forward_before_the_trace_is_honoured():
    """Gradient reversal put by a module's forward on an activation no name reaches, forward run
    before the trace: the pass is hooked node by node, so the trace shows what flowed on."""
    class Reversal(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            feat = torch.tanh(self.a(x))
            feat.register_hook(lambda g: -2 * g)
            self.feat = feat
            return self.b(feat)

    torch.manual_seed(0)
    model = Reversal()
    xb = torch.randn(2, 3)
    out = model(xb)
    model.feat.retain_grad()
    with torchmagic.trace() as t:
        out.sum().backward()
    shown = [n for n in t.nodes if n.op == "tanh"]
    assert len(shown) == 1 and t.passes[0].strategy == "hooks" and "before the recording" in t.passes[0].note
    assert torch.allclose(torch.tensor(shown[0].grad.values), model.feat.grad)
    assert torch.allclose(t.grad("model.a.weight"), model.a.weight.grad)


def test_multi_grad_hooks_and_flop_counting_run_traced_as_untraced():
    from torch.utils.flop_counter import FlopCounterMode

    def run(traced: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        x = torch.randn(4, 8, requires_grad=True)
        seen = []
        torch.autograd.graph.register_multi_grad_hook((x, model[0].weight), lambda grads: seen.append(len(grads)))
        counter = FlopCounterMode(display=False)
        if traced:
            with torchmagic.trace(), counter:
                model(x).sum().backward()
        else:
            with counter:
                model(x).sum().backward()
        return counter.get_total_flops(), seen, x.grad.clone()

    plain, traced = run(False), run(True)
    assert plain[0] == traced[0] and plain[1] == traced[1] and torch.equal(plain[2], traced[2])


def test_torch_compile_aot_backend_is_one_op_and_its_compile_time_passes_are_not_the_users():
    import torch._dynamo.utils as dynamo_utils

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))
    xb = torch.randn(7, 3)
    expected = torch.autograd.grad(model(xb).pow(2).mean(), list(model.parameters()))
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    with torchmagic.trace() as t:
        out = compiled(xb)
        loss = out.pow(2).mean()
        loss.backward()
    try:
        assert len(t.passes) == 1 and not dynamo_utils.counters["graph_break"]  # our hooks broke no graph
        assert t.node("out").op == "CompiledFunction" and any("torch.compile" in note for note in t.notes)
        for (name, _), grad in zip(model.named_parameters(), expected):
            assert torch.allclose(t.grad(f"model.{name}"), grad, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_post_accumulate_hooks_change_grad_not_the_gradient_shown():
    """An optimizer step in backward (``register_post_accumulate_grad_hook``) halves or consumes
    ``.grad``: the trace shows what the pass computed, the leaf ends as it would untraced."""
    x = torch.tensor([1.0, 2.0, 3.0])

    def run(traced: bool):
        torch.manual_seed(0)
        w = torch.randn(3, requires_grad=True)
        v = torch.randn(3, requires_grad=True)

        def halve(p):
            p.grad.mul_(0.5)

        w.register_post_accumulate_grad_hook(halve)

        def step(p):
            with torch.no_grad():
                p.add_(p.grad, alpha=-0.1)
            p.grad = None

        v.register_post_accumulate_grad_hook(step)
        if traced:
            with torchmagic.trace() as t:
                (w * x + v * x).sum().backward()
        else:
            t = None
            (w * x + v * x).sum().backward()
        return t, w.grad.clone(), v.grad, v.detach().clone()

    plain, (t, w_grad, v_grad, v_now) = run(False), run(True)
    assert torch.equal(w_grad, plain[1]) and torch.equal(w_grad, 0.5 * x)
    assert v_grad is None and plain[2] is None and torch.equal(v_now, plain[3])
    assert torch.equal(t.grad("w"), x) and torch.equal(t.grad("v"), x)  # d/dw of sum(w*x): x, before the hooks


def test_per_node_hooks_runs_hooks_put_on_accumulate_grad_nodes():
    """Megatron-style gradient accumulation: a hook on each parameter's AccumulateGrad node moves
    ``.grad`` into ``main_grad``. The one-call capture does not run such hooks (a documented limit);
    ``per_node_hooks=True`` records the pass node by node, and the code runs as untraced."""
    def run(trace_options: dict | None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        handles = []
        for p in model.parameters():
            p.main_grad = torch.zeros_like(p)

            def move(*_, p=p):
                p.main_grad.add_(p.grad)
                p.grad = None

            node = p.view_as(p).grad_fn.next_functions[0][0]
            handles.append((node, node.register_hook(move)))  # (keep the node alive with its hook)
        x = torch.randn(5, 3)
        t = out = None
        if trace_options is None:
            for _ in range(2):
                model(x).pow(2).sum().backward()
        else:
            with torchmagic.trace(**trace_options) as t:
                for _ in range(2):
                    out = model(x)
                    out.pow(2).sum().backward()
        return t, [p.main_grad.clone() for p in model.parameters()], [p.grad for p in model.parameters()], out

    _, plain_main, plain_grads, _ = run(None)
    t, main, grads, last_out = run({"per_node_hooks": True})
    assert all(g is None for g in plain_grads + grads)
    assert all(torch.equal(a, b) for a, b in zip(plain_main, main))
    assert t.passes[-1].strategy == "hooks" and "per_node_hooks" in t.passes[-1].note
    # the pass's own gradient of each parameter is shown: half of main_grad (two equal passes)
    assert torch.allclose(t.grad("model.0.weight"), main[0] / 2)
    assert torch.allclose(t.grad("out"), 2 * last_out)  # d sum(out**2) / d out, by hand


def test_recorders_stopped_out_of_order_leave_torch_as_it_was():
    """A recording started inside another and stopped after it (``%autograd_trace on`` and a
    ``torchmagic.trace()`` left open in a cell): stopped in either order, every patch comes off."""
    import torch.autograd.graph as graph_module
    from torch.autograd.function import Function

    from torchmagic.trace.recorder import Recorder

    originals = (graph_module._engine_run_backward, torch.autograd._engine_run_backward,
                 Function.__dict__["apply"], torch._C._will_engine_execute_node)
    for order in ("outer first", "inner first"):
        outer, inner = Recorder(), Recorder()
        outer.start()
        inner.start()
        w = torch.ones(2, requires_grad=True)
        (w * 2).sum().backward()
        for recorder in ((outer, inner) if order == "outer first" else (inner, outer)):
            recorder.stop()
        now = (graph_module._engine_run_backward, torch.autograd._engine_run_backward,
               Function.__dict__["apply"], torch._C._will_engine_execute_node)
        assert all(a is b for a, b in zip(now, originals)), order
        assert len(inner.passes) == 1 and not outer.passes
        assert "nested trace" in outer.untraced  # the outer trace says where its pass went
        assert torch.equal(w.grad, torch.full((2,), 2.0))
        inner.release()
        outer.release()


def test_a_recorder_that_fails_to_start_leaves_nothing_installed(monkeypatch):
    import torch.autograd.graph as graph_module

    from torchmagic.trace import recorder as recorder_module

    original, modes = graph_module._engine_run_backward, torch._C._len_torch_function_stack()

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(recorder_module.RecordingMode, "__enter__", interrupted)
    recorder = recorder_module.Recorder()
    with pytest.raises(KeyboardInterrupt):
        recorder.start()
    assert graph_module._engine_run_backward is original and not recorder.active
    assert torch._C._len_torch_function_stack() == modes


def test_transformer_inference_takes_its_fast_path_traced_as_untraced():
    """nn.TransformerEncoder in eval under no_grad runs PyTorch's fused fast path, which any torch
    function mode turns off (its result differs in the last bits): traced, it must still run."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        plain = encoder(x)
    modes = torch._C._len_torch_function_stack()
    with torchmagic.trace() as t:
        with torch.no_grad():
            traced = encoder(x)
        assert torch._C._len_torch_function_stack() == modes + 1  # the mode is back after the call
        w = torch.ones(2, requires_grad=True)
        (w * 3).sum().backward()
    assert torch.equal(traced, plain)
    assert any("fast path" in note for note in t.notes)
    assert torch.equal(t.grad("w"), torch.full((2,), 3.0))
    # training: no fast path untraced, so the layers are recorded op by op
    encoder.train()
    with torchmagic.trace() as t:
        out = encoder(x)
        out.sum().backward()
    assert not any("fast path" in note for note in t.notes)
    assert t.node("out").module.startswith("encoder.layers.1")


def test_a_view_regenerated_after_an_in_place_op_is_labelled_as_a_view():
    """``v + 1`` on a view of a tensor changed in place makes the add's node, then regenerates the
    view's (AsStridedBackward0, the later sequence number): each gets its own op."""
    with torchmagic.trace() as t:
        x = torch.ones(3, 2, requires_grad=True)
        y = x * 1
        v = y[0]
        y.mul_(2)
        z = v + 1
        v.retain_grad()
        z.sum().backward()
    assert t.node("v").op == "as_strided" and t.node("z").op == "add"
    assert [n.op for n in t.nodes if n.kind == "op"] == ["mul", "mul_", "as_strided", "add", "sum"]
    assert torch.equal(t.grad("v"), v.grad)


def test_a_frozen_layer_given_its_input_by_keyword_is_recorded_op_by_op():
    """A frozen encoder in eval whose input needs a gradient (an adversarial input, say) builds a
    graph: no fast path untraced, so the mode stays, whether ``src`` is passed by position or name."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    counts = {}
    for how in ("positional", "keyword"):
        x = torch.randn(2, 3, 8, requires_grad=True)
        with torchmagic.trace() as t:
            y = layer(x) if how == "positional" else layer(src=x)
            y.sum().backward()
        counts[how] = t.op_count
        assert not any("fast path" in note for note in t.notes)
        assert torch.equal(t.grad("x"), x.grad)
    assert counts["positional"] == counts["keyword"] > 5


def test_a_layer_left_by_a_keyboard_interrupt_gets_the_mode_back():
    """Module hooks that always run do not run for a BaseException: a fast-path layer left by a
    caught KeyboardInterrupt must not leave the recording off for the rest of the block."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()

    def ctrl_c(module, args):
        raise KeyboardInterrupt

    handle = layer.register_forward_pre_hook(ctrl_c)
    x = torch.randn(2, 3, 8)
    lin = nn.Linear(3, 3)
    modes = torch._C._len_torch_function_stack()
    try:
        with torchmagic.trace() as t:
            with torch.no_grad():
                with pytest.raises(KeyboardInterrupt):
                    layer(x)
            h = lin(torch.ones(3))  # the next module call puts the mode back
            assert torch._C._len_torch_function_stack() == modes + 1
            out = (h * 2).sum()
            out.backward()
    finally:
        handle.remove()
    assert torch._C._len_torch_function_stack() == modes
    assert any("not an Exception" in note for note in t.notes)
    assert t.node("out").op == "sum" and t.node("h").module == "lin"
    assert torch.equal(t.grad("lin.weight"), lin.weight.grad)


def test_a_hooked_tensor_stays_hooked_after_a_pass_that_did_not_run_its_node():
    """``autograd.grad(..., u)`` stops at u without running its node: a later backward through u
    runs u's hook, and the trace shows what flowed on after it (as ``retain_grad`` does)."""
    x = torch.ones(3, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    with torchmagic.trace() as t:
        u = x * w
        u.register_hook(lambda g: g * 10)
        u.retain_grad()
        torch.autograd.grad((u * 2).sum(), u)
        u.grad = None
        loss = (u * 3).sum()
        loss.backward()
    assert torch.equal(u.grad, torch.full((3,), 30.0))
    assert torch.equal(t.grad("u"), u.grad)


def test_a_post_accumulate_hook_with_a_hook_on_the_leafs_node_does_not_reach_the_kept_gradient():
    """AccumulateGrad steals a gradient held once more when its node has hooks: the trace gives it
    a copy, so a later in-place write to ``.grad`` does not change the gradient shown."""
    w = torch.ones(3, requires_grad=True)
    w.view_as(w).grad_fn.next_functions[0][0].register_hook(lambda *args: None)
    w.register_post_accumulate_grad_hook(lambda p: None)
    with torchmagic.trace() as t:
        (w * 2).sum().backward()
        w.grad.zero_()
    assert torch.equal(t.grad("w"), torch.full((3,), 2.0))
    assert torch.equal(w.grad, torch.zeros(3))


@pytest.mark.parametrize("make", [
    lambda a, b: torch.cat([a, b]),
    lambda a, b: torch.stack([a, b[:2]]).sum(0),
    lambda a, b: a.t().t(),
    lambda a, b: a.unsqueeze(0).sum(0),
    lambda a, b: torch.view_as_real(torch.view_as_complex(a.reshape(3, 2))),
], ids=["cat", "stack", "chain of views", "unsqueeze-sum", "view_as_complex"])
def test_a_gradient_of_the_same_memory_as_a_leafs_grad_is_never_shown_changed(make):
    """Backwards of views, ``cat`` and ``stack`` hand leaves views of a gradient the pass computed,
    which then becomes ``.grad``: clipped inside the block, the trace keeps a copy; clipped after
    it, the trace says so rather than show the clipped numbers."""
    torch.manual_seed(0)
    a0, b0, c = torch.randn(2, 3), torch.randn(3, 3), torch.randn(5, 3)

    def run(traced: bool, clip_inside: bool):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        if not traced:
            h = make(a, b)
            h.retain_grad()
            (h * c[:h.shape[0], :h.shape[1]]).sum().backward()
            return None, h.grad.clone()
        with torchmagic.trace() as t:
            h = make(a, b)
            loss = (h * c[:h.shape[0], :h.shape[1]]).sum()
            loss.backward()
            if clip_inside:
                nn.utils.clip_grad_norm_([a, b], max_norm=0.01)
        if not clip_inside:
            nn.utils.clip_grad_norm_([a, b], max_norm=0.01)
        return t, None

    _, truth = run(False, False)
    t, _ = run(True, clip_inside=True)
    assert torch.equal(t.grad("h"), truth)
    t, _ = run(True, clip_inside=False)
    with pytest.raises(LookupError, match="changed in place"):
        t.grad("h")


def test_a_compiled_module_does_not_warn_of_the_traces_global_hooks():
    """torch.compile(module) warns on every call where global module hooks exist: the trace's
    hooks must not give traced code a warning untraced code does not get."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    compiled = torch.compile(model, backend="eager")
    xb = torch.randn(2, 4)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torchmagic.trace() as t:
                out = compiled(xb)
                out.sum().backward()
            after = compiled(xb)  # after the block, a warning would be torch's own business again
        assert not [w for w in caught if "global hooks" in str(w.message)]
        assert torch.equal(after, out.detach())
        assert torch.equal(t.grad("model.2.weight"), model[2].weight.grad)
    finally:
        torch._dynamo.reset()


def test_a_named_view_of_a_parameter_stepped_in_the_block_is_listed_not_lost():
    """``wt = lin.weight.t()``, then ``opt.step()`` in the block: PyTorch gives wt a new grad_fn,
    so the graph's t() cannot be named wt from the namespace. The trace says so, where wt went."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    xb = torch.randn(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with torchmagic.trace() as t:
        wt = lin.weight.t()
        out = xb @ wt
        loss = out.pow(2).sum()
        loss.backward()
        opt.step()
    lost = [m for m in t.missing if m.name == "wt"]
    assert len(lost) == 1 and "t(lin.weight)" in lost[0].reason and lost[0].shape == (3, 2)
    with pytest.raises(KeyError, match="changed in place after the view was made"):
        t.grad("wt")
    assert "wt" in t.text()  # listed under "no gradient"
    # without the step, the same cell names it, and its gradient is retain_grad's
    lin.zero_grad()
    with torchmagic.trace() as t:
        wt = lin.weight.t()
        wt.retain_grad()
        out = xb @ wt
        loss = out.pow(2).sum()
        loss.backward()
    assert torch.equal(t.grad("wt"), wt.grad) and not t.missing


def test_gradients_handed_to_the_code_keep_their_values_when_the_code_changes_them():
    """autograd.grad's results and backward(gradient=v)'s v are the very tensors the trace keeps:
    changed in place in the block, the trace keeps a copy first; after it, it says so."""
    torch.manual_seed(0)
    x = torch.randn(3)
    w = torch.randn(3, requires_grad=True)
    v = torch.ones(3)
    with torchmagic.trace() as t:
        h = (w * x).exp()
        loss = (h * h).sum()
        gw, gh = torch.autograd.grad(loss, [w, h])
        expected_w, expected_h = gw.clone(), gh.clone()
        gw.mul_(0.1)  # manual SGD scales in place
        gh.zero_()
        y = w.sin() * 3
        y.backward(v)
        v.mul_(7)  # the buffer reused
    assert torch.equal(t.grad("w", pass_index=0), expected_w)
    assert torch.equal(t.grad("h"), expected_h)
    assert torch.equal(t.grad("y"), torch.ones(3))
    with torchmagic.trace() as t:
        (gw,) = torch.autograd.grad((w * x).sum(), [w])
    gw.zero_()  # after the block: no copy, but no wrong number either
    with pytest.raises(LookupError, match="changed in place"):
        t.grad("w")


def test_a_pass_the_engine_runs_itself_does_not_add_into_an_earlier_passs_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, requires_grad=True)
    with torchmagic.trace() as t:
        (w * w).sum().backward()  # captured: w.grad is the kept gradient itself
        w.exp().sum().backward(inputs=[w])  # hooked: the engine adds into w.grad in place
        w.sin().sum().backward(create_graph=True)
    for k, expected in enumerate([2 * w.detach(), w.detach().exp(), w.detach().cos()]):
        assert torch.allclose(t.grad("w", pass_index=k), expected)
    assert "sum over the 3 passes" in t.node("w").leaf_grad_note
    w.grad = None


def test_a_parameter_frozen_before_backward_gets_no_grad_as_untraced():
    torch.manual_seed(0)
    layer = nn.Linear(3, 1)
    xb = torch.randn(4, 3)
    with torchmagic.trace():
        out = layer(xb).sum()
        layer.weight.requires_grad_(False)  # frozen after the forward
        out.backward()
    assert layer.weight.grad is None and layer.bias.grad is not None


def test_autograd_grad_leaves_grad_alone_and_the_trace_says_nothing_of_it():
    x = torch.randn(3, requires_grad=True)
    with torchmagic.trace() as t:
        y = (x * 2).sin().sum()
        torch.autograd.grad(y, x)
    assert t.node("x").leaf_grad_note is None and x.grad is None


def test_batched_grad_outputs_run_untouched_and_the_trace_says_so():
    torch.manual_seed(0)
    x = torch.randn(3, requires_grad=True)
    w = torch.randn(3, 3, requires_grad=True)
    (expected,) = torch.autograd.grad((w @ x).tanh(), (x,), torch.eye(3), is_grads_batched=True)
    with torchmagic.trace(stop_on_nan=True) as t:
        y = (w @ x).tanh()
        (jac,) = torch.autograd.grad(y, (x,), torch.eye(3), is_grads_batched=True)
    assert torch.equal(jac, expected)
    assert any("is_grads_batched" in note for note in t.notes) and t.grad("y") is None


def test_a_lazy_module_initialises_in_a_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 1))
    xb = torch.randn(5, 3)
    with torchmagic.trace() as t:
        loss = model(xb).pow(2).mean()
        loss.backward()
    assert model[0].weight.shape == (4, 3)
    assert torch.equal(t.grad("model.0.weight"), model[0].weight.grad)


def test_a_backward_pytorch_refuses_inside_a_hook_gives_pytorchs_error():
    x = torch.randn(3, requires_grad=True)
    messages = []

    def hook(grad):
        try:
            torch.ones(2).sum().backward()
        except RuntimeError as error:
            messages.append(str(error))

    for traced in (False, True):
        y = x * 2
        y.register_hook(hook)
        with (torchmagic.trace() if traced else torch.enable_grad()):
            y.sum().backward()
    assert len(messages) == 2 and messages[0] == messages[1]


def test_a_hooked_tensor_of_a_retained_graph_stays_hooked_when_its_pass_is_replaced():
    """A helper line calls backward(retain_graph=True) for several losses, replacing its pass each
    time; a later pass from another line walks the hooked tensor again and must show what flowed on."""
    def backward_keep(loss):
        loss.backward(retain_graph=True)

    x = torch.ones(3, requires_grad=True)
    with torchmagic.trace() as t:
        h = x * 2
        h.register_hook(lambda g: g * 10)
        h.retain_grad()
        loss = h.sum()
        backward_keep(loss)
        backward_keep((x * 3).sum())  # replaces the pass through h
        h.grad = None
        loss.backward()
    assert torch.equal(h.grad, torch.full((3,), 10.0)) and torch.equal(t.grad("h"), h.grad)


def test_a_graph_built_in_another_thread_is_hooked_node_by_node():
    """Sequence numbers count per thread: a graph (and a hook) built by the main thread, traced in
    a worker, must not pass for one built during the recording."""
    for _ in range(2000):
        torch.ones(1, requires_grad=True) * 1  # the main thread's numbers well above a new thread's
    x = torch.ones(3, requires_grad=True)
    h = torch.tanh(x * 2)
    h.register_hook(lambda g: g * 10)
    h.retain_grad()
    out = (h * 3).sum()
    result = {}

    def worker():
        with torchmagic.trace() as t:
            out.backward()
        result["t"] = t

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    t = result["t"]
    assert t.passes[0].strategy == "hooks" and "another thread" in t.passes[0].note
    node = next(n for n in t.nodes if n.op == "tanh")
    assert torch.allclose(torch.tensor(node.grad.values), h.grad)


def test_a_slice_of_a_gradient_apart_from_a_leafs_grad_is_not_called_changed():
    """cat's backward hands each input a slice of one gradient: a leaf's slice becomes its .grad.
    Zeroing that .grad after the block bumps the family's version counter, but h's slice, whose
    memory is apart, still holds what the pass computed."""
    a = torch.zeros(2, requires_grad=True)
    x = torch.ones(3, requires_grad=True)
    with torchmagic.trace() as t:
        h = x * 2
        z = torch.cat([a, h])
        loss = (z * torch.arange(1.0, 6.0)).sum()
        loss.backward()
    a.grad.zero_()
    assert torch.equal(t.grad("h"), torch.tensor([3.0, 4.0, 5.0]))
    with pytest.raises(LookupError, match="changed in place"):
        t.grad("z")  # the whole gradient does include a's slice


def test_the_compile_warning_filter_leaves_a_users_own_and_an_outer_traces():
    import warnings

    pattern = r"Using `torch\.compile\(module\)` when there are global hooks on modules"

    def ours() -> int:
        return sum(1 for entry in warnings.filters if entry[1] is not None and entry[1].pattern == pattern)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)  # the user's own
        with torchmagic.trace():
            with torchmagic.trace():
                assert ours() == 3
            assert ours() == 2  # the outer trace's is still there
        assert ours() == 1


def test_a_layer_left_by_a_keyboard_interrupt_with_nothing_after_is_noted_at_the_end():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()

    def ctrl_c(module, args):
        raise KeyboardInterrupt

    handle = layer.register_forward_pre_hook(ctrl_c)
    try:
        with torchmagic.trace() as t:
            with torch.no_grad():
                with pytest.raises(KeyboardInterrupt):
                    layer(torch.randn(2, 3, 8))
            w = torch.ones(2, requires_grad=True)
            (w * 2).sum()  # no module call or backward after: these run with the mode off
    finally:
        handle.remove()
    assert any("not an Exception" in note for note in t.notes)


def test_passes_the_engine_runs_count_what_grad_sums():
    """Reentrant checkpoint's inner passes and a pass over a leaf frozen before it: the note says
    how many passes ``.grad`` adds up, as a captured loop would."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    xb = torch.randn(3, 4, requires_grad=True)
    with torchmagic.trace() as t:
        for step in range(3):
            if step == 1:
                layer.zero_grad(set_to_none=True)  # .grad now sums steps 1 and 2
            out = checkpoint_module.checkpoint(layer, xb, use_reentrant=True)
            out.pow(2).sum().backward()
    assert "sum over the 2 passes" in t.node("layer.weight").leaf_grad_note
    w = torch.ones(3, requires_grad=True)
    with torchmagic.trace(per_node_hooks=True) as t:
        (w * 2).sum().backward()
        loss = (w * 3).sum()
        w.requires_grad_(False)  # frozen: the second pass adds nothing to w.grad
        loss.backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0)) and t.node("w").leaf_grad_note is None


def test_clipping_a_grad_that_is_the_default_root_gradient_is_seen():
    """A 0-dim parameter summed into the loss gets the root's ones tensor itself as .grad: clipping
    it in the block is a change the trace saw."""
    w = torch.ones(3, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    with torchmagic.trace() as t:
        loss = (w * 3).sum() + s
        loss.backward()
        nn.utils.clip_grad_norm_([w, s], 0.1)
    assert "changed in place after the pass" in t.node("s").leaf_grad_note
    assert torch.equal(t.grad("s"), torch.tensor(1.0))


def test_a_functional_with_inplace_true_is_a_write_the_trace_sees():
    torch.manual_seed(0)
    x = torch.randn(4, requires_grad=True)
    with torchmagic.trace() as t:
        y = x * torch.randn(4)
        (g,) = torch.autograd.grad(y.sum(), x)
        expected = g.clone()
        nn.functional.relu(g, inplace=True)
    assert torch.equal(t.grad("x"), expected)


def test_a_parameter_inside_and_outside_a_reentrant_checkpoint_counts_each_pass_once():
    for per_node in (False, True):
        torch.manual_seed(0)
        layer = nn.Linear(4, 4)
        xb = torch.randn(3, 4, requires_grad=True)
        with torchmagic.trace(per_node_hooks=per_node) as t:
            for _ in range(2):
                out = checkpoint_module.checkpoint(layer, xb, use_reentrant=True)
                loss = out.pow(2).sum() + layer.weight.sum()  # the weight: inside and outside the block
                loss.backward()
        assert "sum over the 2 passes" in t.node("layer.weight").leaf_grad_note


def test_a_pass_that_raised_is_blamed_only_for_leaves_in_its_graph():
    x = torch.ones(2, requires_grad=True)
    u = torch.ones(2, requires_grad=True)

    def fail(grad):
        raise ValueError("hook failed")

    with torchmagic.trace() as t:
        a = (x * 2).sum()
        b = (u * 3).sum()  # never backwarded
        a.register_hook(fail)
        with pytest.raises(ValueError):
            a.backward()
    assert t.node("x").missing_reason.startswith("backward pass 1 raised before it reached it")
    assert t.node("u").missing_reason == "not reachable from the output"
    assert b.requires_grad


def test_a_leaf_given_two_parts_by_one_pass_says_so():
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    xb = torch.randn(3, 4, requires_grad=True)
    with torchmagic.trace() as t:
        out = checkpoint_module.checkpoint(layer, xb, use_reentrant=True)
        loss = out.pow(2).sum() + layer.weight.sum()  # the weight: inside and outside the block
        loss.backward()
    assert "sum of the 2 parts the pass gave it" in t.node("layer.weight").leaf_grad_note
