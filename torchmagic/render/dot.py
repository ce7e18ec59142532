"""The trace as a Graphviz graph: tensors as boxes, operations as ellipses, data flowing down."""

from __future__ import annotations

import html
import textwrap
from collections import Counter
from collections.abc import Sequence

import graphviz

from ..trace.model import TraceNode
from ..trace.view import CollapsedModule, Fold, View

LEAF_FILL = "#dbe9f6"
PARAM_FILL = "#dcefd8"
OUTPUT_FILL = "#fff2cc"
TENSOR_FILL = "#ffffff"
OP_FILL = "#eeeeee"
COLLAPSED_FILL = "#e8eef6"
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


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _collapsed_label(unit: CollapsedModule, fold: Fold | None, inside: str) -> str:
    """``inside``: the open module cluster the box is drawn in; the box names itself relative to it."""
    esc = html.escape
    name = unit.path[len(inside) + 1:] if inside and unit.path.startswith(inside + ".") else unit.path
    title = fold.label if fold else f"{name} · {unit.kind}" if unit.kind else name
    rows = [f"<TR><TD><B>{esc(title)}</B></TD></TR>"]
    detail = f"{unit.ops} op{'s' if unit.ops != 1 else ''}"
    if unit.params:
        detail += f" · {unit.params:,} params"
    rows.append(f'<TR><TD><FONT POINT-SIZE="9">{esc(detail)}</FONT></TD></TR>')
    if unit.grad_norm is not None:
        color = BAD_BORDER if unit.nonfinite else GRAD_COLOR
        text = f"param grad norm {_fmt(unit.grad_norm)}" + (" (first block)" if fold else "")
        rows.append(f'<TR><TD><FONT POINT-SIZE="9" COLOR="{color}">{esc(text)}</FONT></TD></TR>')
    elif unit.nonfinite:
        rows.append(f'<TR><TD><FONT POINT-SIZE="9" COLOR="{BAD_BORDER}">NaN/Inf gradient inside</FONT></TD></TR>')
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">' + "".join(rows) + "</TABLE>>"


class _Clusters:
    """Statements grouped by the module cluster they belong in, emitted as nested subgraphs."""

    def __init__(self, view: View | None) -> None:
        self.view = view
        self.items: dict[str, list[tuple[str, str, dict[str, str]]]] = {}

    def add(self, path: str, name: str, label: str, **attrs: str) -> None:
        self.items.setdefault(path, []).append((name, label, attrs))

    def emit(self, graph: graphviz.Digraph) -> None:
        paths = set(self.items)
        for path in list(paths):  # every ancestor gets a cluster, so nesting follows the module tree
            while "." in path:
                path = path.rsplit(".", 1)[0]
                paths.add(path)
        children: dict[str, list[str]] = {}
        for path in paths:
            if path:
                parent = path.rsplit(".", 1)[0] if "." in path else ""
                children.setdefault(parent, []).append(path)
        self._emit(graph, "", children)

    def _emit(self, graph, path: str, children: dict[str, list[str]]) -> None:
        for name, label, attrs in self.items.get(path, []):
            graph.node(name, label, **attrs)
        for child in sorted(children.get(path, []), key=_natural):
            with graph.subgraph(name=f"cluster_{child}") as sub:
                view = self.view
                fold = view.folds.get(child) if view is not None else None
                kind = view.modules.get(child, "") if view is not None else ""
                label = fold.label if fold else f"{child} · {kind}" if kind else child
                sub.attr(label=label, style="rounded,dashed" if not fold else "rounded,bold", color="#8aa0b8",
                         fontcolor="#3a4a5a", fontsize="10", labeljust="l")
                self._emit(sub, child, children)


def _on_params(nodes: Sequence[TraceNode]) -> set[int]:
    """Ids of parameters, and of one-input ops on them (``t``, ``view``, ``expand`` of a weight)."""
    found: set[int] = set()
    for node in nodes:  # inputs first, so an op's inputs are classified before it
        if node.kind == "param" or (node.kind == "op" and len(node.inputs) == 1 and node.inputs[0] in found):
            found.add(node.id)
    return found


