"""Names for what a trace shows: the user's variables, module paths, source lines."""

from __future__ import annotations

import linecache
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .model import SourceLine

Labeler = Callable[[str], str]

_IPYTHON_INPUT = re.compile(r"<ipython-input-(\d+)-")


def default_cell_label(filename: str) -> str:
    """``In [5]`` for IPython's cell file names, the base name for a script."""
    match = _IPYTHON_INPUT.match(filename)
    if match:
        return f"In [{match.group(1)}]"
    return os.path.basename(filename) or filename


def source_line(location: tuple[str, int] | None, labeler: Labeler | None = None) -> SourceLine | None:
    if location is None:
        return None
    filename, line = location
    text = linecache.getline(filename, line).strip()
    return SourceLine((labeler or default_cell_label)(filename), line, text)


class NamespaceNames:
    """What the user's namespace calls things: tensors, parameters (``model.0.weight``), modules.

    Values are classified by ``type()``, never ``isinstance`` (which reads ``__class__``, and a
    user's object may make that raise); a module whose traversal raises is skipped.
    """

    def __init__(self, namespace: Mapping[str, Any] | None) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.by_id: dict[int, list[str]] = {}
        self.params: dict[int, list[str]] = {}  # every path of a parameter (tied weights have several)
        self.modules: dict[int, str] = {}
        self.module_types: dict[str, str] = {}  # module path -> class name
        if not namespace:
            return
        for name, value in list(namespace.items()):
            if not isinstance(name, str) or name.startswith("_") or name in ("In", "Out"):
                continue  # IPython's output cache (_, _5, Out) and private names
            kind = type(value)
            if issubclass(kind, torch.Tensor):
                self.tensors.append((name, value))
                self.by_id.setdefault(id(value), []).append(name)
            elif issubclass(kind, torch.nn.Module):
                try:
                    self._add_module(name, value)
                except Exception:
                    continue

    def _add_module(self, name: str, module: torch.nn.Module) -> None:
        for path, sub in module.named_modules(prefix=name):
            self.modules.setdefault(id(sub), path)
            self.module_types.setdefault(path, type(sub).__name__)
        for path, param in module.named_parameters(prefix=name, remove_duplicate=False):
            paths = self.params.setdefault(id(param), [])
            if path not in paths:
                paths.append(path)

    def param_name(self, tensor: Any) -> str | None:
        paths = self.params.get(id(tensor))
        return paths[0] if paths else None


def snapshot(namespace: Mapping[str, Any] | None) -> dict[str, Any]:
    """The tensors and modules of a namespace, by name: what a trace names things by, taken when the
    traced code ends (the namespace itself may change before the trace is built)."""
    if not namespace:
        return {}
    out = {}
    for name, value in list(namespace.items()):
        if isinstance(name, str) and issubclass(type(value), (torch.Tensor, torch.nn.Module)):
            out[name] = value
    return out
