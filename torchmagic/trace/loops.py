"""Find the loops of a trace: runs of iterations that build the same subgraph, and what they carry.

A loop shows in the graph as a tensor made by the same operation on the same line (and in the
same module) again and again, each one computed from the one before: ``h`` in
``for t in range(50): h = torch.tanh(xs[t] @ Wx + h @ Wh + b)``. Those tensors cut the graph
into iterations: iteration k holds the operations that lead to the k-th one and not to the one
before, plus what is computed from iteration k alone (a per-step output, a running loss).
Iterations whose subgraphs are alike (the same operations, shapes, lines, shared inputs and
links to the iteration before) fold: a diagram draws one of them. Nothing here is heuristic
about names; names only break ties between equally good cuts.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .model import SourceLine, TraceNode

MIN_ITERATIONS = 3  # fewer alike iterations than this are drawn as they are


@dataclass
class Loop:
    """Alike iterations of one loop, one of them drawn for all (the last, unless told otherwise).

    ``units`` hold the node ids of each folded iteration, in order; ``carried`` the loop-carried
    tensor of each of them (``h`` at each step). ``first`` is the 1-based number of the first
    folded iteration among ``total`` (iteration 1 can differ: when its ``h`` needs no gradient and
    does not join the fold). ``roles`` give each node its place in its iteration: nodes of one role
    are twins.
    """

    units: list[list[int]]
    carried: list[int]
    first: int
    total: int
    source: SourceLine | None
    roles: list[dict[int, int]] = field(default_factory=list, repr=False)
    shown: int = -1  # index in ``units`` of the iteration drawn
    _stand_in: dict[int, int] | None = field(default=None, repr=False)

    @property
    def drawn(self) -> list[int]:
        return self.units[self.shown]

    @property
    def drawn_number(self) -> int:
        """The drawn iteration's 1-based number in the loop."""
        return self.first + (self.shown % len(self.units))

    @property
    def count(self) -> int:
        return len(self.units)

    @property
    def iterations(self) -> str:
        """``iterations 2…40 of 40`` or ``40 iterations``."""
        last = self.first + self.count - 1
        if self.first == 1 and last == self.total:
            return f"{self.count} iterations"
        return f"iterations {self.first}…{last} of {self.total}"

    def show(self, index: int) -> None:
        """Draw the iteration ``units[index]`` for all (the one holding the first NaN/Inf gradient)."""
        if index % len(self.units) != self.shown % len(self.units):
            self.shown = index % len(self.units)
            self._stand_in = None

    @property
    def stand_in(self) -> dict[int, int]:
        """Each node of an iteration not drawn -> its twin in the drawn one."""
        if self._stand_in is None:
            drawn = _by_role(self.drawn, self.roles[self.shown])
            self._stand_in = {}
            for k, unit in enumerate(self.units):
                if k == self.shown % len(self.units):
                    continue
                for role, ids in _by_role(unit, self.roles[k]).items():
                    for copy, original in zip(ids, drawn[role]):
                        self._stand_in[copy] = original
        return self._stand_in


def _local(node: TraceNode) -> tuple:
    """What a tensor is, apart from where its inputs come from."""
    line = (node.source.cell, node.source.line) if node.source is not None else None
    return node.op, node.kind, node.shape, node.dtype, node.output_nr, line, node.module


def find_loops(nodes: Sequence[TraceNode], exclude: Iterable[int] = (),
               min_iterations: int = MIN_ITERATIONS) -> list[Loop]:
    """The loops of ``nodes`` whose iterations fold, most nodes hidden first, disjoint.

    ``nodes`` are in graph order (inputs first, ids equal to positions); nodes in ``exclude``
    (already folded otherwise) take no part.
    """
    excluded = set(exclude)
    consumers: list[list[int]] = [[] for _ in nodes]
    for node in nodes:
        for i in node.inputs:
            consumers[i].append(node.id)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for node in nodes:
        if node.kind == "op" and node.id not in excluded:
            groups[_local(node)].append(node.id)
    candidates = []
    for members in groups.values():
        if len(members) >= min_iterations:
            for run in _chains(nodes, members):
                if len(run) >= min_iterations:
                    candidates.append(run)
    found: list[Loop] = []
    taken: set[int] = set(excluded)
    scored = []
    for run in candidates:
        loop = _fold(nodes, consumers, run, taken, min_iterations)
        if loop is not None:
            hidden = sum(len(unit) for unit in loop.units[:-1])
            named = sum(nodes[i].name is not None for i in loop.carried)
            scored.append(((hidden, named, loop.carried[-1]), loop))
    for _, loop in sorted(scored, key=lambda item: item[0], reverse=True):
        members = {i for unit in loop.units for i in unit}
        if members & taken:
            continue
        taken |= members
        loop.carried = _state(nodes, consumers, loop, candidates)
        found.append(loop)
    return found


