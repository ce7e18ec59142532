"""Gradient statistics: one tensor at a time, or many at once in a few batched kernels."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from .model import GradientSummary


def _as_real(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_complex():
        tensor = tensor.abs()
    if tensor.dtype not in (torch.float64, torch.float32):
        tensor = tensor.float()
    return tensor


# Gradients up to this many elements are stacked and reduced together; bigger ones are reduced
# one at a time with no copy (aminmax, sum, norm; NaN/Inf counted only when present).
STACK_LIMIT = 4096


def summarize(tensor: torch.Tensor, small_values: int = 16) -> GradientSummary:
    """Statistics of one tensor (values too when it has at most ``small_values`` elements)."""
    return summarize_many([tensor], small_values)[0]


def summarize_many(tensors: list[torch.Tensor], small_values: int = 16) -> list[GradientSummary]:
    """Statistics of many tensors, grouped by (device, size) so each group costs a handful of kernels.

    Per-tensor reductions would cost several small kernels per tensor, which dominates for
    graphs of many small ops; a group of equal-sized gradients is stacked into one matrix and
    reduced along its rows instead.
    """
    results: list[GradientSummary | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, int], list[int]] = defaultdict(list)
    for i, tensor in enumerate(tensors):
        if tensor.numel() == 0:
            results[i] = GradientSummary(tuple(tensor.shape), 0, float("nan"), float("nan"),
                                         float("nan"), 0.0, 0, 0, [] if small_values else None)
        elif tensor.numel() > STACK_LIMIT:  # big enough that memory traffic, not kernel count, is the cost
            results[i] = PendingSummary(tensor, small_values).resolve()
        else:
            groups[(tensor.device, tensor.numel())].append(i)
    for indices in groups.values():
        rows = [_as_real(tensors[i]).reshape(-1) for i in indices]
        dtype = torch.float64 if any(r.dtype == torch.float64 for r in rows) else torch.float32
        data = torch.stack([r if r.dtype == dtype else r.to(dtype) for r in rows])
        stats = torch.stack([
            data.sum(1),
            data.amax(1),
            data.amin(1),
            torch.linalg.vector_norm(data, dim=1),
            torch.isnan(data).sum(1).to(dtype),
            torch.isinf(data).sum(1).to(dtype),
        ]).cpu().tolist()
        small = data.cpu().tolist() if data.shape[1] <= small_values else None
        for j, i in enumerate(indices):
            tensor = tensors[i]
            numel = tensor.numel()
            total, high, low, norm, nan_count, inf_count = (row[j] for row in stats)
            values = None
            if small is not None:
                values = torch.tensor(small[j]).reshape(tensor.shape).tolist() if tensor.dim() else small[j][0]
            results[i] = GradientSummary(
                shape=tuple(tensor.shape),
                numel=numel,
                mean=total / numel,
                min=low,
                max=high,
                norm=norm,
                nan_count=int(nan_count),
                inf_count=int(inf_count),
                values=values,
            )
    return results  # type: ignore[return-value]


class PendingSummary:
    """Statistics of a gradient taken in the backward hook, read back later.

    Used past the memory budget, where the gradient itself cannot be kept. Three reductions
    (sum, aminmax, norm), no copy of the data; NaN and Inf are counted only when those show
    that some exist (on the CPU, where looking costs nothing), or always on other devices,
    where looking would make the hook wait for the device.
    """

    __slots__ = ("shape", "dtype", "numel", "stats", "values")

    def __init__(self, tensor: torch.Tensor, small_values: int = 16) -> None:
        data = _as_real(tensor)  # reductions need no reshape (which would copy a strided gradient)
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.numel = data.numel()
        self.values = data.reshape(-1).clone() if self.numel <= small_values else None
        if self.numel == 0:
            self.stats = None
            return
        low, high = torch.aminmax(data)
        total, norm = data.sum(), torch.linalg.vector_norm(data)
        if data.device.type == "cpu":  # reading a CPU number back costs nothing: keep plain floats
            stats = [total.item(), low.item(), high.item(), norm.item()]
            if not all(math.isfinite(v) for v in stats):
                stats += [float(torch.isnan(data).sum()), float(torch.isinf(data).sum())]
            self.stats = stats
        else:  # no device sync in the hook: count NaN/Inf always, read everything back later
            self.stats = torch.stack([total, low, high, norm, torch.isnan(data).sum().to(total.dtype),
                                      torch.isinf(data).sum().to(total.dtype)])

    def resolve(self) -> GradientSummary:
        if self.stats is None:
            return GradientSummary(self.shape, 0, float("nan"), float("nan"), float("nan"), 0.0, 0, 0,
                                   [] if self.values is not None else None)
        stats = self.stats if isinstance(self.stats, list) else self.stats.tolist()
        total, low, high, norm = stats[:4]
        nan_count, inf_count = (int(stats[4]), int(stats[5])) if len(stats) > 4 else (0, 0)
        values = None
        if self.values is not None:
            values = self.values.reshape(self.shape).tolist() if self.shape else self.values.tolist()[0]
        return GradientSummary(self.shape, self.numel, total / self.numel, low, high, norm,
                               nan_count, inf_count, values)
