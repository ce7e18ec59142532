"""What a diagram draws, before any format: boxes that stand for tensors, edges that stand for autograd edges.

Every box knows the tensors it stands for (a tensor, an operation's outputs, a collapsed module
call, a folded node and its twins) and every edge carries a *witness*: one real autograd edge
(an input and the operation that consumed it) between tensors of its two boxes. The DOT
renderer draws a ``Drawing``; tests check its witnesses against the trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..trace.model import TraceNode
from ..trace.view import Call, View, call_scope

REFERENCE_FANOUT = 3  # a tensor used by more operations than this is drawn again beside each further use


@dataclass
class Box:
    """One shape in the diagram.

    ``kind``: "tensor" (a named tensor, a leaf, an output), "op" (an operation, with its output
    merged in when unnamed), "module" (a collapsed module call), "ref" (a leaf drawn again beside
    one of its uses), "elided" (what max_nodes left out) or "plot" (a loop's gradient norms).
    ``node`` is the trace node whose data the label shows; ``members`` every tensor it stands for.
    """

    name: str
    kind: str
    node: int | None
    members: tuple[int, ...]
    chain: tuple[str, ...] = ()
    unit: Call | None = None
    loop: int | None = None  # for plots: the index of the loop in view.loops


@dataclass
class Edge:
    """An arrow; ``witness`` is (input tensor, consuming tensor), a real autograd edge, or (t, t) for
    an operation's arrow to its own output. A recurrent edge links one iteration to the next."""

    tail: str
    head: str
    witness: tuple[int, int]
    recurrent: bool = False


@dataclass
class Drawing:
    boxes: dict[str, Box] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    elided: list[int] = field(default_factory=list)  # tensors max_nodes left out

    def add(self, box: Box) -> Box:
        self.boxes.setdefault(box.name, box)
        return self.boxes[box.name]


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


class _Builder:
    def __init__(self, nodes: Sequence[TraceNode], view: View, max_nodes: int) -> None:
        self.nodes, self.view = nodes, view
        self.drawing = Drawing()
        candidates = [n for n in nodes if n.id not in view.owner and n.id not in view.stand_in
                      and n.id not in view.hidden]
        self.units = sorted({view.owner[i] for i in view.owner if i not in view.stand_in},
                            key=lambda call: (min(view.collapsed[call].node_ids), call))
        self.unit_names = {call: f"m{k}" for k, call in enumerate(self.units)}
        exits = sorted(i for i in view.exits if i not in view.stand_in)
        self.shown = select(candidates, max(1, max_nodes - len(self.units) - len(exits)))
        self.drawing.elided = [n.id for n in candidates if n.id not in self.shown]
        self.exits = set(exits)
        self._tensor_shown: dict[int, bool] = {}
        self.outputs: dict[int, list[TraceNode]] = {}
        for node in nodes:
            self.outputs.setdefault(node.op_id, []).append(node)
        self.unit_of: dict[int, tuple[int, int]] = {}  # node id -> (fold number, unit index) of loops and blocks
        for n, loop in enumerate(view.loops):
            for k, unit in enumerate(loop.units):
                for i in unit:
                    self.unit_of[i] = (n, k)
        self.block_of: dict[int, tuple[int, int]] = {}  # node id -> (fold number, block index)
        blocks = {call: (n, k) for n, fold in enumerate(view.folds.values()) for k, call in enumerate(fold.units)}
        if blocks:
            for node in nodes:
                if node.kind == "op":
                    for call in call_scope(node):
                        if call in blocks:
                            self.block_of[node.id] = blocks[call]

    def members(self, i: int) -> tuple[int, ...]:
        return tuple(self.view.members(i))

    def tensor_shown(self, i: int) -> bool:
        """Whether the drawn node ``i`` gets a box of its own (it, or a twin, is named or an output)."""
        shown = self._tensor_shown.get(i)
        if shown is None:
            shown = self._tensor_shown[i] = any(self.nodes[m].is_tensor_shown for m in self.members(i))
        return shown

    def exit_box(self, u: int) -> str | None:
        """The box an arrow leaves from when tensor ``u`` is used (None: not drawn at all)."""
        r = self.view.drawn_as(u)
        if r in self.view.hidden:
            return None
        if r in self.view.owner:
            return f"t{r}" if r in self.exits else self.unit_names[self.view.owner[r]]
        if r not in self.shown:
            return "elided"
        return f"t{r}" if self.tensor_shown(r) else f"o{self.nodes[r].op_id}"

    def entry_box(self, v: int) -> str | None:
        """The box the arrows into the operation that made ``v`` point at."""
        r = self.view.drawn_as(v)
        if r in self.view.owner:
            return self.unit_names[self.view.owner[r]]
        if r in self.view.hidden or r not in self.shown or self.nodes[r].kind != "op":
            return None
        return f"o{self.nodes[r].op_id}"

    def build(self) -> Drawing:
        view, drawing = self.view, self.drawing
        for call in self.units:
            unit = view.collapsed[call]
            members = tuple(m for i in unit.node_ids for m in self.members(i))
            drawing.add(Box(self.unit_names[call], "module", None, members, view.chain.get(unit.node_ids[0], ()),
                            unit=call))
        for i in sorted(self.exits):
            drawing.add(Box(f"t{i}", "tensor", i, self.members(i), view.chain.get(i, ())))
            drawing.edges.append(Edge(self.unit_names[view.owner[i]], f"t{i}", (i, i)))
        for node in self.nodes:
            if node.id not in self.shown:
                continue
            if node.kind != "op":
                drawing.add(Box(f"t{node.id}", "tensor", node.id, self.members(node.id), view.chain.get(node.id, ())))
                continue
            members = tuple(m for out in self.outputs[node.op_id] for m in self.members(out.id))
            drawing.add(Box(f"o{node.op_id}", "op", node.id, members, view.chain.get(node.id, ())))
            if self.tensor_shown(node.id):
                drawing.add(Box(f"t{node.id}", "tensor", node.id, self.members(node.id), view.chain.get(node.id, ())))
                drawing.edges.append(Edge(f"o{node.op_id}", f"t{node.id}", (node.id, node.id)))
        self._data_edges()
        if drawing.elided:
            drawing.add(Box("elided", "elided", None, tuple(drawing.elided)))
        for n, loop in enumerate(view.loops):
            chain = view.chain.get(loop.carried[-1], ())
            key = f"loop{n}"
            chain = chain[: chain.index(key) + 1] if key in chain else chain
            drawing.add(Box(f"plot{n}", "plot", None, tuple(loop.carried), chain, loop=n))
        self._references()
        return drawing

    def _data_edges(self) -> None:
        """One arrow per autograd edge between distinct boxes; an operation that uses a tensor twice keeps
        both arrows. Edges of the units not drawn repeat the drawn unit's, except between iterations."""
        drawing, view = self.drawing, self.view
        seen: set[tuple[str, str, bool]] = set()
        done_ops: set[tuple[str, int]] = set()
        # the drawn nodes first, so their edges (with their multiplicity) come before their twins'
        order = [n for n in self.nodes if n.id not in view.stand_in] + [n for n in self.nodes if n.id in view.stand_in]
        for node in order:
            head = self.entry_box(node.id)
            if head is None or (head, node.op_id) in done_ops:
                continue
            done_ops.add((head, node.op_id))
            twin = node.id in view.stand_in
            unit = view.owner.get(view.drawn_as(node.id))
            own: list[Edge] = []
            for u in node.inputs:
                tail = self.exit_box(u)
                if tail is None:
                    continue
                here, there = self.unit_of.get(node.id), self.unit_of.get(u)
                recurrent = here is not None and there is not None and here[0] == there[0] and here[1] != there[1]
                if unit is not None and not recurrent and view.owner.get(view.drawn_as(u)) == unit:
                    continue  # inside one collapsed call (a VAE's mu, returned and also used inside)
                a, b = self.block_of.get(node.id), self.block_of.get(u)
                if a is not None and b is not None and a[0] == b[0] and a[1] != b[1]:
                    continue  # one block feeding the next inside a fold: the ×N says so
                summarised = tail[0] in "me" or head[0] == "m"
                key = (tail, head, recurrent)
                if tail == head and not recurrent:
                    continue
                if (twin or summarised) and key in seen:
                    continue
                own.append(Edge(tail, head, (u, node.id), recurrent))
            for edge in own:
                seen.add((edge.tail, edge.head, edge.recurrent))
            drawing.edges.extend(own)

    def _references(self) -> None:
        """A tensor used by many operations far apart (a weight used at every step of an unrolled loop),
        or the note for what max_nodes left out, would pull long edges across the whole diagram: slow to
        lay out (a 100-step loop took over a minute) and hard to follow. Past the first few uses it is
        drawn again, small, beside each further use."""
        drawing = self.drawing
        uses: dict[str, list[Edge]] = {}
        for edge in drawing.edges:
            box = drawing.boxes.get(edge.tail)
            if box is None:
                continue
            if box.kind in ("elided", "tensor"):
                uses.setdefault(edge.tail, []).append(edge)
        count = 0
        for tail, edges in uses.items():
            if len({e.head for e in edges}) <= REFERENCE_FANOUT:
                continue
            original = drawing.boxes[tail]
            for edge in edges[1:]:
                head = drawing.boxes[edge.head]
                name = f"r{count}"
                count += 1
                chain = tuple(k for k in head.chain if not k.startswith("loop"))
                drawing.add(Box(name, "ref", original.node, original.members, chain))
                edge.tail = name


def draw(nodes: Sequence[TraceNode], view: View, max_nodes: int = 500) -> Drawing:
    """The boxes and edges of the diagram ``view`` describes, at most about ``max_nodes`` boxes."""
    return _Builder(nodes, view, max_nodes).build()
