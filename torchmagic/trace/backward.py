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
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .forward import Location
from .stats import PendingSummary

ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad
REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"
HOOK_WRAPPER = "BackwardHookFunctionBackward"  # module backward hooks' identity nodes
_new_edge = tuple.__new__

Edge = tuple[Any, int]  # (autograd node, input index of that node = output index of its forward op)


class EngineCall:
    """The arguments of ``torch.autograd.graph._engine_run_backward``, by name."""

    __slots__ = ("outputs", "grad_tensors", "retain_graph", "create_graph", "inputs", "allow_unreachable",
                 "accumulate_grad")
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
    """The graph under some roots: each node's ``next_functions`` (read once: about 1 us a read)."""

    __slots__ = ("nexts", "kinds", "sinks", "signature")

    def __init__(self, roots: Sequence[Edge]) -> None:
        nexts: dict[Any, tuple] = {}
        kinds: list[type] = []
        sinks = 0
        stack = [node for node, _ in roots if node is not None]
        push, pop = stack.append, stack.pop
        while stack:
            node = pop()
            if node in nexts:
                continue
            children = nexts[node] = node.next_functions
            kind = type(node)
            kinds.append(kind)
            leads = False
            for child, _ in children:
                if child is not None:
                    leads = True
                    if child not in nexts:
                        push(child)
            if not leads and kind is not ACCUMULATE_GRAD:
                sinks += 1
        self.nexts = nexts
        self.kinds = kinds
        self.sinks = sinks
        self.signature = hash(tuple(kinds))

    def edges(self, roots: Sequence[Edge]) -> list[Edge]:
        """Every distinct edge of the graph, roots last."""
        found = dict.fromkeys(edge for children in self.nexts.values() for edge in children if edge[0] is not None)
        for root in roots:
            found.setdefault(root)
        return list(found)

    def kind_names(self) -> set[str]:
        return {kind.__name__ for kind in set(self.kinds)}


class PassRecord:
    """One backward call: where it was made, how it was recorded, and (while kept) its graph and gradients.

    ``grads`` maps each edge to the gradient that reached it (a tensor) and ``summaries`` to the
    statistics of one past the memory budget. Only the last pass of each call site keeps them.
    """

    __slots__ = ("index", "entry", "location", "strategy", "reason", "roots", "nexts", "grads", "summaries",
                 "versions", "signature", "node_count", "failed", "inner", "kept", "leaf_grads")

    def __init__(self, index: int, entry: str, location: Location | None) -> None:
        self.index = index
        self.entry = entry  # "backward" or "grad"
        self.location = location
        self.strategy = "capture"
        self.reason = ""  # why the pass was recorded with prehooks, or left untouched
        self.roots: list[Edge] = []
        self.nexts: dict[Any, tuple] = {}
        self.grads: dict[Edge, torch.Tensor] = {}
        self.summaries: dict[Edge, PendingSummary] = {}
        self.versions: dict[Edge, int] = {}  # leaf edges whose gradient is the leaf's own .grad
        self.signature = 0
        self.node_count = 0
        self.failed: str | None = None
        self.inner: list[PassRecord] = []  # backward passes run from inside this one (reentrant checkpoint)
        self.kept = True
        self.leaf_grads: list[tuple[torch.Tensor, Edge]] = []  # (leaf, its edge) for each leaf this pass reached

    def drop(self) -> None:
        """Let go of the graph and gradients (a later pass from the same call site replaces them)."""
        self.roots, self.nexts, self.grads, self.summaries, self.versions = [], {}, {}, {}, {}
        self.leaf_grads = []
        self.inner = []
        self.kept = False

    def gradient(self, edge: Edge) -> Any:
        """The tensor or summary kept for ``edge`` (None when this pass kept nothing for it)."""
        grad = self.grads.get(edge)
        return grad if grad is not None else self.summaries.get(edge)


def tensor_bytes(tensor: torch.Tensor) -> int:
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


def needed_edges(roots: Sequence[Edge], walk: Walk, targets: set[Any]) -> list[Edge]:
    """For ``autograd.grad``: the edges into nodes the engine runs (on a path from a root to an input)."""
    needed: dict[Any, bool] = {}
    order: list[Any] = []
    seen: set[Any] = set()
    stack = [(node, False) for node, _ in roots if node is not None]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((child, False) for child, _ in walk.nexts[node] if child is not None and child not in seen)
    for node in order:  # children first
        needed[node] = node in targets or any(needed.get(child, False) for child, _ in walk.nexts[node]
                                              if child is not None)
    edges = dict.fromkeys(edge for node in order if needed[node] for edge in walk.nexts[node]
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
            self.record.summaries[edge] = PendingSummary(grad, self.small_values)

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


def run_captured(call: EngineCall, engine: Any, edges: Sequence[Edge], hooked: Sequence[Any],
                 keeper: GradientKeeper) -> tuple[Any, tuple]:
    """One engine pass returning the gradient of every edge in ``edges`` (after the user's own inputs,
    for ``autograd.grad``); prehooks on ``hooked`` nodes keep what flowed on past their hooks."""
    gradient_edges = tuple(_new_edge(GradientEdge, (node, index, None)) for node, index in edges)
    handles = []
    collecting = gc.isenabled()
    if collecting:  # the edge tuples are GC-tracked: a collection mid-pass costs 50-100 ms
        gc.disable()
    try:
        for node in hooked:
            handles.append(node.register_prehook(keeper.prehook(node)))
        grads = call.run(engine, call.inputs + gradient_edges, False)
    finally:
        for handle in handles:
            handle.remove()
        if collecting:
            gc.enable()
    user = len(call.inputs)
    return grads[:user], grads[user:]


def accumulate_leaf(node: Any, grad: torch.Tensor, others_hold_it: bool) -> bool:
    """Accumulate ``grad`` into the leaf's ``.grad`` as AccumulateGrad would, and say whether ``.grad``
    now is ``grad`` itself (shared with the trace, no copy made).

    A first gradient nobody else holds, laid out as the leaf is, becomes ``.grad`` itself, and the
    post-accumulate hooks run: AccumulateGrad's "steal". Anything else goes through the leaf's own
    AccumulateGrad node (in-place add, layout-obeying copy, sparse rules, hooks).
    """
    leaf = node.variable
    with torch._C.DisableTorchFunctionSubclass(), torch.no_grad():
        if not others_hold_it and leaf.grad is None and _stealable(grad, leaf):
            leaf.grad = grad
            hooks = getattr(leaf, "_post_accumulate_grad_hooks", None)
            if hooks:
                for hook in list(hooks.values()):
                    hook(leaf)
            return True
        if others_hold_it:  # a user's hook kept it: untraced, AccumulateGrad would copy rather than steal
            grad = grad.clone(memory_format=torch.preserve_format)
        node(grad)
    return False


def _stealable(grad: torch.Tensor, leaf: torch.Tensor) -> bool:
    try:
        return (grad.layout == torch.strided and leaf.layout == torch.strided and not grad.requires_grad
                and grad.dtype == leaf.dtype and grad.device == leaf.device and grad.shape == leaf.shape
                and grad.stride() == leaf.stride()
                and (grad.is_contiguous() or grad.is_contiguous(memory_format=torch.channels_last)))
    except Exception:  # meta, nested or subclass tensors: let AccumulateGrad decide
        return False
