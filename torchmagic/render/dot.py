"""A ``Drawing`` as Graphviz DOT: tensors as boxes, operations as ellipses, data flowing down."""

from __future__ import annotations

import html
import math
import textwrap
from collections import Counter
from collections.abc import Sequence

import graphviz

from ..trace.loops import Loop
from ..trace.model import TraceNode
from ..trace.view import CollapsedModule, View, compress_names, natural, plan
from .describe import clip, format_number, grad_text, shape_text
from .drawing import Box, Drawing, draw
from .history import scale

LEAF_FILL = "#dbe9f6"
PARAM_FILL = "#dcefd8"
OUTPUT_FILL = "#fff2cc"
TENSOR_FILL = "#ffffff"
OP_FILL = "#eeeeee"
COLLAPSED_FILL = "#e8eef6"
BAD_FILL = "#ff9a9a"
BAD_BORDER = "#c00000"
GRAD_COLOR = "#1b5e20"
LOOP_COLOR = "#1f5f9f"
PLOT_BARS = 60  # a loop's gradient plot has at most this many bars (iterations are averaged into them)

# Layout settings. What keeps big diagrams fast is drawing a tensor used far and wide again beside
# each use (drawing.py): no edge spans the whole diagram. ``nslimit``/``nslimit1`` (network-simplex
# passes for ranks and x positions) and ``mclimit`` (crossing minimisation) bound what is left: they
# change nothing measurable on ordinary graphs and cut pathological ones (long edges) by 3-4x.
GRAPH_ATTRS = {"rankdir": "TB", "nodesep": "0.25", "ranksep": "0.3", "fontname": "Helvetica", "fontsize": "11",
               "newrank": "true", "nslimit": "2", "nslimit1": "2", "mclimit": "0.5"}

_TABLE = '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">'


def _small(text: str, color: str | None = None, bold: bool = False) -> str:
    body = html.escape(text)
    if bold:
        body = f"<B>{body}</B>"
    color = f' COLOR="{color}"' if color else ""
    return f'<TR><TD><FONT POINT-SIZE="9"{color}>{body}</FONT></TD></TR>'


def _rows(title: str, node: TraceNode | None, bold: bool, also: str = "") -> str:
    esc = html.escape
    rows = [f"<TR><TD>{'<B>' if bold else ''}{esc(title)}{'</B>' if bold else ''}</TD></TR>"]
    if also:
        rows.append(_small(clip(f"also {also}", 60), LOOP_COLOR))
    if node is not None:
        shape = shape_text(node)
        if shape:
            rows.append(_small(shape))
        if node.grad is not None:
            rows.append(_small(grad_text(node, 60), BAD_BORDER if not node.grad.finite else GRAD_COLOR))
        elif node.missing_reason:
            rows.append(_small(f"no grad: {node.missing_reason}", "#777777"))
        if node.nonfinite_origin:
            rows.append(_small("first NaN/Inf gradient here", BAD_BORDER, bold=True))
    return _TABLE + "".join(rows) + "</TABLE>>"


def _tooltip(node: TraceNode, twins: Sequence[str] = ()) -> str:
    parts = [node.label]
    if node.names[1:]:
        parts[0] += " (also " + ", ".join(node.names[1:]) + ")"
    if twins:
        parts.append("drawn for " + compress_names(twins, limit=12))
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


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _collapsed_label(unit: CollapsedModule, title: str, inside: str, folded: bool) -> str:
    """``inside``: the open module cluster the box is drawn in; the box names itself relative to it."""
    name = unit.path[len(inside) + 1:] if inside and unit.path.startswith(inside + ".") else unit.path
    if not title:
        title = f"{name} · {unit.kind}" if unit.kind else name
        if unit.call_text:
            title += f" ({unit.call_text})"
    rows = [f"<TR><TD><B>{html.escape(title)}</B></TD></TR>"]
    detail = f"{unit.ops} op{'s' if unit.ops != 1 else ''}"
    if unit.params:
        detail += f" · {unit.params:,} params"
    rows.append(_small(detail))
    if unit.shared_params:
        rows.append(_small(f"{unit.shared_params} parameter tensors shared by its calls"))
    if unit.names:
        rows.append(_small(clip("inside: " + compress_names(unit.names), 60)))
    if unit.grad_norm is not None:
        text = f"param grad norm {_fmt(unit.grad_norm)}" + (" (drawn block)" if folded else "")
        rows.append(_small(text, BAD_BORDER if unit.nonfinite else GRAD_COLOR))
    elif unit.nonfinite:
        rows.append(_small("NaN/Inf gradient inside", BAD_BORDER))
    return _TABLE + "".join(rows) + "</TABLE>>"


def loop_norms(nodes: Sequence[TraceNode], loop: Loop) -> list[float]:
    """The gradient norm of the loop-carried tensor at each folded iteration (NaN where none flowed)."""
    return [nodes[i].grad.norm if nodes[i].grad is not None else math.nan for i in loop.carried]


