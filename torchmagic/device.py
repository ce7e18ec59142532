"""Parse and validate device specs, apply a default device, describe devices, move objects.

Nothing here imports IPython.
"""

from __future__ import annotations

import contextlib
import html
import os
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .display import TextAndHtml
from .errors import DeviceError

SPECS = ("cpu", "cuda", "cuda:N", "mps", "meta", "auto")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def available_devices() -> list[str]:
    """Devices this machine can use now, best first after the CPU: ``['cpu', 'cuda:0', 'meta']``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        devices.append("mps")
    devices.append("meta")
    return devices


def parse_device(spec: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``meta`` or ``auto`` (cuda, then mps, then cpu).

    Raises DeviceError, naming the devices that are available, for an unknown spec or one
    this machine does not have.
    """
    text = spec.strip().lower()
    available = ", ".join(available_devices())
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {spec!r}; use one of {', '.join(SPECS)} (available here: {available})") from None
    if device.type not in ("cpu", "cuda", "mps", "meta"):
        raise DeviceError(f"unsupported device {spec!r}; use one of {', '.join(SPECS)} (available here: {available})")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"CUDA is not available on this machine (available here: {available})")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"there is no {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(available here: {available})")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise DeviceError(f"MPS is not available on this machine (available here: {available})")
    if device.type == "cpu" and device.index not in (None, 0):
        raise DeviceError(f"there is no {spec!r} (available here: {available})")
    return device


def global_default() -> torch.device | None:
    """The session-wide default set by ``torch.set_default_device`` (None: torch's own CPU default)."""
    context = getattr(getattr(torch, "_GLOBAL_DEVICE_CONTEXT", None), "device_context", None)
    return None if context is None else context.device


def set_default_device(device: torch.device | str | None) -> torch.device | None:
    """Make ``device`` the default for new tensors; returns the previous setting for restoring.

    The CPU is set as ``None``: torch then needs no mode on its stack (and adds no per-call cost).
    """
    previous = global_default()
    if device is not None and torch.device(device) == torch.device("cpu"):
        device = None
    torch.set_default_device(device)
    return previous


@contextlib.contextmanager
def default_device(device: torch.device | str) -> Iterator[torch.device]:
    """The default device inside the block; the previous one restored after it, also on error."""
    previous = set_default_device(device)
    try:
        yield torch.get_default_device()
    finally:
        torch.set_default_device(previous)


# -- describing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    total_bytes: int
    free_bytes: int | None
    capability: tuple[int, int]


@dataclass(frozen=True, repr=False)  # repr is the text view
class DeviceReport(TextAndHtml):
    """What ``%device`` shows: the default, versions, the CPU, CUDA devices, MPS."""

    default: str
    torch_version: str
    cuda_version: str | None
    cpu_threads: int
    cpu_count: int | None
    cuda: tuple[CudaDevice, ...]
    mps: bool

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            ("default device", self.default),
            ("torch", self.torch_version + (f" (CUDA {self.cuda_version})" if self.cuda_version else " (no CUDA build)")),
            ("cpu", f"{self.cpu_threads} threads ({self.cpu_count} cores)"),
        ]
        if self.cuda:
            for d in self.cuda:
                free = f", {_gib(d.free_bytes)} free" if d.free_bytes is not None else ""
                rows.append((f"cuda:{d.index}", f"{d.name}, {_gib(d.total_bytes)} total{free}, "
                                                 f"compute capability {d.capability[0]}.{d.capability[1]}"))
        else:
            rows.append(("cuda", "no CUDA device available: tensors stay on the CPU"))
        rows.append(("mps", "available" if self.mps else "not available"))
        rows.append(("meta", "available (shapes and dtypes only, no data)"))
        return rows

    def text(self) -> str:
        width = max(len(key) for key, _ in self.rows())
        return "\n".join(f"{key.ljust(width)}  {value}" for key, value in self.rows())

    def html(self) -> str:
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{html.escape(v)}</td></tr>" for k, v in self.rows())
        return f"<table class='torchmagic-devices'>{body}</table>"



def _gib(value: int) -> str:
    return f"{value / 2**30:.1f} GiB"


def describe() -> DeviceReport:
    cuda = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            try:
                free, _ = torch.cuda.mem_get_info(index)
            except RuntimeError:
                free = None
            cuda.append(CudaDevice(index, props.name, props.total_memory, free, (props.major, props.minor)))
    return DeviceReport(
        default=str(torch.get_default_device()),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        cpu_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        cuda=tuple(cuda),
        mps=_mps_available(),
    )


# -- moving ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Moved:
    name: str
    kind: str  # "tensor", "module", "optimizer state"
    nbytes: int
    source: str
    target: str