def _natural(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def to_digraph(nodes: Sequence[TraceNode], *, title: str = "", max_nodes: int = 500, view: View | None = None,
               notes: Sequence[str] = ()) -> graphviz.Digraph:
    """Build the diagram. Node names are ``t<id>``, ``o<op_id>`` and ``m<n>`` (a collapsed module),
    so output is deterministic. With a ``view``, tensors are drawn inside their module's cluster,
    collapsed modules as one box each, and folded copies of repeated blocks not at all."""
    graph = graphviz.Digraph("autograd_trace")
    # newrank: ranks are global, so a parameter can share a rank with an activation in another cluster
    graph.attr(rankdir="TB", nodesep="0.25", ranksep="0.3", fontname="Helvetica", fontsize="11", newrank="true")
    # notes wrap at 100 characters so they never make the picture wider than the graph needs
    lines = [title] + [line for note in notes for line in textwrap.wrap(note, 100, subsequent_indent="    ")]
    label = "\\l".join(lines) + ("\\l" if notes else "") if title or notes else ""
    if label:
        graph.attr(label=label, labelloc="t", labeljust="l")
    graph.attr("node", fontname="Helvetica", fontsize="11", margin="0.08,0.03")
    graph.attr("edge", color="#555555", arrowsize="0.7")
    owner = view.owner if view is not None else {}
    stand_in = view.stand_in if view is not None else {}
    candidates = [n for n in nodes if n.id not in owner and n.id not in stand_in]
    units = sorted({owner[i] for i in owner if i not in stand_in}, key=_natural)
    unit_names = {path: f"m{i}" for i, path in enumerate(units)}
    shown = select(candidates, max(1, max_nodes - len(units)))
    hidden = len(candidates) - len(shown)
    clusters = _Clusters(view)

    on_params = _on_params(nodes)

    def where(node: TraceNode) -> str:
        """The cluster a box is drawn in. A parameter (and an op on parameters alone, such as
        Linear's ``t``) sits just outside its module's cluster, beside the chain of modules:
        inside, it would stretch the cluster up alongside the previous module and Graphviz
        would lay the modules out as a diagonal staircase."""
        if view is None:
            return ""
        path = view.cluster.get(node.id, "")
        if node.id in on_params and path:
            return path.rsplit(".", 1)[0] if "." in path else ""
        return path

    def endpoint(node: TraceNode) -> str:
        node = nodes[stand_in.get(node.id, node.id)]
        if node.id in owner:
            return unit_names[owner[node.id]]
        if node.id not in shown:
            return "elided"
        return f"t{node.id}" if node.is_tensor_shown else f"o{node.op_id}"

    for path in units:
        unit = view.collapsed[path]
        first = nodes[unit.node_ids[0]]
        style = {"style": "filled", "fillcolor": BAD_FILL if unit.nonfinite else COLLAPSED_FILL}
        if unit.nonfinite:
            style["color"] = BAD_BORDER
        open_parent = view.cluster.get(first.id, "")  # the open module the collapsed one sits in
        clusters.add(open_parent, unit_names[path], _collapsed_label(unit, view.folds.get(path), open_parent),
                     shape="box3d",
                     tooltip=graphviz.escape(f"{path} ({unit.kind}): {len(unit.node_ids)} tensors inside"), **style)

    outputs_per_op = Counter(n.op_id for n in nodes)  # a multi-output op keeps its ellipse when folded
    by_op: dict[int, list[TraceNode]] = {}
    for node in candidates:
        by_op.setdefault(node.op_id, []).append(node)
    edges: list[tuple[str, str]] = []
    for op_id, outputs in by_op.items():
        first = outputs[0]
        visible = [n for n in outputs if n.id in shown]
        if not visible:
            continue
        if first.kind != "op":
            clusters.add(where(first), f"t{first.id}", _rows(first.label, first, True), shape="box",
                         tooltip=_tooltip(first), **_style(first, PARAM_FILL if first.kind == "param" else LEAF_FILL))
            continue
        merged = [n for n in visible if not n.is_tensor_shown]
        detail = merged[0] if len(merged) == 1 and outputs_per_op[op_id] == 1 else None
        if detail is not None:  # an op with its unnamed output folded in: a rounded box
            op_style = _style(detail, OP_FILL)
            op_style["style"] = "rounded," + op_style["style"]
            shape = "box"
        else:
            op_style, shape = {"style": "filled", "fillcolor": OP_FILL}, "ellipse"
        clusters.add(where(first), f"o{op_id}", _rows(first.op, detail, False), shape=shape,
                     tooltip=_tooltip(detail or first), **op_style)
        for node in visible:
            if node.is_tensor_shown:
                fill = OUTPUT_FILL if node.is_output else TENSOR_FILL
                clusters.add(where(node), f"t{node.id}", _rows(node.label, node, True), shape="box",
                             tooltip=_tooltip(node), **_style(node, fill))
                edges.append((f"o{op_id}", f"t{node.id}"))
        for input_id in first.inputs:
            source = endpoint(nodes[input_id])
            if source != "elided" or hidden:
                edges.append((source, f"o{op_id}"))
    # edges into, out of and between collapsed modules
    for node in nodes:
        if node.id not in owner or node.id in stand_in:
            continue
        head = unit_names[owner[node.id]]
        for input_id in node.inputs:
            source = endpoint(nodes[input_id])
            if source != head and (source != "elided" or hidden):
                edges.append((source, head))
    if hidden:
        clusters.add("", "elided", f"… {hidden} more tensors not drawn (max_nodes={max_nodes})\\nthe trace object keeps them all",
                     shape="note", style="dashed", fontcolor="#555555")
    clusters.emit(graph)
    seen: set[tuple[str, str]] = set()
    for tail, head in edges:
        # a tensor used twice by one op keeps both arrows; a module or the elided note gets one
        summarised = tail[0] == "m" or head[0] == "m" or tail == "elided"
        if summarised and ((tail, head) in seen or tail == head):
            continue
        seen.add((tail, head))
        graph.edge(tail, head, **({"style": "dashed"} if tail == "elided" else {}))
    return graph
