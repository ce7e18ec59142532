"""The gradient table as HTML, for notebooks (everything from user data is escaped)."""

from __future__ import annotations

import html
from collections.abc import Sequence

from ..trace.model import MissingGradient, TraceNode, _format_number
from .dot import BAD_FILL, shape_only
from .text import _ref, gradient_rows

# Inline, because JupyterLab's own table style (right-aligned) wins over a stylesheet's.
_LEFT, _RIGHT = ' style="text-align:left"', ' style="text-align:right"'
_ALIGN = (_LEFT, _LEFT, _RIGHT, _RIGHT, _RIGHT, _RIGHT, _RIGHT, _RIGHT, _LEFT)
_CSS = (
    "<style>.torchmagic-table td,.torchmagic-table th{padding:2px 8px;"
    "font-family:monospace;font-size:12px}.torchmagic-table tr.bad{background:" + BAD_FILL + "}</style>"
)


def gradient_table(nodes: Sequence[TraceNode], missing: Sequence[MissingGradient]) -> str:
    esc = html.escape
    rows = gradient_rows(nodes)
    parts = [_CSS]
    if rows:
        parts.append('<table class="torchmagic-table"><thead><tr>')
        headers = ("name", "shape", "mean", "min", "max", "norm", "NaN", "Inf", "source")
        parts += [f"<th{_ALIGN[i]}>{h}</th>" for i, h in enumerate(headers)]
        parts.append("</tr></thead><tbody>")
        for n in rows:
            cls = ' class="bad"' if not n.grad.finite else ""
            name = esc(_ref(n)) + (" <b>(first NaN/Inf)</b>" if n.nonfinite_origin else "")
            cells = [
                name,
                esc(shape_only(n.shape)),
                *(esc(_format_number(v)) for v in (n.grad.mean, n.grad.min, n.grad.max, n.grad.norm)),
                str(n.grad.nan_count),
                str(n.grad.inf_count),
                esc(str(n.source or "")),
            ]
            parts.append(f"<tr{cls}>" + "".join(f"<td{_ALIGN[i]}>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
        parts.append("</tbody></table>")
    no_grad = [(_ref(n), n.missing_reason, n.source) for n in nodes if n.kind != "op" and n.grad is None and n.missing_reason]
    no_grad += [(m.name, m.reason, m.source) for m in missing]
    if no_grad:
        parts.append('<p style="margin:4px 0 0 0"><b>no gradient</b></p><table class="torchmagic-table"><tbody>')
        for name, reason, source in no_grad:
            parts.append(f"<tr><td>{esc(name)}</td><td>{esc(reason or '')}</td><td>{esc(str(source or ''))}</td></tr>")
        parts.append("</tbody></table>")
    return "".join(parts)
