"""The gradient table and loop plots as HTML, for notebooks (everything from user data is escaped)."""

from __future__ import annotations

import html
from collections.abc import Sequence

from ..trace.loops import Loop
from ..trace.model import MissingGradient, TraceNode
from .describe import is_complex, ref, shape_only, stat_cells
from .dot import BAD_FILL
from .history import history_table
from .text import gradient_rows, importance, loop_history, more_line, pick

# Inline, because JupyterLab's own table style (right-aligned) wins over a stylesheet's.
_LEFT, _RIGHT = ' style="text-align:left"', ' style="text-align:right"'
_ALIGN = (_LEFT, _LEFT, _RIGHT, _RIGHT, _RIGHT, _RIGHT, _RIGHT, _RIGHT, _LEFT)
_CSS = (
    "<style>.torchmagic-table td,.torchmagic-table th{padding:2px 8px;"
    "font-family:monospace;font-size:12px}.torchmagic-table tr.bad{background:" + BAD_FILL + "}</style>"
)


def gradient_table(nodes: Sequence[TraceNode], missing: Sequence[MissingGradient], max_rows: int = 50) -> str:
    """At most ``max_rows`` rows (NaN/Inf, outputs, named tensors, the largest gradients first)."""
    esc = html.escape
    rows, left = pick(gradient_rows(nodes), importance, max_rows)
    parts = [_CSS]
    if rows:
        parts.append('<table class="torchmagic-table"><thead><tr>')
        headers = ("name", "shape", "mean", "min", "max", "norm", "NaN", "Inf", "source")
        parts += [f"<th{_ALIGN[i]}>{h}</th>" for i, h in enumerate(headers)]
        parts.append("</tr></thead><tbody>")
        for n in rows:
            cls = ' class="bad"' if not n.grad.finite else ""
            name = esc(ref(n)) + (" <b>(first NaN/Inf)</b>" if n.nonfinite_origin else "")
            if is_complex(n):
                name += ' <i title="statistics over the magnitudes of a complex gradient">|complex|</i>'
            cells = [
                name,
                esc(shape_only(n.shape)),
                *(esc(cell) for cell in stat_cells(n.grad)),
                str(n.grad.nan_count),
                str(n.grad.inf_count),
                esc(str(n.source or "")),
            ]
            parts.append(f"<tr{cls}>" + "".join(f"<td{_ALIGN[i]}>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
        parts.append("</tbody></table>")
    if left:
        parts.append(f"<p>{esc(more_line(left, 'gradients not listed', max_rows).strip())}</p>")
    no_grad = [(ref(n), n.missing_reason, n.source) for n in nodes if n.kind != "op" and n.grad is None and n.missing_reason]
    no_grad += [(m.name, m.reason, m.source) for m in missing]
    no_grad, left = no_grad[:max_rows], max(0, len(no_grad) - max_rows)
    if no_grad:
        parts.append('<p style="margin:4px 0 0 0"><b>no gradient</b></p><table class="torchmagic-table"><tbody>')
        for name, reason, source in no_grad:
            parts.append(f"<tr><td>{esc(name)}</td><td>{esc(reason or '')}</td><td>{esc(str(source or ''))}</td></tr>")
        parts.append("</tbody></table>")
    if left:
        parts.append(f"<p>{esc(more_line(left, 'tensors without a gradient not listed', max_rows).strip())}</p>")
    return "".join(parts)


def loop_table(nodes: Sequence[TraceNode], loops: Sequence[Loop]) -> str:
    """Each folded loop's carried tensor: its gradient norm per iteration as a plot (backprop through time)."""
    if not loops:
        return ""
    return history_table(loop_history(nodes, loops), title="gradient norm per loop iteration",
                         column="per iteration", width=320)
