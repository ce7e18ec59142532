"""What a diagram draws of a big graph: module calls as clusters or boxes, repeats folded.

Plain data, no Graphviz: the renderers (DOT and text) draw what a ``View`` says. The trace
itself keeps every node; a view only decides how they are shown.

Clusters and boxes are per module *call*: a discriminator called on real data, on
``fake.detach()`` and on ``fake`` is three clusters (or three boxes), each with its own inputs
and outputs, so no edge suggests data flowing from one call into another. Calls come from
``TraceNode.scope``; a trace without scopes counts one call per module.

Levels count a module path's components: ``model`` is level 1, ``model.layers.3`` level 3.
``depth=N`` draws modules of level N or less as open clusters and each call of a module of
level N+1 as one collapsed box (with everything inside it). ``expand`` opens the named modules,
their ancestors and everything inside them, whatever the depth.

Folding draws one of several alike units: consecutive sibling module calls (``layers.0`` …
``layers.5``) or the iterations of a loop (``trace.loops``). A node of a unit not drawn
*stands in* for its twin in the drawn unit; edges to and from it are drawn to and from the twin.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .loops import Loop, find_loops
from .model import TraceNode

AUTO_DEPTH_NODES = 40  # the default depth is the deepest at which the diagram has at most this many boxes

Call = tuple[str, int]  # (module path, call number)


def call_scope(node: TraceNode) -> tuple[Call, ...]:
    """The module calls ``node`` ran inside, outermost first (one call per module without scopes)."""
    if node.scope:
        return node.scope
    return tuple((path, 1) for path in _chain(node.module))


def cluster_key(call: Call) -> str:
    return f"{call[0]}#{call[1]}"


@dataclass
class CollapsedModule:
    """One call of a module drawn as one box: what is inside it, its parameters and their gradients."""

    path: str
    call: int
    calls: int  # calls of this module in the trace
    kind: str  # the module's class name
    node_ids: list[int] = field(default_factory=list)
    ops: int = 0
    params: int = 0  # parameter elements that took part in the graph
    grad_norm: float | None = None  # norm over its parameters' gradients
    nonfinite: bool = False  # some gradient inside is NaN or Inf
    shared_params: int = 0  # parameters shared with the module's other calls, drawn in none of them
    names: list[str] = field(default_factory=list)  # the user's tensors inside, not drawn on their own
    stands_for: list[int] = field(default_factory=list)  # call numbers this box draws (folds: several)

    @property
    def key(self) -> Call:
        return self.path, self.call

    @property
    def call_text(self) -> str:
        """``call 2 of 3``, ``calls 2…40 of 40``, or empty for a module called once."""
        return calls_text(self.stands_for or [self.call], self.calls)


def calls_text(numbers: Sequence[int], calls: int) -> str:
    if calls <= 1:
        return ""
    numbers = sorted(numbers)
    if len(numbers) == 1:
        return f"call {numbers[0]} of {calls}"
    return f"calls {numbers[0]}…{numbers[-1]} of {calls}"


@dataclass
class Fold:
    """Consecutive sibling module calls of one class and one graph shape, drawn once."""

    units: list[Call]  # the last is drawn; the others map onto it node by node
    kind: str
    calls: int = 1  # calls of the first block's module

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.units]

    @property
    def label(self) -> str:
        first, last = self.paths[0], self.paths[-1]
        call = calls_text([self.units[0][1]], self.calls)
        return f"{first} … {last.rsplit('.', 1)[-1]} · {self.kind} ×{len(self.units)}" + (f" ({call})" if call else "")


@dataclass
class Cluster:
    """An open box around part of the diagram: one module call, or the drawn iteration of a loop."""

    key: str
    label: str
    kind: str  # "module", "fold" (repeated blocks) or "loop"


@dataclass
class View:
    depth: int | None  # None: every module open
    auto: bool  # the depth was chosen to fit, not asked for
    collapsed: dict[Call, CollapsedModule]
    owner: dict[int, Call]  # node id -> the collapsed module call drawing it
    stand_in: dict[int, int]  # node id in a unit not drawn -> its twin in the drawn unit (resolved)
    folds: dict[Call, Fold]  # drawn (last) block's call -> its fold
    loops: list[Loop]
    chain: dict[int, tuple[str, ...]]  # node id -> the open clusters around it, outermost first
    clusters: dict[str, Cluster]
    modules: Mapping[str, str]
    hidden: dict[int, Call] = field(default_factory=dict)  # params shared by calls of a collapsed module
    twins: dict[int, list[int]] = field(default_factory=dict)  # drawn node -> the nodes standing in for it
    exits: set[int] = field(default_factory=set)  # named tensors leaving a collapsed call: drawn as boxes after it
    unknown_expand: tuple[str, ...] = ()
    revealed: str | None = None  # opened because the first NaN/Inf gradient is inside

    @property
    def box_count(self) -> int:
        drawn = [i for i in self.chain if i not in self.owner and i not in self.stand_in and i not in self.hidden]
        shown = {self.owner[i] for i in self.owner if i not in self.stand_in}
        exits = [i for i in self.exits if i not in self.stand_in]
        return len(drawn) + len(shown) + len(exits)

    def drawn_as(self, i: int) -> int:
        """The node drawn for ``i``: itself, or its twin in the drawn unit of a fold."""
        return self.stand_in.get(i, i)

    def members(self, i: int) -> list[int]:
        """The nodes a drawn node stands for: itself and its twins in the units not drawn."""
        return [i, *self.twins.get(i, ())]

    def notes(self) -> list[str]:
        """What the view left out of sight, in words, for the diagram and the text view."""
        out = [f"--expand {path}: no such module in this trace" for path in self.unknown_expand]
        if self.revealed:
            out.append(f"{self.revealed} drawn open: the first NaN/Inf gradient is inside it")
        if self.collapsed:
            paths = sorted({key[0] for key in self.collapsed}, key=natural)
            how = "chosen to fit" if self.auto else "as asked"
            out.append(f"modules deeper than level {self.depth} ({how}) drawn collapsed: {len(paths)} "
                       f"({_few(paths)}); --depth N or --expand PATH opens them")
        for fold in self.folds.values():
            out.append(f"{len(fold.units)} repeated {fold.kind} blocks drawn once (×{len(fold.units)}); "
                       "every layer's gradients are in the table and t.nodes")
        for loop in self.loops:
            where = f" at {loop.source}" if loop.source is not None else ""
            out.append(f"loop{where}: {loop.iterations} drawn once (×{loop.count}), as iteration "
                       f"{loop.drawn_number}; every iteration's gradients are in t.nodes; --no-fold draws them all")
        return out


def natural(path: str) -> list:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in path.split(".")]


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


def compress_names(names: Sequence[str], limit: int = 4) -> str:
    """Names as short text: ``h (2…40)``, ``h1 … h4``, ``net.blocks.1…3.lin.weight``, or the first few
    and a count."""
    names = list(dict.fromkeys(names))
    if len(names) <= 2:
        return ", ".join(names)
    split = [re.split(r"(\d+)", name) for name in names]
    if len({len(parts) for parts in split}) == 1:
        differ = [k for k in range(len(split[0])) if len({parts[k] for parts in split}) > 1]
        if len(differ) == 1 and differ[0] % 2 == 1:  # odd positions hold the numbers
            k = differ[0]
            numbers = [int(parts[k]) for parts in split]
            if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
                prefix, suffix = "".join(split[0][:k]), "".join(split[0][k + 1:])
                if suffix:
                    return f"{prefix}{numbers[0]}…{numbers[-1]}{suffix}"
                return f"{names[0]} … {names[-1]}"
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[: limit - 1]) + f", … {names[-1]} ({len(names)} names)"


def plan(nodes: Sequence[TraceNode], modules: Mapping[str, str], *, depth: int | None = None,
         expand: Sequence[str] = (), fold: bool = True, auto_target: int = AUTO_DEPTH_NODES,
         reveal: str | None = None, loops: list[Loop] | None = None) -> View:
    """Decide clusters, collapsed module calls and folds. ``depth=None`` picks the deepest level
    at which the diagram has at most ``auto_target`` boxes (the ``expand`` paths open in any case).
    ``reveal``: a module to open whatever the depth (the one where the first NaN/Inf gradient is).
    ``loops``: the trace's loops when already found (``find_loops``)."""
    if fold and loops is None:
        loops = find_loops(nodes)
    loops = loops if fold else []
    levels = max((len(call_scope(n)) for n in nodes if n.kind == "op"), default=0)
    levels = max([levels] + [n.module.count(".") + 1 for n in nodes if n.module])
    expand = tuple(expand)
    if reveal and reveal not in expand:
        view = plan(nodes, modules, depth=depth, expand=(*expand, reveal), fold=fold, auto_target=auto_target,
                    loops=loops)
        view.revealed = reveal
        return view
    if depth is not None or levels == 0:
        return _Planner(nodes, modules, depth, expand, fold, loops).view(auto=False)
    view = _Planner(nodes, modules, None, expand, fold, loops).view(auto=False)
    for candidate in range(levels - 1, -1, -1):
        if view.box_count <= auto_target:
            break
        view = _Planner(nodes, modules, candidate, expand, fold, loops).view(auto=True)
    return view