def _buckets(values: Sequence[float], width: int) -> list[float]:
    if len(values) <= width:
        return list(values)
    out = []
    for k in range(width):
        chunk = values[k * len(values) // width:(k + 1) * len(values) // width]
        bad = [v for v in chunk if not math.isfinite(v)]
        out.append(bad[0] if bad else sum(chunk) / len(chunk))
    return out


def _plot_label(nodes: Sequence[TraceNode], loop: Loop) -> str:
    """The carried tensor's gradient norm per iteration as a bar chart made of table cells."""
    values = loop_norms(nodes, loop)
    carried = nodes[loop.carried[-1]]
    name = (carried.name or carried.op).split(" (")[0]
    finite = [v for v in values if math.isfinite(v)]
    bars = _buckets(values, PLOT_BARS)
    positions, log = scale(bars)
    cells = []
    for value, p in zip(bars, positions):
        if p is None:
            color, height = (BAD_BORDER, 32) if not math.isnan(value) or finite else ("#cccccc", 2)
        elif value == 0:
            color, height = "#bbbbbb", 1  # vanished to exactly zero
        else:
            color, height = LOOP_COLOR, 2 + round(p * 30)
        cells.append(f'<TD VALIGN="BOTTOM"><TABLE BORDER="0" CELLSPACING="0" CELLPADDING="0"><TR>'
                     f'<TD BGCOLOR="{color}" WIDTH="{3 if len(bars) > 30 else 5}" HEIGHT="{height}" '
                     f'FIXEDSIZE="TRUE"></TD></TR></TABLE></TD>')
    span = len(cells)
    head = f"grad norm of {name} per iteration" + (" (log scale)" if log else "")
    if finite:
        low, high = format_number(values[0]), format_number(values[-1])
        head += f": {low} → {high}" if math.isfinite(values[0]) and math.isfinite(values[-1]) else ""
    else:
        head += ": no gradient reached it"
    last = loop.first + loop.count - 1
    rows = [f'<TR><TD COLSPAN="{span}"><FONT POINT-SIZE="9" COLOR="{LOOP_COLOR}">{html.escape(head)}</FONT></TD></TR>',
            "<TR>" + "".join(cells) + "</TR>",
            f'<TR><TD COLSPAN="{span}"><FONT POINT-SIZE="8" COLOR="#555555">iteration {loop.first} → {last}'
            f"</FONT></TD></TR>"]
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="1" CELLPADDING="0">' + "".join(rows) + "</TABLE>>"


class _Clusters:
    """Statements grouped by the clusters around them, emitted as nested subgraphs."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.items: dict[tuple[str, ...], list[tuple[str, str, dict[str, str]]]] = {}

    def add(self, chain: tuple[str, ...], name: str, label: str, **attrs: str) -> None:
        self.items.setdefault(chain, []).append((name, label, attrs))

    def emit(self, graph: graphviz.Digraph) -> None:
        chains = set(self.items)
        for chain in list(chains):  # every enclosing cluster exists, so nesting is complete
            for k in range(1, len(chain)):
                chains.add(chain[:k])
        children: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for chain in chains:
            if chain:
                children.setdefault(chain[:-1], []).append(chain)
        self._emit(graph, (), children)

    def _emit(self, graph, chain: tuple[str, ...], children) -> None:
        for name, label, attrs in self.items.get(chain, []):
            graph.node(name, label, **attrs)
        for child in sorted(children.get(chain, []), key=lambda c: _order(c[-1])):
            key = child[-1]
            cluster = self.view.clusters.get(key)
            label = cluster.label if cluster is not None else key
            kind = cluster.kind if cluster is not None else "module"
            with graph.subgraph(name=f"cluster_{key}") as sub:
                style = {"module": "rounded,dashed", "fold": "rounded,bold", "loop": "rounded,bold"}[kind]
                color = LOOP_COLOR if kind == "loop" else "#8aa0b8"
                sub.attr(label=label, style=style, color=color, fontcolor="#3a4a5a" if kind != "loop" else LOOP_COLOR,
                         fontsize="10", labeljust="l")
                self._emit(sub, child, children)


def _order(key: str) -> tuple:
    """Sibling clusters in module order, calls in call order, loops after them."""
    path, _, call = key.rpartition("#")
    return (0, natural(path), int(call), "") if call.isdigit() else (1, [], 0, key)


def to_digraph(nodes: Sequence[TraceNode], *, title: str = "", max_nodes: int = 500, view: View | None = None,
               notes: Sequence[str] = ()) -> graphviz.Digraph:
    """Build the diagram. Node names are ``t<id>``, ``o<op_id>``, ``m<n>`` (a collapsed module call),
    ``r<n>`` (a leaf drawn again beside a use) and ``plot<n>``, so output is deterministic."""
    if view is None:
        view = plan(nodes, {}, fold=False, auto_target=len(nodes) or 1)
    drawing = draw(nodes, view, max_nodes)
    graph = graphviz.Digraph("autograd_trace")
    graph.attr(**GRAPH_ATTRS)
    # notes wrap at 100 characters so they never make the picture wider than the graph needs
    lines = [title] + [line for note in notes for line in textwrap.wrap(note, 100, subsequent_indent="    ")]
    label = "\\l".join(lines) + ("\\l" if notes else "") if title or notes else ""
    if label:
        graph.attr(label=label, labelloc="t", labeljust="l")
    graph.attr("node", fontname="Helvetica", fontsize="11", margin="0.08,0.03")
    graph.attr("edge", color="#555555", arrowsize="0.7")
    clusters = _Clusters(view)
    outputs = Counter(n.op_id for n in nodes)  # a multi-output op keeps its ellipse
    for box in drawing.boxes.values():
        _emit_box(clusters, box, nodes, view, drawing, max_nodes, outputs)
    clusters.emit(graph)
    for edge in drawing.edges:
        tail = drawing.boxes[edge.tail]
        if edge.recurrent:
            graph.edge(edge.tail, edge.head, label="next iteration", style="dashed", color=LOOP_COLOR,
                       fontcolor=LOOP_COLOR, fontsize="9", constraint="false")
        else:
            not_drawn = tail.kind == "elided" or tail.kind == "ref" and tail.node is None
            graph.edge(edge.tail, edge.head, **({"style": "dashed"} if not_drawn else {}))
    return graph


def _twin_names(nodes: Sequence[TraceNode], view: View, i: int) -> list[str]:
    return [nodes[m].label for m in view.members(i)[1:] if nodes[m].name is not None]


def _emit_box(clusters: _Clusters, box: Box, nodes, view: View, drawing: Drawing, max_nodes: int,
              outputs: Counter) -> None:
    if box.kind == "module":
        unit = view.collapsed[box.unit]
        fold = view.folds.get(box.unit)
        inside = box.chain[-1].rpartition("#")[0] if box.chain else ""
        style = {"style": "filled", "fillcolor": BAD_FILL if unit.nonfinite else COLLAPSED_FILL}
        if unit.nonfinite:
            style["color"] = BAD_BORDER
        tip = f"{unit.path} ({unit.kind}) {unit.call_text}: {len(unit.node_ids)} tensors inside"
        clusters.add(box.chain, box.name, _collapsed_label(unit, fold.label if fold else "", inside, fold is not None),
                     shape="box3d", tooltip=graphviz.escape(tip), **style)
    elif box.kind == "elided":
        named = [nodes[i].label for i in drawing.elided if nodes[i].name is not None]
        text = f"… {len(drawing.elided)} more tensors not drawn (max_nodes={max_nodes})"
        if named:
            text += "\\nnamed: " + graphviz.escape(clip(compress_names(named), 80))
        clusters.add((), "elided", text + "\\nthe trace object keeps them all", shape="note", style="dashed",
                     fontcolor="#555555")
    elif box.kind == "plot":
        loop = view.loops[box.loop]
        clusters.add(box.chain, box.name, _plot_label(nodes, loop), shape="plain",
                     tooltip=graphviz.escape(f"gradient norm of the loop-carried tensor, {loop.iterations}"))
    elif box.kind == "ref" and box.node is None:  # an input max_nodes left out
        clusters.add(box.chain, box.name, "…", shape="box", style="dashed", fontsize="9", color="#777777",
                     fontcolor="#555555", tooltip=f"an input not drawn (max_nodes={max_nodes})")
    elif box.kind == "ref":
        node = nodes[box.node]
        clusters.add(box.chain, box.name, graphviz.escape(node.label), shape="box", style="dashed,filled",
                     fillcolor={"param": PARAM_FILL, "leaf": LEAF_FILL}.get(node.kind, TENSOR_FILL), fontsize="9",
                     color="#777777",
                     tooltip=graphviz.escape(f"{node.label} again: drawn in full once, used by many operations"))
    elif box.kind == "tensor":
        node = nodes[box.node]
        twins = _twin_names(nodes, view, node.id)
        fill = {"param": PARAM_FILL, "leaf": LEAF_FILL}.get(node.kind, OUTPUT_FILL if node.is_output else TENSOR_FILL)
        clusters.add(box.chain, box.name, _rows(node.label, node, True, compress_names(twins)), shape="box",
                     tooltip=_tooltip(node, twins), **_style(node, fill))
    else:  # an operation: a rounded box with its unnamed output folded in, else an ellipse
        node = nodes[box.node]
        detail = node if outputs[node.op_id] == 1 and f"t{node.id}" not in drawing.boxes else None
        if detail is not None:
            attrs = _style(detail, OP_FILL)
            attrs["style"] = "rounded," + attrs["style"]
            shape = "box"
        else:
            attrs, shape = {"style": "filled", "fillcolor": OP_FILL}, "ellipse"
        clusters.add(box.chain, box.name, _rows(node.op, detail, False), shape=shape,
                     tooltip=_tooltip(detail or node, _twin_names(nodes, view, node.id) if detail else ()), **attrs)