def _state(nodes: Sequence[TraceNode], consumers: list[list[int]], loop: Loop, candidates: list[list[int]]) -> list[int]:
    """The carried tensor whose gradient the plot shows: of the chains that run through every folded
    iteration, the loop's state (``hidden``, which the next iteration computes with) rather than an
    accumulator (``loss = loss + ...``, which only the next sum uses: its gradient is 1 throughout)."""
    unit_of = {i: k for k, unit in enumerate(loop.units) for i in unit}

    def score(chain: list[int]) -> tuple[int, int]:
        # used by the loop for more than the next link (an accumulator feeds only its next sum);
        # then named by the user (hidden, rather than the cat it is concatenated into)
        used = sum(any(c in unit_of and c != chain[k + 1] for c in consumers[chain[k]])
                   for k in range(len(chain) - 1))
        return used, sum(nodes[i].name is not None for i in chain)

    best, best_score = loop.carried, score(loop.carried)
    for run in candidates:
        chain = [i for i in run if i in unit_of]
        if len(chain) != loop.count or [unit_of[i] for i in chain] != list(range(loop.count)):
            continue
        chain_score = score(chain)
        if chain_score > best_score:
            best, best_score = chain, chain_score
    return best


def _chains(nodes: Sequence[TraceNode], members: list[int]) -> list[list[int]]:
    """Split ``members`` (ascending ids) into runs where each one is computed from the one before."""
    runs: list[list[int]] = [[members[0]]]
    for before, after in zip(members, members[1:]):
        if _reaches(nodes, before, after):
            runs[-1].append(after)
        else:
            runs.append([after])
    return runs


def _reaches(nodes: Sequence[TraceNode], source: int, target: int) -> bool:
    """Whether ``target`` is computed from ``source`` (ids only grow along the graph: search back)."""
    stack, seen = [target], {target}
    while stack:
        node = stack.pop()
        for i in nodes[node].inputs:
            if i == source:
                return True
            if i > source and i not in seen:
                seen.add(i)
                stack.append(i)
    return False


def _ancestors(nodes: Sequence[TraceNode], start: int, stop: set[int], allowed=None) -> list[int]:
    """Operations ``start`` is computed from (itself included), not entering ``stop``."""
    found, stack = [start], [start]
    seen = {start}
    while stack:
        for i in nodes[stack.pop()].inputs:
            node = nodes[i]
            if i in seen or i in stop or node.kind != "op" or (allowed is not None and not allowed(node)):
                continue
            seen.add(i)
            found.append(i)
            stack.append(i)
    return found


