"""The extension's options, the ``TorchMagic`` configurable: ``%config TorchMagic`` and ipython_config.py."""

from __future__ import annotations

import math
import sys
from typing import Any

from traitlets import Float, Int, TraitError, Unicode
from traitlets.config import Config, Configurable

from .. import device as devices
from ..errors import DeviceError


class FiniteFloat(Float):
    """A float that is a number (NaN compares false with any bound, so ``min`` lets it through)."""

    def validate(self, obj: Any, value: Any) -> float:
        if isinstance(value, bool):
            raise TraitError("expected a number, not bool")
        try:
            value = super().validate(obj, value)
        except OverflowError:
            raise TraitError("too large a number") from None
        if not math.isfinite(value):
            raise TraitError(f"must be a finite number, not {value!r}")
        return value


class Count(Int):
    """An int that is not a bool (``True`` passes traitlets' Int as 1)."""

    def validate(self, obj: Any, value: Any) -> int:
        if isinstance(value, bool):
            raise TraitError("expected a number, not bool")
        return super().validate(obj, value)


class DeviceSpec(Unicode):
    """A device spec as ``%device`` takes it; empty means "leave the default device alone"."""

    info_text = "a device spec (cpu, cuda, cuda:N, mps, meta, auto) or empty"

    def validate(self, obj: Any, value: Any) -> str:
        value = super().validate(obj, value)
        if value.strip():
            try:
                devices.parse_device(value)
            except DeviceError as error:
                raise TraitError(str(error)) from None
        return value


class TorchMagic(Configurable):
    """torchmagic's options (``%config TorchMagic`` lists them).

    A value that fails validation is refused where IPython applies it, with one line saying
    so, and the option keeps its value; IPython's config may still hold the refused value
    (``%config`` merges it into every configurable), so loading the extension again warns
    in one line and uses the default instead of failing.
    """

    layout_timeout = FiniteFloat(
        10.0, min=0.0,
        help="Seconds any diagram's layout may take; it then stops and the text view is shown with the reason.",
    ).tag(config=True)
    max_rows = Count(
        50, min=1, help="Rows the text view, the gradient table and the per-pass plots list at most (NaN/Inf, "
                        "outputs, named tensors and the largest gradients first; every tensor stays in t.nodes).",
    ).tag(config=True)
    max_nodes = Count(500, min=1, help="Diagrams draw at most this many tensors; the rest are summarised.").tag(config=True)
    small_values = Count(
        16, min=0, help="Gradients with at most this many elements are shown as values, larger ones as statistics."
    ).tag(config=True)
    memory_budget = Count(
        256 * 2**20, min=0,
        help="Bytes of gradient tensors a trace keeps whole (those nearest the output first; a leaf's gradient, "
             "which is its .grad, costs nothing); past it, a gradient's norm alone. Only the newest trace keeps them.",
    ).tag(config=True)
    history_size = Count(
        3, min=1, help="How many past traces are kept (torchmagic.last_trace(), %autograd_trace show)."
    ).tag(config=True)
    live_interval = FiniteFloat(
        0.25, min=0.02, help="Seconds between refreshes of a --live view (it refreshes after a backward pass, "
                             "never more often than this).",
    ).tag(config=True)
    default_device = DeviceSpec(
        "", help="Default device applied when the extension loads (cpu, cuda, cuda:N, mps, meta, auto); empty: leave it."
    ).tag(config=True)

    def _load_config(self, cfg: Config, section_names: list[str] | None = None, traits: dict | None = None) -> None:
        # traitlets applies config here, both at construction and from `%config` (update_config); a
        # TraitError from it would abort the whole load (and `%reload_ext` with it). Values that fail
        # their trait's validation are taken out of `cfg` first, so they are neither set nor merged.
        traits = self.traits(config=True) if traits is None else traits
        for section in self.section_names():
            if not cfg._has_section(section):
                continue
            entries = cfg[section]
            for name in [n for n in entries if n in traits]:
                value = entries[name]
                if isinstance(value, Config) or type(value).__name__ in ("LazyConfigValue", "DeferredConfig"):
                    continue
                try:
                    traits[name].validate(self, value)
                except TraitError as error:
                    del entries[name]
                    print(f"torchmagic: TorchMagic.{name} = {value!r} not applied: {_reason(traits[name], value, error)}; "
                          f"it stays {getattr(self, name)!r}", file=sys.stderr)
        super()._load_config(cfg, section_names=section_names, traits=traits)


def _reason(trait: Any, value: Any, error: TraitError) -> str:
    """traitlets' messages name the class and the instance; say what the value must be instead."""
    low = getattr(trait, "min", None)
    if isinstance(trait, Int) and isinstance(value, float) and not isinstance(trait, Float):
        return f"expected a whole number, not {value!r}"
    if low is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
        return "must not be negative" if low == 0 else f"must be at least {low}"
    if isinstance(trait, (Int, Float)) and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"expected a number, not {type(value).__name__}"
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__
