"""The trace as aligned text, for the IPython terminal and for ``t.text()``."""

from __future__ import annotations

from collections.abc import Sequence

from ..trace.model import MissingGradient, TraceNode, _format_number
from ..trace.view import CollapsedModule, Fold, View
from .dot import _shape_text, shape_only


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _ref(node: TraceNode) -> str:
    return node.name if node.name is not None else f"%{node.id}"


def _unit_row(unit: CollapsedModule, fold: Fold | None) -> tuple[str, ...]:
    what = f"[{fold.label if fold else unit.kind or 'module'}: {unit.ops} ops, {len(unit.node_ids)} tensors"
    what += f", {unit.params:,} params]" if unit.params else "]"
    grad = f"param grad norm {unit.grad_norm:.3g}" if unit.grad_norm is not None else ""
    if unit.nonfinite:
        grad = (grad + "  " if grad else "") + "NaN/Inf inside"
    return (unit.path, "=", what, "", "collapsed", grad)


def graph_lines(nodes: Sequence[TraceNode], max_nodes: int, view: View | None = None) -> list[str]:
    """One line a tensor, inputs first: ``z = mul(%3)   (2, 2) float32   grad [[0.25, ...]]``.

    With a ``view``, a collapsed module is one line and folded copies of a repeated block none.
    """
    rows = []
    owner = view.owner if view is not None else {}
    stand_in = view.stand_in if view is not None else {}
    visible = [n for n in nodes if n.id not in stand_in]
    shown = visible if len(visible) <= max_nodes else visible[-max_nodes:]
    done_units: set[str] = set()

    def ref(i: int) -> str:  # an input inside a collapsed module is named by the module
        i = stand_in.get(i, i)
        return owner[i] if i in owner else _ref(nodes[i])

    for node in shown:
        if node.id in owner:
            path = owner[node.id]
            if path not in done_units:
                done_units.add(path)
                rows.append(_unit_row(view.collapsed[path], view.folds.get(path)))
            continue
        if node.kind == "op":
            args = ", ".join(ref(i) for i in node.inputs)
            what = f"{node.op}({args})"
            if node.output_nr or len([n for n in nodes if n.op_id == node.op_id]) > 1:
                what += f"[{node.output_nr}]"
        else:
            what = node.op if node.kind == "leaf" else "parameter"
        flags = []
        if node.is_output:
            flags.append("output")
        if node.nonfinite_origin:
            flags.append("FIRST NaN/Inf")
        if node.grad is not None:
            grad = _clip("grad " + node.grad.short(), 70)
        else:
            grad = f"no grad: {node.missing_reason}" if node.missing_reason else ""
        rows.append((_ref(node), "=", _clip(what, 40), _shape_text(node), " ".join(flags), grad))
    lines = table(rows) if rows else ["  (no autograd graph)"]
    if len(shown) < len(visible):
        lines.insert(0, f"  … {len(visible) - len(shown)} earlier tensors not shown (max_nodes={max_nodes})")
    if view is not None:
        lines[:0] = ["  " + note for note in view.notes()]
    return lines


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def gradient_rows(nodes: Sequence[TraceNode]) -> list[TraceNode]:
    """The tensors the gradient table lists: named ones, leaves, outputs, and any NaN/Inf."""
    return [
        n for n in nodes
        if n.grad is not None and (n.name is not None or n.kind != "op" or n.is_output or not n.grad.finite)
    ]


def gradient_lines(nodes: Sequence[TraceNode], missing: Sequence[MissingGradient]) -> list[str]:
    lines = []
    rows = gradient_rows(nodes)
    if rows:
        header = ("name", "shape", "mean", "min", "max", "norm", "NaN", "Inf", "source")
        body = [
            (
                _ref(n) + (" (!)" if n.nonfinite_origin else ""),
                shape_only(n.shape),
                _format_number(n.grad.mean),
                _format_number(n.grad.min),
                _format_number(n.grad.max),
                _format_number(n.grad.norm),
                str(n.grad.nan_count),
                str(n.grad.inf_count),
                _clip(str(n.source), 50) if n.source else "",
            )
            for n in rows
        ]
        lines += table([header, *body])
    no_grad = [n for n in nodes if n.kind != "op" and n.grad is None and n.missing_reason]
    if no_grad or missing:
        lines.append("  no gradient:")
        rows2 = [(_ref(n), shape_only(n.shape), n.missing_reason or "", str(n.source or "")) for n in no_grad]
        rows2 += [(m.name, shape_only(m.shape), m.reason, str(m.source or "")) for m in missing]
        lines += table(rows2, indent="    ")
    return lines
