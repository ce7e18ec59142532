"""Gradient norms over time as small plots (per backward pass, per loop iteration): text sparklines and SVG.

Norms that span more than two orders of magnitude are plotted on a log scale, so a vanishing
or exploding gradient shows as a slope rather than a flat line with one spike.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

from .describe import format_number

_SPARKS = "▁▂▃▄▅▆▇█"
BAD = "#c00000"


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def scale(values: Sequence[float]) -> tuple[list[float | None], bool]:
    """Each value placed in [0, 1] (None where not finite), and whether the scale is logarithmic.

    A gradient that vanished to exactly 0 (float underflow) does not stop a log scale: zeros sit
    at the bottom, below the smallest positive value.
    """
    finite = [v for v in values if _finite(v)]
    if not finite:
        return [None] * len(values), False
    positive = [v for v in finite if v > 0]
    log = min(finite) >= 0 and len(positive) >= 2 and max(positive) / min(positive) > 100
    if not log:
        low, high = min(finite), max(finite)
        span = (high - low) or 1.0
        return [None if not _finite(v) else (v - low) / span for v in values], False
    low, high = math.log10(min(positive)), math.log10(max(positive))
    span = (high - low) or 1.0
    floor = 0.1 if len(positive) < len(finite) else 0.0  # room below for the zeros
    out: list[float | None] = []
    for v in values:
        if not _finite(v):
            out.append(None)
        elif v == 0:
            out.append(0.0)
        else:
            out.append(floor + (1 - floor) * (math.log10(v) - low) / span)
    return out, True


def _buckets(values: Sequence[float], width: int) -> list[float]:
    """At most ``width`` values: the mean of each run of passes (NaN/Inf wins within its run)."""
    if len(values) <= width:
        return list(values)
    out = []
    for i in range(width):
        chunk = values[i * len(values) // width:(i + 1) * len(values) // width]
        bad = [v for v in chunk if not _finite(v)]
        out.append(bad[0] if bad else sum(chunk) / len(chunk))
    return out


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """``▁▂▅█`` for a list of numbers; ``!`` marks NaN or Inf, ``_`` an exact zero on a log scale."""
    values = _buckets(values, width)
    positions, log = scale(values)
    return "".join("!" if p is None else "_" if log and v == 0 else _SPARKS[min(7, int(p * 7.999))]
                   for v, p in zip(values, positions))


def sparkline_svg(values: Sequence[float], width: int = 160, height: int = 22) -> str:
    """A small inline SVG line plot; NaN/Inf passes are red ticks at the top. At most one point per
    pixel: longer series are averaged in runs (a NaN/Inf wins its run)."""
    count = len(values)
    values = _buckets(values, width)
    positions, log = scale(values)
    n = len(values)
    step = width / max(1, n - 1)
    points, bad = [], []
    for i, p in enumerate(positions):
        x = i * step if n > 1 else width / 2
        if p is None:
            bad.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="6" stroke="{BAD}" stroke-width="1.5"/>')
        else:
            points.append(f"{x:.1f},{height - 2 - p * (height - 4):.1f}")
    line = f'<polyline fill="none" stroke="#1f5f9f" stroke-width="1.2" points="{" ".join(points)}"/>' if points else ""
    title = f"<title>{count} values{' (log scale)' if log else ''}</title>"
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{title}{line}{"".join(bad)}</svg>')


def _summary(values: Sequence[float]) -> tuple[str, str, str, str]:
    finite = [v for v in values if _finite(v)]
    bad = len(values) - len(finite)
    low = format_number(min(finite)) if finite else "-"
    high = format_number(max(finite)) if finite else "-"
    return format_number(values[0]), format_number(values[-1]), f"{low} … {high}", str(bad)


def _bounded(history: Mapping[str, Sequence[tuple[int, float]]], max_rows: int) -> tuple[list, int]:
    """At most ``max_rows`` series, those with NaN/Inf and the largest last values first, in their order."""
    items = [(name, [v for _, v in entries]) for name, entries in history.items()]

    def key(item):
        values = item[1]
        bad = any(not _finite(v) for v in values)
        last = values[-1] if values and _finite(values[-1]) else -1.0
        return (not bad, -last)

    if len(items) <= max_rows:
        return items, 0
    chosen = {id(item) for item in sorted(items, key=key)[:max_rows]}
    return [item for item in items if id(item) in chosen], len(items) - max_rows


def history_lines(history: Mapping[str, Sequence[tuple[int, float]]], column: str = "per pass",
                  max_rows: int = 50) -> list[str]:
    from .text import more_line, table

    items, left = _bounded(history, max_rows)
    rows = [("name", column, "first", "last", "range", "NaN/Inf")]
    for name, values in items:
        _, log = scale(values)
        rows.append((name, sparkline(values) + (" (log)" if log else ""), *_summary(values)))
    return table(rows) + ([more_line(left, "series not listed", max_rows)] if left else [])


def history_table(history: Mapping[str, Sequence[tuple[int, float]]], title: str = "gradient norm per backward pass",
                  column: str = "per pass", width: int = 160, max_rows: int = 50) -> str:
    from .text import more_line

    esc = html.escape
    items, left = _bounded(history, max_rows)
    align_left, right = ' style="text-align:left"', ' style="text-align:right"'
    parts = [f'<p style="margin:6px 0 2px 0"><b>{esc(title)}</b></p>',
             '<table class="torchmagic-table torchmagic-history"><thead><tr>']
    for header, align in (("name", align_left), (column, align_left), ("first", right), ("last", right),
                          ("range", right), ("NaN/Inf", right)):
        parts.append(f"<th{align}>{header}</th>")
    parts.append("</tr></thead><tbody>")
    for name, values in items:
        first, last, span, bad = _summary(values)
        cls = ' class="bad"' if bad != "0" else ""
        parts.append(f"<tr{cls}><td{align_left}>{esc(name)}</td><td{align_left}>{sparkline_svg(values, width=width)}"
                     f"</td><td{right}>{first}</td><td{right}>{last}</td><td{right}>{esc(span)}</td>"
                     f"<td{right}>{bad}</td></tr>")
    parts.append("</tbody></table>")
    if left:
        parts.append(f"<p>{esc(more_line(left, 'series not listed', max_rows).strip())}</p>")
    return "".join(parts)
