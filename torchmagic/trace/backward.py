"""The backward side of a recording: the gradient that reached every edge of the graph, pass by pass.

A backward call becomes one engine pass in capture mode: every edge of the graph is handed to the
engine as an input (a ``GradientEdge``), so the engine returns the gradient that reached each
tensor with no Python running per node; each leaf's ``.grad`` is then accumulated by its own
AccumulateGrad node, as the engine would have. Where capture would change what runs, the pass
runs untouched with a prehook on each node instead ("hooks"): reentrant checkpoint (it refuses
capture), ``backward(inputs=...)``, ``create_graph=True``, a distributed process group (DDP puts
hooks on AccumulateGrad nodes), nodes that lead nowhere. Nodes whose tensors carry a user hook get
a prehook in capture mode too: capture sees a gradient before such a hook changes it, the prehook
sees what flowed on.
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .forward import Location
from .stats import NormOnly, PendingSummary

ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad
REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"
HOOK_WRAPPER = "BackwardHookFunctionBackward"  # module backward hooks' identity nodes
_new_edge = tuple.__new__

Edge = tuple[Any, int]  # (autograd node, input index of that node = output index of its forward op)


class EngineCall:
    """The arguments of ``torch.autograd.graph._engine_run_backward``, by name."""

    __slots__ = ("outputs", "grad_tensors", "retain_graph", "create_graph", "inputs", "allow_unreachable",
                 "accumulate_grad", "input_edges")
    _NAMES = ("grad_tensors", "retain_graph", "create_graph", "inputs", "allow_unreachable", "accumulate_grad")

    def __init__(self, outputs: Sequence[Any], args: tuple, kwargs: dict) -> None:
        self.outputs = tuple(outputs)
        values = dict(zip(self._NAMES, args))
        values.update(kwargs)
        self.grad_tensors = values.get("grad_tensors")
        self.retain_graph = values.get("retain_graph")
        self.create_graph = bool(values.get("create_graph", False))
        self.inputs = tuple(values.get("inputs") or ())
        self.allow_unreachable = values.get("allow_unreachable", True)
        self.accumulate_grad = values.get("accumulate_grad", True)
        self.input_edges: list[Edge] = []  # filled in by the recorder's analysis (it may fail)

    def run(self, engine: Any, inputs: tuple, accumulate_grad: bool) -> Any:
        return engine(self.outputs, self.grad_tensors, self.retain_graph, self.create_graph, inputs,
                      self.allow_unreachable, accumulate_grad=accumulate_grad)


def edge_of(value: Any) -> Edge:
    if isinstance(value, GradientEdge):
        return value.node, value.output_nr
    node = value.grad_fn
    if node is not None:
        return node, value.output_nr
    return tuple(get_gradient_edge(value)[:2])


class Walk:
    """The graph under some roots, walked once: its nodes, and its edges with the leaves' first.

    Edges are the ``(node, index)`` tuples of ``next_functions`` themselves, so keeping them makes
    no new objects (each one kept is one more for Python's garbage collector to scan).
    """

    __slots__ = ("seen", "leaf_edges", "edges", "kinds", "sinks", "signature", "oldest", "newest")

    def __init__(self, roots: Sequence[Edge]) -> None:
        seen: set[Any] = set()
        leaf_edges: list[Edge] = []
        edges: list[Edge] = []
        kinds: list[type] = []
        sinks = 0
        oldest, newest = sys.maxsize, -1  # a node's sequence numbers (made before a recording? in another thread?)
        stack = []
        for edge in roots:
            node = edge[0]
            if node is not None and node not in seen:
                seen.add(node)
                stack.append(node)
                if type(node) is ACCUMULATE_GRAD:
                    leaf_edges.append(edge)
                else:
                    edges.append(edge)
        push, pop, add, accumulate_grad = stack.append, stack.pop, seen.add, ACCUMULATE_GRAD
        leaf_edge, edge_add = leaf_edges.append, edges.append
        while stack:
            node = pop()
            kind = type(node)
            kinds.append(kind)
            if kind is accumulate_grad:
                continue
            seq = node._sequence_nr()
            if seq < oldest:
                oldest = seq
            if seq > newest:
                newest = seq
            leads = False
            for edge in node.next_functions:
                child = edge[0]
                if child is None:
                    continue
                leads = True
                if type(child) is accumulate_grad:
                    if child not in seen:
                        add(child)
                        push(child)
                        leaf_edge(edge)
                else:
                    edge_add(edge)
                    if child not in seen:
                        add(child)
                        push(child)
            if not leads:
                sinks += 1
        self.seen = seen
        self.leaf_edges = leaf_edges
        self.edges = list(dict.fromkeys(edges))  # a tensor used twice appears once
        self.kinds = kinds
        self.sinks = sinks
        self.oldest, self.newest = oldest, newest
        self.signature = hash(tuple(kinds))

    def all_edges(self) -> list[Edge]:
        """Every distinct edge, the leaves' first."""
        return self.leaf_edges + self.edges

    def hooked(self, seqs: set[int]) -> list[Any]:
        """The nodes walked whose sequence numbers are in ``seqs`` (those a user's tensor hook is on)."""
        if not seqs:
            return []
        return [node for node in self.seen if type(node) is not ACCUMULATE_GRAD and node._sequence_nr() in seqs]

    def has_kind(self, name: str) -> bool:
        return any(kind.__name__ == name for kind in set(self.kinds))


class PassRecord:
    """One backward call: where it was made, how it was recorded, and (while kept) its gradients.

    A captured pass keeps the engine's answer as it came: ``edges`` and ``values`` side by side
    (a tensor, or past the memory budget its norm: a NormOnly). Prehooks fill ``grads`` (tensors) and
    ``summaries``, which win over ``values`` for their edges (they saw what flowed on past a
    user's hook). Only the last pass of each call site keeps them.
    """

    __slots__ = ("index", "entry", "location", "strategy", "reason", "roots", "edges", "values", "grads",
                 "summaries", "versions", "signature", "node_count", "failed", "inner", "kept", "leaf_grads",
                 "nexts", "_index")

    def __init__(self, index: int, entry: str, location: Location | None) -> None:
        self.index = index
        self.entry = entry  # "backward" or "grad"
        self.location = location
        self.strategy = "capture"
        self.reason = ""  # why the pass was recorded with prehooks, or left untouched
        self.roots: list[Edge] = []
        self.edges: list[Edge] = []
        self.values: list[Any] = []
        self.grads: dict[Edge, torch.Tensor] = {}
        self.summaries: dict[Edge, PendingSummary | NormOnly] = {}
        self.versions: dict[Edge, int] = {}  # leaf edges whose gradient is the leaf's own .grad
        self.signature = 0
        self.node_count = 0
        self.failed: str | None = None
        self.inner: list[PassRecord] = []  # backward passes run from inside this one (reentrant checkpoint)
        self.kept = True
        self.leaf_grads: list[tuple[torch.Tensor, Edge]] = []  # (leaf, its edge) for each leaf this pass reached
        self.nexts: set[Any] = set()  # the nodes walked (kept for passes run from inside another)
        self._index: dict[Edge, int] | None = None

    def drop(self) -> None:
        """Let go of the graph and gradients (a later pass from the same call site replaces them)."""
        self.roots, self.edges, self.values, self.grads, self.summaries, self.versions = [], [], [], {}, {}, {}
        self.leaf_grads, self.inner, self.nexts, self._index = [], [], set(), None
        self.kept = False

    def items(self):
        """(edge, tensor or summary) for every edge this pass kept something for."""
        for edge, value in zip(self.edges, self.values):
            if value is not None and edge not in self.grads and edge not in self.summaries:
                yield edge, value
        yield from self.grads.items()
        yield from self.summaries.items()

    def gradient(self, edge: Edge) -> Any:
        """The tensor or summary kept for ``edge`` (None when this pass kept nothing for it)."""
        for part in (self, *self.inner):
            value = part.grads.get(edge)
            if value is None:
                value = part.summaries.get(edge)
            if value is None and part.edges:
                if part._index is None:
                    part._index = {e: i for i, e in enumerate(part.edges)}
                position = part._index.get(edge)
                value = part.values[position] if position is not None else None
            if value is not None:
                return value
        return None

    def tensors(self):
        """(container, key, edge, tensor) for every kept tensor, so one can be replaced where it is kept."""
        for i, value in enumerate(self.values):
            if isinstance(value, torch.Tensor):
                yield self.values, i, self.edges[i], value
        for edge, value in self.grads.items():
            yield self.grads, edge, edge, value

    def intact(self, edge: Edge) -> bool:
        """Whether the tensor kept for ``edge`` still holds what the pass computed (a leaf's gradient
        shared with its ``.grad`` may have been changed in place by code the trace did not see)."""
        version = self.versions.get(edge)
        if version is None:
            return True
        value = self.gradient(edge)
        return not isinstance(value, torch.Tensor) or value._version == version


def tensor_bytes(tensor: torch.Tensor) -> int:
    try:
        return tensor.nbytes
    except Exception:  # sparse and some subclasses have no nbytes
        try:
            return tensor.numel() * tensor.element_size()
        except Exception:
            return 0


def estimate_bytes(edges: Sequence[Edge], step: int = 16) -> float:
    """Bytes of every edge's gradient, from the metadata of every ``step``-th edge (0.7 us each)."""
    sample = edges[::step]
    total = 0
    for node, index in sample:
        if type(node) is ACCUMULATE_GRAD:
            continue
        metadata = node._input_metadata
        if index < len(metadata):
            total += math.prod(metadata[index].shape) * metadata[index].dtype.itemsize
    return total * len(edges) / max(1, len(sample))


def post_order(roots: Sequence[Any], nexts: dict[Any, tuple]) -> list[Any]:
    """Nodes reachable from ``roots``, inputs before the ops that consume them; ``nexts`` maps a node
    to its ``next_functions`` and is filled in for nodes it lacks (reading that costs about 1 us)."""
    order: list[Any] = []
    done: set[Any] = set()
    for root in dict.fromkeys(roots):
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
                continue
            if node in done:
                continue
            done.add(node)
            children = nexts.get(node)
            if children is None:
                children = nexts[node] = node.next_functions
            stack.append((node, True))
            for child, _ in reversed(children):
                if child is not None and child not in done:
                    stack.append((child, False))
    return order


def needed_edges(roots: Sequence[Edge], targets: set[Any]) -> list[Edge]:
    """For ``autograd.grad``: the edges into nodes the engine runs (on a path from a root to an input)."""
    children: dict[Any, tuple] = {}
    order = post_order([node for node, _ in roots if node is not None], children)
    needed: dict[Any, bool] = {}
    for node in order:  # children first
        needed[node] = node in targets or any(needed.get(child, False) for child, _ in children[node]
                                              if child is not None)
    edges = dict.fromkeys(edge for node in order if needed[node] for edge in children[node]
                          if edge[0] is not None and needed.get(edge[0]) and edge[0] not in targets)
    for root in roots:
        if needed.get(root[0]) and root[0] not in targets:
            edges.setdefault(root)
    return list(edges)


class GradientKeeper:
    """Keeps what a prehook sees, within a byte budget; past it, statistics only."""

    def __init__(self, record: PassRecord, budget: int, small_values: int, kept_bytes: int = 0) -> None:
        self.record = record
        self.budget = budget
        self.small_values = small_values
        self.kept_bytes = kept_bytes

    def keep(self, edge: Edge, grad: torch.Tensor) -> None:
        if grad.requires_grad:  # create_graph: keep the values, not a graph of their own
            grad = grad.detach()
        previous = self.record.grads.get(edge)
        if previous is not None:  # a prehook firing twice for one node (reentrant passes): latest wins
            self.kept_bytes -= tensor_bytes(previous)
        size = tensor_bytes(grad)
        if self.kept_bytes + size <= self.budget:
            self.kept_bytes += size
            self.record.grads[edge] = grad
            self.record.summaries.pop(edge, None)
        else:
            self.record.grads.pop(edge, None)
            self.record.summaries[edge] = NormOnly.of(grad)

    def prehook(self, node: Any):
        def hook(grad_outputs):
            for index, grad in enumerate(grad_outputs):
                if grad is not None:
                    self.keep((node, index), grad)
        return hook


def run_hooked(call: EngineCall, engine: Any, record: PassRecord, nodes: Sequence[Any], keeper: GradientKeeper) -> Any:
    """Run the engine untouched, with a prehook on each node keeping what reaches it."""
    handles = []
    try:
        for node in nodes:
            handles.append(node.register_prehook(keeper.prehook(node)))
        return call.run(engine, call.inputs, call.accumulate_grad)
    finally:
        for handle in handles:
            handle.remove()


def run_captured(call: EngineCall, engine: Any, edges: Sequence[Edge],
                 hooked: Sequence[tuple[Any, GradientKeeper]]) -> tuple[Any, tuple]:
    """One engine pass returning the gradient of every edge in ``edges`` (after the user's own inputs,
    for ``autograd.grad``); a prehook on each ``hooked`` node has its keeper keep what reaches it."""
    gradient_edges = tuple(_new_edge(GradientEdge, (node, index, None)) for node, index in edges)
    handles = []
    collecting = gc.isenabled()
    if collecting:  # the edge tuples are GC-tracked: a collection mid-pass costs 50-100 ms
        gc.disable()
    try:
        for node, keeper in hooked:
            handles.append(node.register_prehook(keeper.prehook(node)))
        grads = call.run(engine, call.inputs + gradient_edges, False)
    finally:
        for handle in handles:
            handle.remove()
        if collecting:
            gc.enable()
    user = len(call.inputs)
    return grads[:user], grads[user:]


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def accumulate_leaf(node: Any, grad: torch.Tensor, others_hold_it: bool) -> bool:
    """Accumulate ``grad`` into the leaf's ``.grad`` as AccumulateGrad would, and say whether ``.grad``
    now is ``grad`` itself (shared with the trace, no copy made).

    A first gradient nobody else holds, laid out as the leaf is, on a leaf without post-accumulate
    hooks, becomes ``.grad`` itself: AccumulateGrad's "steal". Anything else goes through the leaf's
    own AccumulateGrad node (in-place add, layout-obeying copy, sparse rules, hooks).
    """
    leaf = node.variable
    if type(leaf) not in _PLAIN or type(grad) is not torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return _accumulate(node, leaf, grad, others_hold_it)
    return _accumulate(node, leaf, grad, others_hold_it)


def _accumulate(node: Any, leaf: torch.Tensor, grad: torch.Tensor, others_hold_it: bool) -> bool:
    if not others_hold_it and leaf.grad is None and not leaf._post_accumulate_grad_hooks and _stealable(grad, leaf):
        leaf.grad = grad
        return True
    # (a post-accumulate hook may change .grad in place, an optimizer step in backward: the node
    # runs the hooks itself on a copy, and the trace keeps what the pass computed; the copy is
    # made here, as AccumulateGrad steals even the trace's tensor where its node has hooks too)
    if others_hold_it or (leaf.grad is None and leaf._post_accumulate_grad_hooks):
        grad = grad.clone(memory_format=torch.preserve_format)  # (.grad gets the copy: same values)
    enabled = torch.is_grad_enabled()
    torch._C._set_grad_enabled(False)  # the engine runs AccumulateGrad with grad mode off (no create_graph)
    try:
        node(grad)
    finally:
        torch._C._set_grad_enabled(enabled)
    return False


def _stealable(grad: torch.Tensor, leaf: torch.Tensor) -> bool:
    try:
        # the engine has already made the gradient's shape, dtype and device the leaf's own;
        # stride() raises for sparse tensors
        return (grad.stride() == leaf.stride() and not grad.requires_grad
                and (grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)))
    except Exception:  # meta, nested or subclass tensors: let AccumulateGrad decide
        return False


