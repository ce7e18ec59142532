"""Move a namespace's tensors, modules and optimizers to a device, all or nothing.

Every new tensor is allocated first; only when all of them exist are they swapped in, and
a failure while swapping undoes the swaps already made. Modules move in place (their
parameters keep their identity), and an optimizer follows the tensors it optimizes: a
parameter moved in place keeps its entry, a bare tensor replaced by a moved copy is
replaced in ``param_groups`` and its state is moved and re-keyed. Nothing here imports
IPython.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import MoveError


@dataclass(frozen=True)
class Moved:
    name: str
    kind: str  # "tensor", "module", "optimizer state"
    nbytes: int
    source: str
    target: str


@dataclass
class MoveReport:
    """Which names moved where, and which were left alone (with why)."""

    target: str
    moved: list[Moved] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why it was left alone)

    def text(self) -> str:
        lines = [f"moved to {self.target}:" if self.moved else f"nothing moved to {self.target}"]
        for m in self.moved:
            lines.append(f"  {m.name:<20} {m.kind:<16} {_size(m.nbytes):>10}  {m.source} -> {m.target}")
        if self.skipped:
            lines.append("left alone:")
            lines += [f"  {name:<20} {reason}" for name, reason in self.skipped]
        if self.target == "meta" and self.moved:
            lines.append("note: meta tensors keep shapes and dtypes only; their values are gone")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def reason(error: BaseException) -> str:
    """``TypeName: first line of the message``, at most 200 characters."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    return (f"{type(error).__name__}: {first}" if first else type(error).__name__)[:200]


@dataclass
class _Swap:
    """One change to make, and how to take it back."""

    apply: Callable[[], None]
    undo: Callable[[], None]


class _Plan:
    """The new tensors, allocated; the swaps that put them in place; the report they will make true."""

    def __init__(self, device: torch.device, namespace: MutableMapping[str, Any]) -> None:
        self.device = device
        self.namespace = namespace
        self.report = MoveReport(str(device))
        self.swaps: list[_Swap] = []
        self.module_tensors: set[int] = set()  # ids of every module's parameters and buffers
        self.in_place: set[int] = set()  # ids of those that move in place
        self.replaced: dict[int, torch.Tensor] = {}  # id of a bare tensor -> its moved copy

    def commit(self) -> None:
        done: list[_Swap] = []
        try:
            for swap in self.swaps:
                swap.apply()
                done.append(swap)
        except BaseException:
            for swap in reversed(done):
                swap.undo()
            raise


def move_namespace(namespace: MutableMapping[str, Any], device: torch.device | str) -> MoveReport:
    """Move the tensors, modules and optimizer state bound in ``namespace`` to ``device``, all or nothing.

    Raises MoveError (naming the object and the reason) when anything cannot be moved; then
    nothing has changed. Names starting with ``_`` (IPython's output history) are left alone.
    """
    device = torch.device(device)
    values = [(name, value) for name, value in list(namespace.items())
              if not name.startswith("_") and name not in ("In", "Out")]
    plan = _Plan(device, namespace)
    failure = None
    try:
        # modules first (their parameters are not bare tensors), optimizers last (they follow both)
        for kind, step in ((torch.nn.Module, _plan_module), (torch.Tensor, _plan_tensor),
                           (torch.optim.Optimizer, _plan_optimizer)):
            for name, value in values:
                if issubclass(type(value), kind):  # type(), not isinstance: never runs the object's own code
                    try:
                        step(plan, name, value)
                    except Exception as error:
                        failure = f"{name}: {reason(error)}"
                        raise
        for name, value in values:  # tensors inside containers are the user's to move: say so
            if type(value) in (list, tuple, dict) and _holds_tensor(value, plan):
                plan.report.skipped.append((name, f"a {type(value).__name__} holding tensors: --move moves names "
                                                  "bound to tensors, modules and optimizers (move its items yourself)"))
        plan.commit()
        return plan.report
    except Exception as error:
        failure = failure or f"{reason(error)} while swapping in the moved tensors; every swap was undone"
    # Raised here, outside the handler, with the plan dropped: the error kept by IPython for %debug
    # must not keep alive the tensors allocated for the move (on a GPU, that is its memory).
    values = plan = None
    raise MoveError(failure)


def _holds_tensor(value: Any, plan: _Plan, depth: int = 2) -> bool:
    """Whether a list, tuple or dict holds a tensor this move leaves where it is (not a module's, not
    one moved by its name, not on the target already), looking two levels down, 1,000 items at most."""
    items = list(value.values() if type(value) is dict else value)[:1000]
    for item in items:
        if issubclass(type(item), torch.Tensor):
            if (item.device != plan.device and id(item) not in plan.module_tensors and id(item) not in plan.in_place
                    and id(item) not in plan.replaced):
                return True
        elif depth > 1 and type(item) in (list, tuple, dict) and _holds_tensor(item, plan, depth - 1):
            return True
    return False


