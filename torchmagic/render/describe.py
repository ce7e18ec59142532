"""Short text for tensors shared by every renderer: shapes, references, gradients, numbers."""

from __future__ import annotations

from ..trace.model import GradientSummary, TraceNode
from ..trace.model import _format_number as format_number

__all__ = ["clip", "format_number", "grad_text", "is_complex", "ref", "shape_only", "shape_text", "stat_cells"]


def shape_only(shape: tuple[int, ...] | None) -> str:
    """``(2, 3)``, ``(4,)``, ``()``; empty when unknown."""
    if shape is None:
        return ""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def shape_text(node: TraceNode) -> str:
    """Shape, dtype and (when not the CPU) device: ``(2, 2) float32``."""
    parts = []
    if node.shape is not None:
        parts.append(shape_only(node.shape))
    if node.dtype is not None:
        parts.append(node.dtype)
    if node.device is not None and node.device != "cpu":
        parts.append(node.device)
    return " ".join(parts)


def ref(node: TraceNode) -> str:
    """How one tensor names another: its label, or ``%id`` for an unnamed intermediate."""
    return node.name if node.name is not None else f"%{node.id}"


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_complex(node: TraceNode) -> bool:
    return bool(node.dtype) and node.dtype.startswith("complex")


def grad_text(node: TraceNode, limit: int = 1000, grad: GradientSummary | None = None) -> str:
    """``grad [[0.25, 0.25]]``; a complex gradient's values are complex numbers, and its statistics
    (mean, min, max) are over its elements' magnitudes, which the summary says. ``limit`` clips
    the values or statistics."""
    grad = grad if grad is not None else node.grad
    if grad is None:
        return ""
    return f"grad {clip(grad.short(), limit)}"


def stat_cells(grad: GradientSummary) -> tuple[str, str, str, str]:
    """Mean, min, max and norm for a table; blank where the trace kept no such number (a meta
    tensor, or a gradient past the memory budget, which keeps its norm alone)."""
    if not grad.has_statistics:
        return "", "", "", ""
    if grad.norm_only:
        return "", "", "", format_number(grad.norm)
    return format_number(grad.mean), format_number(grad.min), format_number(grad.max), format_number(grad.norm)
