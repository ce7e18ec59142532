"""The trace as plain data: tensors, the operations that made them, and their gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SourceLine:
    """Where a tensor was made: ``In [5], line 3: z = y * y * 3``."""

    cell: str
    line: int
    text: str

    def __str__(self) -> str:
        text = f": {self.text}" if self.text else ""
        return f"{self.cell}, line {self.line}{text}"


def _format_number(value: float) -> str:
    if isinstance(value, complex):
        imag = _format_number(abs(value.imag))
        return f"{_format_number(value.real)}{'-' if value.imag < 0 or str(value.imag) == '-0.0' else '+'}{imag}j"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3e}"


def format_values(values: Any) -> str:
    """A nested list of numbers as short text: ``[[4.5, 4.5], [4.5, 4.5]]``."""
    if isinstance(values, list):
        return "[" + ", ".join(format_values(v) for v in values) + "]"
    return _format_number(values)


COMPLEX_NOTE = "complex: mean, min and max of |g|"
NORM_ONLY_NOTE = "over the memory budget: only its norm was kept"


@dataclass(frozen=True)
class GradientSummary:
    """What a gradient looked like: its values when small, else its statistics.

    Statistics are taken over every element; ``nan_count`` and ``inf_count`` say how many
    are not finite (mean, min, max and norm are then nan or inf themselves).
    """

    shape: tuple[int, ...] | None
    numel: int
    mean: float
    min: float
    max: float
    norm: float
    nan_count: int
    inf_count: int
    values: Any = None  # a nested list (or a number) when the tensor is small
    note: str | None = None  # what kind of statistics these are, or why there are none (meta, complex, sparse)

    @property
    def finite(self) -> bool:
        return self.nan_count == 0 and self.inf_count == 0

    def short(self) -> str:
        """One line: the values when small, else mean/min/max/norm, plus NaN/Inf counts."""
        if self.values is not None:
            text = format_values(self.values) + ("  (complex)" if self.note == COMPLEX_NOTE else "")
            return text + (f"  [{self.nan_count} NaN, {self.inf_count} Inf]" if not self.finite else "")
        if self.numel == 0:
            text = "(empty)"
        elif not self.has_statistics:
            text = f"{self.shape} ({self.note})" if self.note else "(no statistics)"
        elif self.norm_only:
            text = f"norm {_format_number(self.norm)}"
        else:
            text = (
                f"mean {_format_number(self.mean)}  min {_format_number(self.min)}  "
                f"max {_format_number(self.max)}  norm {_format_number(self.norm)}"
            )
        if not self.finite:
            text += f"  [{self.nan_count} NaN, {self.inf_count} Inf]"
        if self.note and self.has_statistics:
            text += f"  ({self.note})"
        return text

    @property
    def norm_only(self) -> bool:
        """Past the memory budget a trace keeps a gradient's norm alone (mean, min and max are NaN)."""
        return self.note is not None and self.note.startswith(NORM_ONLY_NOTE)

    @property
    def has_statistics(self) -> bool:
        """False for a tensor without data (meta) or whose statistics could not be taken."""
        return not (math.isnan(self.norm) and self.nan_count == 0)


@dataclass
class TraceNode:
    """One tensor in the traced graph, with the operation that made it.

    ``kind`` is ``"leaf"`` (a tensor the user created that requires grad), ``"param"`` (an
    nn.Module parameter) or ``"op"`` (the output of an operation). ``inputs`` are the ids of
    the tensors the operation consumed, in argument order (a tensor used twice appears
    twice). Outputs of one multi-output operation (split, unbind) share ``op_id``.
    """

    id: int
    kind: str
    op: str
    op_id: int
    output_nr: int
    name: str | None
    names: tuple[str, ...]
    shape: tuple[int, ...] | None
    dtype: str | None
    device: str | None
    inputs: tuple[int, ...] = ()
    source: SourceLine | None = None
    module: str | None = None
    is_output: bool = False
    seen_forward: bool = field(default=True, repr=False)
    grad: GradientSummary | None = None
    missing_reason: str | None = None
    nonfinite_origin: bool = False
    grad_kept: bool = False
    grad_seq: int | None = field(default=None, repr=False)
    # The module calls the op ran inside, outermost first: ((path, call number), ...). A module
    # called three times (a GAN's discriminator) gives call numbers 1, 2, 3; a call number is
    # 1-based and counts that module's calls within the trace. Empty outside any module.
    scope: tuple[tuple[str, int], ...] = ()
    grad_pass: int | None = None  # index (in Trace.passes) of the backward pass the gradient shown is from
    # A leaf's own .grad at the end of the traced code, where it differs from ``grad`` (the last
    # pass's contribution): accumulated over passes, clipped, zeroed.
    leaf_grad: GradientSummary | None = None
    leaf_grad_note: str | None = None  # why .grad differs, in words

    @property
    def label(self) -> str:
        """The user's name for the tensor, or ``op`` for an unnamed intermediate."""
        return self.name if self.name is not None else self.op

    @property
    def is_tensor_shown(self) -> bool:
        """Whether a diagram draws this tensor as a box of its own (else it merges into its op)."""
        return self.kind != "op" or self.name is not None or self.is_output


@dataclass(frozen=True)
class PassInfo:
    """One backward call during the traced code: where it was made and how it was recorded.

    Only the last pass from each line of code keeps its graph and gradients (``kept``); a training
    loop's earlier passes leave their per-pass gradient norms (``Trace.grad_history``).
    """

    index: int
    entry: str  # "backward" or "grad" (torch.autograd.grad)
    roots: tuple[str, ...]
    node_count: int
    signature: int
    location: SourceLine | None = None  # the line that called backward
    strategy: str = "capture"  # "capture": one engine pass; "hooks": a prehook on each node (see note)
    note: str = ""  # why the pass was recorded with hooks
    kept: bool = True
    failed: str | None = None  # the error the pass raised, if it did

    def describe(self) -> str:
        """``pass 2: errG.backward() (In [4], line 9)``."""
        root = ", ".join(self.roots) or "?"
        call = f"{root}.backward()" if self.entry == "backward" else f"autograd.grad({root}, ...)"
        where = f" ({self.location})" if self.location is not None else ""
        return f"pass {self.index + 1}: {call}{where}"


@dataclass(frozen=True)
class MissingGradient:
    """A leaf that requires grad but got no gradient in the trace, and why."""

    name: str
    shape: tuple[int, ...] | None
    reason: str
    source: SourceLine | None = None
