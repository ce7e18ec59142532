"""Gradient statistics: honest for every kind of tensor, batched where many small ones are alike.

Dense real gradients get mean, min, max, norm and NaN/Inf counts; a complex one the same over
its magnitudes (and says so), with its values as complex numbers when small; a sparse one is
reduced over its stored values; a meta tensor has a shape and no data. Statistics never go
through a tensor subclass's ``__torch_function__`` and never raise: what cannot be computed is
said in the summary's note.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from .model import COMPLEX_NOTE, NORM_ONLY_NOTE, GradientSummary

_no_subclass = torch._C.DisableTorchFunctionSubclass

# Gradients up to this many elements are stacked and reduced together; bigger ones are reduced
# one at a time with no copy (aminmax, sum, norm; NaN/Inf counted only when present).
STACK_LIMIT = 4096


def _empty(shape: tuple[int, ...], note: str) -> GradientSummary:
    """A summary with no statistics (a meta tensor, or one whose statistics failed), saying why."""
    nan = float("nan")
    return GradientSummary(shape, math.prod(shape), nan, nan, nan, nan, 0, 0, None, note)


def _special(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` cannot go through the batched path (None when it can)."""
    if tensor.is_meta:
        return "meta"
    if tensor.layout != torch.strided:
        return "sparse"
    if tensor.is_complex():
        return "complex"
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        return "subclass"
    return None


def summarize(tensor: torch.Tensor, small_values: int = 16) -> GradientSummary:
    """Statistics of one tensor (values too when it has at most ``small_values`` elements)."""
    return summarize_many([tensor], small_values)[0]


def summarize_many(tensors: Sequence[torch.Tensor], small_values: int = 16) -> list[GradientSummary]:
    """Statistics of many tensors, grouped by (device, dtype class, size) so each group costs a handful of kernels.

    Per-tensor reductions would cost several small kernels per tensor, which dominates for
    graphs of many small ops; a group of equal-sized gradients is stacked into one matrix and
    reduced along its rows instead.
    """
    results: list[GradientSummary | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, int], list[int]] = defaultdict(list)
    big: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    with _no_subclass(), torch.no_grad():
        for i, tensor in enumerate(tensors):
            try:
                if _special(tensor) is not None or tensor.numel() == 0:
                    results[i] = PendingSummary(tensor, small_values).resolve()
                elif tensor.numel() > STACK_LIMIT:
                    if tensor.dtype in (torch.float32, torch.float64) and tensor.numel() > small_values:
                        big[(tensor.device, tensor.dtype)].append(i)
                    else:
                        results[i] = PendingSummary(tensor, small_values).resolve()
                else:
                    groups[(tensor.device, tensor.numel())].append(i)
            except Exception as error:
                results[i] = _unavailable(tensor, error)
        batches = [(lambda indices: _summarize_big(tensors, indices, results), big.values()),
                   (lambda indices: _summarize_group(tensors, indices, small_values, results), groups.values())]
        for summarize, index_groups in batches:
            for indices in index_groups:
                try:
                    summarize(indices)
                except Exception:  # fall back to one at a time, so one odd tensor spoils nothing
                    for i in indices:
                        try:
                            results[i] = PendingSummary(tensors[i], small_values).resolve()
                        except Exception as error:
                            results[i] = _unavailable(tensors[i], error)
    return results  # type: ignore[return-value]


def _unavailable(tensor: Any, error: BaseException) -> GradientSummary:
    try:
        shape = tuple(tensor.shape)
    except Exception:
        shape = ()
    return _empty(shape, f"statistics unavailable ({type(error).__name__}: {error})")


def _summarize_group(tensors, indices, small_values, results) -> None:
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
        if not nan_count and not inf_count and not (math.isfinite(total) and math.isfinite(norm)):
            total, norm = _in_float64(tensor)  # finite values, overflowed sum or norm
        values = None
        if small is not None:
            values = torch.tensor(small[j]).reshape(tensor.shape).tolist() if tensor.dim() else small[j][0]
        results[i] = GradientSummary(tuple(tensor.shape), numel, total / numel, low, high, norm,
                                     int(nan_count), int(inf_count), values)


