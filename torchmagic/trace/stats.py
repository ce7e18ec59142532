"""Gradient statistics: one tensor at a time, or many at once in a few batched kernels."""

from __future__ import annotations

from collections import defaultdict

import torch

from .model import GradientSummary


def _as_real(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_complex():
        tensor = tensor.abs()
    if tensor.dtype != torch.float64:
        tensor = tensor.float()
    return tensor


def summarize(tensor: torch.Tensor, small_values: int = 16) -> GradientSummary:
    """Statistics of one tensor (values too when it has at most ``small_values`` elements)."""
    return summarize_many([tensor], small_values)[0]


def summarize_many(tensors: list[torch.Tensor], small_values: int = 16) -> list[GradientSummary]:
    """Statistics of many tensors, grouped by device so each group costs a handful of kernels.

    Per-tensor reductions would cost several small kernels per tensor, which dominates for
    graphs of many small ops; instead each group is flattened into one vector and reduced by
    segment.
    """
    results: list[GradientSummary | None] = [None] * len(tensors)
    groups: dict[torch.device, list[int]] = defaultdict(list)
    for i, tensor in enumerate(tensors):
        if tensor.numel() == 0:
            results[i] = GradientSummary(tuple(tensor.shape), 0, float("nan"), float("nan"),
                                         float("nan"), 0.0, 0, 0, [] if small_values else None)
        else:
            groups[tensor.device].append(i)
    for indices in groups.values():
        flats = [_as_real(tensors[i]).reshape(-1) for i in indices]
        dtype = torch.float64 if any(f.dtype == torch.float64 for f in flats) else torch.float32
        data = torch.cat([f.to(dtype) for f in flats])
        lengths = torch.tensor([f.numel() for f in flats], device=data.device)
        sums = torch.segment_reduce(data, "sum", lengths=lengths)
        maxs = torch.segment_reduce(data, "max", lengths=lengths)
        mins = torch.segment_reduce(data, "min", lengths=lengths)
        squares = torch.segment_reduce(data * data, "sum", lengths=lengths)
        nans = torch.segment_reduce(torch.isnan(data).to(dtype), "sum", lengths=lengths)
        infs = torch.segment_reduce(torch.isinf(data).to(dtype), "sum", lengths=lengths)
        stacked = torch.stack([sums, maxs, mins, squares, nans, infs]).cpu().tolist()
        for j, i in enumerate(indices):
            tensor = tensors[i]
            numel = tensor.numel()
            total, high, low, square, nan_count, inf_count = (row[j] for row in stacked)
            values = None
            if numel <= small_values:
                values = _as_real(tensor).cpu().tolist()
            results[i] = GradientSummary(
                shape=tuple(tensor.shape),
                numel=numel,
                mean=total / numel,
                min=low,
                max=high,
                norm=square**0.5,
                nan_count=int(nan_count),
                inf_count=int(inf_count),
                values=values,
            )
    return results  # type: ignore[return-value]
