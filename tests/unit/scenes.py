"""Traced code the diagram tests share: loops, repeated blocks, a GAN step, a siamese net, random graphs."""

from __future__ import annotations

import random

import torch
from torch import nn

import torchmagic
from torchmagic.trace.view import _chain


def rnn_loop(steps: int, side_outputs: bool = False, **view):
    """The issue's RNN: ``for t in range(steps): h = torch.tanh(xs[t] @ Wx + h @ Wh + b)``."""
    torch.manual_seed(0)
    xs = torch.randn(steps, 1, 8)
    Wx = torch.randn(8, 16, requires_grad=True)
    Wh = (torch.randn(16, 16) * 0.3).requires_grad_()
    b = torch.zeros(16, requires_grad=True)
    Wo = torch.randn(16, 1, requires_grad=True)
    with torchmagic.trace(**view) as t:
        h = torch.zeros(1, 16)
        loss = torch.zeros(())
        for step in range(steps):
            h = torch.tanh(xs[step] @ Wx + h @ Wh + b)
            if side_outputs:
                loss = loss + (h @ Wo).square().sum()
        if not side_outputs:
            loss = h.pow(2).sum()
        loss.backward()
    return t


def lstm_loop(steps: int = 6, **view):
    """Two loop-carried tensors (h and c), written out by hand."""
    torch.manual_seed(0)
    W = torch.randn(12, 16, requires_grad=True)
    xs = torch.randn(steps, 1, 4)
    with torchmagic.trace(**view) as t:
        h, c = torch.zeros(1, 4), torch.zeros(1, 4)
        for step in range(steps):
            gates = torch.cat([xs[step], h, c], dim=1) @ W
            i, f, o, g = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        loss = h.sum()
        loss.backward()
    return t


def alternating_loop(**view):
    """Demo part 6: a loop whose graph differs from step to step: nothing to fold."""
    with torchmagic.trace(**view) as t:
        w = torch.tensor([0.5, -1.0], requires_grad=True)
        h = w
        for step in range(6):
            h = torch.tanh(h) if step % 2 == 0 else h * 2
        h.sum().backward()
    return t


def two_loops(**view):
    torch.manual_seed(0)
    x = torch.randn(3, requires_grad=True)
    with torchmagic.trace(**view) as t:
        a = x
        for _ in range(5):
            a = torch.sin(a) * 0.9
        b = a
        for _ in range(4):
            b = b + torch.cos(b)
        out = b.sum()
        out.backward()
    return t


def cell_loop(steps: int = 8, **view):
    """An nn.RNNCell called once per step: one module, ``steps`` calls."""
    torch.manual_seed(0)
    cell = nn.RNNCell(3, 5)
    xs = torch.randn(steps, 2, 3)
    with torchmagic.trace(**view) as t:
        h = torch.zeros(2, 5)
        for step in range(steps):
            h = cell(xs[step], h)
        loss = h.square().mean()
        loss.backward()
    return t


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(4)])
        self.ln_f = nn.LayerNorm(4)


def folded_blocks_cell(**view):
    """The issue's cell: ``h1 = blocks[0](h0) ... h4 = blocks[3](h3); hf = ln_f(h4)``."""
    model = Blocks()
    blocks, ln_f = model.blocks, model.ln_f
    h0 = torch.randn(2, 4, requires_grad=True)
    with torchmagic.trace(**view) as t:
        h1 = blocks[0](h0)
        h2 = blocks[1](h1)
        h3 = blocks[2](h2)
        h4 = blocks[3](h3)
        hf = ln_f(h4)
        loss = hf.square().sum()
        loss.backward()
    return t


def dcgan_step(**view):
    """One DCGAN step: netD on real data, on ``fake.detach()`` (discriminator loss) and on ``fake``."""
    torch.manual_seed(0)
    netG = nn.Sequential(nn.ConvTranspose2d(8, 4, 4, 1, 0), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.ConvTranspose2d(4, 1, 4, 2, 1), nn.Tanh())
    netD = nn.Sequential(nn.Conv2d(1, 4, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 4, 1, 0), nn.Sigmoid())
    bce = nn.BCELoss()
    real = torch.randn(2, 1, 8, 8)
    noise = torch.randn(2, 8, 1, 1)
    ones, zeros = torch.ones(2), torch.zeros(2)
    with torchmagic.trace(**view) as t:
        d_real = netD(real).view(-1)
        err_real = bce(d_real, ones)
        fake = netG(noise)
        d_fake = netD(fake.detach()).view(-1)
        err_fake = bce(d_fake, zeros)
        errD = err_real + err_fake
        errD.backward()
        d_gen = netD(fake).view(-1)
        errG = bce(d_gen, ones)
        errG.backward()
    return t