def all_finite(record: PassRecord) -> bool:
    """Whether every gradient the pass kept is finite: one multi-tensor norm and one read back (a
    norm is NaN or Inf where any element is); a norm that overflowed is checked element-wise."""
    dense, summaries = [], []
    for _, value in record.items():
        if isinstance(value, torch.Tensor):
            if value.layout == torch.strided and not value.is_meta and (value.is_floating_point() or value.is_complex()):
                dense.append(value)
        else:
            summaries.append(value)
    for part in record.inner:
        for _, value in part.items():
            if isinstance(value, torch.Tensor) and value.layout == torch.strided and value.is_floating_point():
                dense.append(value)
    for summary in summaries:
        norm = summary.norm
        if isinstance(norm, torch.Tensor):
            norm = norm.item()
        if not math.isfinite(norm) and summary.numel:
            return False
    if not dense:
        return True
    with torch._C.DisableTorchFunctionSubclass(), torch.no_grad():
        by_device: dict[Any, list[torch.Tensor]] = {}
        for tensor in dense:
            by_device.setdefault((tensor.device, tensor.is_complex()), []).append(tensor)
        for tensors in by_device.values():
            try:
                norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
            except Exception:  # a dtype or layout the multi-tensor kernel does not take
                norms = torch.stack([torch.linalg.vector_norm(t).float() for t in tensors])
            finite = torch.isfinite(norms)
            if bool(finite.all()):
                continue
            for tensor, ok in zip(tensors, finite.tolist()):
                if not ok and not bool(torch.isfinite(tensor).all()):
                    return False
    return True