def _plan_module(plan: _Plan, name: str, module: torch.nn.Module) -> None:
    """Parameters, their grads and buffers, moved in place; parameters keep their identity."""
    tensors: list[tuple[Any, str, torch.Tensor, bool]] = []  # (owner, key, tensor, is a parameter)
    seen: set[int] = set()
    for owner in module.modules():
        for key, param in owner._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                tensors.append((owner, key, param, True))
        for key, buffer in owner._buffers.items():
            if buffer is not None and id(buffer) not in seen:
                seen.add(id(buffer))
                tensors.append((owner, key, buffer, False))
    plan.module_tensors.update(seen)
    pending = [item for item in tensors if item[2].device != plan.device and id(item[2]) not in plan.in_place]
    if not pending:
        return
    source = str(pending[0][2].device)
    nbytes = 0
    for owner, key, tensor, is_param in pending:
        plan.in_place.add(id(tensor))
        new_data = tensor.detach().to(plan.device)
        nbytes += _nbytes(new_data)
        if is_param:
            plan.swaps.append(_parameter_swap(tensor, new_data, plan.device))
        else:
            plan.swaps.append(_buffer_swap(owner, key, tensor, new_data))
    plan.report.moved.append(Moved(name, "module", nbytes, source, str(plan.device)))


def _parameter_swap(param: torch.Tensor, new_data: torch.Tensor, device: torch.device) -> _Swap:
    old_grad = param.grad
    new_grad = None if old_grad is None else old_grad.to(device)
    if torch._has_compatible_shallow_copy_type(param, new_data):
        old_data = param.data

        def apply() -> None:
            param.data = new_data
            param.grad = new_grad

        def undo() -> None:
            param.data = old_data
            param.grad = old_grad

        return _Swap(apply, undo)
    # cpu <-> meta: `.data =` refuses; swap the contents so the Parameter object stays the same
    replacement = torch.nn.Parameter(new_data, requires_grad=param.requires_grad)
    replacement.grad = new_grad

    def swap() -> None:
        torch.utils.swap_tensors(param, replacement)

    return _Swap(swap, swap)


def _buffer_swap(owner: Any, key: str, old: torch.Tensor, new: torch.Tensor) -> _Swap:
    def apply() -> None:
        owner._buffers[key] = new

    def undo() -> None:
        owner._buffers[key] = old

    return _Swap(apply, undo)


def _moved_tensor(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device``; a leaf that requires grad stays a leaf that requires grad."""
    if isinstance(t, torch.nn.Parameter):
        new = torch.nn.Parameter(t.detach().to(device), requires_grad=t.requires_grad)
    elif t.requires_grad and t.grad_fn is None:
        new = t.detach().to(device).requires_grad_(True)
    else:
        new = t.to(device)  # non-leaves keep their graph (the move is differentiable)
    if t.grad_fn is None and t.grad is not None:
        new.grad = t.grad.to(device)
    return new


def _plan_tensor(plan: _Plan, name: str, tensor: torch.Tensor) -> None:
    if id(tensor) in plan.module_tensors:
        plan.report.skipped.append((name, "part of a module: moved with it"))
        return
    if tensor.device == plan.device:
        return
    new = plan.replaced.get(id(tensor))
    if new is None:  # a tensor bound to two names moves once: both names get the same copy
        new = plan.replaced[id(tensor)] = _moved_tensor(tensor, plan.device)
    plan.report.moved.append(Moved(name, "tensor", _nbytes(tensor), str(tensor.device), str(plan.device)))

    namespace = plan.namespace

    def apply() -> None:
        namespace[name] = new

    def undo() -> None:
        namespace[name] = tensor

    plan.swaps.append(_Swap(apply, undo))


def _plan_optimizer(plan: _Plan, name: str, optimizer: torch.optim.Optimizer) -> None:
    """Follow the parameters: moved in place, or replaced by a moved copy; state tensors move along.

    Scalar ``step`` counters stay where the optimizer keeps them (Adam wants them on the CPU).
    A parameter the namespace does not reach stays, and the report says the optimizer now
    spans two devices.
    """
    nbytes = 0
    stranded = 0
    sources: set[str] = set()
    for group in optimizer.param_groups:
        params = group["params"]
        for index, param in enumerate(params):
            new_param = plan.replaced.get(id(param))
            if new_param is None and id(param) not in plan.in_place:
                if param.device != plan.device:
                    stranded += 1
                continue
            state = optimizer.state.get(param)
            new_state = None
            if state is not None:
                new_state = {key: value.to(plan.device) if isinstance(value, torch.Tensor) and key != "step"
                             and value.device != plan.device else value for key, value in state.items()}
                nbytes += sum(_nbytes(value) for key, value in new_state.items()
                              if isinstance(value, torch.Tensor) and value is not state[key])
                sources.update(str(value.device) for key, value in state.items()
                               if isinstance(value, torch.Tensor) and value is not new_state[key])
            new = new_param if new_param is not None else param
            plan.swaps.append(_optimizer_swap(optimizer, params, index, param, new, state, new_state))
    if nbytes:
        plan.report.moved.append(Moved(name, "optimizer state", nbytes, ", ".join(sorted(sources)), str(plan.device)))
    if stranded:
        plan.report.skipped.append((name, f"{stranded} parameter(s) not bound in the namespace stay where they "
                                          "are: the optimizer now spans two devices"))


def _optimizer_swap(optimizer: torch.optim.Optimizer, params: list, index: int, old: torch.Tensor,
                    new: torch.Tensor, old_state: dict | None, new_state: dict | None) -> _Swap:
    def apply() -> None:
        params[index] = new
        if old_state is not None:
            if new is not old:
                del optimizer.state[old]
            optimizer.state[new] = new_state

    def undo() -> None:
        params[index] = old
        if old_state is not None:
            if new is not old:
                optimizer.state.pop(new, None)
            optimizer.state[old] = old_state

    return _Swap(apply, undo)