class _Planner:
    """One view's decisions, step by step: module calls, parameters, folds, clusters."""

    def __init__(self, nodes, modules, depth, expand, fold, loops) -> None:
        self.nodes, self.modules, self.depth, self.expand, self.fold = nodes, modules, depth, expand, fold
        self.loops: list[Loop] = list(loops)
        self.owner: dict[int, Call] = {}
        self.open_calls: dict[int, tuple[Call, ...]] = {}  # op id -> the open calls around it
        self.collapsed: dict[Call, CollapsedModule] = {}
        self.hidden: dict[int, Call] = {}
        self.calls: dict[str, int] = {}
        self.stand_in: dict[int, int] = {}
        self.folds: dict[Call, Fold] = {}
        self.exits: set[int] = set()
        self.consumers: list[list[int]] = [[] for _ in nodes]
        for node in nodes:
            for i in node.inputs:
                self.consumers[i].append(node.id)
        self.opened: set[str] = set()  # calls drawn open because a box would draw a cycle

    def view(self, auto: bool) -> View:
        self._assign_ops()
        crossed = self._crossed_units()
        while crossed:  # (each round opens at least one call: it ends)
            self.opened |= crossed
            self.owner, self.open_calls, self.collapsed = {}, {}, {}
            self._assign_ops()
            crossed = self._crossed_units()
        self._assign_leaves()
        self._stand_ins()
        chain, clusters = self._clusters()
        for unit in self.collapsed.values():
            self._summarise(unit)
        twins: dict[int, list[int]] = {}
        for copy, original in self.stand_in.items():
            twins.setdefault(original, []).append(copy)
        self._calls_drawn(twins)
        self._open_calls_drawn(twins, clusters)
        unknown = tuple(p for p in self.expand if p not in self.modules)
        return View(self.depth, auto, self.collapsed, self.owner, self.stand_in, self.folds, self.loops, chain,
                    clusters, self.modules, self.hidden, twins, self.exits, unknown)

    # -- step 1: every operation is in the open calls around it, or inside one collapsed call
    def _assign_ops(self) -> None:
        for node in self.nodes:
            for path, number in call_scope(node):
                self.calls[path] = max(self.calls.get(path, 0), number)
        for node in self.nodes:
            if node.kind != "op":
                continue
            scope = call_scope(node)
            closed = next((k for k, (path, _) in enumerate(scope) if self._closed(path)), None)
            self.open_calls[node.id] = scope if closed is None else scope[:closed]
            if closed is not None:
                path, number = scope[closed]
                unit = self.collapsed.get((path, number))
                if unit is None:
                    unit = self.collapsed[(path, number)] = CollapsedModule(
                        path, number, self.calls.get(path, 1), self.modules.get(path, ""))
                unit.node_ids.append(node.id)
                self.owner[node.id] = (path, number)

    def _closed(self, path: str) -> bool:
        """Whether calls of the module at ``path`` are drawn as boxes at this depth."""
        return not _is_open(path, self.depth, self.expand) and path not in self.opened

    def _crossed_units(self) -> set[str]:
        """Collapsed calls whose box would be in a cycle: what leaves it comes back into it through
        operations outside it. A module's own call cannot do that; a container never called itself
        (``for attn, ff in self.layers: x = attn(x) + x; x = ff(x) + x``) can, and is drawn open."""
        crossed: set[str] = set()
        for (path, _), unit in self.collapsed.items():
            inside = set(unit.node_ids)
            low, high = min(inside), max(inside)
            between: set[int] = set()  # outside the box, fed by it (ids are in graph order)
            for i in range(low + 1, high):
                if i not in inside and any(u in inside or u in between for u in self.nodes[i].inputs):
                    between.add(i)
            if between and any(u in between for j in inside for u in self.nodes[j].inputs):
                crossed.add(path)
        return crossed

    # -- step 2: a parameter inside a collapsed module is in the box of the one call that uses it,
    # hidden (and counted in each box) when several calls share it, and drawn when used outside
    def _assign_leaves(self) -> None:
        for node in self.nodes:
            if node.kind == "op" or not node.module:
                continue
            closed = next((p for p in _chain(node.module) if self._closed(p)), None)
            if closed is None:
                continue
            users = {self.owner.get(i) for i in self.consumers[node.id]}
            if not users or None in users or any(call[0] != closed for call in users):
                continue
            if len(users) == 1:
                (call,) = users
                self.owner[node.id] = call
                self.collapsed[call].node_ids.append(node.id)
            else:
                self.hidden[node.id] = min(users)
                for call in users:
                    self.collapsed[call].shared_params += 1

    # -- step 3: folds. Loops first; then runs of sibling blocks among the calls left drawn
    def _stand_ins(self) -> None:
        origin = next((n.id for n in self.nodes if n.nonfinite_origin), None)
        for loop in self.loops:
            shown = next((k for k, unit in enumerate(loop.units) if origin in unit), -1)
            loop.show(shown)  # the iteration where the first NaN/Inf gradient appeared, else the last
            self.stand_in.update(loop.stand_in)
        self.loops = [loop for loop in self.loops if not self._inside_one_box(loop)]
        if self.fold:
            self._fold_blocks()
        for copy in list(self.stand_in):  # a twin can itself be in a unit not drawn: follow to the end
            target = self.stand_in[copy]
            while target in self.stand_in:
                target = self.stand_in[target]
            self.stand_in[copy] = target

    def _inside_one_box(self, loop: Loop) -> bool:
        owners = {self.owner.get(i) for unit in loop.units for i in unit}
        if len(owners) == 1 and None not in owners:
            for unit in loop.units[:-1]:
                for i in unit:
                    self.stand_in.pop(i, None)
            return True
        return False

    def _unit_members(self, call: Call, ops: dict[Call, list[int]]) -> list[TraceNode]:
        """The operations of one call and, for a module called once, its parameters (in graph order)."""
        path = call[0]
        members = list(ops.get(call, ()))
        if self.calls.get(path, 1) == 1:
            prefix = path + "."
            members += [n.id for n in self.nodes if n.kind != "op" and n.module
                        and (n.module == path or n.module.startswith(prefix))]
        return [self.nodes[i] for i in sorted(members)]

    def _fold_blocks(self) -> None:
        """Fold runs of consecutive indexed sibling calls (``layers.0``, ``layers.1``, …) alike in class
        and shape, and drawn alike (all collapsed or all open). Expanded modules never fold: the user
        asked to see them."""
        parents: dict[tuple, list[tuple[int, Call]]] = {}
        drawn_calls: set[tuple[Call, ...]] = set()
        for node in self.nodes:
            if node.kind != "op" or node.id in self.stand_in:
                continue
            scope = call_scope(node)
            shown = self.open_calls[node.id]
            drawn_calls.add(scope[: len(shown) + (1 if node.id in self.owner else 0)])
        ops: dict[Call, list[int]] = {}
        for node in self.nodes:
            if node.kind == "op":
                for call in call_scope(node):
                    ops.setdefault(call, []).append(node.id)
        units: dict[Call, Call | None] = {}
        for scope in drawn_calls:
            for k, call in enumerate(scope):
                units.setdefault(call, scope[k - 1] if k else None)
        for call, parent in units.items():
            path, number = call
            parent_path, _, last = path.rpartition(".")
            if last.isdigit() and parent_path and not _on_expand_path(path, self.expand):
                parents.setdefault((parent_path, parent), []).append((int(last), call))
        consumers: dict[int, list[int]] = {}
        for node in self.nodes:
            for u in node.inputs:
                consumers.setdefault(u, []).append(node.id)
        for _, children in sorted(parents.items(), key=lambda item: (natural(item[0][0]), str(item[0][1]))):
            children.sort()
            run: list[tuple[Call, list[TraceNode], tuple]] = []
            for index, call in children:
                members = self._unit_members(call, ops)
                if any(n.id in self.stand_in for n in members):
                    self._close_run(run)
                    run = []
                    continue
                signature = (self.modules.get(call[0], ""), call in self.collapsed, call[1],
                             _signature(members, call[0]))
                entry = (call, members, signature)
                if (run and index == int(run[-1][0][0].rsplit(".", 1)[1]) + 1 and signature == run[-1][2]
                        and _feeds_only(run[-1][1], members, consumers)):
                    run.append(entry)
                    continue
                self._close_run(run)
                run = [entry]
            self._close_run(run)

    def _close_run(self, run) -> None:
        """The last block of a run is drawn (its output is what the code after the blocks uses)."""
        if len(run) < 2:
            return
        last_call, last_members, _ = run[-1]
        for _, members, _ in run[:-1]:
            for copy, original in zip(members, last_members):
                self.stand_in[copy.id] = original.id
        self.folds[last_call] = Fold([call for call, _, _ in run], self.modules.get(last_call[0], ""),
                                     self.calls.get(last_call[0], 1))

    # -- step 4: the open clusters around each drawn node
    def _clusters(self) -> tuple[dict[int, tuple[str, ...]], dict[str, Cluster]]:
        clusters: dict[str, Cluster] = {}
        chain: dict[int, tuple[str, ...]] = {}
        loop_of: dict[int, str] = {}
        for n, loop in enumerate(self.loops):
            for i in loop.drawn:
                loop_of[i] = f"loop{n}"
        loop_depth = {}
        for n, loop in enumerate(self.loops):  # a loop's cluster sits inside the calls all iterations share
            scopes = [self._open_scope(i) for i in (*loop.drawn, *loop.units[0])]
            common = scopes[0]
            for scope in scopes[1:]:
                common = _common_prefix(common, scope)
            loop_depth[f"loop{n}"] = len(common)
            where = f" · {loop.source}" if loop.source is not None else ""
            clusters[f"loop{n}"] = Cluster(f"loop{n}", f"loop ×{loop.count} ({loop.iterations}; iteration "
                                           f"{loop.drawn_number} drawn){where}", "loop")
        on_params = _on_params(self.nodes)
        for node in self.nodes:
            if node.id in self.stand_in or node.id in self.hidden:
                continue
            if node.kind != "op":
                continue
            scope = self._open_scope(node.id)
            keys = [cluster_key(call) for call in scope]
            for call in scope:
                self._module_cluster(call, clusters)
            if node.id in on_params and keys and scope[-1][0] == node.module:
                keys = keys[:-1]  # a weight's transpose sits beside its module, like the weight
            elif node.id in loop_of:
                keys.insert(loop_depth[loop_of[node.id]], loop_of[node.id])
            chain[node.id] = tuple(keys)
        for node in self.nodes:  # parameters beside the module using them; the user's leaves outside all
            if node.kind == "op" or node.id in self.hidden:
                continue
            if not node.module:
                chain[node.id] = ()
                continue
            users = [chain.get(self.stand_in.get(i, i), ()) for i in self.consumers[node.id]]
            common = users[0] if users else ()
            for user in users[1:]:
                common = _common_prefix(common, user)
            common = tuple(k for k in common if not k.startswith("loop"))
            if common and node.module and common[-1].rpartition("#")[0] == node.module:
                common = common[:-1]
            chain[node.id] = common
        return chain, clusters

    def _open_scope(self, i: int) -> tuple[Call, ...]:
        return self.open_calls.get(i, ())

    def _module_cluster(self, call: Call, clusters: dict[str, Cluster]) -> None:
        key = cluster_key(call)
        if key in clusters:
            return
        fold = self.folds.get(call)
        if fold is not None:
            clusters[key] = Cluster(key, fold.label, "fold")
            return
        path, number = call
        kind = self.modules.get(path, "")
        label = f"{path} · {kind}" if kind else path
        which = calls_text([number], self.calls.get(path, 1))
        clusters[key] = Cluster(key, label + (f" ({which})" if which else ""), "module")

    # -- step 5: what each collapsed box holds
    def _summarise(self, unit: CollapsedModule) -> None:
        squares, any_grad = 0.0, False
        ops = set()
        for i in unit.node_ids:
            node = self.nodes[i]
            if node.kind == "op":
                ops.add(node.op_id)
                if node.name is not None or node.is_output:
                    if self._leaves_box(node):
                        self.exits.add(node.id)
                    elif node.name is not None:
                        unit.names.append(node.name)
            if node.grad is not None and not node.grad.finite:
                unit.nonfinite = True
        params = [self.nodes[i] for i in unit.node_ids if self.nodes[i].kind == "param"]
        params += [self.nodes[i] for i, call in self.hidden.items() if call[0] == unit.path]
        for node in params:
            unit.params += math.prod(node.shape or ())
            if node.grad is not None:
                any_grad = True
                squares += node.grad.norm ** 2
                if not node.grad.finite:
                    unit.nonfinite = True
        unit.ops = len(ops)
        unit.grad_norm = math.sqrt(squares) if any_grad else None

    def _leaves_box(self, node: TraceNode) -> bool:
        """A named tensor that leaves its collapsed call (``h1 = block(h0)``) is drawn as its own box."""
        call = self.owner[node.id]
        return node.is_output or any(self.owner.get(i) != call for i in self.consumers[node.id])

    def _open_calls_drawn(self, twins: dict[int, list[int]], clusters: dict[str, Cluster]) -> None:
        """An open call drawn for the calls of its twins (one per loop iteration) says which calls."""
        numbers: dict[Call, set[int]] = {}
        for original, copies in twins.items():
            for call in self.open_calls.get(original, ()):
                for copy in copies:
                    for path, number in call_scope(self.nodes[copy]):
                        if path == call[0]:
                            numbers.setdefault(call, {call[1]}).add(number)
        for call, drawn in numbers.items():
            cluster = clusters.get(cluster_key(call))
            if cluster is not None and cluster.kind == "module" and len(drawn) > 1:
                kind = self.modules.get(call[0], "")
                label = f"{call[0]} · {kind}" if kind else call[0]
                cluster.label = f"{label} ({calls_text(sorted(drawn), self.calls.get(call[0], 1))})"

    def _calls_drawn(self, twins: dict[int, list[int]]) -> None:
        for unit in self.collapsed.values():
            numbers = {unit.call}
            for i in unit.node_ids:
                for copy in twins.get(i, ()):
                    if copy in self.owner and self.owner[copy][0] == unit.path:
                        numbers.add(self.owner[copy][1])
            unit.stands_for = sorted(numbers)


