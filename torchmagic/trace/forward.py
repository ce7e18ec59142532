"""The forward side of a recording: which torch call, module call and line of code made each autograd node.

Nothing is written onto the graph while it is built. A lean TorchFunctionMode notes the range of
autograd sequence numbers each torch call created, global module hooks note where each module
call begins and ends, and the user's line is noted when it changes. A node is attributed
afterwards by its sequence number (``node._sequence_nr()``), so recording costs a few list appends
per op and keeps no node alive. Sequence numbers count per thread, so hooks that fire in other
threads are ignored.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import weakref
from array import array
from bisect import bisect_right
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

sequence_nr = torch._C._autograd._get_sequence_nr  # the number the next autograd node will get
_peek_transform = torch._C._functorch.peek_interpreter_stack  # not None inside torch.func transforms
_is_compiling = torch.compiler.is_compiling
_no_subclass = torch._C.DisableTorchFunctionSubclass

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_internal_code: dict[Any, bool] = {}

Location = tuple[str, int]
MAX_CUTS = 64  # detach / no_grad cut points remembered per recording (for "cut by .detach() at ...")
CUT_OPS = frozenset({"detach", "detach_", "data"})
_NO_LEAF_OPS = frozenset({"detach", "detach_", "data", "grad"})


def _is_internal(code: Any) -> bool:
    internal = _internal_code.get(code)
    if internal is None:
        internal = _internal_code[code] = code.co_filename.startswith((_TORCH_DIR, _OWN_DIR))
    return internal


def user_frame(depth: int = 1) -> Any:
    """The nearest frame outside torch and torchmagic (a frame walk: well under a microsecond a frame)."""
    frame = sys._getframe(depth + 1)
    while frame is not None and _is_internal(frame.f_code):
        frame = frame.f_back
    return frame


def user_location(depth: int = 1) -> Location | None:
    """(filename, line) of the nearest frame outside torch and torchmagic."""
    frame = user_frame(depth + 1)
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


@functools.lru_cache(maxsize=4096)
def op_name(func: Any) -> str:
    """A short op name for a torch callable: ``mul``, ``linear``, ``T`` for ``Tensor.T``."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a property read such as t.T or t.data
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    return name


_INPLACE_DUNDERS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                              "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                              "__setitem__", "__set__"})


@functools.lru_cache(maxsize=4096)
def writes_in_place(func: Any) -> bool:
    """Whether a torch callable changes a tensor argument in place (``mul_``, ``_foreach_mul_``, ``+=``)."""
    name = getattr(func, "__name__", "") or ""
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.endswith("__")


def _module_call_codes() -> frozenset:
    """The code objects of ``nn.Module.__call__``'s plumbing (a forward hook's callers)."""
    from types import CodeType

    from torch.nn import Module

    codes = set()
    for function in (Module._call_impl, Module._wrapped_call_impl):
        code = function.__code__
        codes.add(code)
        codes.update(c for c in code.co_consts if isinstance(c, CodeType))
    return frozenset(codes)


_MODULE_CALL_CODES = _module_call_codes()


class LeafInfo:
    """A leaf tensor that requires grad, seen while recording: what made it, where, what cut it off.
    It holds the leaf weakly: a loop that makes a fresh leaf each step does not keep them all."""

    __slots__ = ("ref", "_shape", "op", "location", "names", "detached", "no_grad")

    def __init__(self, tensor: torch.Tensor, op: str | None, location: Location | None) -> None:
        self.ref = weakref.ref(tensor)
        self._shape = _shape_of(tensor)
        self.op = op
        self.location = location
        self.names: list[tuple[str, Location | None]] = []
        self.detached: Location | None = None  # where .detach() was applied to it
        self.no_grad: Location | None = None  # where it was used under torch.no_grad()

    @property
    def tensor(self) -> torch.Tensor | None:
        return self.ref()

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The leaf's shape now (``w.data = ...`` may change it), or as last seen once it died."""
        tensor = self.ref()
        if tensor is not None:
            shape = _shape_of(tensor)
            if shape is not None:
                self._shape = shape
        return self._shape


def _shape_of(tensor: torch.Tensor) -> tuple[int, ...] | None:
    try:  # (an uninitialized parameter of a lazy module has none yet)
        with torch._C.DisableTorchFunctionSubclass():
            return tuple(tensor.shape)
    except Exception:
        return None


class LeafTable(dict):
    """id(leaf) -> LeafInfo, for leaves that are alive: an entry whose leaf died (and whose id a
    new tensor may now have) is not answered, and dead entries are let go as the table grows."""

    def __init__(self) -> None:
        super().__init__()
        self._prune_at = 1024

    def of(self, tensor: Any) -> LeafInfo | None:
        info = self.get(id(tensor))
        return info if info is not None and info.ref() is tensor else None

    def add(self, tensor: torch.Tensor, op: str | None, location: Location | None) -> LeafInfo:
        info = self[id(tensor)] = LeafInfo(tensor, op, location)
        if len(self) >= self._prune_at:
            for key in [key for key, entry in self.items() if entry.ref() is None]:
                del self[key]
            self._prune_at = max(1024, 2 * len(self))
        return info

    def alive(self):
        """(id, info) of the leaves still alive."""
        return [(key, info) for key, info in self.items() if info.ref() is not None]


