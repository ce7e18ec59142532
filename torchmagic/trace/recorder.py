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
from typing import Any

import torch
import torch.autograd as autograd_module
import torch.autograd.graph as graph_module
from torch.autograd.function import Function
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
    _is_compiling,
    _no_subclass,
    _peek_transform,
    op_name,
    remove_mode,
    sequence_nr,
    tensor_class,
    user_location,
)
from .stats import NormOnly, PendingSummary, norms_of

_live_recorders: weakref.WeakSet = weakref.WeakSet()
_own_call = threading.local()  # set while a recorder runs the engine itself: outer wrappers let it through
MAX_CALL_SITES = 16  # distinct backward call sites whose last pass keeps its graph (oldest let go first)
UNTRACED_TRANSFORMS = ("torch.func transform", "code inside torch.func transforms (vmap, grad, jacrev, ...) ran "
                       "untouched: their inner gradients are not in this trace")


def _grad_of(leaf: torch.Tensor) -> Any:
    """``leaf.grad``, not through a subclass's ``__torch_function__`` (and without the cost of the
    context that avoids it, for plain tensors and parameters)."""
    if type(leaf) in bw._PLAIN:
        return leaf.grad
    with _no_subclass():
        return leaf.grad


def _equal(shown: Any, now: torch.Tensor) -> bool:
    if not isinstance(shown, torch.Tensor):
        return False
    try:
        with _no_subclass():
            return (shown.shape == now.shape and shown.dtype == now.dtype and shown.device == now.device
                    and shown.layout == now.layout == torch.strided and not now.is_meta and torch.equal(shown, now))
    except Exception:
        return False


def recorders_holding_state() -> list[Recorder]:
    """Recorders still active or still holding gradients or tensors (the leak check uses this)."""
    return [r for r in list(_live_recorders) if r.active or r.holds_state]


