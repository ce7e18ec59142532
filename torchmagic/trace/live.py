"""A live view of a training loop while it runs: passes so far, their rate, the loss, each module's
gradient norm per pass and NaN/Inf counts, refreshed at most every ``interval`` seconds.

Plain Python: the recorder calls ``on_pass`` after each backward pass, and the view calls
``publish(view)`` when it is due; whoever shows it (a notebook display updated in place, a
terminal status line) decides how. Nothing here reads a gradient the recording has not already
reduced: norms are the per-pass norms the recorder takes anyway, and the loss is read back in one
batch per refresh.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..display import TextAndHtml
from ..render.history import sparkline, sparkline_svg
from .model import _format_number
from .stats import floats_of

MAX_MODULE_ROWS = 12  # a live view is a glance: the modules with the largest gradients
MAX_PASSES_PLOTTED = 2000  # the plots show the latest passes (a sparkline has 40 buckets anyway)


class LiveView(TextAndHtml):
    """What a training loop has done so far; ``text()`` is one status line, ``html()`` a small table."""

    def __init__(self, recorder: Any, publish: Callable[[LiveView], None], *, interval: float = 0.25,
                 names: Callable[[], Mapping[str, Any]] | None = None, clock: Callable[[], float] = time.monotonic,
                 cell: str = "") -> None:
        self.recorder = recorder
        self.publish = publish
        self.interval = interval
        self.names = names
        self.clock = clock
        self.cell = cell
        self.started = clock()
        self.passes = 0
        self.updates = 0
        self.losses: list[float] = []
        self._pending_losses: list[torch.Tensor] = []
        self._last = float("-inf")
        self._labels: dict[int, str] | None = None
        self.module_norms: dict[str, list[float]] = {}  # module (or leaf) -> norm per pass
        self.nonfinite: list[int] = []  # per pass: how many leaf gradients were NaN/Inf
        self._cursor: dict[int, tuple[Any, int]] = {}  # id(leaf) -> (its norm history, how much is counted)
        self._squares: dict[int, dict[str, float]] = {}  # pass index -> module -> sum of squared norms
        self._bad: dict[int, int] = {}
        self.bad_passes = 0  # passes with a NaN/Inf leaf gradient, over the whole run
        self.error: str | None = None
        recorder.listeners.append(self.on_pass)

    def detach(self) -> None:
        if self.on_pass in self.recorder.listeners:
            self.recorder.listeners.remove(self.on_pass)

    # -- fed by the recorder -------------------------------------------------------------------
    def on_pass(self, recorder: Any, record: Any, outputs: tuple) -> None:
        self.passes += 1
        if len(outputs) == 1 and isinstance(outputs[0], torch.Tensor):
            try:
                with torch._C.DisableTorchFunctionSubclass():
                    root = outputs[0]
                    if root.numel() == 1 and not root.is_meta and not root.is_complex():
                        self._pending_losses.append(root.detach().reshape(()))
            except Exception:
                pass
        now = self.clock()
        if now - self._last >= self.interval:
            self.refresh(now)

    def refresh(self, now: float | None = None) -> None:
        """Bring the numbers up to date and publish; never raises into the training loop."""
        self._last = self.clock() if now is None else now
        try:
            self._collect()
            self.updates += 1
            self.publish(self)
        except Exception as error:  # a view must not stop training
            self.error = f"{type(error).__name__}: {error}"

    def _collect(self) -> None:
        if self._pending_losses:
            with torch._C.DisableTorchFunction():
                values = floats_of(self._pending_losses)
            self.losses += values
            del self.losses[:-MAX_PASSES_PLOTTED]
            self._pending_losses = []
        recorder = self.recorder
        for record in recorder.passes:
            if record.kept and record.leaf_grads:
                with torch._C.DisableTorchFunction():
                    recorder.ledger.norms(record)
        histories = recorder.ledger.history
        gone = [key for key, (history, _) in self._cursor.items()
                if key not in histories or histories[key][1] is not history]
        for key in gone:  # a leaf that died, or a new leaf that took a dead one's id: a fresh history
            del self._cursor[key]
        if gone:
            self._labels = None  # (names are by id: look again)
        labels = self._leaf_labels()
        fresh: list[tuple[str, int, Any]] = []  # norms not seen yet: (module, pass index, norm)
        for key, (_, history) in histories.items():
            seen = self._cursor.get(key)
            cursor = seen[1] if seen is not None else 0
            label = labels.get(key)
            while cursor < len(history) and history[cursor][1] is not None:
                if label is not None:
                    index, norm = history[cursor]
                    fresh.append((label.rsplit(".", 1)[0] if "." in label else label, index, norm))
                cursor += 1
            self._cursor[key] = (history, cursor)
        if fresh:
            with torch._C.DisableTorchFunction():  # one read back per device for all of them
                values = floats_of([n for _, _, n in fresh])
            for (module, index, _), value in zip(fresh, values):
                squares = self._squares.setdefault(index, {})
                squares[module] = squares.get(module, 0.0) + (value * value if math.isfinite(value) else math.inf)
                if not math.isfinite(value):
                    if index not in self._bad:
                        self.bad_passes += 1
                    self._bad[index] = self._bad.get(index, 0) + 1
        order = sorted(self._squares)[-MAX_PASSES_PLOTTED:]
        if len(self._squares) > len(order):  # older passes are no longer plotted
            kept = set(order)
            self._squares = {index: self._squares[index] for index in order}
            self._bad = {index: count for index, count in self._bad.items() if index in kept}
        modules: dict[str, list[float]] = {}
        for index in order:
            for module, squares in self._squares[index].items():
                modules.setdefault(module, []).append(math.sqrt(squares) if math.isfinite(squares) else math.nan)
        self.module_norms = modules
        self.nonfinite = [self._bad.get(index, 0) for index in order]

    def _leaf_labels(self) -> dict[int, str]:
        """id(leaf) -> its name: a parameter's module path, else the variable's name (found once)."""
        if self._labels is None:
            from .naming import NamespaceNames

            names = NamespaceNames(self.names() if self.names is not None else None)
            labels: dict[int, str] = {}
            for key, paths in names.params.items():
                labels[key] = paths[0]
            for key, variables in names.by_id.items():
                labels.setdefault(key, variables[0])
            self._labels = labels
        labels = self._labels
        for key, info in self.recorder.leaves.alive():
            if key not in labels and info.names:
                labels[key] = info.names[0][0]
        return labels

    # -- views ---------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.passes / elapsed if elapsed > 0 else 0.0

    def _top_modules(self) -> list[tuple[str, list[float]]]:
        """The modules with the largest gradient norm in the latest pass (NaN/Inf first)."""
        def latest(item: tuple[str, list[float]]) -> float:
            value = item[1][-1]
            return -math.inf if not math.isfinite(value) else -value

        return sorted(self.module_norms.items(), key=latest)[:MAX_MODULE_ROWS]

    def text(self) -> str:
        """One line: passes, rate, loss, the NaN/Inf count and the largest module's norm sparkline."""
        parts = [f"{self.passes} backward pass{'es' if self.passes != 1 else ''}", f"{self.rate:.1f}/s"]
        if self.losses:
            parts.append(f"loss {_format_number(self.losses[-1])} {sparkline(self.losses, 16)}")
        bad = self.bad_passes
        parts.append(f"NaN/Inf in {bad} pass{'es' if bad != 1 else ''}" if bad else "no NaN/Inf")
        top = self._top_modules()
        if top:
            name, values = top[0]
            parts.append(f"|grad| {name} {sparkline(values, 16)} {_format_number(values[-1])}")
        return "live: " + " · ".join(parts)

    def html(self) -> str:
        esc = html.escape
        head = esc(self.text().removeprefix("live: "))
        rows = []
        for name, values in self._top_modules():
            bad = any(not math.isfinite(v) for v in values)
            style = ' style="background:#ff9a9a"' if bad else ""
            rows.append(f"<tr{style}><td>{esc(name)}</td><td>{sparkline_svg(values)}</td>"
                        f"<td style=\"text-align:right\">{esc(_format_number(values[-1]))}</td></tr>")
        loss = ""
        if self.losses:
            loss = (f"<tr><td><b>loss</b></td><td>{sparkline_svg(self.losses)}</td>"
                    f"<td style=\"text-align:right\">{esc(_format_number(self.losses[-1]))}</td></tr>")
        title = f"live trace{' of ' + esc(self.cell) if self.cell else ''}"
        return (f'<div class="torchmagic-live"><p style="margin:2px 0"><b>{title}</b> · {head}</p>'
                f'<table class="torchmagic-table">{loss}{"".join(rows)}</table></div>')

