"""Record a stretch of code: the autograd graph it builds and the gradients its backward passes compute.

``start()`` installs three things, ``stop()`` removes them by identity: the forward log's mode and
module hooks (``forward.py``), and a wrapper around ``torch.autograd.graph._engine_run_backward``
through which every backward call of this thread passes (``backward.py`` says how each pass is
recorded). Nothing here imports IPython, and nothing is built until a trace asks (``build.py``).
"""

from __future__ import annotations

import re
import sys
import threading
import warnings
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
    LeafTable,
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
from .ledger import LeafLedger, requires_grad_of
from .stats import NormOnly

_live_recorders: weakref.WeakSet = weakref.WeakSet()
_own_call = threading.local()  # .active: the recorder running the engine itself (outer wrappers let it through)
NESTED_TRACE = "backward passes recorded by a trace started inside this one are shown there, not here"
MAX_CALL_SITES = 16  # distinct backward call sites whose last pass keeps its graph (oldest let go first)
UNTRACED_TRANSFORMS = ("torch.func transform", "code inside torch.func transforms (vmap, grad, jacrev, ...) ran "
                       "untouched: their inner gradients are not in this trace")


def _traced_by_compiler(value: Any) -> bool:
    """A fake or functional tensor: torch.compile tracing a graph, not the user's code running."""
    return type(value).__module__.startswith("torch._subclasses")


def recorders_holding_state() -> list[Recorder]:
    """Recorders still active or still holding gradients or tensors (the leak check uses this)."""
    return [r for r in list(_live_recorders) if r.active or r.holds_state]


# (owner, attribute) -> {a wrapper of ours, still installed under another's wrapper: what it wrapped}
_retired: dict[tuple[Any, str], dict[Any, Any]] = {}


def _unpatch(owner: Any, name: str, installed: Any, original: Any) -> None:
    """Put back what ``installed`` replaced. If another wrapper now sits on top of it (a trace
    started inside this one, stopped later), ours stays in place, passing calls through, and is
    taken out when the wrapper on top is: stops in any order leave the original in place."""
    retired = _retired.setdefault((owner, name), {})
    if vars(owner).get(name) is installed:
        value = original
        while any(value is wrapper for wrapper in retired):
            value = retired.pop(next(wrapper for wrapper in retired if wrapper is value))
        setattr(owner, name, value)
    else:
        retired[installed] = original
    if not retired:
        del _retired[(owner, name)]


FAST_PATH_NOTE = ("transformer layers and attention in inference (no graph built) ran untouched, so that "
                  "PyTorch's fused fast path runs as untraced; uses of tensors inside them are not listed")
FAST_PATH_LEFT = ("a transformer layer run untouched was left by an exception that is not an Exception "
                  "(KeyboardInterrupt): torch calls after it, up to the next module call or backward, "
                  "were not recorded")
_fast_path_type: dict[type, bool] = {}
_COMPILE_HOOKS_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks on modules"


BATCHED_GRADS = ("backward passes over batched grad_outputs (autograd.grad(..., is_grads_batched=True), "
                 "vectorized jacobian/hessian) ran untouched: their gradients exist only inside the vmap")
_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)


def _batched(value: Any) -> bool:
    try:
        return isinstance(value, torch.Tensor) and _is_legacy_batched is not None and _is_legacy_batched(value)
    except Exception:
        return False


def _add_warning_filter() -> tuple:
    """Our own entry at the front of ``warnings.filters`` (``filterwarnings`` would first remove an
    equal one: a user's, or an outer trace's)."""
    entry = ("ignore", re.compile(_COMPILE_HOOKS_WARNING, re.IGNORECASE), UserWarning, None, 0)
    warnings.filters.insert(0, entry)
    _filters_mutated()
    return entry


def _filters_mutated() -> None:
    mutated = getattr(warnings, "_filters_mutated", None) or getattr(warnings, "_filters_mutated_lock_held", None)
    if mutated is not None:
        mutated()


def _remove_warning_filter(entry: Any) -> None:
    """Take our filter out of ``warnings.filters`` by identity (a user's ``catch_warnings`` may
    already have restored a list without it)."""
    if entry is None:
        return
    for i, other in enumerate(warnings.filters):
        if other is entry:
            del warnings.filters[i]
            _filters_mutated()
            return