class Recorder:
    """Records one stretch of code: ``start()``, run the code, ``stop()``; a Trace then builds from it.

    ``memory_budget`` bounds the bytes of gradient tensors a pass keeps whole; past it, a
    gradient's norm alone is kept.
    """

    def __init__(self, *, memory_budget: int = 256 * 2**20, small_values: int = 16) -> None:
        self.memory_budget = memory_budget
        self.small_values = small_values
        self.log = ForwardLog()  # replaced by start(): the log of the recording
        self.leaves: dict[int, LeafInfo] = {}
        self.cuts: list[Cut] = []
        self.hooked: dict[Any, None] = {}  # nodes whose tensors got a user hook while recording
        self.passes: list[bw.PassRecord] = []
        self.call_sites: dict[tuple, int] = {}  # (location, entry) -> index of its last pass
        self.leaf_history: dict[int, tuple[torch.Tensor, list[tuple[int, Any]]]] = {}
        self.final_grads: dict[int, tuple[Any, int | None, str | None]] = {}  # id(leaf) -> (summary, version, note)
        self.shared_grads: set[int] = set()  # data pointers of leaves' .grad that are also a kept gradient
        self.watched: dict[int, int] = {}  # data pointer of a leaf's .grad -> id(leaf), for in-place writes
        self.changed_in_place: set[int] = set()  # id(leaf) whose .grad an op changed in place after a pass
        self.summed: dict[int, int] = {}  # id(leaf) -> how many passes its current .grad adds up
        self.untraced: dict[str, str] = {}  # what ran untouched, and why (shown by the trace)
        self.listeners: list[Any] = []  # called after each backward pass: listener(recorder, record, outputs)
        self.stop_on_nonfinite = False  # raise NonFiniteGradient after a pass that computed a NaN/Inf gradient
        self.namespace_source: Any = None  # () -> the names in use, for describing a stop mid-recording
        self.labeler: Any = None  # filename -> "In [5]", for the same
        self.op_count = 0
        self._thread = threading.get_ident()
        self._mode: RecordingMode | None = None
        self._module_handles: list[Any] = []
        self._original_engine: Any = None
        self._installed_engine: Any = None
        self._original_apply: Any = None
        self._installed_apply: Any = None
        self._closed = False
        self._distributed = False
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
        thread = self._thread
        get_ident, getframe = threading.get_ident, sys._getframe

        def enter(module, args):
            if get_ident() == thread:
                log.enter_module(module, getframe(1))

        def leave(module, args, output):
            if get_ident() == thread:
                log.leave_module()

        self._module_handles = [nn_module.register_module_forward_pre_hook(enter),
                                nn_module.register_module_forward_hook(leave, always_call=True)]
        self._original_apply = Function.__dict__["apply"]
        original_apply = self._original_apply.__func__

        def apply(cls, *args, **kwargs):
            # a custom Function's node takes its sequence number before its forward runs, so the
            # line that called apply is marked here (the mode never sees apply)
            if not _is_compiling() and get_ident() == thread:
                log.mark_user_frame(getframe(1), sequence_nr())
            return original_apply(cls, *args, **kwargs)

        self._installed_apply = classmethod(apply)
        Function.apply = self._installed_apply
        self._original_engine = graph_module._engine_run_backward
        self._installed_engine = self._engine  # one bound method, so stop() can find it by identity
        graph_module._engine_run_backward = autograd_module._engine_run_backward = self._installed_engine
        self._closed = False
        self._distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
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
            apply, self._installed_apply = self._installed_apply, None
            if apply is not None and Function.__dict__.get("apply") is apply:
                Function.apply = self._original_apply
            self._closed = True  # a wrapper someone wrapped in turn stays installed, passing calls through
            if mode is not None:
                self.log.close()
                self.op_count = len(self.log.op_start)
                self.shared_grads.clear()
                self.watched.clear()
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
        self.watched.clear()
        self.changed_in_place.clear()
        self.summed.clear()
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
        kind = type(out)
        if kind is torch.Tensor or kind is torch.nn.Parameter:  # the common case, without a context manager
            is_leaf = out.requires_grad and out.grad_fn is None
        elif issubclass(kind, torch.Tensor):
            with _no_subclass():
                is_leaf = out.requires_grad and out.grad_fn is None
        else:
            is_leaf = False
        if is_leaf:
            if grad_enabled and name not in _NO_LEAF_OPS and id(out) not in self.leaves:
                self.leaves[id(out)] = LeafInfo(out, name, user_location())
            return
        if name in CUT_OPS or (not grad_enabled and kind is not type(None) and getattr(func, "__name__", "") != "__get__"):
            self._note_cuts(name, args)  # (reading a property, or a call that returns nothing, uses no value)

    def _note_cuts(self, name: str, args: tuple) -> None:
        """Tensors with a gradient path that this call cuts: ``.detach()``/``.data``, or any op under
        no_grad. A leaf is noted once (where it was first cut off); at most MAX_CUTS others."""
        how = {"detach": ".detach()", "detach_": ".detach_()", "data": ".data"}.get(name, "torch.no_grad()")
        location = None
        for arg in args:
            kind = type(arg)
            if kind is torch.Tensor or kind is torch.nn.Parameter:
                if not arg.requires_grad:
                    continue
                node = arg.grad_fn
            elif issubclass(kind, torch.Tensor):
                with _no_subclass():
                    if not arg.requires_grad:
                        continue
                    node = arg.grad_fn
            else:
                continue
            if node is None:
                info = self.leaves.get(id(arg))
                if info is None:
                    info = self.leaves[id(arg)] = LeafInfo(arg, None, None)
                if how == "torch.no_grad()":
                    if info.no_grad is None:
                        info.no_grad = location = location or user_location()
                elif info.detached is None:
                    info.detached = location = location or user_location()
            elif len(self.cuts) < MAX_CUTS:
                location = location or user_location()
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
    def before_in_place(self, written: Any) -> None:
        """An op is about to write ``written`` (a tensor, or a list of them) in place. Where one is a
        leaf's ``.grad`` (clipping, ``zero_()``), note it; where that ``.grad`` is also a gradient
        the trace keeps, copy it first: the trace keeps what the pass computed."""
        hit: set[int] = set()
        if isinstance(written, (list, tuple)):
            for item in written:
                self._hit(item, hit)
        else:
            self._hit(written, hit)
        if hit:
            self.changed_in_place.update(self.watched[pointer] for pointer in hit)
            shared = hit & self.shared_grads
            if shared:
                self._unshare(shared)

    def _hit(self, value: Any, hit: set[int]) -> None:
        kind = type(value)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            try:
                pointer = value.data_ptr()
            except Exception:  # sparse, meta
                return
        elif issubclass(kind, torch.Tensor):
            try:
                with _no_subclass():
                    pointer = value.data_ptr()
            except Exception:
                return
        else:
            return
        if pointer in self.watched:
            hit.add(pointer)

    def _unshare(self, pointers: set[int]) -> None:
        """Replace every kept gradient sharing memory with the ``.grad`` tensors at ``pointers`` by a copy."""
        storages = set()
        for record in self.passes:
            for part in (record, *record.inner):
                for _, _, grad in part.tensors():
                    try:
                        if grad.data_ptr() in pointers:
                            storages.add(grad.untyped_storage().data_ptr())
                    except Exception:
                        continue
        for record in self.passes:
            for part in (record, *record.inner):
                for container, key, grad in list(part.tensors()):
                    try:
                        if grad.untyped_storage().data_ptr() in storages:
                            container[key] = grad.clone()
                    except Exception:
                        continue
                part.versions.clear()
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
                result = self._hooked_pass(call, record, walk)
            else:
                result = self._captured_pass(call, record, walk, roots)
        except BaseException as error:
            record.failed = f"{type(error).__name__}: {error}"
            raise
        finally:
            self._running = None
        self._after_pass(record, call.outputs)
        return result

    def _after_pass(self, record: bw.PassRecord, outputs: tuple) -> None:
        """Tell the listeners (a live view); with ``stop_on_nonfinite``, raise at a NaN/Inf gradient."""
        for listener in list(self.listeners):
            listener(self, record, outputs)
        if self.stop_on_nonfinite and not bw.all_finite(record):
            from ..errors import NonFiniteGradient

            raise NonFiniteGradient(self.describe_nonfinite(record))

    def describe_nonfinite(self, record: bw.PassRecord) -> str:
        """Where the first NaN/Inf gradient of ``record`` appeared, from a trace of what ran so far
        (built without disturbing this recording)."""
        from .trace import Trace

        where = f" ({self._line_text(record.location)})" if record.location else ""
        header = f"backward pass {record.index + 1}{where} computed a NaN/Inf gradient (stopped by --stop-on-nan)"
        try:
            trace = Trace.snapshot(self, self.namespace_source() if self.namespace_source else None,
                                   self.labeler)
            lines = trace.describe_nonfinite()
        except Exception as error:  # the stop must happen even if describing it fails
            lines = [f"(could not describe where: {type(error).__name__}: {error})"]
        return "\n".join([header, *("  " + line for line in lines)])

    def _line_text(self, location: Location) -> str:
        from .naming import source_line

        return str(source_line(location, self.labeler))

    def _strategy(self, call: bw.EngineCall, walk: bw.Walk) -> tuple[str, str]:
        if walk.has_kind(bw.REENTRANT_CHECKPOINT):
            return "hooks", "reentrant checkpoint (it refuses the engine's capture mode)"
        if call.create_graph:
            return "hooks", "create_graph=True"
        if call.inputs and call.accumulate_grad:
            return "hooks", "backward(inputs=...)"
        if walk.sinks:
            return "hooks", "the graph has nodes that lead nowhere"
        if self._distributed:
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
        record.roots = roots
        record.signature, record.node_count = walk.signature, len(walk.seen)
        self.passes.append(record)

    def _drop(self, record: bw.PassRecord) -> None:
        self.leaf_norms(record)
        if self.shared_grads:
            for edge in record.versions:
                grad = record.gradient(edge)
                if isinstance(grad, torch.Tensor):
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
            edges = walk.all_edges()
            leaf_count = len(walk.leaf_edges)
        else:
            edges = bw.needed_edges(roots, {bw.edge_of(t)[0] for t in call.inputs})
            leaf_count = 0
        keeper = bw.GradientKeeper(record, self.memory_budget, self.small_values)
        hooked = [(node, keeper) for node in self.hooked if node in walk.seen]  # a user's hook: what flowed on
        estimate = bw.estimate_bytes(edges)
        if estimate > 4 * self.memory_budget:
            edges, summarised = self._split_for_budget(edges)
            norms_only = bw.GradientKeeper(record, 0, self.small_values)  # far from the output: norms alone
            hooked += [(node, norms_only) for node in summarised]
        user_grads, grads = self._run_own(bw.run_captured, call, self._original_engine, edges, hooked)
        leaves = self._accumulate(record, edges, grads, leaf_count)
        record.edges, record.values = edges, list(grads)
        if len(edges) <= 64 or estimate > self.memory_budget / 2:  # small, or near the budget: count exactly
            self._keep_within_budget(record, keeper)
        if not call.accumulate_grad:
            for tensor, grad in zip(call.inputs, user_grads):
                if grad is not None:
                    edge = bw.edge_of(tensor)
                    if record.gradient(edge) is None:
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

    def _accumulate(self, record: bw.PassRecord, edges: list, grads: tuple, count: int) -> list:
        """Each leaf's gradient (the first ``count`` edges) into its ``.grad``, by its own
        AccumulateGrad node's rules, as the engine would have."""
        leaves = []
        for i in range(count):
            grad = grads[i]
            if grad is None:
                continue
            edge = edges[i]
            node = edge[0]
            leaf = node.variable
            old = leaf.grad if type(leaf) in bw._PLAIN else _grad_of(leaf)
            if old is not None and self.shared_grads:
                pointer = old.data_ptr() if not old.is_sparse else 0
                if pointer in self.shared_grads:
                    self._unshare({pointer})  # accumulating into it would change the earlier pass's gradient
            key = id(leaf)
            if old is None:
                self.summed[key] = 1
                self.changed_in_place.discard(key)
            else:
                self.summed[key] = self.summed.get(key, 1) + 1
            # held by the grads tuple, `grad` and getrefcount's argument; more means a user's hook kept it
            others_hold_it = sys.getrefcount(grad) > 3
            if bw.accumulate_leaf(node, grad, others_hold_it) and grad.data_ptr():  # (a meta tensor has none)
                pointer = grad.data_ptr()
                self.shared_grads.add(pointer)
                self.watched[pointer] = id(leaf)
                record.versions[edge] = grad._version
            else:
                self._watch(leaf)
            leaves.append((leaf, edge, grad))
        return leaves

    def _watch(self, leaf: torch.Tensor) -> None:
        """Note where ``leaf.grad`` lives, so an in-place write to it later is seen."""
        grad = leaf.grad if type(leaf) in bw._PLAIN else _grad_of(leaf)
        try:
            if grad is not None and not grad.is_sparse and grad.data_ptr():
                self.watched[grad.data_ptr()] = id(leaf)
        except Exception:
            pass

    def _keep_within_budget(self, record: bw.PassRecord, keeper: bw.GradientKeeper) -> None:
        """Past the memory budget, keep a gradient's norm instead of the tensor (a tensor shared by
        edges counts once; a leaf's gradient that is its ``.grad`` costs nothing and is always kept)."""
        counted: set[int] = set()
        kept = keeper.kept_bytes
        values, edges, shared = record.values, record.edges, record.versions
        over: list[int] = []
        for i, grad in enumerate(values):
            if not isinstance(grad, torch.Tensor):
                continue
            key = id(grad)
            if key in counted or edges[i] in shared:
                continue
            size = bw.tensor_bytes(grad)
            if kept + size > self.memory_budget:
                over.append(i)
                continue
            kept += size
            counted.add(key)
        if over:
            for i, summary in zip(over, NormOnly.of_many([values[i] for i in over])):
                values[i] = summary
        keeper.kept_bytes = kept

    def _hooked_pass(self, call: bw.EngineCall, record: bw.PassRecord, walk: bw.Walk) -> Any:
        keeper = bw.GradientKeeper(record, self.memory_budget, self.small_values)
        result = self._run_own(bw.run_hooked, call, self._original_engine, record, list(walk.seen), keeper)
        leaves = [(edge[0].variable, edge, value) for edge, value in record.items()
                  if type(edge[0]) is bw.ACCUMULATE_GRAD]
        for leaf, _, _ in leaves:
            self._watch(leaf)
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
        inner.roots, inner.nexts, inner.node_count = roots, walk.seen, len(walk.seen)
        running.inner.append(inner)
        keeper = bw.GradientKeeper(inner, self.memory_budget, self.small_values)
        result = self._run_own(bw.run_hooked, call, self._original_engine, inner, list(walk.seen), keeper)
        leaves = [(edge[0].variable, edge, value) for edge, value in inner.items()
                  if type(edge[0]) is bw.ACCUMULATE_GRAD]
        self._note_leaf_norms(running, leaves)
        return result

    def _note_leaf_norms(self, record: bw.PassRecord, leaves: list) -> None:
        """Note which leaves this pass reached. Their norms are taken when the pass is let go (a later
        pass from the same line replaces it) or when the trace is built, from the kept gradients,
        which the copy-before-write keeps as the pass computed them."""
        if not leaves:
            return
        record.leaf_grads.extend((leaf, edge) for leaf, edge, _ in leaves)
        for leaf, _, _ in leaves:
            entry = self.leaf_history.get(id(leaf))
            if entry is None:
                entry = self.leaf_history[id(leaf)] = (leaf, [])
            if not entry[1] or entry[1][-1][0] != record.index:
                entry[1].append((record.index, None))

    def leaf_norms(self, record: bw.PassRecord) -> None:
        """Fill in the norms of ``record``'s leaf gradients in ``leaf_history`` (NaN where not kept intact)."""
        pairs = [(leaf, edge) for leaf, edge in record.leaf_grads]
        if not pairs:
            return
        values = [record.gradient(edge) if record.intact(edge) else None for _, edge in pairs]
        present = [i for i, value in enumerate(values) if value is not None]
        norms = norms_of([values[i] for i in present])
        by_leaf = {id(pairs[i][0]): norm for i, norm in zip(present, norms)}
        for leaf, _ in pairs:
            entry = self.leaf_history.get(id(leaf))
            if entry is None:
                continue
            history = entry[1]
            for k, (index, norm) in enumerate(history):
                if index == record.index and norm is None:
                    history[k] = (index, by_leaf.get(id(leaf), float("nan")))

    @staticmethod
    def _grad_note(passes: int, changed: bool) -> str:
        if passes > 1 and changed:
            return f".grad is the sum over the {passes} passes that reached it, changed in place since " \
                   "(clipped, scaled or zeroed)"
        if passes > 1:
            return f".grad is the sum over the {passes} passes that reached it (PyTorch adds them up)"
        if changed:
            return ".grad was changed in place after the pass (clipped, scaled or zeroed)"
        return ".grad differs from the pass's gradient (changed by code the trace did not see)"

    def _snapshot_final_grads(self) -> None:
        """Each leaf's ``.grad`` as the code left it, where it is not simply the last pass's gradient."""
        last_gradient: dict[int, Any] = {}
        for record in self.passes:
            if not record.kept:
                continue
            for leaf, edge in record.leaf_grads:
                last_gradient[id(leaf)] = (record, edge)
        for key, (leaf, history) in self.leaf_history.items():
            now = _grad_of(leaf)
            found = last_gradient.get(key)
            shown = None
            if found is not None:
                shown = found[0].gradient(found[1])
            passes = {index for index, _ in history}
            if now is None:
                self.final_grads[key] = (None, None, ".grad is None now (set to None after the last pass, e.g. "
                                                      "zero_grad())")
                continue
            if shown is now and found[1] in found[0].versions and found[0].versions[found[1]] == now._version:
                continue  # .grad is the very tensor the last pass gave, unchanged
            if _equal(shown, now):
                continue  # .grad holds what the last pass gave (zeroed, then accumulated once)
            note = self._grad_note(self.summed.get(key, len(passes)), key in self.changed_in_place)
            try:
                summary = PendingSummary(now, self.small_values)
            except Exception:
                continue
            self.final_grads[key] = (summary, now._version, note)
