"""The trace as aligned text, for the IPython terminal and for ``t.text()``.

Long traces stay readable: each listing shows at most ``max_rows`` rows, chosen by what matters
(NaN/Inf, outputs, named tensors, the largest gradients), kept in graph order, and says how
many more are in ``t.nodes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..trace.loops import Loop
from ..trace.model import MissingGradient, TraceNode
from ..trace.view import View, compress_names
from .describe import clip, grad_text, is_complex, ref, shape_only, shape_text, stat_cells


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def importance(node: TraceNode) -> tuple:
    """Sort key, most important first: NaN/Inf, outputs, named tensors, then the largest gradients."""
    bad = node.nonfinite_origin or (node.grad is not None and not node.grad.finite)
    norm = node.grad.norm if node.grad is not None and math.isfinite(node.grad.norm) else -1.0
    return (not bad, not node.is_output, node.name is None, -norm, node.id)


def pick(items: Sequence, key, limit: int) -> tuple[list, int]:
    """At most ``limit`` of ``items``, the smallest ``key`` first, returned in their own order; and how
    many were left out."""
    if len(items) <= limit:
        return list(items), 0
    chosen = set(sorted(range(len(items)), key=lambda k: key(items[k]))[:limit])
    return [item for k, item in enumerate(items) if k in chosen], len(items) - limit


def more_line(count: int, what: str, max_rows: int) -> str:
    return f"  … {count} more {what} (max_rows={max_rows}); every tensor is in t.nodes"


class _Refs:
    """How the text names a tensor where another one uses it, as the diagram draws it."""

    def __init__(self, nodes: Sequence[TraceNode], view: View | None) -> None:
        self.nodes, self.view = nodes, view

    def unit(self, call) -> str:
        unit = self.view.collapsed[call]
        return unit.path if unit.calls <= 1 else f"{unit.path}#{unit.call}"

    def __call__(self, i: int) -> str:
        node = self.nodes[i]
        view = self.view
        if view is None:
            return ref(node)
        # a twin in a fold keeps its own name, module call or id where it is used (the previous
        # iteration's h, the previous block's norm2), never its drawn twin's
        if node.name is not None:
            return node.name
        if i in view.owner and i not in view.exits:
            return self.unit(view.owner[i])
        return ref(node)


def graph_lines(nodes: Sequence[TraceNode], max_rows: int, view: View | None = None) -> list[str]:
    """One line a tensor, inputs first: ``z = mul(%3)   (2, 2) float32   grad [[0.25, ...]]``.

    With a ``view``, a collapsed module call is one line, folded twins none (the drawn twin's
    line names them), and a folded loop starts with a line that says so.
    """
    refs = _Refs(nodes, view)
    owner = view.owner if view is not None else {}
    stand_in = view.stand_in if view is not None else {}
    hidden = view.hidden if view is not None else {}
    exits = view.exits if view is not None else set()
    outputs: dict[int, int] = {}
    for node in nodes:
        outputs[node.op_id] = outputs.get(node.op_id, 0) + 1
    loops = view.loops if view is not None else []
    entries: list[tuple[tuple, tuple[str, ...], str | None]] = []  # (importance, row, header before it)
    done_units: set = set()
    unit_inputs = None
    starts: dict[int, Loop] = {}
    for node, loop in _in_order(nodes, loops):
        if node.id in stand_in or node.id in hidden:
            continue
        header = None
        if loop is not None and loop not in starts.values():
            starts[node.id] = loop
            header = _loop_header(loop)
        if node.id in owner:
            call = owner[node.id]
            if call not in done_units:
                done_units.add(call)
                if unit_inputs is None:
                    unit_inputs = _unit_inputs(nodes, view, refs)
                unit_row = _unit_row(nodes, view, call, refs, unit_inputs)
                entries.append(((False, False, False, 0.0, node.id), unit_row, header))
                header = None
            if node.id not in exits:
                continue
            what = f"output of {refs.unit(call)}"
        elif node.kind == "op":
            what = f"{node.op}({', '.join(refs(i) for i in node.inputs)})"
            if node.output_nr or outputs[node.op_id] > 1:
                what += f"[{node.output_nr}]"
        else:
            what = node.op if node.kind == "leaf" else "parameter"
        flags = []
        if node.is_output:
            flags.append("output")
        if node.nonfinite_origin:
            flags.append("FIRST NaN/Inf")
        if view is not None:
            twins = [nodes[m].label for m in view.members(node.id)[1:] if nodes[m].name is not None]
            if twins:
                flags.append("also " + compress_names(twins))
        if node.grad is not None:
            grad = grad_text(node, 65)
        else:
            grad = f"no grad: {node.missing_reason}" if node.missing_reason else ""
        row = (ref(node), "=", clip(what, 40), shape_text(node), " ".join(flags), grad)
        entries.append((importance(node), row, header))
    chosen, left = pick(entries, lambda entry: entry[0], max_rows)
    lines: list[str] = []
    if chosen:
        body = table([row for _, row, _ in chosen])
        for (_, _, header), line in zip(chosen, body):
            if header:
                lines.append(header)
            lines.append(line)
    else:
        lines = ["  (no autograd graph)"]
    if left:
        lines.append(more_line(left, "tensors not listed", max_rows))
    if view is not None:
        lines[:0] = ["  " + note for note in view.notes()]
    return lines


def _in_order(nodes: Sequence[TraceNode], loops: Sequence[Loop]):
    """Nodes in graph order, each with its loop when in a drawn iteration; a drawn iteration's nodes
    together, where its last one is (nothing outside uses them before: the order stays inputs first)."""
    unit_of = {i: loop for loop in loops for i in loop.drawn}
    last = {max(loop.drawn): loop for loop in loops}
    for node in nodes:
        if node.id in last:
            loop = last[node.id]
            for i in sorted(loop.drawn):
                yield nodes[i], loop
        elif node.id not in unit_of:
            yield node, None


def _loop_header(loop: Loop) -> str:
    where = f" at {loop.source}" if loop.source is not None else ""
    return f"  ┌ loop{where} ×{loop.count}: iteration {loop.drawn_number} drawn for {loop.iterations}"


def _unit_inputs(nodes, view: View, refs: _Refs) -> dict:
    """What feeds each collapsed call, as the diagram draws it (its arrows in), by the names the text uses."""
    from .drawing import draw

    drawing = draw(nodes, view, len(nodes) or 1)
    names = {}
    for name, box in drawing.boxes.items():
        if box.kind == "module":
            names[name] = refs.unit(box.unit)
        elif box.node is not None:
            names[name] = refs(box.node)
    inputs: dict = {}
    for edge in drawing.edges:
        head = drawing.boxes[edge.head]
        if head.kind == "module" and edge.tail in names:
            inputs.setdefault(head.unit, []).append(names[edge.tail])
    return inputs


def _unit_row(nodes, view: View, call, refs: _Refs, inputs: dict) -> tuple[str, ...]:
    unit = view.collapsed[call]
    fold = view.folds.get(call)
    what = f"{fold.label if fold else unit.kind or 'module'}"
    if unit.call_text and not fold:
        what += f" ({unit.call_text})"
    what += f": {unit.ops} ops, {len(unit.node_ids)} tensors" + (f", {unit.params:,} params" if unit.params else "")
    if unit.names:
        what += "; inside: " + compress_names(unit.names)
    what = f"[{what}]({', '.join(dict.fromkeys(inputs.get(call, ())))})"
    grad = f"param grad norm {unit.grad_norm:.3g}" if unit.grad_norm is not None else ""
    if unit.nonfinite:
        grad = (grad + "  " if grad else "") + "NaN/Inf inside"
    return (refs.unit(call), "=", clip(what, 70), "", "collapsed", grad)


def gradient_rows(nodes: Sequence[TraceNode]) -> list[TraceNode]:
    """The tensors the gradient table lists: named ones, leaves, outputs, and any NaN/Inf."""
    return [
        n for n in nodes
        if n.grad is not None and (n.name is not None or n.kind != "op" or n.is_output or not n.grad.finite)
    ]


def gradient_lines(nodes: Sequence[TraceNode], missing: Sequence[MissingGradient], max_rows: int = 50) -> list[str]:
    lines = []
    rows, left = pick(gradient_rows(nodes), importance, max_rows)
    if rows:
        header = ("name", "shape", "mean", "min", "max", "norm", "NaN", "Inf", "source")
        body = [
            (
                ref(n) + (" (!)" if n.nonfinite_origin else "") + (" |complex|" if is_complex(n) else ""),
                shape_only(n.shape),
                *stat_cells(n.grad),
                str(n.grad.nan_count),
                str(n.grad.inf_count),
                clip(str(n.source), 50) if n.source else "",
            )
            for n in rows
        ]
        lines += table([header, *body])
        if any(is_complex(n) for n in rows):
            lines.append("  |complex|: statistics of a complex gradient are over its elements' magnitudes")
    if left:
        lines.append(more_line(left, "gradients not listed", max_rows))
    no_grad = [n for n in nodes if n.kind != "op" and n.grad is None and n.missing_reason]
    if no_grad or missing:
        lines.append("  no gradient:")
        rows2 = [(ref(n), shape_only(n.shape), n.missing_reason or "", str(n.source or "")) for n in no_grad]
        rows2 += [(m.name, shape_only(m.shape), m.reason, str(m.source or "")) for m in missing]
        rows2, left2 = rows2[:max_rows], max(0, len(rows2) - max_rows)
        lines += table(rows2, indent="    ")
        if left2:
            lines.append("  " + more_line(left2, "tensors without a gradient not listed", max_rows))
    return lines


def loop_history(nodes: Sequence[TraceNode], loops: Sequence[Loop]) -> dict[str, list[tuple[int, float]]]:
    """Each loop's carried tensor: its gradient norm at each folded iteration, as (iteration, norm)."""
    out = {}
    for loop in loops:
        carried = nodes[loop.carried[-1]]
        name = (carried.name or f"%{carried.id} {carried.op}").split(" (")[0]
        norms = [nodes[i].grad.norm if nodes[i].grad is not None else math.nan for i in loop.carried]
        out[f"{name} ({loop.iterations})"] = [(loop.first + k, v) for k, v in enumerate(norms)]
    return out


def loop_lines(nodes: Sequence[TraceNode], loops: Sequence[Loop]) -> list[str]:
    from .history import history_lines

    return history_lines(loop_history(nodes, loops), column="per iteration")
