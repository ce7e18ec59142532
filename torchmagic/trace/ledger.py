"""The ledger of a recording's leaf gradients: each leaf's gradient accumulated into ``.grad`` as
AccumulateGrad would, kept without a copy where ``.grad`` is that very tensor (and copied before
anything writes to it in place), its norm per pass, and ``.grad`` as the code left it where that
differs from what the last pass gave."""

from __future__ import annotations

import sys
import weakref
from array import array
from collections.abc import Sequence
from typing import Any

import torch

from . import backward as bw
from .stats import PendingSummary, floats_of, norms_of

_no_subclass = torch._C.DisableTorchFunctionSubclass

def _grad_of(leaf: torch.Tensor) -> Any:
    """``leaf.grad``, not through a subclass's ``__torch_function__`` (and without the cost of the
    context that avoids it, for plain tensors and parameters)."""
    if type(leaf) in bw._PLAIN:
        return leaf.grad
    with _no_subclass():
        return leaf.grad


class NormHistory:
    """One leaf's gradient norm, pass by pass, as ``(pass index, norm)`` items kept in flat arrays.
    A norm not taken yet is ``None``; one taken but not read back yet (a 0-dim tensor, read back
    with others in one go) waits in ``pending``."""

    __slots__ = ("passes", "values", "pending")

    def __init__(self) -> None:
        self.passes = array("q")
        self.values = array("d")
        self.pending: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.passes)

    def __getitem__(self, k: int) -> tuple[int, Any]:
        if k < 0:
            k += len(self.passes)
        pending = self.pending
        return self.passes[k], (pending[k] if k in pending else self.values[k])

    def __iter__(self):
        return (self[k] for k in range(len(self.passes)))

    def open(self, index: int) -> None:
        """Pass ``index`` reached this leaf (its norm to come)."""
        if not self.passes or self.passes[-1] != index:
            self.passes.append(index)
            self.values.append(float("nan"))
            self.pending[len(self.passes) - 1] = None

    def set(self, k: int, norm: Any) -> None:
        if isinstance(norm, float):
            self.values[k] = norm
            self.pending.pop(k, None)
        else:
            self.pending[k] = norm


READ_BACK_EVERY = 1024  # norms (0-dim tensors, maybe on a GPU) read back to floats in one go


def requires_grad_of(leaf: torch.Tensor) -> bool:
    """``leaf.requires_grad``, not through a subclass's ``__torch_function__``."""
    if type(leaf) in bw._PLAIN:
        return leaf.requires_grad
    with _no_subclass():
        return leaf.requires_grad


