"""The trace as a Graphviz graph: tensors as boxes, operations as ellipses, data flowing down."""

from __future__ import annotations

import html
from collections.abc import Sequence

import graphviz

from ..trace.model import TraceNode

LEAF_FILL = "#dbe9f6"
PARAM_FILL = "#dcefd8"
OUTPUT_FILL = "#fff2cc"
TENSOR_FILL = "#ffffff"
OP_FILL = "#eeeeee"
BAD_FILL = "#ff9a9a"
BAD_BORDER = "#c00000"
GRAD_COLOR = "#1b5e20"


def shape_only(shape: tuple[int, ...] | None) -> str:
    if shape is None:
        return ""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _shape_text(node: TraceNode) -> str:
    parts = []
    if node.shape is not None:
        parts.append(shape_only(node.shape))
    if node.dtype is not None:
        parts.append(node.dtype)
    if node.device is not None and node.device != "cpu":
        parts.append(node.device)
    return " ".join(parts)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _rows(title: str, node: TraceNode | None, bold: bool) -> str:
    esc = html.escape
    rows = [f"<TR><TD>{'<B>' if bold else ''}{esc(title)}{'</B>' if bold else ''}</TD></TR>"]
    if node is not None:
        shape = _shape_text(node)
        if shape:
            rows.append(f'<TR><TD><FONT POINT-SIZE="9">{esc(shape)}</FONT></TD></TR>')
        if node.grad is not None:
            color = BAD_BORDER if not node.grad.finite else GRAD_COLOR
            rows.append(
                f'<TR><TD><FONT POINT-SIZE="9" COLOR="{color}">grad {esc(_clip(node.grad.short()))}</FONT></TD></TR>'
            )
        elif node.missing_reason:
            rows.append(f'<TR><TD><FONT POINT-SIZE="9" COLOR="#777777">no grad: {esc(node.missing_reason)}</FONT></TD></TR>')
        if node.nonfinite_origin:
            rows.append(f'<TR><TD><FONT POINT-SIZE="9" COLOR="{BAD_BORDER}"><B>first NaN/Inf gradient here</B></FONT></TD></TR>')
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">' + "".join(rows) + "</TABLE>>"


def _tooltip(node: TraceNode) -> str:
    parts = [node.label]
    if node.names[1:]:
        parts[0] += " (also " + ", ".join(node.names[1:]) + ")"
    if node.module:
        parts.append(f"in {node.module}")
    if node.source is not None:
        parts.append(str(node.source))
    return graphviz.escape(" — ".join(parts))


def _style(node: TraceNode, base_fill: str) -> dict[str, str]:
    attrs = {"style": "filled", "fillcolor": base_fill}
    if node.grad is not None and not node.grad.finite:
        attrs.update(fillcolor=BAD_FILL, color=BAD_BORDER, fontcolor="#000000")
        attrs["penwidth"] = "3" if node.nonfinite_origin else "1.5"
    return attrs


def select(nodes: Sequence[TraceNode], max_nodes: int) -> set[int]:
    """Ids of the tensors to draw when the graph has more than ``max_nodes``.

    Kept first: outputs, named tensors, leaves and parameters, non-finite gradients; then
    the operations nearest the output. What is left out is drawn as one summary node.
    """
    if len(nodes) <= max_nodes:
        return {n.id for n in nodes}
    keep: list[int] = [n.id for n in reversed(nodes) if n.is_output or n.nonfinite_origin]
    keep += [n.id for n in reversed(nodes) if n.grad is not None and not n.grad.finite]
    keep += [n.id for n in reversed(nodes) if n.name is not None]
    keep += [n.id for n in reversed(nodes)]
    return set(list(dict.fromkeys(keep))[:max_nodes])


def to_digraph(nodes: Sequence[TraceNode], *, title: str = "", max_nodes: int = 500) -> graphviz.Digraph:
    """Build the diagram. Node names are ``t<id>`` and ``o<op_id>``, so output is deterministic."""
    graph = graphviz.Digraph("autograd_trace")
    graph.attr(rankdir="TB", nodesep="0.25", ranksep="0.3", fontname="Helvetica", fontsize="11")
    if title:
        graph.attr(label=title, labelloc="t", labeljust="l")
    graph.attr("node", fontname="Helvetica", fontsize="11", margin="0.08,0.03")
    graph.attr("edge", color="#555555", arrowsize="0.7")
    shown = select(nodes, max_nodes)
    hidden = len(nodes) - len(shown)

    def endpoint(node: TraceNode) -> str:
        if node.id not in shown:
            return "elided"
        return f"t{node.id}" if node.is_tensor_shown else f"o{node.op_id}"

    by_op: dict[int, list[TraceNode]] = {}
    for node in nodes:
        by_op.setdefault(node.op_id, []).append(node)
    edges: list[tuple[str, str]] = []
    for op_id, outputs in by_op.items():
        first = outputs[0]
        visible = [n for n in outputs if n.id in shown]
        if not visible:
            continue
        if first.kind != "op":
            graph.node(f"t{first.id}", _rows(first.label, first, True), shape="box",
                       tooltip=_tooltip(first), **_style(first, PARAM_FILL if first.kind == "param" else LEAF_FILL))
            continue
        merged = [n for n in visible if not n.is_tensor_shown]
        detail = merged[0] if len(merged) == 1 and len(outputs) == 1 else None
        if detail is not None:  # an op with its unnamed output folded in: a rounded box
            op_style = _style(detail, OP_FILL)
            op_style["style"] = "rounded," + op_style["style"]
            shape = "box"
        else:
            op_style, shape = {"style": "filled", "fillcolor": OP_FILL}, "ellipse"
        graph.node(f"o{op_id}", _rows(first.op, detail, False), shape=shape,
                   tooltip=_tooltip(detail or first), **op_style)
        for node in visible:
            if node.is_tensor_shown:
                fill = OUTPUT_FILL if node.is_output else TENSOR_FILL
                graph.node(f"t{node.id}", _rows(node.label, node, True), shape="box",
                           tooltip=_tooltip(node), **_style(node, fill))
                edges.append((f"o{op_id}", f"t{node.id}"))
        for input_id in first.inputs:
            source = endpoint(nodes[input_id])
            if source != "elided" or hidden:
                edges.append((source, f"o{op_id}"))
    if hidden:
        graph.node("elided", f"… {hidden} more tensors not drawn (max_nodes={max_nodes})\\nthe trace object keeps them all",
                   shape="note", style="dashed", fontcolor="#555555")
    seen_elided: set[tuple[str, str]] = set()
    for tail, head in edges:
        if tail == "elided":
            if (tail, head) in seen_elided:
                continue
            seen_elided.add((tail, head))
            graph.edge(tail, head, style="dashed")
        else:
            graph.edge(tail, head)
    return graph