class Cut:
    """A tensor with a graph whose gradient path was cut: ``.detach()``, ``.data``, or use under no_grad."""

    __slots__ = ("node", "how", "location")

    def __init__(self, node: Any, how: str, location: Location | None) -> None:
        self.node = node
        self.how = how
        self.location = location


class IntLog:
    """An append-only list of ints, cheap to append to (a list) and compact when long (an array
    of 8-byte ints: a Python int in a list costs 36 bytes). ``compact`` moves the list's items into
    the array; ``append`` stays the list's own bound method throughout."""

    __slots__ = ("old", "recent", "append")

    def __init__(self) -> None:
        self.old = array("q")
        self.recent: list[int] = []
        self.append = self.recent.append

    def compact(self) -> None:
        self.old.extend(self.recent)
        self.recent.clear()

    def __len__(self) -> int:
        return len(self.old) + len(self.recent)

    def __getitem__(self, k: int) -> int:
        old = len(self.old)
        return self.old[k] if k < old else self.recent[k - old]

    def __iter__(self):
        yield from self.old
        yield from self.recent

    def bisect(self, value: int) -> int:
        """The number of items <= ``value`` (the items ascend)."""
        recent = self.recent
        if recent and value >= recent[0]:
            return len(self.old) + bisect_right(recent, value)
        return bisect_right(self.old, value)


COMPACT_AT = 1 << 14  # log entries kept as Python ints before they move into arrays


class ForwardLog:
    """Flat logs of what the forward side saw, in sequence-number order; read by the trace's build."""

    __slots__ = ("thread", "first_seq", "end_seq", "op_start", "op_end", "op_func", "line_seq", "line_code",
                 "line_no", "module_seq", "module_event", "bindings", "depth", "last_code", "last_line", "output_seq")

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.first_seq = sequence_nr()
        self.end_seq: int | None = None
        self.op_start = IntLog()
        self.op_end = IntLog()
        self.op_func: list[Any] = []
        self.line_seq = IntLog()
        self.line_code: list[Any] = []
        self.line_no = IntLog()
        self.module_seq = IntLog()
        self.module_event: list[Any] = []  # the module entered, or None where the innermost one returned
        self.bindings: dict[int, list[tuple[int, str, Location | None]]] = {}  # node seq -> (output, name, line)
        self.depth = 0  # module calls open on the recording thread
        self.last_code: Any = None  # the line marked last
        self.last_line = -1
        self.output_seq: dict[int, int] = {}  # a call that made several nodes -> its output's, where not the last

    def mark(self, code: Any, line: int, seq: int) -> None:
        """Note that ops from ``seq`` on come from ``line`` of ``code`` (where that changed)."""
        if code is not self.last_code or line != self.last_line:
            self.last_code, self.last_line = code, line
            self.line_seq.append(seq)
            self.line_code.append(code)
            self.line_no.append(line)

    def mark_user_frame(self, frame: Any, seq: int) -> None:
        """Mark the line of the nearest user frame at or above ``frame``."""
        while frame is not None and _is_internal(frame.f_code):
            frame = frame.f_back
        if frame is not None:
            self.mark(frame.f_code, frame.f_lineno, seq)

    def enter_module(self, module: Any, frame: Any) -> None:
        """A module call begins: note it, and the user's line that made it (where the caller is the
        user's code, or this is the outermost call: a module called by torch's own code inside
        another module keeps that module's line)."""
        seq = sequence_nr()
        self.depth += 1
        self.module_seq.append(seq)
        self.module_event.append(module)
        while frame is not None and frame.f_code in _MODULE_CALL_CODES:
            frame = frame.f_back
        if frame is None:
            return
        if not _is_internal(frame.f_code):
            self.mark(frame.f_code, frame.f_lineno, seq)
        elif self.depth == 1:
            self.mark_user_frame(frame, seq)

    def leave_module(self) -> None:
        self.depth -= 1
        self.module_seq.append(sequence_nr())
        self.module_event.append(None)

    def close(self) -> None:
        if self.end_seq is None:
            self.end_seq = sequence_nr()
        self.compact()

    def compact(self) -> None:
        """Move long logs' ints into arrays (called between backward passes, off the per-op path)."""
        for log in (self.op_start, self.op_end, self.line_seq, self.line_no, self.module_seq):
            if len(log.recent) >= COMPACT_AT or self.end_seq is not None:
                log.compact()

    def made_here(self, seq: int) -> bool:
        end = self.end_seq if self.end_seq is not None else sequence_nr()
        return self.first_seq <= seq < end

    # -- attribution, at build time ------------------------------------------------------
    def op_at(self, seq: int) -> tuple[Any, bool] | None:
        """The torch call that created node ``seq``, and whether the node was the last it created."""
        k = self.op_start.bisect(seq) - 1
        if k >= 0 and seq < self.op_end[k]:
            last = self.op_end[k] - 1
            if self.output_seq:
                last = self.output_seq.get(self.op_start[k], last)
            return self.op_func[k], seq == last
        return None

    def note_output(self, start: int, end: int, out: Any) -> None:
        """A call made several nodes: where its output's node is not the last of them (``v + 1``
        on a view changed in place makes the add's node, then regenerates the view's), note it."""
        if isinstance(out, (tuple, list)):
            out = next((item for item in out if tensor_class(item)), None)
        if not tensor_class(out):
            return
        try:
            with _no_subclass():
                node = out.grad_fn
            seq = node._sequence_nr() if node is not None else None
        except Exception:
            return
        if seq is not None and start <= seq < end - 1:
            self.output_seq[start] = seq

    def location_at(self, seq: int) -> Location | None:
        k = self.line_seq.bisect(seq) - 1
        if k < 0:
            return None
        return self.line_code[k].co_filename, self.line_no[k]

    def module_calls(self) -> tuple[list[int], list[tuple[tuple[Any, int], ...]]]:
        """Segment starts and, for each segment, the stack of (module, call index) open in it.

        A call index counts the module's calls within this log (0-based), so a module called three
        times gives three distinct calls.
        """
        starts: list[int] = []
        stacks: list[tuple[tuple[Any, int], ...]] = []
        stack: list[tuple[Any, int]] = []
        counts: dict[int, int] = {}
        for seq, module in zip(self.module_seq, self.module_event):
            if module is None:
                if stack:
                    stack.pop()
            else:
                index = counts.get(id(module), 0)
                counts[id(module)] = index + 1
                stack.append((module, index))
            if starts and starts[-1] == seq:
                stacks[-1] = tuple(stack)
            else:
                starts.append(seq)
                stacks.append(tuple(stack))
        return starts, stacks


