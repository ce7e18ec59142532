"""torchmagic: see PyTorch's autograd graph, gradients, conversions and devices in IPython and Jupyter."""

from __future__ import annotations

from typing import Any

from .trace import Trace

__version__ = "0.1.0"

_history: list[Trace] = []


def trace(*, max_nodes: int = 500, memory_budget: int = 64 * 2**20, small_values: int = 16) -> Trace:
    """Record the autograd graph built in a ``with`` block, and its gradients.

    ``with torchmagic.trace() as t: ...`` then ``t.grad("y")``, ``t.nodes``, ``t.svg()``.
    """
    return Trace(max_nodes=max_nodes, memory_budget=memory_budget, small_values=small_values)


def last_trace() -> Trace | None:
    """The most recent trace made by the ``%autograd_trace`` magics (None before any)."""
    return _history[-1] if _history else None


def load_ipython_extension(ipython: Any) -> None:
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload

    unload(ipython)


__all__ = ["Trace", "last_trace", "load_ipython_extension", "trace", "unload_ipython_extension"]