def wgan_gp_step(**view):
    """A WGAN-GP critic step: D on real data, on ``fake.detach()`` and on their mix, with the gradient penalty."""
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    G = nn.Sequential(nn.Linear(2, 4))
    real, z, alpha = torch.randn(6, 4), torch.randn(6, 2), torch.rand(6, 1)
    with torchmagic.trace(**view) as t:
        fake = G(z)
        d_real = D(real).mean()
        d_fake = D(fake.detach()).mean()
        interp = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
        d_interp = D(interp)
        grads = torch.autograd.grad(d_interp.sum(), interp, create_graph=True)[0]
        gp = ((grads.norm(2, dim=1) - 1) ** 2).mean()
        loss_D = d_fake - d_real + 10 * gp
        loss_D.backward()
    return t


def siamese(**view):
    """One encoder called on two inputs; both outputs named."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    a = torch.randn(2, 3, requires_grad=True)
    b = torch.randn(2, 3, requires_grad=True)
    with torchmagic.trace(**view) as t:
        za = encoder(a)
        zb = encoder(b)
        loss = (za - zb).square().sum()
        loss.backward()
    return t


def small_transformer(**view):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    tokens = torch.randn(2, 5, 8, requires_grad=True)
    with torchmagic.trace(**view) as t:
        loss = encoder(tokens).square().mean()
        loss.backward()
    return t


def random_program(seed: int) -> str:
    """Source of a random computation on a few leaves: elementwise ops, some names, sometimes a loop."""
    rng = random.Random(seed)
    lines = [f"torch.manual_seed({seed})"]
    pool = []
    for k in range(rng.randint(1, 3)):
        lines.append(f"x{k} = torch.randn(3, requires_grad=True)")
        pool.append(f"x{k}")
    binary = ["{a} + {b}", "{a} * {b}", "{a} - torch.tanh({b})"]
    unary = ["torch.sin({a})", "torch.tanh({a})", "{a} * 1.5"]
    body = ["with torchmagic.trace(**view) as t:"]
    for k in range(rng.randint(3, 12)):
        name = f"v{k}" if rng.random() < 0.5 else f"_u{k}"
        if rng.random() < 0.25:  # a loop with a carried tensor
            body.append(f"    {name} = {rng.choice(pool)}")
            body.append(f"    for _ in range({rng.randint(2, 7)}):")
            step = rng.choice(unary).format(a=name)
            body.append(f"        {name} = {step} + {pool[0]}")
        elif rng.random() < 0.5:
            body.append(f"    {name} = " + rng.choice(binary).format(a=rng.choice(pool), b=rng.choice(pool)))
        else:
            body.append(f"    {name} = " + rng.choice(unary).format(a=rng.choice(pool)))
        pool.append(name)
    body.append("    out = " + " + ".join(f"{v}.sum()" for v in pool[len(lines) - 1:]))
    body.append("    out.backward()")
    return "\n".join(lines + body)


def random_graph(seed: int, **view):
    namespace = {"torch": torch, "torchmagic": torchmagic, "view": view}
    exec(compile(random_program(seed), f"<random {seed}>", "exec"), namespace)
    return namespace["t"]


def fill_scope_by_calls(trace, *paths: str):
    """Give the operations of the modules ``paths`` a call number each, as recorder v2 will: their calls
    here are the connected parts of their operations (disjoint calls, as in a GAN step or a siamese net)."""
    for path in paths:
        _fill_scope(trace, path)
    trace.set_view(depth=trace.depth, expand=trace.expand, fold=trace.fold)
    return trace


def _fill_scope(trace, path: str) -> None:
    nodes = trace.nodes
    prefix = path + "."
    inside = [n.id for n in nodes if n.kind == "op" and n.module and (n.module == path or n.module.startswith(prefix))]
    parent = {i: i for i in inside}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in inside:
        for j in nodes[i].inputs:
            if j in parent:
                parent[find(i)] = find(j)
    groups = sorted({find(i) for i in inside}, key=lambda r: min(i for i in inside if find(i) == r))
    number = {root: k + 1 for k, root in enumerate(groups)}
    for i in inside:
        node = nodes[i]
        node.scope = tuple((p, number[find(i)]) for p in _chain(node.module))
