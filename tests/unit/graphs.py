"""Graphs that several test modules trace: the textbook chapter's example first."""

from __future__ import annotations

import torch

import torchmagic


def seed():
    """The chapter's example: x = ones(2, 2), y = x + 2, z = y * y * 3, out = z.mean(); backward."""
    with torchmagic.trace() as t:
        x = torch.ones(2, 2, requires_grad=True)
        y = x + 2
        z = y * y * 3
        out = z.mean()
        out.backward()
    return t, x, y, z, out
