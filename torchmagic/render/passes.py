"""Which backward passes a trace saw, what it left out, and leaves whose ``.grad`` differs from the
gradient shown: as text lines and as HTML (everything from user data escaped)."""

from __future__ import annotations

import html
from collections.abc import Sequence

from ..trace.model import PassInfo, TraceNode, _format_number
from .describe import shape_only

MAX_PASS_LINES = 8  # a training loop's passes are summarised, not listed one by one


def pass_lines(passes: Sequence[PassInfo], notes: Sequence[str]) -> list[str]:
    """``pass 2: errG.backward() (In [4], line 9)``, one line per pass whose graph is shown (and a
    count of the others), then what the trace left out or recorded another way."""
    lines = []
    shown = [p for p in passes if p.kept]
    if len(passes) > 1 or any(p.failed for p in passes):
        earlier = len(passes) - len(shown)
        lines.append(f"backward passes: {len(passes)}" + (f" ({earlier} earlier ones from the same lines "
                                                          "left their norms per pass)" if earlier else ""))
        for info in shown[-MAX_PASS_LINES:]:
            text = "  " + info.describe()
            if info.failed:
                text += f"  raised {info.failed}"
            lines.append(text)
    lines += [f"note: {note}" for note in notes]
    return lines


def leaf_grad_rows(nodes: Sequence[TraceNode]) -> list[TraceNode]:
    """Leaves whose own ``.grad`` differs from the gradient the trace shows (clipped, accumulated, zeroed)."""
    return [n for n in nodes if n.kind != "op" and n.leaf_grad_note]


def leaf_grad_lines(nodes: Sequence[TraceNode]) -> list[str]:
    from .text import table

    rows = leaf_grad_rows(nodes)
    if not rows:
        return []
    body = []
    for node in rows:
        grad = node.leaf_grad
        value = "None" if grad is None else grad.short()
        body.append((node.name or f"%{node.id}", shape_only(node.shape), value, node.leaf_grad_note or ""))
    return ["  .grad differs from the gradient shown (which is what the pass computed):",
            *table(body, indent="    ")]


def pass_html(passes: Sequence[PassInfo], notes: Sequence[str]) -> str:
    esc = html.escape
    lines = pass_lines(passes, notes)
    if not lines:
        return ""
    return '<pre style="margin:4px 0;font-size:12px">' + esc("\n".join(lines)) + "</pre>"


def leaf_grad_html(nodes: Sequence[TraceNode]) -> str:
    esc = html.escape
    rows = leaf_grad_rows(nodes)
    if not rows:
        return ""
    parts = ['<p style="margin:4px 0 0 0"><b>.grad differs from the gradient shown</b> '
             "(the table shows what each pass computed)</p>", '<table class="torchmagic-table"><tbody>']
    for node in rows:
        grad = node.leaf_grad
        value = "None" if grad is None else grad.short()
        norm = "" if grad is None else f"norm {_format_number(grad.norm)}"
        parts.append(f"<tr><td>{esc(node.name or '')}</td><td>{esc(value)}</td><td>{esc(norm)}</td>"
                     f"<td>{esc(node.leaf_grad_note or '')}</td></tr>")
    parts.append("</tbody></table>")
    return "".join(parts)
