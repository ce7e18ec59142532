"""torchmagic: see PyTorch's autograd graph, gradients, conversions and devices in IPython and Jupyter."""

from __future__ import annotations

from typing import Any

from .trace import Trace

__version__ = "0.1.0"

_history: list[Trace] = []
_last_conversion = None


def trace(*, max_nodes: int = 500, memory_budget: int = 256 * 2**20, small_values: int = 16,
          depth: int | None = None, expand: tuple[str, ...] = (), fold: bool = True,
          stop_on_nan: bool = False, per_node_hooks: bool = False) -> Trace:
    """Record the autograd graph built in a ``with`` block, and its gradients.

    ``with torchmagic.trace() as t: ...`` then ``t.grad("y")``, ``t.nodes``, ``t.svg()``.
    ``depth``, ``expand`` and ``fold`` say how the diagram shows modules (``t.set_view`` changes it).
    ``stop_on_nan``: raise ``torchmagic.errors.NonFiniteGradient`` at the first backward pass that
    computes a NaN or Inf gradient, saying where it first appeared and what fed it.
    ``per_node_hooks``: record every backward pass with a hook on each node, the engine running it
    as untraced (slower): for code with hooks put directly on a leaf's AccumulateGrad node
    (``p.grad_fn.next_functions[0][0].register_hook``), which a captured pass does not run.
    """
    return Trace(max_nodes=max_nodes, memory_budget=memory_budget, small_values=small_values,
                 depth=depth, expand=expand, fold=fold, stop_on_nan=stop_on_nan,
                 per_node_hooks=per_node_hooks)


def last_trace() -> Trace | None:
    """The most recent trace made by the ``%autograd_trace`` magics (None before any)."""
    return _history[-1] if _history else None


def last_conversion():
    """The report (a ``ConversionReport``) of the most recent ``%tensor``/``%%tensor`` cell, or None."""
    return _last_conversion


def to_tensor(value: Any, name: str = "", *, dtype=None, device=None, requires_grad: bool = False, copy: bool = False):
    """Convert one list or ndarray the way ``%%tensor`` does; returns a ``Conversion`` saying what it did.

    ``to_tensor(arr).tensor`` is the tensor; ``.shares_memory`` and ``.copy_reason`` say how.
    """
    from . import convert as conversion
    from .device import parse_device

    options = conversion.ConversionOptions(
        dtype=conversion.parse_dtype(dtype) if isinstance(dtype, str) else dtype,
        device=parse_device(device) if isinstance(device, str) else device,
        requires_grad=requires_grad,
        copy=copy,
    )
    return conversion.convert(value, name, options)


def load_ipython_extension(ipython: Any) -> None:
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload

    unload(ipython)


__all__ = ["Trace", "last_conversion", "to_tensor", "last_trace", "load_ipython_extension", "trace", "unload_ipython_extension"]
