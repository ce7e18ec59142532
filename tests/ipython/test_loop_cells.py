"""Backprop through time as a user types it: an RNN loop under %%autograd_trace, folded by iteration."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import torchmagic

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
import truth  # noqa: E402

SETUP = """import torch
torch.manual_seed(0)
T = {steps}
xs = torch.randn(T, 1, 8)
Wx = torch.randn(8, 16, requires_grad=True)
Wh = (torch.randn(16, 16) * 0.3).requires_grad_()
b = torch.zeros(16, requires_grad=True)
"""
CELL = """%%autograd_trace
h = torch.zeros(1, 16)
for t in range(T):
    h = torch.tanh(xs[t] @ Wx + h @ Wh + b)
loss = h.pow(2).sum()
loss.backward()
"""


@pytest.mark.parametrize("steps", [40, 200])
def test_rnn_cell_draws_one_iteration_names_every_step_and_plots_their_gradients(shell, steps):
    shell.run("%config TorchMagic.layout_timeout = 5")
    shell.run(SETUP.format(steps=steps))
    start = time.perf_counter()
    shell.run(CELL)
    assert time.perf_counter() - start < 5 + 1  # the bound: layout_timeout plus a second
    (bundle,) = [o["data"] for o in shell.outputs]
    svg = bundle["image/svg+xml"]
    assert f"loop ×{steps}" in svg and "next iteration" in svg and f"also h (1…{steps - 1})" in svg
    assert "grad norm of h per iteration (log scale)" in svg
    assert "gradient norm per loop iteration" in bundle["text/html"] and "<polyline" in bundle["text/html"]
    t = torchmagic.last_trace()
    assert t.view().box_count <= 12
    truth.check(t)


def test_no_fold_draws_every_step(shell):
    shell.run(SETUP.format(steps=12))
    shell.run(CELL)
    shell.run("%autograd_trace show --no-fold")
    (bundle,) = [o["data"] for o in shell.outputs]
    assert bundle["image/svg+xml"].count(">tanh<") == 12 and "next iteration" not in bundle["image/svg+xml"]
    text = bundle["text/plain"]
    assert all(f"h ({k})" in text for k in range(1, 13))