class RecordingMode(TorchFunctionMode):
    """Notes, for every torch call that creates autograd nodes, their sequence-number range and line.

    Inside torch.func transforms and while torch.compile traces, calls pass through untouched:
    Dynamo would otherwise trace this mode's bookkeeping into the compiled graph.
    """

    def __init__(self, recorder: Any) -> None:
        super().__init__()
        self.recorder = recorder
        self._ledger = recorder.ledger
        log = recorder.log
        self._op_start = log.op_start.append
        self._op_end = log.op_end.append
        self._op_func = log.op_func.append
        self._log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if _is_compiling():  # Dynamo traces this method: no side effects of ours may get into its graph
            return func(*args, **kwargs) if kwargs else func(*args)
        if _peek_transform() is not None:
            self.recorder.note_untraced()
            return func(*args, **kwargs) if kwargs else func(*args)
        recorder = self.recorder
        ledger = self._ledger
        if ledger.watched and (writes_in_place(func) or (kwargs and ("out" in kwargs or kwargs.get("inplace")))):
            # what an op writes: its first argument (t.mul_(c), torch._foreach_mul_(grads, c),
            # F.relu(t, inplace=True)), or out=
            ledger.before_in_place(kwargs["out"] if kwargs and "out" in kwargs else args[0] if args else None)
        start = sequence_nr()
        out = func(*args, **kwargs) if kwargs else func(*args)
        end = sequence_nr()
        if end != start:
            log = self._log
            frame = sys._getframe(1)
            code = frame.f_code
            if code is not log.last_code or frame.f_lineno != log.last_line:
                if not _is_internal(code):
                    log.mark(code, frame.f_lineno, start)
                elif not log.depth:  # inside a module call, its entry marked the user's line
                    log.mark_user_frame(frame, start)
            self._op_start(start)
            self._op_end(end)
            self._op_func(func)
            if end - start > 1:
                log.note_output(start, end, out)
        else:
            recorder.no_node(func, out, args)
        return out


def find_mode_on_stack(mode: TorchFunctionMode) -> int | None:
    """The position of ``mode`` on this thread's torch function mode stack (0 is the bottom)."""
    for i in range(torch._C._len_torch_function_stack()):
        if torch._C._get_function_stack_at(i) is mode:
            return i
    return None


def remove_mode(mode: TorchFunctionMode) -> bool:
    """Take ``mode`` off the stack by identity, leaving modes above it (a user's, left open) in place."""
    position = find_mode_on_stack(mode)
    if position is None:
        return False
    from torch.overrides import _pop_mode, _push_mode

    above = []
    while torch._C._len_torch_function_stack() - 1 > position:
        above.append(_pop_mode())
    popped = _pop_mode()
    for other in reversed(above):
        _push_mode(other)
    if popped is not mode:  # cannot happen; put it back rather than lose a user's mode
        _push_mode(popped)
        return False
    return True


def tensor_class(value: Any) -> bool:
    """Whether ``value`` is a tensor, without touching ``value.__class__`` (which user objects may override)."""
    return issubclass(type(value), torch.Tensor)