def _fast_path_kind(kind: type) -> bool:
    """Whether modules of ``kind`` have PyTorch's inference fast path (which any mode turns off)."""
    nn = torch.nn
    found = _fast_path_type[kind] = issubclass(kind, (nn.TransformerEncoderLayer, nn.TransformerEncoder,
                                                      nn.MultiheadAttention))
    return found


def _total_bytes(values: Any) -> int:
    """Bytes of the tensors among ``values`` (a tensor shared by several edges counts each time)."""
    total = 0
    for value in values:
        if isinstance(value, torch.Tensor):
            try:
                total += value.nbytes
            except Exception:  # a wrapper or sparse tensor without storage bytes of its own
                continue
    return total


class Recorder:
    """Records one stretch of code: ``start()``, run the code, ``stop()``; a Trace then builds from it.

    ``memory_budget`` bounds the bytes of gradient tensors a pass keeps whole; past it, a
    gradient's norm alone is kept.
    """

    def __init__(self, *, memory_budget: int = 256 * 2**20, small_values: int = 16) -> None:
        self.memory_budget = memory_budget
        self.small_values = small_values
        self.log = ForwardLog()  # replaced by start(): the log of the recording
        self.leaves = LeafTable()
        self.cuts: list[Cut] = []
        self.hooked: set[int] = set()  # sequence numbers of nodes whose tensors got a user hook (no node held)
        self.passes: list[bw.PassRecord] = []
        self.call_sites: dict[tuple, int] = {}  # (location, entry) -> index of its last pass
        self.ledger = LeafLedger(self.passes, small_values)  # each leaf's gradient, pass by pass
        self.untraced: dict[str, str] = {}  # what ran untouched, and why (shown by the trace)
        self.listeners: list[Any] = []  # called after each backward pass: listener(recorder, record, outputs)
        self.stop_on_nonfinite = False  # raise NonFiniteGradient after a pass that computed a NaN/Inf gradient
        self.namespace_source: Any = None  # () -> the names in use, for describing a stop mid-recording
        self.labeler: Any = None  # filename -> "In [5]", for the same
        self.op_count = 0
        self._thread = threading.get_ident()
        self._mode: RecordingMode | None = None
        self._module_handles: list[Any] = []
        self._warning_filter: Any = None  # the warnings filter this recording added (removed by identity)
        self._original_engine: Any = None
        self._installed_engine: Any = None
        self._original_apply: Any = None
        self._installed_apply: Any = None
        self._original_will_execute: Any = None
        self._installed_will_execute: Any = None
        self._capturing: set[Any] | None = None  # the nodes of the captured pass running now
        self._grad_at_start: dict[int, bool] = {}  # id(leaf) -> had a .grad when the running pass began
        self._paused: list[Any] = []  # the module whose inference fast path runs with the mode off
        self._closed = False
        self._distributed = False
        self.per_node_hooks = False  # record every pass with a prehook per node, as untraced (asked for)
        self._running: bw.PassRecord | None = None
        _live_recorders.add(self)

    # -- lifetime ---------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._mode is not None

    @property
    def holds_state(self) -> bool:
        return bool(self.leaves or self.passes or self.cuts or self.ledger.history or self.hooked)

    def start(self) -> None:
        if self._mode is not None:
            raise RuntimeError("recorder already started")
        try:
            self._start()
        except BaseException:  # (a Ctrl-C part-way): take back whatever was installed
            self.stop()
            raise

    def _start(self) -> None:
        self.log = ForwardLog()
        self._thread = self.log.thread
        log = self.log
        thread = self._thread
        get_ident, getframe = threading.get_ident, sys._getframe

        # Dynamo traces module hooks into compiled code: under torch.compile they must do nothing
        paused = self._paused
        fast_path = _fast_path_type

        def enter(module, args):
            if not _is_compiling() and get_ident() == thread:
                caller = getframe(1)
                log.enter_module(module, caller)
                if paused:
                    self._resume_left_pauses()
                kind = type(module)
                if (fast_path[kind] if kind in fast_path else _fast_path_kind(kind)) and not paused:
                    self._pause_for_fast_path(module, args, caller)

        def leave(module, args, output):
            if not _is_compiling() and get_ident() == thread:
                log.leave_module()
                if paused and paused[-1][0] is module:
                    self._resume_after_fast_path()

        self._module_handles = [nn_module.register_module_forward_pre_hook(enter),
                                nn_module.register_module_forward_hook(leave, always_call=True)]
        # torch.compile(module) warns of global module hooks on every call: ours, not the user's
        self._warning_filter = _add_warning_filter()
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
        original_will_execute = self._original_will_execute = torch._C._will_engine_execute_node

        def will_execute(node):
            # asked by multi-grad hooks (FlopCounterMode, FSDP) during a pass: a captured pass runs as
            # autograd.grad, where a leaf's node never runs; untraced, the leaves of the graph would
            capturing = self._capturing
            if capturing is not None and type(node) is bw.ACCUMULATE_GRAD:
                return node in capturing
            return original_will_execute(node)

        self._installed_will_execute = will_execute
        torch._C._will_engine_execute_node = will_execute
        self._original_engine = graph_module._engine_run_backward
        self._installed_engine = self._engine  # one bound method, so stop() can find it by identity
        graph_module._engine_run_backward = autograd_module._engine_run_backward = self._installed_engine
        self._closed = False
        self._distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        mode = self._mode = RecordingMode(self)  # (set first: a stop part-way finds it, on the stack or not)
        mode.__enter__()

    def _pause_for_fast_path(self, module: Any, args: tuple, caller: Any) -> None:
        """A transformer layer or attention in inference takes PyTorch's fused fast path only where
        no torch function mode is active: with nothing to record (no graph is built), the mode steps
        off the stack for the call, so the layer computes what it computes untraced. ``caller`` is
        the frame of the module's call (the global hook sees no keyword arguments; that frame has them)."""
        if module.training:
            return
        if torch.is_grad_enabled():
            if any(p.requires_grad for p in module.parameters()):
                return  # a graph is being built: no fast path untraced either
            try:
                kwargs = caller.f_locals.get("kwargs")
            except Exception:
                return
            if not isinstance(kwargs, dict):
                return  # cannot tell whether a keyword input builds a graph: keep recording
            if any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())):
                return
        mode = self._mode
        length = torch._C._len_torch_function_stack()
        if mode is None or not length or torch._C._get_function_stack_at(length - 1) is not mode:
            return  # another mode above ours: no fast path untraced either
        from torch.overrides import _pop_mode

        _pop_mode()
        self._paused.append((module, caller))
        self.untraced.setdefault("fast path", FAST_PATH_NOTE)

    def _resume_after_fast_path(self) -> None:
        self._paused.pop()
        if self._mode is not None and not self._closed:
            from torch.overrides import _push_mode

            _push_mode(self._mode)

    def _resume_left_pauses(self) -> None:
        """A layer left by a BaseException (KeyboardInterrupt caught inside the block) never runs
        its leave hook: once its call's frame is gone, the mode goes back on the stack."""
        while self._paused:
            frame, target = sys._getframe(1), self._paused[-1][1]
            while frame is not None and frame is not target:
                frame = frame.f_back
            if frame is not None:
                return  # still inside the layer
            self._resume_after_fast_path()
            self.untraced.setdefault("fast path left", FAST_PATH_LEFT)

    def stop(self) -> None:
        """Remove the mode, the hooks and the engine wrapper (each by identity); safe to call twice."""
        mode, self._mode = self._mode, None
        if self._paused:  # a layer left by a BaseException, and nothing since put the mode back
            self.untraced.setdefault("fast path left", FAST_PATH_LEFT)
            self._paused.clear()
        try:
            if mode is not None:
                remove_mode(mode)
        finally:
            for handle in self._module_handles:
                handle.remove()
            self._module_handles = []
            entry, self._warning_filter = self._warning_filter, None
            _remove_warning_filter(entry)
            installed, self._installed_engine = self._installed_engine, None
            if installed is not None:
                _unpatch(graph_module, "_engine_run_backward", installed, self._original_engine)
                _unpatch(autograd_module, "_engine_run_backward", installed, self._original_engine)
            apply, self._installed_apply = self._installed_apply, None
            if apply is not None:
                _unpatch(Function, "apply", apply, self._original_apply)
            will_execute, self._installed_will_execute = self._installed_will_execute, None
            if will_execute is not None:
                _unpatch(torch._C, "_will_engine_execute_node", will_execute, self._original_will_execute)
            self._closed = True  # a wrapper still installed (wrapped in turn) passes calls through
            if mode is not None:
                self.log.close()
                self.op_count = len(self.log.op_start)
                self.hooked.clear()
                self.ledger.snapshot()
                self.ledger.stop_watching()

    def release(self) -> None:
        """Drop every gradient and tensor reference this recording holds."""
        for record in self.passes:
            record.drop()
        self.passes.clear()
        self.call_sites.clear()
        self.leaves.clear()
        self.cuts.clear()
        self.hooked.clear()
        self.ledger.clear()
        self.log = ForwardLog()

    # -- forward side paths (rare: most ops only append to the log) ------------------------
    def note_untraced(self) -> None:
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
                    self.hooked.add(node._sequence_nr())
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
            if grad_enabled and name not in _NO_LEAF_OPS and self.leaves.of(out) is None:
                self.leaves.add(out, name, user_location())
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
                info = self.leaves.of(arg)
                if info is None:
                    info = self.leaves.add(arg, None, None)
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
            info = self.leaves.of(value)
            if info is None:
                info = self.leaves.add(value, None, location)
            if name not in [n for n, _ in info.names]:
                info.names.append((name, location))
        return value

    # -- backward ---------------------------------------------------------------------------
    def _engine(self, outputs: Any, *args: Any, **kwargs: Any) -> Any:
        """Installed as ``_engine_run_backward`` while recording: every backward call passes here."""
        original = self._original_engine
        if self._paused and threading.get_ident() == self._thread:
            self._resume_left_pauses()
        running = self._running
        if running is not None and not self._closed and (
                threading.get_ident() == self._thread or torch._C._current_graph_task_id() != -1):
            return self._inner_pass(running, bw.EngineCall(outputs, args, kwargs))
        owner = getattr(_own_call, "active", None)
        if self._closed or owner is not None or threading.get_ident() != self._thread:
            if owner is not None and owner is not self and not self._closed:
                self.untraced.setdefault("nested trace", NESTED_TRACE)
            return original(outputs, *args, **kwargs)
        if _peek_transform() is not None:
            self.untraced.setdefault(*UNTRACED_TRANSFORMS)
            return original(outputs, *args, **kwargs)
        if _is_compiling() or any(_traced_by_compiler(t) for t in outputs):  # AOTAutograd tracing a backward
            return original(outputs, *args, **kwargs)
        call = bw.EngineCall(outputs, args, kwargs)
        if call.grad_tensors and any(_batched(g) for g in call.grad_tensors):
            self.untraced.setdefault("batched grads", BATCHED_GRADS)  # (their values live inside the vmap)
            return original(outputs, *args, **kwargs)
        self.log.compact()
        record = bw.PassRecord(len(self.passes), "backward" if call.accumulate_grad else "grad", user_location())
        try:
            roots = [bw.edge_of(t) for t in call.outputs]
            call.input_edges = [bw.edge_of(t) for t in call.inputs]
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
        if self.per_node_hooks:
            return "hooks", "asked for (per_node_hooks / --per-node-hooks)"
        if walk.has_kind(bw.REENTRANT_CHECKPOINT):
            return "hooks", "reentrant checkpoint (it refuses the engine's capture mode)"
        if call.create_graph:
            return "hooks", "create_graph=True"
        if call.inputs and call.accumulate_grad:
            return "hooks", "backward(inputs=...)"
        if walk.sinks:
            return "hooks", "the graph has nodes that lead nowhere"
        if walk.oldest < self.log.first_seq or walk.newest >= sequence_nr():  # (numbers count per thread)
            return "hooks", ("part of the graph was built before the recording or in another thread (hooks put "
                             "on it there are not known)")
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
        self.ledger.release(record)
        record.drop()

    def _run_own(self, function: Any, *args: Any) -> Any:
        previous = getattr(_own_call, "active", None)
        _own_call.active = self
        try:
            return function(*args)
        finally:
            _own_call.active = previous

    def _captured_pass(self, call: bw.EngineCall, record: bw.PassRecord, walk: bw.Walk, roots: list) -> Any:
        if call.accumulate_grad:
            edges = walk.all_edges()
            leaf_count = len(walk.leaf_edges)
        else:
            edges = bw.needed_edges(roots, {edge[0] for edge in call.input_edges})
            leaf_count = 0
        keeper = bw.GradientKeeper(record, self.memory_budget, self.small_values)
        hooked = [(node, keeper) for node in walk.hooked(self.hooked)]  # a user's hook: what flowed on
        estimate = bw.estimate_bytes(edges)
        if estimate > 4 * self.memory_budget:
            edges, summarised = self._split_for_budget(edges)
            norms_only = bw.GradientKeeper(record, 0, self.small_values)  # far from the output: norms alone
            hooked += [(node, norms_only) for node in summarised]
        self._capturing = walk.seen if call.accumulate_grad else None
        try:
            user_grads, grads = self._run_own(bw.run_captured, call, self._original_engine, edges, hooked)
        finally:
            self._capturing = None
        leaves = self.ledger.accumulate(record, edges, grads, leaf_count)
        record.edges, record.values = edges, list(grads)
        if len(edges) <= 64 or estimate > self.memory_budget / 2 or _total_bytes(grads) > self.memory_budget / 2:
            self._keep_within_budget(record, keeper)  # near the budget (the estimate may miss one big gradient)
        if not call.accumulate_grad:
            for edge, grad in zip(call.input_edges, user_grads):
                if grad is not None:
                    if record.gradient(edge) is None:
                        keeper.keep(edge, grad)
                    if type(edge[0]) is bw.ACCUMULATE_GRAD:
                        leaves.append((edge[0].variable, edge, grad))
            self.ledger.hold(record, call.input_edges, user_grads)
            self.ledger.hold(record, roots, call.grad_tensors)
            self.ledger.note(record, leaves)
            return user_grads
        self.ledger.hold(record, roots, call.grad_tensors)
        self.ledger.note(record, leaves)
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
        had = self.ledger.before_engine_accumulates(walk.leaf_edges) if call.accumulate_grad else set()
        # (a reentrant checkpoint's passes inside this one find .grad the engine already filled in it)
        self._grad_at_start = {id(edge[0].variable): id(edge[0].variable) in had for edge in walk.leaf_edges}
        try:
            result = self._run_own(bw.run_hooked, call, self._original_engine, record, list(walk.seen), keeper)
        finally:
            self._grad_at_start = {}
        leaves = [(edge[0].variable, edge, value) for edge, value in record.items()
                  if type(edge[0]) is bw.ACCUMULATE_GRAD and requires_grad_of(edge[0].variable)]  # (frozen: dropped)
        for leaf, _, _ in leaves:
            self.ledger.watch(leaf)
        if call.accumulate_grad:
            self.ledger.engine_accumulated(leaves, had, record.index)
        if not call.accumulate_grad and result:
            for edge, grad in zip(call.input_edges, result):
                if grad is not None:
                    if edge not in record.grads:
                        keeper.keep(edge, grad)
            self.ledger.hold(record, call.input_edges, result)
        self.ledger.hold(record, record.roots, call.grad_tensors)
        self.ledger.note(record, leaves)
        return result

    def _inner_pass(self, running: bw.PassRecord, call: bw.EngineCall) -> Any:
        """A backward run from inside one of ours (reentrant checkpoint recomputing its block):
        recorded with prehooks as part of the running pass."""
        inner = bw.PassRecord(running.index, "backward", None)
        inner.strategy, inner.reason = "hooks", "run during the pass by reentrant checkpoint"
        try:
            roots = [bw.edge_of(t) for t in call.outputs]
            walk = bw.Walk(roots)
        except Exception:  # PyTorch's own error, as untraced (a backward of what needs no gradient)
            return call.run(self._original_engine, call.inputs, call.accumulate_grad)
        inner.roots, inner.nexts, inner.node_count = roots, walk.seen, len(walk.seen)
        running.inner.append(inner)
        keeper = bw.GradientKeeper(inner, self.memory_budget, self.small_values)
        had = self.ledger.before_engine_accumulates(walk.leaf_edges) if call.accumulate_grad else set()
        had = {key for key in had if self._grad_at_start.get(key, True)}  # as the running pass began
        result = self._run_own(bw.run_hooked, call, self._original_engine, inner, list(walk.seen), keeper)
        leaves = [(edge[0].variable, edge, value) for edge, value in inner.items()
                  if type(edge[0]) is bw.ACCUMULATE_GRAD]
        if call.accumulate_grad:
            self.ledger.engine_accumulated(leaves, had, running.index)
        self.ledger.note(running, leaves)
        return result