@dataclass
class MoveReport:
    """Which names moved where, and which could not (each wholly on its old device)."""

    target: str
    moved: list[Moved] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why it was left alone)

    def text(self) -> str:
        lines = [f"moved to {self.target}:" if self.moved else f"nothing moved to {self.target}"]
        for m in self.moved:
            lines.append(f"  {m.name:<20} {m.kind:<16} {_size(m.nbytes):>10}  {m.source} -> {m.target}")
        if self.failed:
            lines.append("not moved (still wholly on the old device):")
            lines += [f"  {name:<20} {reason}" for name, reason in self.failed]
        if self.skipped:
            lines.append("left alone:")
            lines += [f"  {name:<20} {reason}" for name, reason in self.skipped]
        if self.target == "meta" and self.moved:
            lines.append("note: meta tensors keep shapes and dtypes only; their values are gone")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return str(nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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


def move_namespace(namespace: MutableMapping[str, Any], device: torch.device | str) -> MoveReport:
    """Move the tensors, modules and optimizer state bound in ``namespace`` to ``device``.

    Each object is moved all or nothing: its new storage is allocated first and swapped in
    only when every part of it is ready, so an error part-way (out of memory, a dtype the
    device lacks) leaves it wholly where it was and is listed with the reason. Modules move
    in place (parameter identity is kept, so optimizers keep working).
    """
    device = torch.device(device)
    report = MoveReport(str(device))
    names = [n for n in list(namespace) if not n.startswith("_") and n not in ("In", "Out")]
    module_params: set[int] = set()
    moved_params: set[int] = set()
    for name in names:
        value = namespace[name]
        if isinstance(value, torch.nn.Module):
            for p in value.parameters():
                module_params.add(id(p))
            try:
                nbytes, source = _move_module(value, device)
            except Exception as error:  # noqa: BLE001 - reported to the user, object untouched
                report.failed.append((name, _reason(error)))
                continue
            moved_params.update(id(p) for p in value.parameters())
            if source is not None:
                report.moved.append(Moved(name, "module", nbytes, source, str(device)))
    for name in names:
        value = namespace[name]
        if isinstance(value, torch.Tensor):
            if id(value) in module_params:
                report.skipped.append((name, "a module parameter: moved with its module"))
                continue
            if value.device == device:
                continue
            try:
                new = _moved_tensor(value, device)
            except Exception as error:  # noqa: BLE001
                report.failed.append((name, _reason(error)))
                continue
            report.moved.append(Moved(name, "tensor", _nbytes(value), str(value.device), str(device)))
            namespace[name] = new
        elif isinstance(value, torch.optim.Optimizer):
            try:
                nbytes = _move_optimizer_state(value, device, moved_params)
            except Exception as error:  # noqa: BLE001
                report.failed.append((name, _reason(error)))
                continue
            if nbytes:
                report.moved.append(Moved(name, "optimizer state", nbytes, "", str(device)))
    return report


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:200]


def _move_module(module: torch.nn.Module, device: torch.device) -> tuple[int, str | None]:
    """Move parameters, their grads and buffers in place, all or nothing."""
    tensors: list[tuple[Any, str, torch.Tensor]] = []  # (owner, attribute, tensor)
    seen: set[int] = set()
    for owner in module.modules():
        for key, param in owner._parameters.items():
            if param is not None and id(param) not in seen:
                seen.add(id(param))
                tensors.append((owner, key, param))
        for key, buffer in owner._buffers.items():
            if buffer is not None and id(buffer) not in seen:
                seen.add(id(buffer))
                tensors.append((owner, key, buffer))
    pending = [t for _, _, t in tensors if t.device != device]
    if not pending:
        return 0, None
    source = str(pending[0].device)
    # allocate everything first; nothing is changed until all allocations succeeded
    new_data = {id(t): t.detach().to(device) for t in pending}
    new_grads = {id(t): t.grad.to(device) for t in pending if isinstance(t, torch.nn.Parameter) and t.grad is not None}
    swaps = {}
    for t in pending:
        if isinstance(t, torch.nn.Parameter) and not torch._has_compatible_shallow_copy_type(t, new_data[id(t)]):
            # cpu <-> meta: `.data =` refuses; swap the contents so the Parameter object stays the same
            replacement = torch.nn.Parameter(new_data[id(t)], requires_grad=t.requires_grad)
            replacement.grad = new_grads.get(id(t))
            swaps[id(t)] = replacement
    for owner, key, t in tensors:
        if id(t) not in new_data:
            continue
        if id(t) in swaps:
            torch.utils.swap_tensors(t, swaps[id(t)])
        elif isinstance(t, torch.nn.Parameter):
            t.data = new_data[id(t)]
            if id(t) in new_grads:
                t.grad = new_grads[id(t)]
        else:
            owner._buffers[key] = new_data[id(t)]
    return sum(_nbytes(t) for t in new_data.values()), source


def _move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device, params: set[int]) -> int:
    """Move state tensors (momentum buffers and the like) of parameters now on ``device``.

    Scalar ``step`` counters stay where the optimizer keeps them (Adam wants them on the CPU).
    """
    updates: list[tuple[dict, str, torch.Tensor]] = []
    for param, state in optimizer.state.items():
        if param.device != device:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step" and value.device != device:
                updates.append((state, key, value.to(device)))
    for state, key, value in updates:
        state[key] = value
    return sum(_nbytes(v) for _, _, v in updates)