def _summarize_big(tensors, indices, results) -> None:
    """Big dense real tensors of one device and dtype: no copies; norms in one multi-tensor call,
    sums, minima and maxima one kernel a tensor, and a single read-back for all of them."""
    group = [tensors[i] for i in indices]  # one device and dtype
    norms = torch._foreach_norm(group)
    highs = [t.amax() for t in group]  # torch._foreach_max is several times slower on the CPU
    lows = [t.amin() for t in group]
    totals = [t.sum() for t in group]
    stats = torch.stack([torch.stack(column) for column in (totals, lows, highs, norms)]).cpu().tolist()
    for j, i in enumerate(indices):
        tensor = group[j]
        total, low, high, norm = (column[j] for column in stats)
        nan_count = inf_count = 0
        if not (math.isfinite(total) and math.isfinite(low) and math.isfinite(high) and math.isfinite(norm)):
            nan_count, inf_count = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            if not nan_count and not inf_count:  # finite values whose sum or norm overflowed float32
                total, norm = _in_float64(tensor)
        numel = tensor.numel()
        results[i] = GradientSummary(tuple(tensor.shape), numel, total / numel, low, high, norm, nan_count, inf_count)


def _as_real(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.dtype not in (torch.float64, torch.float32):
        tensor = tensor.float()
    return tensor


def _in_float64(tensor: torch.Tensor) -> tuple[float, float]:
    """Sum and norm of a tensor whose values are finite but whose float32 sum or norm overflowed."""
    return tensor.sum(dtype=torch.float64).item(), torch.linalg.vector_norm(tensor, dtype=torch.float64).item()


def norms_of(gradients: Sequence[Any]) -> list[Any]:
    """The norm of each gradient (a tensor or a PendingSummary), as a 0-dim tensor or a float; NaN
    where there is no data (meta). Dense real tensors share one multi-tensor kernel."""
    out: list[Any] = [float("nan")] * len(gradients)
    dense: list[int] = []
    with _no_subclass(), torch.no_grad():
        for i, grad in enumerate(gradients):
            try:
                if isinstance(grad, (PendingSummary, NormOnly)):
                    out[i] = grad.norm
                elif _special(grad) is None and grad.is_floating_point():
                    dense.append(i)
                else:
                    out[i] = PendingSummary(grad, 0).norm
            except Exception:
                continue
        low = [i for i in dense if gradients[i].dtype in _LOW_PRECISION]  # their norm overflows early
        wide = [i for i in dense if gradients[i].dtype not in _LOW_PRECISION]
        for group, dtype in ((wide, None), (low, torch.float32)):
            if not group:
                continue
            try:
                for i, norm in zip(group, torch._foreach_norm([gradients[i] for i in group], dtype=dtype)):
                    out[i] = norm
            except Exception:
                for i in group:
                    out[i] = torch.linalg.vector_norm(gradients[i], dtype=dtype)
    return out


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def floats_of(values: Sequence[Any]) -> list[float]:
    """Numbers (floats or 0-dim tensors, on any device) as floats: the tensors of each device other
    than the CPU stacked and read back at once, one sync per device rather than one per value."""
    out = [float("nan")] * len(values)
    by_device: dict[Any, list[int]] = {}
    for i, value in enumerate(values):
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(i)
        elif value is not None:
            out[i] = float(value)
    with _no_subclass(), torch.no_grad():
        for device, indices in by_device.items():
            if device.type == "cpu":  # no sync to save: one read each is cheaper than a stack
                for i in indices:
                    out[i] = float(values[i])
                continue
            stacked = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in indices])
            for i, number in zip(indices, stacked.tolist()):
                out[i] = number
    return out


