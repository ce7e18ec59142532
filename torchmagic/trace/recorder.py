"""Record a stretch of code: the autograd graph it builds and the gradients its backward passes compute.

``start()`` installs three things, ``stop()`` removes them by identity: the forward log's mode and
module hooks (``forward.py``), and a wrapper around ``torch.autograd.graph._engine_run_backward``
through which every backward call of this thread passes (``backward.py`` says how each pass is
recorded). Nothing here imports IPython, and nothing is built until a trace asks (``build.py``).
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.autograd as autograd_module
import torch.autograd.graph as graph_module
from torch.nn.modules import module as nn_module

from . import backward as bw
from .forward import (
    _NO_LEAF_OPS,
    CUT_OPS,
    MAX_CUTS,
    Cut,
    ForwardLog,
    LeafInfo,
    Location,
    RecordingMode,
    _no_subclass,
    _peek_transform,
    op_name,
    remove_mode,
    sequence_nr,
    tensor_class,
    user_location,
)
from .stats import PendingSummary, norms_of

_live_recorders: weakref.WeakSet = weakref.WeakSet()
_own_call = threading.local()  # set while a recorder runs the engine itself: outer wrappers let it through
MAX_CALL_SITES = 16  # distinct backward call sites whose last pass keeps its graph (oldest let go first)
UNTRACED_TRANSFORMS = ("torch.func transform", "code inside torch.func transforms (vmap, grad, jacrev, ...) ran "
                       "untouched: their inner gradients are not in this trace")


def recorders_holding_state() -> list[Recorder]:
    """Recorders still active or still holding gradients or tensors (the leak check uses this)."""
    return [r for r in list(_live_recorders) if r.active or r.holds_state]


class Recorder:
    """Records one stretch of code: ``start()``, run the code, ``stop()``; a Trace then builds from it.

    ``memory_budget`` bounds the bytes of gradient tensors a pass keeps whole; past it, gradients
    are kept as statistics only.
    """

    def __init__(self, *, memory_budget: int = 64 * 2**20, small_values: int = 16) -> None:
        self.memory_budget = memory_budget
        self.small_values = small_values
        self.log = ForwardLog()
        self.leaves: dict[int, LeafInfo] = {}
        self.cuts: list[Cut] = []
        self.hooked: dict[Any, None] = {}  # nodes whose tensors got a user hook while recording
        self.passes: list[bw.PassRecord] = []
        self.call_sites: dict[tuple, int] = {}  # (location, entry) -> index of its last pass
        self.leaf_history: dict[int, tuple[torch.Tensor, list[tuple[int, Any]]]] = {}
        self.final_grads: dict[int, tuple[Any, int | None, str | None]] = {}  # id(leaf) -> (summary, version, note)
        self.shared_grads: set[int] = set()  # data pointers of leaves' .grad that are also a kept gradient
        self.untraced: dict[str, str] = {}  # what ran untouched, and why (shown by the trace)
        self.op_count = 0
        self._thread = threading.get_ident()
        self._mode: RecordingMode | None = None
        self._module_handles: list[Any] = []
        self._original_engine: Any = None
        self._installed_engine: Any = None
        self._closed = False
        self._running: bw.PassRecord | None = None
        _live_recorders.add(self)

    # -- lifetime ---------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._mode is not None

    @property
    def holds_state(self) -> bool:
        return bool(self.leaves or self.passes or self.cuts or self.leaf_history or self.hooked)

    def start(self) -> None:
        if self._mode is not None:
            raise RuntimeError("recorder already started")
        self.log = ForwardLog()
        self._thread = self.log.thread
        log = self.log
        module_seq, module_event, thread = log.module_seq.append, log.module_event.append, self._thread
        get_ident = threading.get_ident

        def enter(module, args):
            if get_ident() == thread:
                module_seq(sequence_nr())
                module_event(module)

        def leave(module, args, output):
            if get_ident() == thread:
                module_seq(sequence_nr())
                module_event(None)

        self._module_handles = [nn_module.register_module_forward_pre_hook(enter),
                                nn_module.register_module_forward_hook(leave, always_call=True)]
        self._original_engine = graph_module._engine_run_backward
        self._installed_engine = self._engine  # one bound method, so stop() can find it by identity
        graph_module._engine_run_backward = autograd_module._engine_run_backward = self._installed_engine
        self._closed = False
        mode = RecordingMode(self)
        mode.__enter__()
        self._mode = mode

    def stop(self) -> None:
        """Remove the mode, the hooks and the engine wrapper (each by identity); safe to call twice."""
        mode, self._mode = self._mode, None
        try:
            if mode is not None:
                remove_mode(mode)
        finally:
            for handle in self._module_handles:
                handle.remove()
            self._module_handles = []
            installed, self._installed_engine = self._installed_engine, None
            if installed is not None and graph_module._engine_run_backward is installed:
                graph_module._engine_run_backward = self._original_engine
            if installed is not None and autograd_module._engine_run_backward is installed:
                autograd_module._engine_run_backward = self._original_engine
            self._closed = True  # a wrapper someone wrapped in turn stays installed, passing calls through
            if mode is not None:
                self.log.close()
                self.op_count = len(self.log.op_start)
                self.shared_grads.clear()
                self.hooked.clear()
                self._snapshot_final_grads()

    def release(self) -> None:
        """Drop every gradient and tensor reference this recording holds."""
        for record in self.passes:
            record.drop()
        self.passes.clear()
        self.call_sites.clear()
        self.leaves.clear()
        self.cuts.clear()
        self.hooked.clear()
        self.leaf_history.clear()
        self.final_grads.clear()
        self.shared_grads.clear()
        self.log = ForwardLog()

    # -- forward side paths (rare: most ops only append to the log) ------------------------
    def note_untraced(self, func: Any) -> None:
        if _peek_transform() is not None:
            self.untraced.setdefault(*UNTRACED_TRANSFORMS)

    def no_node(self, func: Any, out: Any, args: tuple) -> None:
        """A torch call that made no autograd node: a new leaf, a hook, or a cut in the graph."""
        name = op_name(func)
        if name == "register_hook":
            if args and tensor_class(args[0]):
                with _no_subclass():
                    node = args[0].grad_fn
                if node is not None:
                    self.hooked[node] = None
            return
        grad_enabled = torch.is_grad_enabled()
        if tensor_class(out):
            with _no_subclass():
                is_leaf = out.requires_grad and out.grad_fn is None
            if is_leaf:
                if grad_enabled and name not in _NO_LEAF_OPS and id(out) not in self.leaves:
                    self.leaves[id(out)] = LeafInfo(out, name, user_location())
                return
        if not grad_enabled or name in CUT_OPS:
            self._note_cuts(name, args)

    def _note_cuts(self, name: str, args: tuple) -> None:
        how = {"detach": ".detach()", "detach_": ".detach_()", "data": ".data"}.get(name, "torch.no_grad()")
        location = None
        for arg in args:
            if not tensor_class(arg):
                continue
            with _no_subclass():
                if not arg.requires_grad:
                    continue
                node = arg.grad_fn
            if location is None:
                location = user_location()
            if node is None:
                info = self.leaves.get(id(arg))
                if info is None:
                    info = self.leaves[id(arg)] = LeafInfo(arg, None, None)
                if how == "torch.no_grad()":
                    info.no_grad = info.no_grad or location
                else:
                    info.detached = info.detached or location
            elif len(self.cuts) < MAX_CUTS:
                self.cuts.append(Cut(node, how, location))

    def bind(self, name: str, value: Any, location: Location | None = None) -> Any:
        """Note that the user bound ``name`` to ``value`` (the assignment hook calls this)."""
        if not tensor_class(value) or name.startswith("<"):
            return value
        try:
            with _no_subclass():
                node, requires_grad, output_nr = value.grad_fn, value.requires_grad, value.output_nr
        except Exception:  # a wrapper tensor (torch.func) or a subclass that refuses: not ours to name
            return value
        if location is None:
            location = user_location()
        if node is not None:
            bindings = self.log.bindings.setdefault(node._sequence_nr(), [])
            if not bindings or bindings[-1][:2] != (output_nr, name):
                bindings.append((output_nr, name, location))
        elif requires_grad:
            info = self.leaves.get(id(value))
            if info is None:
                info = self.leaves[id(value)] = LeafInfo(value, None, location)
            if name not in [n for n, _ in info.names]:
                info.names.append((name, location))
        return value

    # -- in-place writes to gradients we keep ----------------------------------------------
    def before_in_place(self, args: tuple, kwargs: dict | None) -> None:
        """Copy a kept gradient that is also a leaf's ``.grad`` before an op changes it in place
        (clipping, ``zero_()``): the trace keeps what the pass computed."""
        hit: set[int] = set()
        values: Iterable[Any] = args if not kwargs else (*args, *kwargs.values())
        for value in values:
            if isinstance(value, (list, tuple)):
                for item in value:
                    self._hit(item, hit)
            else:
                self._hit(value, hit)
        if hit:
            self._unshare(hit)

    def _hit(self, value: Any, hit: set[int]) -> None:
        if tensor_class(value):
            try:
                with _no_subclass():
                    pointer = value.data_ptr()
            except Exception:
                return
            if pointer in self.shared_grads:
                hit.add(pointer)

    def _unshare(self, pointers: set[int]) -> None:
        storages = set()
        for record in self.passes:
            for edge, grad in list(record.grads.items()):
                try:
                    if grad.data_ptr() in pointers:
                        storages.add(grad.untyped_storage().data_ptr())
                except Exception:
                    continue
        for record in self.passes:
            for edge, grad in list(record.grads.items()):
                try:
                    if grad.untyped_storage().data_ptr() in storages:
                        record.grads[edge] = grad.clone()
                        record.versions.pop(edge, None)
                except Exception:
                    continue
        self.shared_grads -= pointers

    # -- backward ---------------------------------------------------------------------------
    def _engine(self, outputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Installed as ``_engine_run_backward`` while recording: every backward call passes here."""
        original = self._original_engine
        running = self._running
        if running is not None and not self._closed and (
                threading.get_ident() == self._thread or torch._C._current_graph_task_id() != -1):
            return self._inner_pass(running, bw.EngineCall(outputs, args, kwargs))
        if self._closed or getattr(_own_call, "active", False) or threading.get_ident() != self._thread:
            return original(outputs, *args, **kwargs)
        if _peek_transform() is not None:
            self.untraced.setdefault(*UNTRACED_TRANSFORMS)
            return original(outputs, *args, **kwargs)
        call = bw.EngineCall(outputs, args, kwargs)
        record = bw.PassRecord(len(self.passes), "backward" if call.accumulate_grad else "grad", user_location())
        try:
            roots = [bw.edge_of(t) for t in call.outputs]
            walk = bw.Walk(roots)
            strategy, reason = self._strategy(call, walk)
        except Exception as error:  # our analysis failed: the pass runs as if untraced
            self.untraced.setdefault(f"pass {record.index}", f"a backward pass ran unrecorded ({type(error).__name__}: "
                                     f"{error})")
            return original(outputs, *args, **kwargs)
        self._open_pass(record, roots, walk, strategy, reason)
        self._running = record
        try:
            if strategy == "hooks":
                return self._hooked_pass(call, record, walk)
            return self._captured_pass(call, record, walk, roots)
        except BaseException as error:
            record.failed = f"{type(error).__name__}: {error}"
            raise
        finally:
            self._running = None

    def _strategy(self, call: bw.EngineCall, walk: bw.Walk) -> tuple[str, str]:
        kinds = walk.kind_names()
        if bw.REENTRANT_CHECKPOINT in kinds:
            return "hooks", "reentrant checkpoint (it refuses the engine's capture mode)"
        if call.create_graph:
            return "hooks", "create_graph=True"
        if call.inputs and call.accumulate_grad:
            return "hooks", "backward(inputs=...)"
        if walk.sinks:
            return "hooks", "the graph has nodes that lead nowhere"
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return "hooks", "a distributed process group (DDP hooks on AccumulateGrad)"
        return "capture", ""

    def _open_pass(self, record: bw.PassRecord, roots: list, walk: bw.Walk, strategy: str, reason: str) -> None:
        """A new pass replaces the last one from the same call site (a training loop keeps one graph)."""
        site = (record.location, record.entry)
        previous = self.call_sites.pop(site, None)
        if previous is not None:
            self._drop(self.passes[previous])
        self.call_sites[site] = record.index
        while len(self.call_sites) > MAX_CALL_SITES:
            oldest = next(iter(self.call_sites))
            self._drop(self.passes[self.call_sites.pop(oldest)])
        record.strategy, record.reason = strategy, reason
        record.roots, record.nexts = roots, walk.nexts
        record.signature, record.node_count = walk.signature, len(walk.nexts)
        self.passes.append(record)

    def _drop(self, record: bw.PassRecord) -> None:
        if self.shared_grads:
            for edge in record.versions:
                grad = record.grads.get(edge)
                if grad is not None:
                    self.shared_grads.discard(grad.data_ptr())
        record.drop()

    def _run_own(self, function: Any, *args: Any) -> Any:
        _own_call.active = True
        try:
            return function(*args)
        finally:
            _own_call.active = False

    def _captured_pass(self, call: bw.EngineCall, record: bw.PassRecord, walk: bw.Walk, roots: list) -> Any:
        if call.accumulate_grad:
            edges = walk.edges(roots)
        else:
            targets = {bw.edge_of(t)[0] for t in call.inputs}
            edges = bw.needed_edges(roots, walk, targets)
        keeper = bw.GradientKeeper(record, self.memory_budget, self.small_values)
        hooked = [node for node in self.hooked if node in walk.nexts]
        if bw.estimate_bytes(edges) > 4 * self.memory_budget:
            edges, summarised = self._split_for_budget(edges)
            hooked += summarised
        user_grads, grads = self._run_own(bw.run_captured, call, self._original_engine, edges, hooked, keeper)
        leaves = self._accumulate(record, edges, grads) if call.accumulate_grad else []
        self._keep(record, edges, grads, keeper)
        if not call.accumulate_grad:
            for tensor, grad in zip(call.inputs, user_grads):
                if grad is not None:
                    edge = bw.edge_of(tensor)
                    if edge not in record.grads and edge not in record.summaries:
                        keeper.keep(edge, grad)
                    if type(edge[0]) is bw.ACCUMULATE_GRAD:
                        leaves.append((edge[0].variable, edge, grad))
            self._note_leaf_norms(record, leaves)
            return user_grads
        self._note_leaf_norms(record, leaves)
        return ()

    def _split_for_budget(self, edges: list) -> tuple[list, list]:
        """A graph far over the memory budget: capture the edges nearest the output up to twice the
        budget (and every leaf edge, which accumulation needs); the rest are summarised in a prehook
        as they arrive, one at a time."""
        limit, total = 2 * self.memory_budget, 0
        captured, over = [], {}
        for edge in edges:
            node, index = edge
            if type(node) is bw.ACCUMULATE_GRAD:
                captured.append(edge)
                continue
            if total <= limit:
                metadata = node._input_metadata
                if index < len(metadata):
                    total += int(torch.Size(metadata[index].shape).numel()) * metadata[index].dtype.itemsize
                captured.append(edge)
            else:
                over[node] = None
        return captured, list(over)

    def _accumulate(self, record: bw.PassRecord, edges: list, grads: tuple) -> list:
        """Each leaf's gradient into its ``.grad``, by its own AccumulateGrad node, as the engine would."""
        leaves = []
        accumulate_grad = bw.ACCUMULATE_GRAD
        for i in range(len(edges)):
            edge = edges[i]
            node = edge[0]
            if type(node) is not accumulate_grad:
                continue
            grad = grads[i]
            if grad is None:
                continue
            leaf = node.variable
            with _no_subclass():
                old = leaf.grad
            if old is not None and self.shared_grads:
                self._hit(old, hit := set())
                if hit:
                    self._unshare(hit)
            # held by the grads tuple, `grad` and getrefcount's argument; more means a user's hook kept it
            others_hold_it = sys.getrefcount(grad) > 3
            shared = bw.accumulate_leaf(node, grad, others_hold_it)
            if shared:
                self.shared_grads.add(grad.data_ptr())
                record.versions[edge] = grad._version
            leaves.append((leaf, edge, grad))
        return leaves

    def _keep(self, record: bw.PassRecord, edges: list, grads: tuple, keeper: bw.GradientKeeper) -> None:
        """Keep each edge's gradient within the budget, counting a tensor shared by edges once."""
        counted: set[int] = set()
        kept = keeper.kept_bytes
        budget = self.memory_budget
        over = []
        own_grads, own_summaries = record.grads, record.summaries
        for i in range(len(edges)):
            grad = grads[i]
            if grad is None:
                continue
            edge = edges[i]
            if edge in own_grads or edge in own_summaries:  # a prehook saw what flowed on past a user's hook
                continue
            key = id(grad)
            if key not in counted:
                size = bw.tensor_bytes(grad)
                if kept + size > budget:
                    over.append((edge, grad))
                    continue
                kept += size
                counted.add(key)
            own_grads[edge] = grad
        for edge, grad in over:
            own_summaries[edge] = PendingSummary(grad, self.small_values)
        keeper.kept_bytes = kept

    def _hooked_pass(self, call: bw.EngineCall, record: bw.PassRecord, walk: bw.Walk) -> Any:
        keeper = bw.GradientKeeper(record, self.memory_budget, self.small_values)
        result = self._run_own(bw.run_hooked, call, self._original_engine, record, list(walk.nexts), keeper)
        leaves = []
        for edge in list(record.grads) + list(record.summaries):
            if type(edge[0]) is bw.ACCUMULATE_GRAD:
                leaves.append((edge[0].variable, edge, record.gradient(edge)))
        if not call.accumulate_grad and result:
            for tensor, grad in zip(call.inputs, result):
                if grad is not None:
                    edge = bw.edge_of(tensor)
                    if edge not in record.grads:
                        keeper.keep(edge, grad)
        self._note_leaf_norms(record, leaves)
        return result

    def _inner_pass(self, running: bw.PassRecord, call: bw.EngineCall) -> Any:
        """A backward run from inside one of ours (reentrant checkpoint recomputing its block):
        recorded with prehooks as part of the running pass."""
        inner = bw.PassRecord(running.index, "backward", None)
        inner.strategy, inner.reason = "hooks", "run during the pass by reentrant checkpoint"
        roots = [bw.edge_of(t) for t in call.outputs]
        walk = bw.Walk(roots)
        inner.roots, inner.nexts, inner.node_count = roots, walk.nexts, len(walk.nexts)
        running.inner.append(inner)
        keeper = bw.GradientKeeper(inner, self.memory_budget, self.small_values)
        result = self._run_own(bw.run_hooked, call, self._original_engine, inner, list(walk.nexts), keeper)
        leaves = [(edge[0].variable, edge, inner.gradient(edge)) for edge in list(inner.grads) + list(inner.summaries)
                  if type(edge[0]) is bw.ACCUMULATE_GRAD]
        self._note_leaf_norms(running, leaves)
        return result

    def _note_leaf_norms(self, record: bw.PassRecord, leaves: list) -> None:
        """Each leaf's gradient norm in this pass (taken now, before any clipping), for the per-pass plot."""
        if not leaves:
            return
        record.leaf_grads.extend((leaf, edge) for leaf, edge, _ in leaves)
        norms = norms_of([grad for _, _, grad in leaves])
        for (leaf, _, _), norm in zip(leaves, norms):
            entry = self.leaf_history.get(id(leaf))
            if entry is None:
                entry = self.leaf_history[id(leaf)] = (leaf, [])
            entry[1].append((record.index, norm))

    def _snapshot_final_grads(self) -> None:
        """Each leaf's ``.grad`` as the code left it, where it is not simply the last pass's gradient."""
        last_gradient: dict[int, Any] = {}
        for record in self.passes:
            if not record.kept:
                continue
            for leaf, edge in record.leaf_grads:
                last_gradient[id(leaf)] = (record, edge)
        for key, (leaf, history) in self.leaf_history.items():
            with _no_subclass():
                now = leaf.grad
            found = last_gradient.get(key)
            shown = found[0].gradient(found[1]) if found is not None else None
            passes = {index for index, _ in history}
            if now is None:
                self.final_grads[key] = (None, None, ".grad is None now (set to None after the last pass, e.g. "
                                                      "zero_grad())")
                continue
            if shown is now and found[1] in found[0].versions and found[0].versions[found[1]] == now._version:
                continue  # .grad is the very tensor the last pass gave, unchanged
            if len(passes) > 1:
                note = f".grad now: accumulated over {len(passes)} passes, or changed after them"
            else:
                note = ".grad now: changed after the pass (clipped, scaled or zeroed in place)" \
                    if shown is not None and found[0].entry == "backward" else ".grad now"
            try:
                summary = PendingSummary(now, self.small_values)
            except Exception:
                continue
            self.final_grads[key] = (summary, now._version, note)