def _feeds_only(block: list[TraceNode], following: list[TraceNode], consumers: Mapping[int, list[int]]) -> bool:
    """Whether what ``block`` computes is used only inside it and by the ``following`` block: a fold
    draws the last block for all, so a use of an earlier block's output elsewhere (``x = b(x) + x``
    written in the parent, U-Net skips) would be drawn as a use of the last block's."""
    inside = {n.id for n in block} | {n.id for n in following}
    return all(c in inside for n in block for c in consumers.get(n.id, ()))


def _common_prefix(a: tuple, b: tuple) -> tuple:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return a[:n]


def _on_params(nodes: Sequence[TraceNode]) -> set[int]:
    """Ids of parameters, and of one-input ops on them (``t``, ``view``, ``expand`` of a weight)."""
    found: set[int] = set()
    for node in nodes:  # inputs first, so an op's inputs are classified before it
        if node.kind == "param" or (node.kind == "op" and len(node.inputs) == 1 and node.inputs[0] in found):
            found.add(node.id)
    return found


def _signature(members: list[TraceNode], path: str) -> tuple:
    """The block's graph shape: each tensor's op, kind, shape and module relative to the block,
    and its inputs as positions inside the block (or "outside")."""
    position = {n.id: i for i, n in enumerate(members)}
    cut = len(path)
    return tuple(
        (n.op, n.kind, n.shape, n.dtype, (n.module or "")[cut:], tuple(position.get(i, -1) for i in n.inputs))
        for n in members
    )
