"""Record the autograd graph that code builds, and the gradients that flow through it.

Forward: a TorchFunctionMode sees every torch call and writes an ``OpRecord`` (op name,
source line, module, output shapes) into the new autograd node's ``metadata`` dict, so the
record lives exactly as long as the graph does and the recorder keeps no node alive.
Backward: when a backward entry point is called, the graph is walked from its roots and a
prehook is put on every node; the hook receives the gradient of each tensor the node
produced. Every handle is removed in a ``finally``. Nothing here imports IPython.
"""

from __future__ import annotations

import functools
import os
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .stats import PendingSummary

KEY = "torchmagic"  # the key of our record in autograd nodes' metadata dicts

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_internal_files: dict[str, bool] = {}

Location = tuple[str, int]


def user_location(depth: int = 1) -> Location | None:
    """(filename, line) of the nearest frame outside torch and torchmagic.

    A frame walk costs well under a microsecond per frame, unlike ``inspect.stack()``.
    """
    frame = sys._getframe(depth)
    while frame is not None:
        filename = frame.f_code.co_filename
        internal = _internal_files.get(filename)
        if internal is None:
            internal = filename.startswith((_TORCH_DIR, _OWN_DIR))
            _internal_files[filename] = internal
        if not internal:
            return filename, frame.f_lineno
        frame = frame.f_back
    return None


@functools.lru_cache(maxsize=4096)
def op_name(func: Any) -> str:
    """A short op name for a torch callable: ``mul``, ``linear``, ``T`` for ``Tensor.T``."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a property read such as t.T or t.mT
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    return name


def node_op_name(node: Any) -> str:
    """Op name for an autograd node no torch call was seen for: ``LogSoftmaxBackward0`` -> ``log_softmax``."""
    name = type(node).__name__
    if name == "AccumulateGrad":
        return "leaf"
    for suffix in ("Backward0", "Backward1", "Backward"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


class GradSlot:
    """The gradient that reached one output of one node: a kept tensor or a summary."""

    __slots__ = ("tensor", "summary", "seq", "count", "version")

    def __init__(self, tensor: torch.Tensor | None, summary: Any, seq: int, version: int | None = None) -> None:
        self.tensor = tensor
        self.summary = summary
        self.seq = seq
        self.count = 1
        self.version = version  # for a leaf's own .grad: its version when the pass ended


class OpRecord:
    """What we know of one autograd node; stored in ``node.metadata[KEY]``."""

    __slots__ = ("op", "trace_id", "location", "module", "outputs", "names", "grads", "seen_forward")

    def __init__(self, op: str, trace_id: int, location: Location | None, module: Any, seen_forward: bool) -> None:
        self.op = op
        self.trace_id = trace_id
        self.location = location
        self.module = module
        self.outputs: dict[int, tuple[tuple[int, ...], torch.dtype, torch.device]] = {}
        self.names: dict[int, list[tuple[str, Location | None]]] = {}
        self.grads: dict[int, GradSlot] | None = None
        self.seen_forward = seen_forward


class LeafInfo:
    """A leaf tensor that requires grad, seen during the recording (kept only until it ends)."""

    __slots__ = ("tensor", "op", "location", "names", "detached", "no_grad")

    def __init__(self, tensor: torch.Tensor, op: str | None, location: Location | None) -> None:
        self.tensor = tensor
        self.op = op
        self.location = location
        self.names: list[tuple[str, Location | None]] = []
        self.detached = False
        self.no_grad = False


class PassRecord:
    """One backward call: its roots (held until the trace is built) and its graph's shape."""

    __slots__ = ("entry", "root_edges", "root_tensors", "node_count", "signature", "failed")

    def __init__(self, entry: str, root_edges: list, root_tensors: list, node_count: int, signature: int) -> None:
        self.entry = entry
        self.root_edges = root_edges
        self.root_tensors = root_tensors
        self.node_count = node_count
        self.signature = signature
        self.failed = False


_BACKWARD_ENTRIES = {torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad}
_NO_LEAF_OPS = frozenset({"detach", "detach_", "data", "grad"})


def _as_tensor_list(value: Any) -> list[torch.Tensor]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [value]
    return [v for v in value if isinstance(v, torch.Tensor)]