class PendingSummary:
    """Statistics of one gradient taken now, read back later (possibly without a device sync now).

    Used past the memory budget, where the gradient itself cannot be kept, and for any tensor
    the batched path cannot take. Three reductions (sum, aminmax, norm), no copy of the data;
    NaN and Inf are counted only when those show some exist (on the CPU, where looking costs
    nothing), or always on other devices, where looking would make the hook wait for the device.
    """

    __slots__ = ("shape", "dtype", "numel", "stats", "values", "note")

    def __init__(self, tensor: torch.Tensor, small_values: int = 16) -> None:
        with _no_subclass(), torch.no_grad():
            self._take(tensor, small_values)

    def _take(self, tensor: torch.Tensor, small_values: int) -> None:
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype
        self.numel = tensor.numel()
        self.values = None
        self.note = None
        self.stats: Any = None
        kind = _special(tensor)
        if kind == "meta":
            self.note = "meta tensor: shape only, no data"
            return
        if kind == "subclass":
            tensor = tensor.as_subclass(torch.Tensor)
        tensor = tensor.detach()
        stored = tensor
        if kind == "sparse":
            stored = tensor.coalesce().values() if tensor.layout == torch.sparse_coo else tensor.values()
            self.note = f"sparse: {stored.numel():,} stored values"
        if self.numel == 0:
            return
        if self.numel <= small_values:
            dense = tensor.to_dense() if kind == "sparse" else tensor
            self.values = dense.reshape(-1).clone()
        if tensor.is_complex():
            self.note = COMPLEX_NOTE
            magnitude = stored.abs()
            norm = torch.linalg.vector_norm(stored)
            data = magnitude
        else:
            data = stored if stored.dtype in (torch.float64, torch.float32) else stored.float()
            norm = torch.linalg.vector_norm(data)
        if data.numel() == 0:  # a sparse tensor storing nothing: all zeros
            self.stats = [0.0, 0.0, 0.0, 0.0]
            return
        low, high = data.amin(), data.amax()
        total = data.sum()
        if kind == "sparse" and stored.numel() < self.numel:  # the implicit zeros count too
            zero = torch.zeros((), dtype=low.dtype, device=low.device)
            low, high = torch.minimum(low, zero), torch.maximum(high, zero)
        if data.device.type == "cpu":  # reading a CPU number back costs nothing: keep plain floats
            stats = [total.item(), low.item(), high.item(), norm.item()]
            if not all(math.isfinite(v) for v in stats):
                stats += [float(torch.isnan(data).sum()), float(torch.isinf(data).sum())]
                if not stats[4] and not stats[5] and data.is_floating_point():
                    stats[0], stats[3] = _in_float64(data)  # finite values, overflowed sum or norm
            self.stats = stats
        else:  # no device sync now: count NaN/Inf always, read everything back later
            self.stats = torch.stack([total, low, high, norm.to(total.dtype), torch.isnan(data).sum().to(total.dtype),
                                      torch.isinf(data).sum().to(total.dtype)])

    @property
    def norm(self) -> Any:
        if self.stats is None:
            return 0.0 if self.numel == 0 else float("nan")
        return self.stats[3]

    def resolve(self) -> GradientSummary:
        values = None
        if self.values is not None:
            values = self.values.reshape(self.shape).tolist() if self.shape else self.values.tolist()[0]
        if self.stats is None:
            if self.numel == 0:
                return GradientSummary(self.shape, 0, float("nan"), float("nan"), float("nan"), 0.0, 0, 0,
                                       values if values is not None else [], self.note)
            return _empty(self.shape, self.note)
        stats = self.stats if isinstance(self.stats, list) else self.stats.tolist()
        total, low, high, norm = stats[:4]
        nan_count, inf_count = (int(stats[4]), int(stats[5])) if len(stats) > 4 else (0, 0)
        return GradientSummary(self.shape, self.numel, total / self.numel, low, high, norm,
                               nan_count, inf_count, values, self.note)


class NormOnly:
    """What a trace keeps of a gradient past its memory budget: shape, dtype and norm, one reduction
    taken when the gradient arrives (the norm is read back when shown). The norm also says whether
    any element is NaN or Inf, though not how many."""

    __slots__ = ("shape", "dtype", "numel", "norm")

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, numel: int, norm: Any) -> None:
        self.shape, self.dtype, self.numel, self.norm = shape, dtype, numel, norm

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Any:
        """The norm of a dense real tensor; anything else (complex, sparse, meta) gets full statistics."""
        with _no_subclass(), torch.no_grad():
            if _special(tensor) is not None or not tensor.is_floating_point():
                return PendingSummary(tensor, 0)
            dtype = torch.float32 if tensor.dtype in _LOW_PRECISION else None  # (a float16 norm overflows at 65504)
            return cls(tuple(tensor.shape), tensor.dtype, tensor.numel(), torch.linalg.vector_norm(tensor.detach(), dtype=dtype))

    @classmethod
    def of_many(cls, tensors: Sequence[torch.Tensor]) -> list[Any]:
        """The same for many at once (one multi-tensor norm for the dense real ones)."""
        norms = norms_of(tensors)
        return [cls(tuple(t.shape), t.dtype, t.numel(), n) if _special(t) is None and t.is_floating_point()
                else PendingSummary(t, 0) for t, n in zip(tensors, norms)]

    def resolve(self) -> GradientSummary:
        norm = float(self.norm)
        nan = float("nan")
        note = NORM_ONLY_NOTE
        if math.isinf(norm):
            note += " (an Inf norm: an Inf element, or a sum of squares past the range of float32)"
        return GradientSummary(self.shape, self.numel, nan, nan, nan, norm, int(math.isnan(norm)),
                               int(math.isinf(norm)), None, note)
