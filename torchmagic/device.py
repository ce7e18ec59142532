"""Parse and validate device specs, apply a default device, describe devices.

Nothing here imports IPython.
"""

from __future__ import annotations

import contextlib
import html
import os
from collections.abc import Iterator
from dataclasses import dataclass

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
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise DeviceError(f"there is no {spec!r} (available here: {available})")
        return torch.device("cpu")  # (cpu:0 is the CPU: torch compares them unequal)
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
    if device is not None and torch.device(device).type == "cpu":  # (cpu:0 is the CPU too)
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
