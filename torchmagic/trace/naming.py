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
    """What the user's namespace calls things: tensors, parameters (``model.0.weight``), modules."""

    def __init__(self, namespace: Mapping[str, Any] | None) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.by_id: dict[int, list[str]] = {}
        self.params: dict[int, str] = {}
        self.modules: dict[int, str] = {}
        self.module_types: dict[str, str] = {}  # module path -> class name
        if not namespace:
            return
        for name, value in list(namespace.items()):
            if name.startswith("_") or name in ("In", "Out"):
                continue  # IPython's output cache (_, _5, Out) and private names
            if isinstance(value, torch.Tensor):
                self.tensors.append((name, value))
                self.by_id.setdefault(id(value), []).append(name)
            elif isinstance(value, torch.nn.Module):
                for path, module in value.named_modules(prefix=name):
                    self.modules.setdefault(id(module), path)
                    self.module_types.setdefault(path, type(module).__name__)
                for path, param in value.named_parameters(prefix=name):
                    self.params.setdefault(id(param), path)