def _fold(nodes, consumers, carried: list[int], taken: set[int], min_iterations: int) -> Loop | None:
    count = len(carried)
    # iteration k (k >= 2): what leads to carried[k] and not to carried[k - 1]
    seen = set(_ancestors(nodes, carried[0], set()))
    cores: list[list[int]] = [[]]
    for k in range(1, count):
        core = _ancestors(nodes, carried[k], seen)
        seen.update(core)
        cores.append(core)
    keys = {_local(nodes[i]) for core in cores[1:] for i in core}
    # iteration 1: the same, only as far back as operations the later iterations also have
    cores[0] = _ancestors(nodes, carried[0], set(), allowed=lambda n: _local(n) in keys)
    iteration: dict[int, int] = {i: k for k, core in enumerate(cores) for i in core}
    if len(iteration) != sum(len(core) for core in cores):
        return None  # iterations overlap: not a simple loop
    # what is computed from iteration k and no later one (a per-step output, a running sum)
    side: dict[int, int] = {}
    for node in nodes[carried[0]:]:
        if node.id in iteration or node.kind != "op":
            continue
        ks = [iteration.get(i, side.get(i)) for i in node.inputs]
        ks = [k for k in ks if k is not None]
        if ks:
            side[node.id] = max(ks)
    per_key = Counter()
    for k in range(count):
        per_key.update({_local(nodes[i]) for i, j in side.items() if j == k})
    common = {key for key, seen_in in per_key.items() if seen_in >= max(2, count - 1)}
    units = [sorted(core) for core in cores]
    for i, k in side.items():
        if _local(nodes[i]) in common:
            units[k].append(i)
            iteration[i] = k
    # an op on parameters alone that only one iteration uses is that iteration's (the t(weight)
    # an nn.Linear makes at each call): left outside, each iteration would read a different one
    for node in nodes:
        if node.kind != "op" or node.id in iteration or any(nodes[j].kind == "op" for j in node.inputs):
            continue
        users = {iteration.get(c) for c in consumers[node.id]}
        if len(users) == 1 and None not in users:
            (k,) = users
            units[k].append(node.id)
            iteration[node.id] = k
    units = [sorted(unit) for unit in units]
    signatures = _signatures(nodes, units, iteration)
    # the longest run of alike iterations, the last one drawn
    best = (0, 0)
    start = 0
    for k in range(1, count + 1):
        if k == count or signatures[k][0] != signatures[start][0]:
            if k - start > best[1] - best[0]:
                best = (start, k)
            start = k
    lo, hi = best
    if hi - lo < min_iterations:
        return None
    entry: set[int] | None = None
    if lo == 1:
        # iteration 1 may differ only in where the carried input comes from: a tensor from before the
        # loop that no later iteration uses (the loop's entry), or nothing at all (h = zeros)
        later = {j for unit in units[1:] for i in unit for j in nodes[i].inputs}
        entry = {j for i in units[0] for j in nodes[i].inputs if j not in iteration and j not in later}
        plain = _signatures(nodes, [units[0], units[hi - 1]], iteration, drop=entry)
        if plain[0][0] == plain[1][0]:
            lo = 0
        else:
            entry = None
    folded = units[lo:hi]
    if any(i in taken for unit in folded for i in unit):
        return None
    # roles comparable across every folded iteration (iteration 1's without the links it lacks)
    roles = [r for _, r in _signatures(nodes, folded, iteration, drop=entry)] if entry is not None \
        else [r for _, r in signatures[lo:hi]]
    source = nodes[carried[hi - 1]].source
    return Loop(folded, carried[lo:hi], lo + 1, count, source, roles)


def _by_role(unit: list[int], roles: dict[int, int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = defaultdict(list)
    for i in unit:
        out[roles[i]].append(i)
    return out


def _signatures(nodes, units: list[list[int]], iteration: dict[int, int], drop: set[int] | None = None) -> list[tuple]:
    """Each iteration's shape as a multiset of canonical node roles, and each node's role.

    A role is an exact (interned) description of a node: what it is and, recursively, where
    each input comes from: a node of the same iteration (by role), a node ``j`` iterations
    back (by what it is), or a tensor outside the loop (by id: shared, the same every time).
    ``drop`` (to compare the first iteration): leave out inputs from earlier iterations and these.
    """
    interned: dict[tuple, int] = {}
    out = []
    for unit in units:
        roles: dict[int, int] = {}
        for i in unit:  # ascending ids: inputs before the nodes that use them
            node = nodes[i]
            sources = []
            for j in node.inputs:
                if j in roles:
                    sources.append(("in", roles[j]))
                elif j in iteration:
                    if drop is None:
                        sources.append(("back", iteration[i] - iteration[j], _local(nodes[j])))
                elif drop is None or j not in drop:
                    sources.append(("outside", j))
            key = (_local(node), tuple(sources))
            roles[i] = interned.setdefault(key, len(interned))
        out.append((tuple(sorted(Counter(roles.values()).items())), roles))
    return out
