"""What a diagram draws of a big graph: module clusters, collapsed modules, repeated blocks folded.

Plain data, no Graphviz: the renderers (DOT and text) draw what a ``View`` says. The trace
itself keeps every node; a view only decides how they are shown.

Levels count a module path's components: ``model`` is level 1, ``model.layers.3`` level 3.
``depth=N`` draws modules of level N or less as open clusters and each module of level N+1 as
one collapsed node (with everything inside it). ``expand`` opens the named modules, their
ancestors and everything inside them, whatever the depth.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .model import TraceNode

AUTO_DEPTH_NODES = 40  # the default depth is the deepest at which the diagram has at most this many boxes


@dataclass
class CollapsedModule:
    """A module drawn as one node: what is inside it, its parameters and their gradients."""

    path: str
    kind: str  # the module's class name
    node_ids: list[int] = field(default_factory=list)
    ops: int = 0
    params: int = 0  # parameter elements that took part in the graph
    grad_norm: float | None = None  # norm over its parameters' gradients
    nonfinite: bool = False  # some gradient inside is NaN or Inf


@dataclass
class Fold:
    """Consecutive sibling modules of one class and one graph shape, drawn once."""

    paths: list[str]  # first is drawn; the rest map onto it node by node
    kind: str

    @property
    def label(self) -> str:
        first, last = self.paths[0], self.paths[-1]
        return f"{first} … {last.rsplit('.', 1)[-1]} · {self.kind} ×{len(self.paths)}"


@dataclass
class View:
    depth: int | None  # None: every module open
    auto: bool  # the depth was chosen to fit, not asked for
    collapsed: dict[str, CollapsedModule]
    owner: dict[int, str]  # node id -> the collapsed module drawing it
    stand_in: dict[int, int]  # node id in a folded copy -> the node drawn for it in the first block
    folds: dict[str, Fold]  # first block's path -> its fold
    cluster: dict[int, str]  # node id -> the deepest open module containing it ("" for none)
    modules: Mapping[str, str]
    unknown_expand: tuple[str, ...] = ()
    revealed: str | None = None  # opened because the first NaN/Inf gradient is inside

    @property
    def box_count(self) -> int:
        drawn = [i for i in self.cluster if i not in self.owner and i not in self.stand_in]
        shown = {self.owner[i] for i in self.owner if i not in self.stand_in}
        return len(drawn) + len(shown)

    def notes(self) -> list[str]:
        """What the view left out of sight, in words, for the diagram and the text view."""
        out = [f"--expand {path}: no such module in this trace" for path in self.unknown_expand]
        if self.revealed:
            out.append(f"{self.revealed} drawn open: the first NaN/Inf gradient is inside it")
        if self.collapsed:
            shown = sorted(self.collapsed, key=lambda p: [int(c) if c.isdigit() else c for c in p.split(".")])
            how = "chosen to fit" if self.auto else "as asked"
            out.append(f"modules deeper than level {self.depth} ({how}) drawn collapsed: {len(shown)} "
                       f"({_few(shown)}); --depth N or --expand PATH opens them")
        for fold in self.folds.values():
            out.append(f"{len(fold.paths)} repeated {fold.kind} blocks drawn once (×{len(fold.paths)}); "
                       "every layer's gradients are in the table and t.nodes")
        return out


def _few(paths: Sequence[str], limit: int = 4) -> str:
    text = ", ".join(paths[:limit])
    return text + (f", … {len(paths) - limit} more" if len(paths) > limit else "")


def _chain(path: str | None) -> list[str]:
    if not path:
        return []
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _on_expand_path(path: str, expand: Iterable[str]) -> bool:
    """An expanded module, one of its ancestors, or something inside it."""
    return any(e == path or e.startswith(path + ".") or path.startswith(e + ".") for e in expand)


def _is_open(path: str, depth: int | None, expand: Iterable[str]) -> bool:
    return depth is None or path.count(".") + 1 <= depth or _on_expand_path(path, expand)


def plan(nodes: Sequence[TraceNode], modules: Mapping[str, str], *, depth: int | None = None,
         expand: Sequence[str] = (), fold: bool = True, auto_target: int = AUTO_DEPTH_NODES,
         reveal: str | None = None) -> View:
    """Decide clusters, collapsed modules and folds. ``depth=None`` picks the deepest level at
    which the diagram has at most ``auto_target`` boxes (the ``expand`` paths open in any case).
    ``reveal``: a module to open whatever the depth (the one where the first NaN/Inf gradient is)."""
    levels = max((n.module.count(".") + 1 for n in nodes if n.module), default=0)
    expand = tuple(expand)
    if reveal and reveal not in expand:
        view = plan(nodes, modules, depth=depth, expand=(*expand, reveal), fold=fold, auto_target=auto_target)
        view.revealed = reveal
        return view
    if depth is not None or levels == 0:
        return _plan(nodes, modules, depth, expand, fold, auto=False)
    view = _plan(nodes, modules, None, expand, fold, auto=False)
    for candidate in range(levels - 1, -1, -1):
        if view.box_count <= auto_target:
            break
        view = _plan(nodes, modules, candidate, expand, fold, auto=True)
    return view


def _plan(nodes, modules, depth, expand, fold, auto) -> View:
    owner: dict[int, str] = {}
    cluster: dict[int, str] = {}
    collapsed: dict[str, CollapsedModule] = {}
    drawn_units: set[str] = set()  # open modules and collapsed ones, each drawn as a unit
    for node in nodes:
        chain = _chain(node.module)
        closed = next((p for p in chain if not _is_open(p, depth, expand)), None)
        open_chain = chain if closed is None else chain[: chain.index(closed)]
        drawn_units.update(open_chain)
        if closed is not None:
            drawn_units.add(closed)
        cluster[node.id] = open_chain[-1] if open_chain else ""
        if closed is not None:
            owner[node.id] = closed
            unit = collapsed.get(closed)
            if unit is None:
                unit = collapsed[closed] = CollapsedModule(closed, modules.get(closed, ""))
            unit.node_ids.append(node.id)
    for unit in collapsed.values():
        _summarise(unit, nodes)
    stand_in: dict[int, int] = {}
    folds: dict[str, Fold] = {}
    if fold:
        collapsed_paths = set(collapsed)
        expanded = {p for p in drawn_units if _on_expand_path(p, expand)}
        _fold(nodes, modules, drawn_units - expanded, collapsed_paths, stand_in, folds)
    unknown = tuple(p for p in expand if p not in modules)
    return View(depth, auto, collapsed, owner, stand_in, folds, cluster, modules, unknown)


def _summarise(unit: CollapsedModule, nodes: Sequence[TraceNode]) -> None:
    squares, any_grad = 0.0, False
    ops = set()
    for i in unit.node_ids:
        node = nodes[i]
        if node.kind == "op":
            ops.add(node.op_id)
        if node.grad is not None and not node.grad.finite:
            unit.nonfinite = True
        if node.kind == "param":
            unit.params += math.prod(node.shape or ())
            if node.grad is not None:
                any_grad = True
                squares += node.grad.norm ** 2
    unit.ops = len(ops)
    unit.grad_norm = math.sqrt(squares) if any_grad else None


def _members(nodes: Sequence[TraceNode], path: str) -> list[TraceNode]:
    prefix = path + "."
    return [n for n in nodes if n.module and (n.module == path or n.module.startswith(prefix))]


def _signature(members: list[TraceNode], path: str) -> tuple:
    """The block's graph shape: each tensor's op, kind, shape and module relative to the block,
    and its inputs as positions inside the block (or "outside")."""
    position = {n.id: i for i, n in enumerate(members)}
    cut = len(path)
    return tuple(
        (n.op, n.kind, n.shape, n.dtype, n.module[cut:], tuple(position.get(i, -1) for i in n.inputs))
        for n in members
    )


def _fold(nodes, modules, drawn_units, collapsed_paths, stand_in, folds) -> None:
    """Fold runs of consecutive indexed siblings (``layers.0``, ``layers.1``, …) alike in class and shape,
    and drawn alike (all collapsed or all open). Expanded modules never fold: the user asked to see them."""
    by_parent: dict[str, list[tuple[int, str]]] = {}
    for path in drawn_units:
        parent, _, last = path.rpartition(".")
        if last.isdigit() and parent:
            by_parent.setdefault(parent, []).append((int(last), path))
    for _, children in sorted(by_parent.items()):
        children.sort()
        run: list[tuple[str, list[TraceNode], tuple]] = []
        for index, path in children:
            members = _members(nodes, path)
            entry = (path, members, (modules.get(path, ""), path in collapsed_paths, _signature(members, path)))
            if run and index == int(run[-1][0].rsplit(".", 1)[1]) + 1 and entry[2] == run[-1][2]:
                run.append(entry)
                continue
            _close_run(run, stand_in, folds, modules)
            run = [entry]
        _close_run(run, stand_in, folds, modules)


def _close_run(run, stand_in, folds, modules) -> None:
    if len(run) < 2:
        return
    first_path, first_members, _ = run[0]
    for _, members, _ in run[1:]:
        for copy, original in zip(members, first_members):
            stand_in[copy.id] = original.id
    folds[first_path] = Fold([path for path, _, _ in run], modules.get(first_path, ""))