class _RecordingMode(TorchFunctionMode):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if func in _BACKWARD_ENTRIES:
            return self.recorder._run_backward(func, args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self.recorder._record(func, out, args)
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            for item in out:
                if isinstance(item, torch.Tensor):
                    self.recorder._record(func, item, args)
        return out


_trace_ids = iter(range(1, sys.maxsize))
_live_recorders: weakref.WeakSet = weakref.WeakSet()


def recorders_holding_state() -> list[Recorder]:
    """Recorders still active or still holding gradients or tensors (the leak check uses this)."""
    return [r for r in list(_live_recorders) if r.active or r._touched or r.leaves or r.passes or r.last_edges]


class Recorder:
    """Records one stretch of code: start(), run the code, stop(), then build a Trace.

    ``memory_budget`` bounds the bytes of gradient tensors kept whole; past it, gradients are
    summarised as they arrive and the tensors are dropped.
    """

    def __init__(self, *, memory_budget: int = 64 * 2**20, small_values: int = 16) -> None:
        self.trace_id = next(_trace_ids)
        self.memory_budget = memory_budget
        self.small_values = small_values
        self.leaves: dict[int, LeafInfo] = {}
        self.passes: list[PassRecord] = []
        self.leaf_history: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.kept_bytes = 0
        self.op_count = 0
        self._touched: dict[int, OpRecord] = {}
        self._seq = 0
        self._mode: _RecordingMode | None = None
        self._module_stack: list[Any] = []
        self._module_handles: list[Any] = []
        # (leaf, gradient or None when its .grad is taken after the pass, record, sequence number)
        self._pass_leaf_grads: list[tuple[torch.Tensor, torch.Tensor | None, OpRecord | None, int]] = []
        self.last_edges: dict[Any, tuple] = {}
        _live_recorders.add(self)

    # -- lifetime ---------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self._mode is not None

    def start(self) -> None:
        if self._mode is not None:
            raise RuntimeError("recorder already started")
        from torch.nn.modules import module as nn_module

        self._module_handles = [
            nn_module.register_module_forward_pre_hook(self._enter_module),
            nn_module.register_module_forward_hook(self._exit_module, always_call=True),
        ]
        self._mode = _RecordingMode(self)
        self._mode.__enter__()

    def stop(self) -> None:
        """Pop the mode and remove the module hooks; safe to call twice."""
        mode, self._mode = self._mode, None
        try:
            if mode is not None:
                mode.__exit__(None, None, None)
        finally:
            for handle in self._module_handles:
                handle.remove()
            self._module_handles = []
            self._module_stack.clear()

    def release(self) -> None:
        """Drop every gradient and tensor reference this recording holds."""
        for record in self._touched.values():
            record.grads = None
        self._touched.clear()
        self.leaves.clear()
        self.passes.clear()
        self.leaf_history.clear()
        self._pass_leaf_grads.clear()
        self.last_edges = {}
        self.kept_bytes = 0

    # -- forward ------------------------------------------------------------------------
    def _enter_module(self, module, args):
        self._module_stack.append(module)

    def _exit_module(self, module, args, output):
        stack = self._module_stack
        # a forward that raised skips nothing with always_call=True, but be tolerant
        while stack:
            if stack.pop() is module:
                break

    def _record(self, func: Any, out: torch.Tensor, args: tuple) -> None:
        node = out.grad_fn
        if node is None:
            if out.requires_grad:
                if id(out) not in self.leaves:
                    name = op_name(func)
                    if name not in _NO_LEAF_OPS:
                        self.leaves[id(out)] = LeafInfo(out, name, user_location())
            elif not torch.is_grad_enabled() or op_name(func) in ("detach", "detach_"):
                self._note_leaf_inputs(func, args)
            return
        metadata = node.metadata
        record = metadata.get(KEY)
        if record is None:
            self.op_count += 1
            module = self._module_stack[-1] if self._module_stack else None
            record = OpRecord(op_name(func), self.trace_id, user_location(), module, True)
            metadata[KEY] = record
        output_nr = out.output_nr
        if output_nr not in record.outputs:
            record.outputs[output_nr] = (tuple(out.shape), out.dtype, out.device)

    def _note_leaf_inputs(self, func: Any, args: tuple) -> None:
        detached = op_name(func) in ("detach", "detach_")
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.requires_grad and arg.grad_fn is None:
                info = self.leaves.get(id(arg))
                if info is None:
                    info = self.leaves[id(arg)] = LeafInfo(arg, None, None)
                if detached:
                    info.detached = True
                else:
                    info.no_grad = True

    def bind(self, name: str, value: Any, location: Location | None = None) -> Any:
        """Note that the user bound ``name`` to ``value`` (the assignment hook calls this)."""
        if not isinstance(value, torch.Tensor) or name.startswith("<"):
            return value
        if location is None:
            location = user_location()
        node = value.grad_fn
        if node is not None:
            metadata = node.metadata
            record = metadata.get(KEY)
            if record is None:
                record = OpRecord(node_op_name(node), self.trace_id, location, None, False)
                metadata[KEY] = record
            record.outputs.setdefault(value.output_nr, (tuple(value.shape), value.dtype, value.device))
            bindings = record.names.setdefault(value.output_nr, [])
            if not bindings or bindings[-1][0] != name:
                bindings.append((name, location))
        elif value.requires_grad:
            info = self.leaves.get(id(value))
            if info is None:
                info = self.leaves[id(value)] = LeafInfo(value, None, location)
            if name not in [n for n, _ in info.names]:
                info.names.append((name, location))
        return value

    # -- backward -----------------------------------------------------------------------
    def _run_backward(self, func: Any, args: tuple, kwargs: dict) -> Any:
        entry = "grad" if func is torch.autograd.grad else "backward"
        if func is torch.Tensor.backward:
            roots = [args[0]]
        else:
            first = args[0] if args else kwargs.get("outputs" if entry == "grad" else "tensors")
            roots = _as_tensor_list(first)
        root_edges = [(t.grad_fn, t.output_nr) for t in roots if t.grad_fn is not None]
        handles: list[Any] = []
        previous = self._touched
        self._touched = {}
        pass_record = None
        try:
            node_count, signature = self._hook_graph([edge[0] for edge in root_edges], handles)
            pass_record = PassRecord(entry, root_edges, roots, node_count, signature)
            # Backward again through the same graph (retain_graph) adds up, as .grad does. A new graph
            # (the next step of a training loop) starts afresh, parameters included, though their
            # AccumulateGrad nodes are the same each step: the trace shows the last pass.
            last = self.passes[-1].root_edges if self.passes else None
            same_graph = bool(last) and [e[0] for e in last] == [e[0] for e in root_edges]
            for key, record in previous.items():
                if not same_graph or key not in self._touched:
                    self._drop_grads(record)
            result = func(*args, **kwargs)
            if entry == "grad":
                inputs = _as_tensor_list(args[1] if len(args) > 1 else kwargs.get("inputs"))
                grads = result if isinstance(result, (tuple, list)) else (result,)
                self._store_returned_grads(inputs, grads)
            return result
        except BaseException:
            if pass_record is not None:
                pass_record.failed = True
            raise
        finally:
            for handle in handles:
                handle.remove()
            if pass_record is not None:
                if self.passes:  # only the last pass's graph is drawn: let earlier graphs go
                    self.passes[-1].root_edges, self.passes[-1].root_tensors = [], []
                self.passes.append(pass_record)
                self._close_pass()

    def _hook_graph(self, roots: Iterable[Any], handles: list) -> tuple[int, int]:
        stack = list(roots)
        # node -> next_functions of this pass only (build reuses it; reading the attribute costs ~1 us)
        seen: dict[Any, tuple] = {}
        self.last_edges = seen
        kinds: list[type] = []
        touched = self._touched
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            children = seen[node] = node.next_functions
            kinds.append(type(node))
            metadata = node.metadata
            record = metadata.get(KEY)
            if record is None:
                record = OpRecord(node_op_name(node), self.trace_id, None, None, False)
                metadata[KEY] = record
            touched[id(record)] = record
            leaf = getattr(node, "variable", None) if kinds[-1].__name__ == "AccumulateGrad" else None
            handles.append(node.register_prehook(functools.partial(self._on_grad, record, leaf)))
            for child, _ in children:
                if child is not None:
                    stack.append(child)
        return len(seen), hash(tuple(kinds))

    def _on_grad(self, record: OpRecord, leaf: torch.Tensor | None, grad_outputs: tuple) -> None:
        self._seq += 1
        slots = record.grads
        if slots is None:
            slots = record.grads = {}
        for index, grad in enumerate(grad_outputs):
            if grad is None:
                continue
            if leaf is not None and leaf.grad is None and index not in slots and not grad.requires_grad:
                # AccumulateGrad will make this very tensor the leaf's .grad, without a copy, unless
                # we hold it too (then it clones). Take .grad itself once the pass is over instead.
                self._pass_leaf_grads.append((leaf, None, record, self._seq))
                continue
            self._store(record, slots, index, grad)
            if leaf is not None:
                self._pass_leaf_grads.append((leaf, grad.detach(), None, 0))

    def _store(self, record: OpRecord, slots: dict, index: int, grad: torch.Tensor) -> None:
        if grad.requires_grad:  # create_graph=True: keep values, not the double-backward graph
            grad = grad.detach()
        slot = slots.get(index)
        if slot is not None and slot.tensor is not None:
            slot.tensor = slot.tensor + grad  # a second backward through the same graph accumulates
            slot.version = None  # a sum of our own, no longer the leaf's .grad
            slot.count += 1
            return
        nbytes = grad.numel() * grad.element_size()
        if slot is None and self.kept_bytes + nbytes <= self.memory_budget:
            self.kept_bytes += nbytes
            slots[index] = GradSlot(grad, None, self._seq)
        elif slot is None:
            slots[index] = GradSlot(None, PendingSummary(grad, self.small_values), self._seq)
        else:  # summary only, accumulating beyond the budget: keep the latest
            slot.summary = PendingSummary(grad, self.small_values)
            slot.count += 1

    def _drop_grads(self, record: OpRecord) -> None:
        if record.grads:
            for slot in record.grads.values():
                if slot.tensor is not None:
                    self.kept_bytes -= slot.tensor.numel() * slot.tensor.element_size()
        record.grads = None

    def _store_returned_grads(self, inputs: list[torch.Tensor], grads: Iterable[Any]) -> None:
        from torch.autograd.graph import get_gradient_edge

        self._seq += 1
        for tensor, grad in zip(inputs, grads):
            if grad is None:
                continue
            node, index = get_gradient_edge(tensor)[:2]
            metadata = node.metadata
            record = metadata.get(KEY)
            if record is None:
                record = OpRecord(node_op_name(node), self.trace_id, None, None, False)
                metadata[KEY] = record
            self._touched[id(record)] = record
            if record.grads is None:
                record.grads = {}
            self._store(record, record.grads, index, grad)
            if tensor.grad_fn is None:
                self._pass_leaf_grads.append((tensor, grad.detach(), None, 0))

    def _close_pass(self) -> None:
        """Collect the leaves' own .grad, and keep each leaf's gradient norm for this pass."""
        pending, self._pass_leaf_grads = self._pass_leaf_grads, []
        grads = []
        for leaf, grad, record, seq in pending:
            if grad is None:  # deferred in the hook: this pass's gradient is now the leaf's .grad
                grad = leaf.grad
                if grad is None:
                    continue
                if record.grads is None:
                    record.grads = {}
                nbytes = grad.numel() * grad.element_size()
                if self.kept_bytes + nbytes <= self.memory_budget:
                    self.kept_bytes += nbytes
                    record.grads[0] = GradSlot(grad, None, seq, grad._version)
                else:
                    record.grads[0] = GradSlot(None, PendingSummary(grad, self.small_values), seq)
            grads.append((leaf, grad))
        if not grads:
            return
        norms = torch._foreach_norm([g.float() if not g.is_floating_point() else g for _, g in grads])
        index = len(self.passes) - 1
        for (leaf, _), norm in zip(grads, norms):
            entry = self.leaf_history.get(id(leaf))
            if entry is None:
                entry = self.leaf_history[id(leaf)] = (leaf, [])
            history = entry[1]
            if history and history[-1][0] == index:
                history[-1] = (index, history[-1][1] + norm)
            else:
                history.append((index, norm))
