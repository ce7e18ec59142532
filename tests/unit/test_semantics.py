"""The semantics table: each scenario runs plain and traced; results must be identical, and every
gradient the trace shows must equal one computed independently (``retain_grad`` in the plain run).

A scenario is a function of ``keep(name, tensor) -> tensor``: in the plain run ``keep`` calls
``retain_grad()`` on the tensor; in the traced run it names it, as a cell's assignment would.
It returns the values to compare (``.grad`` of leaves, outputs, parameters after a step).
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as checkpoint_module
from torch import nn

import torchmagic

SCENARIOS = {}
SINGLE_PASS = set()  # scenarios with one backward pass: every kept gradient is comparable to retain_grad


def scenario(single_pass: bool = True):
    def register(fn):
        SCENARIOS[fn.__name__] = fn
        if single_pass:
            SINGLE_PASS.add(fn.__name__)
        return fn
    return register


@scenario()
def seed(keep):
    x = keep("x", torch.ones(2, 2, requires_grad=True))
    y = keep("y", x + 2)
    z = keep("z", y * y * 3)
    out = keep("out", z.mean())
    out.backward()
    return [x.grad]


@scenario()
def leaf_used_twice(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    keep("s", (x * x).sum()).backward()
    return [x.grad]


@scenario(single_pass=False)
def two_graphs_accumulate(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    (x * 2).sum().backward()
    (x * 3).sum().backward()
    return [x.grad]


@scenario(single_pass=False)
def retain_graph_twice(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    y = keep("y", (x.exp() * 2).sum())
    y.backward(retain_graph=True)
    y.backward()
    return [x.grad]


@scenario(single_pass=False)
def create_graph_double_backward(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    y = (x ** 3).sum()
    y.backward(create_graph=True)
    g = x.grad
    gg = torch.autograd.grad(g.sum(), x)[0]
    return [g.detach(), gg, torch.tensor(g.requires_grad)]


@scenario()
def user_hook_on_intermediate_scales(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    y = keep("y", x * 2)
    y.register_hook(lambda g: g * 10)
    keep("out", (y * y).sum()).backward()
    return [x.grad]


@scenario()
def leaf_tensor_hook(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    x.register_hook(lambda g: g + 1)
    (x * 2).sum().backward()
    return [x.grad]


@scenario()
def post_accumulate_hook(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    seen = []
    x.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    (x * 2).sum().backward()
    return [x.grad, seen[0], torch.tensor(len(seen))]


@scenario()
def node_prehook_user(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    y = keep("y", x * 2)
    calls = []
    y.grad_fn.register_prehook(lambda go: calls.append(1))
    (y * 3).sum().backward()
    return [x.grad, torch.tensor(len(calls))]


@scenario()
def retain_grad_user(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    y = x * 2
    y.retain_grad()
    (y * 3).sum().backward()
    return [x.grad, y.grad]


@scenario()
def autograd_grad_leaves_grad_untouched(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    w = keep("w", torch.randn(3, requires_grad=True))
    y = keep("y", (x * w).exp().sum())
    (g,) = torch.autograd.grad(y, x)
    return [g, torch.tensor(w.grad is None), torch.tensor(x.grad is None)]


@scenario()
def backward_inputs_subset(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    w = keep("w", torch.randn(3, requires_grad=True))
    (x * w).sum().backward(inputs=[w])
    return [w.grad, torch.tensor(x.grad is None)]


@scenario(single_pass=False)
def mlp_sgd_momentum_steps(keep):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xb = torch.randn(4, 8)
    for _ in range(3):
        opt.zero_grad()
        model(xb).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@scenario(single_pass=False)
def clip_grad_norm_then_adam(keep):
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xb = torch.randn(5, 6)
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        model(xb).pow(2).sum().backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
    return [p.detach().clone() for p in model.parameters()] + [p.grad.clone() for p in model.parameters()]


@scenario()
def full_backward_hook_module(keep):
    lin = nn.Linear(4, 4)
    seen = []
    lin.register_full_backward_hook(lambda mod, gi, go: seen.append(go[0].clone()))
    x = keep("x", torch.randn(2, 4, requires_grad=True))
    keep("out", lin(x).sum()).backward()
    return [x.grad, lin.weight.grad, seen[0]]


@scenario()
def guided_backprop_hook_changes_grad_input(keep):
    relu = nn.ReLU()
    relu.register_full_backward_hook(lambda mod, gi, go: (gi[0].clamp(min=0),))
    x = keep("x", torch.randn(3, 4, requires_grad=True))
    h = keep("h", x * 3)
    keep("out", (relu(h) * torch.randn(3, 4)).sum()).backward()
    return [x.grad]


@scenario()
def checkpoint_reentrant(keep):
    lin = nn.Linear(4, 4)
    x = keep("x", torch.randn(2, 4, requires_grad=True))
    y = checkpoint_module.checkpoint(lambda a: lin(a).relu(), x, use_reentrant=True)
    keep("out", y.sum()).backward()
    return [x.grad, lin.weight.grad]


@scenario()
def checkpoint_nonreentrant(keep):
    lin = nn.Linear(4, 4)
    x = keep("x", torch.randn(2, 4, requires_grad=True))
    y = checkpoint_module.checkpoint(lambda a: lin(a).relu(), x, use_reentrant=False)
    keep("out", y.sum()).backward()
    return [x.grad, lin.weight.grad]


@scenario()
def non_contiguous_leaf(keep):
    p = keep("p", torch.randn(4, 3).t().detach().requires_grad_())
    (p * torch.randn(3, 4)).sum().backward()
    return [p.grad, torch.tensor(p.grad.stride())]


@scenario()
def custom_function(keep):
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g * 5

    x = keep("x", torch.randn(3, requires_grad=True))
    y = keep("y", Twice.apply(x))
    y.sum().backward()
    return [x.grad]


@scenario(single_pass=False)  # .grad changes after the pass: the trace shows both (tested below)
def user_hook_keeps_the_gradient(keep):
    x = keep("x", torch.randn(3, requires_grad=True))
    kept = []

    def hook(g):
        kept.append(g)
        return g

    x.register_hook(hook)
    (x * 2).sum().backward()
    x.grad.add_(1)  # untraced, .grad is a copy: the kept tensor must not change
    return [x.grad, kept[0]]


@scenario()
def split_and_unused_output(keep):
    x = keep("x", torch.arange(6.0, requires_grad=True))
    a, b, c = torch.split(x, 2)
    keep("out", (keep("a", a) * 3).sum() + keep("b", b).sum()).backward()
    return [x.grad]


@scenario()
def in_place_on_intermediate(keep):
    x = keep("x", torch.randn(4, requires_grad=True))
    y = x * 2
    y.add_(1)
    y = keep("y", y)
    keep("out", (y ** 2).sum()).backward()
    return [x.grad]


@scenario()
def leaf_root(keep):
    x = keep("x", torch.tensor(3.0, requires_grad=True))
    x.backward()
    return [x.grad]


@scenario()
def sparse_embedding(keep):
    emb = nn.Embedding(10, 3, sparse=True)
    idx = torch.tensor([1, 2, 2, 7])
    keep("out", emb(idx).sum()).backward()
    return [emb.weight.grad.to_dense()]


@scenario()
def complex_leaf(keep):
    z = keep("z", torch.tensor([1 + 2j, 3 - 1j], requires_grad=True))
    keep("out", (z * z.conj()).real.sum()).backward()
    return [z.grad]


@scenario()
def lstm_language_model_step(keep):
    lstm = nn.LSTM(5, 7, batch_first=True)
    head = nn.Linear(7, 11)
    xb = torch.randn(2, 6, 5)
    out, _ = lstm(xb)
    logits = keep("logits", head(out))
    loss = keep("loss", nn.functional.cross_entropy(logits.reshape(-1, 11), torch.randint(0, 11, (12,))))
    loss.backward()
    return [p.grad for p in lstm.parameters()] + [p.grad for p in head.parameters()]


def _run(fn, traced: bool):
    torch.manual_seed(0)
    kept: dict[str, torch.Tensor] = {}
    if not traced:
        def keep(name, tensor):
            if tensor.grad_fn is not None:
                tensor.retain_grad()
            kept[name] = tensor
            return tensor
        return fn(keep), kept, None
    with torchmagic.trace() as t:
        recorder = t._recorder

        def keep(name, tensor):
            kept[name] = tensor
            return recorder.bind(name, tensor)

        result = fn(keep)
    return result, kept, t


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_traced_runs_exactly_as_untraced(name):
    fn = SCENARIOS[name]
    plain, plain_kept, _ = _run(fn, traced=False)
    traced, _, t = _run(fn, traced=True)
    assert _same(plain, traced), f"{name}: traced result differs from untraced"
    assert t.nodes is not None  # the trace builds without error


@pytest.mark.parametrize("name", sorted(SINGLE_PASS))
def test_every_gradient_shown_equals_an_independent_one(name):
    """Intermediates against retain_grad, leaves against .grad (one pass: they are that pass's)."""
    fn = SCENARIOS[name]
    _, plain_kept, _ = _run(fn, traced=False)
    _, traced_kept, t = _run(fn, traced=True)
    compared = 0
    for key, tensor in plain_kept.items():
        expected = tensor.grad
        if tensor.grad_fn is None and not tensor.requires_grad:
            continue
        if expected is None:
            continue
        if expected.is_sparse:
            expected = expected.to_dense()
        shown = t.grad(key)
        assert shown is not None, f"{name}: the trace shows no gradient for {key}"
        if shown.is_sparse:
            shown = shown.to_dense()
        assert torch.allclose(shown, expected), f"{name}: {key}: trace {shown} vs independent {expected}"
        compared += 1
    assert compared >= 1


def test_the_table_has_at_least_twenty_scenarios():
    assert len(SCENARIOS) >= 20


def test_a_grad_changed_after_the_pass_is_shown_apart_from_the_pass_gradient():
    (grad_after, kept), _, t = _run(SCENARIOS["user_hook_keeps_the_gradient"], traced=True)
    assert torch.equal(t.grad("x"), kept)  # what the pass contributed (what the user's hook saw)
    assert t.node("x").leaf_grad.values == grad_after.tolist() and "changed in place after the pass" in t.node("x").leaf_grad_note
