"""What every diagram must satisfy, checked against the trace itself (used by the property tests).

1. Every drawn edge stands for a real autograd edge: its witness is an input and the operation
   that consumed it (or a tensor and itself, for an operation's arrow to its output), lying in
   the boxes at its two ends.
2. No drawn path invents dataflow: between two boxes that each stand for one tensor, a path in
   the drawing means the first tensor is computed into the second in the autograd graph. (A
   collapsed call is drawn as a function of all its inputs; where code outside a call reads its
   inner tensors, as a gradient penalty's double backward does, that reading is not a path of the
   call: such graphs are checked with ``paths=False``.)
3. Every named tensor is drawn, or listed by the box that stands for it (a fold's "also h (1…39)",
   a collapsed call's "inside: …", a module box for its own parameters).
"""

from __future__ import annotations

import re

from torchmagic.render.dot import to_digraph
from torchmagic.render.drawing import Drawing, draw


def descendants(nodes) -> list[int]:
    """For each tensor, a bitset of the tensors computed from it (itself included)."""
    consumers = [[] for _ in nodes]
    for node in nodes:
        for i in node.inputs:
            consumers[i].append(node.id)
    reach = [0] * len(nodes)
    for node in reversed(nodes):  # consumers come later in graph order
        bits = 1 << node.id
        for c in consumers[node.id]:
            bits |= reach[c]
        reach[node.id] = bits
    return reach


def box_statements(dot: str) -> dict[str, str]:
    """Each DOT node's statement text, by node name."""
    out = {}
    for line in dot.splitlines():
        match = re.match(r'\s*"?([A-Za-z0-9_]+)"? \[(.*)\]$', line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def mentions(text: str, name: str) -> bool:
    """Whether ``text`` lists ``name``, literally or inside a range (``h (1…39)``, ``h1 … h4``,
    ``net.blocks.0…2.lin.weight``)."""
    if name in text:
        return True
    for number in re.finditer(r"\d+", name):
        before, value, after = name[: number.start()], int(number.group()), name[number.end():]
        for match in re.finditer(r"(\d+)…(\d+)", text):
            low, high = int(match.group(1)), int(match.group(2))
            if low <= value <= high and text[: match.start()].endswith(before) and text[match.end():].startswith(after):
                return True
        for match in re.finditer(r"([^\s<>,;\"]+) … ([^\s<>,;\"]+)", text):
            first, last = match.group(1), match.group(2)
            a = re.fullmatch(re.escape(before) + r"(\d+)" + re.escape(after), first)
            b = re.fullmatch(re.escape(before) + r"(\d+)" + re.escape(after), last)
            if a and b and int(a.group(1)) <= value <= int(b.group(1)):
                return True
    return False


def check(trace, max_nodes: int = 100_000, drawing: Drawing | None = None, paths: bool = True) -> Drawing:
    """Assert the three properties for ``trace``'s current view (or for ``drawing`` of it); returns the
    drawing checked."""
    nodes = trace.nodes
    view = trace.view()
    drawing = drawing or draw(nodes, view, max_nodes)
    assert not drawing.elided, "draw every tensor to check them all (raise max_nodes)"
    reach = descendants(nodes)
    boxes = drawing.boxes
    # 1. witnesses
    for edge in drawing.edges:
        source, target = edge.witness
        assert source in boxes[edge.tail].members, f"{edge}: witness tail not in its box"
        assert target in boxes[edge.head].members, f"{edge}: witness head not in its box"
        assert source == target or source in nodes[target].inputs, f"{edge}: not an autograd edge"
    # 2. paths between single-tensor boxes
    out_edges: dict[str, list[str]] = {}
    for edge in drawing.edges:
        out_edges.setdefault(edge.tail, []).append(edge.head)
    single = {name: box.members[0] for name, box in boxes.items() if len(set(box.members)) == 1} if paths else {}
    for start, tensor in single.items():
        seen, stack = {start}, [start]
        while stack:
            for head in out_edges.get(stack.pop(), ()):
                if head not in seen:
                    seen.add(head)
                    stack.append(head)
        for name in seen:
            if name in single:
                other = single[name]
                assert reach[tensor] >> other & 1, (
                    f"the drawing has a path {nodes[tensor].label} (box {start}) -> {nodes[other].label} (box {name})"
                    " but the autograd graph does not")
    # 3. names
    dot = to_digraph(nodes, max_nodes=max_nodes, view=view).source
    statements = box_statements(dot)
    holders: dict[int, list[str]] = {}
    for name, box in boxes.items():
        for m in box.members:
            holders.setdefault(m, []).append(name)
    drawn_itself = {box.node for box in boxes.values() if box.kind == "tensor"}
    for node in nodes:
        if node.name is None or node.id in drawn_itself:
            continue
        where = holders.get(node.id, [])
        if node.id in view.hidden:  # a parameter shared by calls of a collapsed module: in each call's box
            path = view.hidden[node.id][0]
            assert node.name.startswith(path + "."), node.name
            continue
        assert where, f"named tensor {node.name!r} is in no box"
        listed = any(mentions(statements.get(h, ""), node.name) for h in where)
        own_module = node.kind == "param" and any(node.name.startswith(path + ".") for h in where
                                                  for path in _paths(view, boxes[h]))
        assert listed or own_module, f"named tensor {node.name!r} is neither drawn nor listed by {where}"
    return drawing


def _paths(view, box) -> list[str]:
    """The module paths a collapsed box draws: its own; a fold's box draws each of its blocks, and a
    box inside a folded block draws the same module of each block."""
    if box.kind != "module":
        return []
    path = box.unit[0]
    out = [path]
    for drawn, fold in view.folds.items():
        if path == drawn[0]:
            out += fold.paths
        elif path.startswith(drawn[0] + "."):
            out += [unit + path[len(drawn[0]):] for unit in fold.paths]
    return out