def _is_meta(tensor: Any) -> bool:
    try:
        with _no_subclass():
            return bool(tensor.is_meta)
    except Exception:
        return False


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage a strided tensor can touch: [start, end)."""
    size = tensor.element_size()
    start = tensor.storage_offset() * size
    if tensor.numel() == 0:
        return start, start
    reach = sum((n - 1) * abs(stride) for n, stride in zip(tensor.shape, tensor.stride()))
    return start, start + (reach + 1) * size


def _overlaps(value: torch.Tensor, others: list[torch.Tensor]) -> bool:
    start, end = _span(value)
    return any(start < other_end and other_start < end for other_start, other_end in map(_span, others))


def _equal(shown: Any, now: torch.Tensor) -> bool:
    if not isinstance(shown, torch.Tensor):
        return False
    try:
        with _no_subclass():
            return (shown.shape == now.shape and shown.dtype == now.dtype and shown.device == now.device
                    and shown.layout == now.layout == torch.strided and not now.is_meta and torch.equal(shown, now))
    except Exception:
        return False


class LeafLedger:
    """What a recording knows of each leaf's gradient, pass by pass (``passes`` is the recorder's list)."""

    def __init__(self, passes: list[bw.PassRecord], small_values: int) -> None:
        self.passes = passes
        self.small_values = small_values
        self.history: dict[int, tuple[weakref.ref, NormHistory]] = {}  # id(leaf) -> (leaf, its norms)
        self.final: dict[int, tuple[Any, int | None, str | None]] = {}  # id(leaf) -> (summary, version, note)
        self.shared: set[int] = set()  # data pointers of leaves' .grad that are also a kept gradient
        self.held: dict[int, weakref.ref] = {}  # address -> a kept gradient the code holds too (autograd.grad's)
        self.watched: dict[int, weakref.ref] = {}  # data pointer of a leaf's .grad -> the leaf, for in-place writes
        self.changed_in_place: set[int] = set()  # id(leaf) whose .grad an op changed in place after a pass
        self.summed: dict[int, int] = {}  # id(leaf) -> how many passes its current .grad adds up
        self._counted: dict[int, int] = {}  # id(leaf) -> the pass last counted in summed
        self._unread: list[tuple[NormHistory, int]] = []  # norms taken, not read back yet
        self._prune_at = 1024

    def clear(self) -> None:
        for store in (self.history, self.final, self.shared, self.held, self.watched, self.changed_in_place, self.summed,
                      self._counted,
                      self._unread):
            store.clear()

    def stop_watching(self) -> None:
        """The recording is over: writes are no longer seen (a later change shows as a version change)."""
        self.shared.clear()
        self.held.clear()
        self.watched.clear()

    def release(self, record: bw.PassRecord) -> None:
        """A pass is let go (a later one from the same line replaces it): its norms now, while its
        gradients are still those it computed."""
        self.norms(record)
        if self.shared:
            for edge in record.versions:
                grad = record.gradient(edge)
                if isinstance(grad, torch.Tensor):
                    self.shared.discard(grad.data_ptr())
                    self.held.pop(grad.data_ptr(), None)

    # -- in-place writes to gradients we keep ----------------------------------------------
    def before_in_place(self, written: Any) -> None:
        """An op is about to write ``written`` (a tensor, or a list of them) in place. Where one is a
        leaf's ``.grad`` (clipping, ``zero_()``), note it; where it is memory of a gradient the trace
        keeps, copy that gradient first: the trace keeps what the pass computed."""
        hit: set[int] = set()
        if isinstance(written, (list, tuple)):
            for item in written:
                self._hit(item, hit)
        else:
            self._hit(written, hit)
        if hit:
            shared = hit & self.shared
            if shared:
                self._unshare(shared)

    def _hit(self, value: Any, hit: set[int]) -> None:
        """If ``value`` is (a view of) a watched leaf's ``.grad``: note the change, and add its address."""
        kind = type(value)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            try:
                pointer, base = value.data_ptr(), value._base
            except Exception:  # sparse, meta
                return
        elif issubclass(kind, torch.Tensor):
            try:
                with _no_subclass():
                    pointer, base = value.data_ptr(), value._base
            except Exception:
                return
        else:
            return
        ref = self.watched.get(pointer)
        if ref is None and base is not None:  # a view of .grad (w.grad[1:]) writes into it too
            pointer = base.data_ptr()
            ref = self.watched.get(pointer)
        if ref is None:
            return
        if self.held.get(pointer) is ref:  # a gradient the code was handed (no leaf's .grad): keep a copy
            hit.add(pointer)
            return
        leaf = ref()
        grad = None if leaf is None else leaf.grad if type(leaf) in bw._PLAIN else _grad_of(leaf)
        if grad is not None and grad.data_ptr() == pointer:
            self.changed_in_place.add(id(leaf))
        elif pointer not in self.shared:  # .grad was replaced or freed, and the address may be reused
            del self.watched[pointer]
            return
        hit.add(pointer)  # (a shared address is the trace's own gradient, whoever writes to it)

    def _unshare(self, pointers: set[int]) -> None:
        """Replace every kept gradient sharing memory with the ``.grad`` tensors at ``pointers`` by a
        copy (a copy is the trace's own: no longer shared, no version to watch)."""
        storages = set()
        for record in self.passes:
            for part in (record, *record.inner):
                for _, _, _, grad in part.tensors():
                    try:
                        if grad.data_ptr() in pointers:
                            storages.add(grad.untyped_storage().data_ptr())
                    except Exception:
                        continue
        for record in self.passes:
            for part in (record, *record.inner):
                for container, key, edge, grad in list(part.tensors()):
                    try:
                        if grad.untyped_storage().data_ptr() in storages:
                            container[key] = grad.clone()
                            part.versions.pop(edge, None)
                    except Exception:
                        continue
        self.shared -= pointers
        for pointer in pointers:
            self.held.pop(pointer, None)

    def hold(self, record: bw.PassRecord, edges: Sequence[bw.Edge], tensors: Sequence[Any] | None) -> None:
        """The pass handed ``tensors`` to the code (``autograd.grad``'s results) or took them from it
        (``backward(gradient=v)``), and keeps them for ``edges``: an in-place write by the code
        (``g.mul_(lr)``, clipping once assigned to ``.grad``) gets the trace a copy first, and one
        after the recording shows as a changed version, not as the pass's gradient."""
        for edge, tensor in zip(edges, tensors or ()):
            if type(tensor) is not torch.Tensor:
                continue
            kept = record.gradient(edge)
            if kept is not tensor:
                continue
            try:
                pointer = tensor.data_ptr()
            except Exception:
                continue
            if not pointer:
                continue
            record.versions.setdefault(edge, tensor._version)
            self.shared.add(pointer)
            ref = self.held[pointer] = weakref.ref(tensor)
            self.watched.setdefault(pointer, ref)  # (a leaf's .grad already there stays: it is both)
        if len(self.watched) >= self._prune_at:
            self._prune()

    def before_engine_accumulates(self, leaf_edges: list) -> set[int]:
        """A pass run by the engine itself (hooked node by node) is about to add into these leaves'
        ``.grad`` in place: where an earlier pass's kept gradient is that ``.grad``, copy it first.
        Returns the leaves (ids) that have a ``.grad`` already."""
        pointers, had = set(), set()
        for node, _ in leaf_edges:
            grad = _grad_of(node.variable)
            if grad is None:
                continue
            had.add(id(node.variable))
            try:
                if self.shared and not grad.is_sparse and grad.data_ptr() in self.shared:
                    pointers.add(grad.data_ptr())
            except Exception:
                continue
        if pointers:
            self._unshare(pointers)
        return had

    def engine_accumulated(self, leaves: list, had: set[int], index: int) -> None:
        """The engine added these leaves' gradients into ``.grad`` in pass ``index``: count the passes
        each ``.grad`` sums (a leaf frozen before the pass got nothing: AccumulateGrad drops it)."""
        for leaf, _, _ in leaves:
            if requires_grad_of(leaf):
                self._count(id(leaf), id(leaf) in had, index)

    def _count(self, key: int, had_grad: bool, index: int) -> None:
        """One more pass in the leaf's ``.grad`` (once per pass: reentrant checkpoint's recompute and
        the pass around it both add to a parameter used inside and outside the block)."""
        if self._counted.get(key) == index:
            return
        self._counted[key] = index
        if had_grad:
            self.summed[key] = self.summed.get(key, 1) + 1
        else:
            self.summed[key] = 1
            self.changed_in_place.discard(key)

    # -- a pass's leaves -------------------------------------------------------------------------
    def accumulate(self, record: bw.PassRecord, edges: list, grads: tuple, count: int) -> list:
        """Each leaf's gradient (the first ``count`` edges) into its ``.grad``, by its own
        AccumulateGrad node's rules, as the engine would have."""
        leaves = []
        bases: dict[int, list[torch.Tensor]] = {}  # id(base) -> its views that became a leaf's .grad
        for i in range(count):
            grad = grads[i]
            if grad is None:
                continue
            edge = edges[i]
            node = edge[0]
            leaf = node.variable
            if not requires_grad_of(leaf):  # requires_grad_(False) after the forward: AccumulateGrad drops it
                continue
            old = leaf.grad if type(leaf) in bw._PLAIN else _grad_of(leaf)
            if old is not None and self.shared:
                pointer = old.data_ptr() if not old.is_sparse else 0
                if pointer in self.shared:
                    self._unshare({pointer})  # accumulating into it would change the earlier pass's gradient
            self._count(id(leaf), old is not None, record.index)
            # held by the grads tuple, `grad` and getrefcount's argument; more means a user's hook kept it
            others_hold_it = sys.getrefcount(grad) > 3
            if bw.accumulate_leaf(node, grad, others_hold_it) and grad.data_ptr():  # (a meta tensor has none)
                pointer = grad.data_ptr()
                self.shared.add(pointer)
                self.watched[pointer] = weakref.ref(leaf)
                record.versions[edge] = grad._version
                base = grad._base
                if base is not None:
                    bases.setdefault(id(base), []).append(grad)
            else:
                self.watch(leaf)
            leaves.append((leaf, edge, grad))
        if bases:
            self._share_views(record, edges, grads, count, bases)
        return leaves

    @staticmethod
    def _share_views(record: bw.PassRecord, edges: list, grads: tuple, count: int,
                     bases: dict[int, list[torch.Tensor]]) -> None:
        """A view's backward (``w.t()`` in ``linear``, ``cat``'s slices, a chain of views) hands its
        leaf a view of a gradient the pass computed: once that leaf's ``.grad`` is that memory, every
        kept gradient of the same view family (the base, and its other views) whose bytes overlap
        it is shared too, and is watched like it (copied before an in-place write, its version
        checked when read; a view family shares one version counter, so a slice apart from
        ``.grad`` is left out, or writing to ``.grad`` would seem to change it)."""
        for i in range(count, len(edges)):
            value = grads[i]
            if isinstance(value, torch.Tensor):
                if id(value) in bases:  # the base itself: it holds its views' memory
                    record.versions[edges[i]] = value._version
                    continue
                base = value._base
                stolen = bases.get(id(base)) if base is not None else None
                if stolen:  # another view of that base: only where the bytes overlap
                    pointer = value.data_ptr()
                    if any(pointer == other.data_ptr() for other in stolen) or _overlaps(value, stolen):
                        record.versions[edges[i]] = value._version

    def watch(self, leaf: torch.Tensor) -> None:
        """Note where ``leaf.grad`` lives, so an in-place write to it later is seen."""
        grad = leaf.grad if type(leaf) in bw._PLAIN else _grad_of(leaf)
        try:
            if grad is not None and not grad.is_sparse and grad.data_ptr():
                self.watched[grad.data_ptr()] = weakref.ref(leaf)
        except Exception:
            pass

    def note(self, record: bw.PassRecord, leaves: list) -> None:
        """Note which leaves this pass reached. Their norms are taken when the pass is let go (a later
        pass from the same line replaces it) or when the trace is built, from the kept gradients,
        which the copy-before-write keeps as the pass computed them."""
        if not leaves:
            return
        record.leaf_grads.extend((leaf, edge) for leaf, edge, _ in leaves)
        for leaf, _, _ in leaves:
            entry = self.history.get(id(leaf))
            if entry is None or entry[0]() is not leaf:  # new, or a dead leaf's id reused
                entry = self.history[id(leaf)] = (weakref.ref(leaf), NormHistory())
            entry[1].open(record.index)
        if len(self.history) >= self._prune_at or len(self.watched) >= self._prune_at:
            self._prune()

    def _prune(self) -> None:
        """Let go of leaves that died (a loop making a fresh leaf each step) and of addresses no
        ``.grad`` has any more."""
        for key in [key for key, (ref, _) in self.history.items() if ref() is None]:
            del self.history[key]
        for pointer in [p for p, ref in self.watched.items() if p not in self.shared and ref() is None]:
            del self.watched[pointer]
        for pointer in [p for p, ref in self.held.items() if p not in self.shared]:
            del self.held[pointer]
        self._prune_at = max(1024, 2 * max(len(self.history), len(self.watched)))

    def norms(self, record: bw.PassRecord) -> None:
        """Fill in the norms of ``record``'s leaf gradients in ``history`` (NaN where not kept intact)."""
        pairs = [(leaf, edge) for leaf, edge in record.leaf_grads]
        if not pairs:
            return
        values = [record.gradient(edge) if record.intact(edge) else None for _, edge in pairs]
        present = [i for i, value in enumerate(values) if value is not None]
        norms = norms_of([values[i] for i in present])
        by_leaf = {id(pairs[i][0]): norm for i, norm in zip(present, norms)}
        for leaf, _ in pairs:
            entry = self.history.get(id(leaf))
            if entry is None:
                continue
            history = entry[1]
            for k in range(len(history) - 1, -1, -1):  # the pass's entry is at or near the end
                index, norm = history[k]
                if index < record.index:
                    break
                if index == record.index and norm is None:
                    norm = by_leaf.get(id(leaf), float("nan"))
                    history.set(k, norm)
                    if not isinstance(norm, float):
                        self._unread.append((history, k))
        if len(self._unread) >= READ_BACK_EVERY:
            self.read_back()

    def read_back(self) -> None:
        """The norms taken so far, as floats (one read back per device, not one per norm)."""
        unread, self._unread = self._unread, []
        try:
            values = floats_of([history.pending[k] for history, k in unread])
        except Exception:
            values = [float("nan")] * len(unread)
        for (history, k), value in zip(unread, values):
            history.set(k, value)

    @staticmethod
    def _note(passes: int, changed: bool) -> str:
        if passes > 1 and changed:
            return f".grad is the sum over the {passes} passes that reached it, changed in place since " \
                   "(clipped, scaled or zeroed)"
        if passes > 1:
            return f".grad is the sum over the {passes} passes that reached it (PyTorch adds them up)"
        if changed:
            return ".grad was changed in place after the pass (clipped, scaled or zeroed)"
        return ".grad differs from the pass's gradient (changed by code the trace did not see)"

    def snapshot(self) -> None:
        """At the end of the recording: the norms of the passes still kept (their gradients are what
        they computed now; code after the recording may change a ``.grad`` they share), and each
        leaf's ``.grad`` as the code left it, where it is not simply the last pass's gradient."""
        for record in self.passes:
            if record.kept:
                self.norms(record)
        self.read_back()
        last_gradient: dict[int, Any] = {}
        split: dict[int, int] = {}  # id(leaf) -> the parts its last pass gave it, where more than one
        backward = {record.index for record in self.passes if record.entry == "backward"}  # (.grad: not autograd.grad)
        for record in self.passes:
            if not record.kept or record.index not in backward:
                continue
            parts: dict[int, int] = {}
            for leaf, edge in record.leaf_grads:
                last_gradient[id(leaf)] = (record, edge)
                parts[id(leaf)] = parts.get(id(leaf), 0) + 1
            for key, count in parts.items():
                if count > 1:  # (a leaf used inside and outside a reentrant checkpoint: two parts)
                    split[key] = count
        for key, (ref, history) in self.history.items():
            leaf = ref()
            if leaf is None:
                continue
            passes = {index for index, _ in history if index in backward}
            if not passes:
                continue  # only autograd.grad reached it: .grad is none of the trace's business
            now = _grad_of(leaf)
            found = last_gradient.get(key)
            shown = None
            if found is not None:
                shown = found[0].gradient(found[1])
            if now is None:
                self.final[key] = (None, None, ".grad is None now (set to None after the last pass, e.g. "
                                                      "zero_grad())")
                continue
            if shown is now and found[1] in found[0].versions and found[0].versions[found[1]] == now._version:
                continue  # .grad is the very tensor the last pass gave, unchanged
            if _equal(shown, now):
                continue  # .grad holds what the last pass gave (zeroed, then accumulated once)
            if _is_meta(now) and self.summed.get(key, len(passes)) <= 1 and key not in self.changed_in_place:
                continue  # no values to compare, and nothing seen that would make it differ
            note = self._note(self.summed.get(key, len(passes)), key in self.changed_in_place)
            if key in split and self.summed.get(key, len(passes)) <= 1 and key not in self.changed_in_place:
                note = (f".grad is the sum of the {split[key]} parts the pass gave it (inside and outside a "
                        "reentrant checkpoint's recompute); the gradient shown is one of them")
            try:
                summary = PendingSummary(now, self.small_values)
            except Exception:
                continue
            self.final[key] = (summary, now._version, note)
