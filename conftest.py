"""Runs the IPython sessions in docs/*.md and in the magics' docstrings cell by cell in a real
shell, as ipdoctest collects them (a root conftest: the magics' modules are collected too).

IPython's ipdoctest plugin finds the ``In [N]:`` examples and compares their output, but on
its own it execs each one as plain Python in a shell that never runs a cell: no
``pre_run_cell``/``post_run_cell`` events (which show a ``%%autograd_trace`` cell's trace and
drive ``%autograd_trace on``), and no ``In [N]`` count. ipdoctest asks a global ``_ip`` how
to turn an example into Python; the answer given here is "run it as the next cell of this
file's shell", so each page replays as the terminal session it shows: ``Out[N]:`` values,
displays as text, an exception raised as the cell raised it.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.display_trap import DisplayTrap
from IPython.core.displayhook import DisplayHook

from torchmagic.testing import TorchmagicShell

RUN_CELL = "__run_cell__"


class _ReplayAsCells:
    """What ipdoctest calls ``_ip``: it rewrites each example into a call that runs it as a cell."""

    def __init__(self) -> None:
        self.shell: TorchmagicShell | None = None
        self._idle_ns: dict[str, Any] = {}

    @property
    def user_ns(self) -> dict[str, Any]:  # ipdoctest runs each page's examples in this namespace
        return self.shell.ns if self.shell is not None else self._idle_ns

    @property
    def input_transformer_manager(self) -> _ReplayAsCells:
        return self

    def transform_cell(self, source: str) -> str:
        return f"{RUN_CELL}({source!r})\n"

    def prefilter(self, line: str) -> str:
        return line


_replay = _ReplayAsCells()


class _OutAsWritten(DisplayHook):
    """Prints a cell's value as the pages write it: ``Out[N]:`` on a line of its own before a
    multi-line value, and no prompt before a one-line value (ipdoctest drops ``Out[N]: ``
    from the expected text)."""

    def write_output_prompt(self) -> None:
        pass

    def write_format_data(self, format_dict: dict, md_dict: dict | None = None) -> None:
        text = format_dict.get("text/plain")
        if text is None:
            return
        if "\n" in text:
            text = f"Out[{self.shell.execution_count - 1}]:\n{text}"
        print(text)


def pytest_configure(config: pytest.Config) -> None:
    builtins._ip = _replay  # ipdoctest's parser and items look it up there


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(builtins, "_ip", None) is _replay:
        del builtins._ip


@pytest.fixture
def docs_shell() -> Iterator[TorchmagicShell]:
    """A fresh terminal-like shell for each page: In [1] first, text output printed."""
    with TorchmagicShell(load_extension=False, capture_displays=False) as shell:
        ip = shell.ip
        ip.displayhook = _OutAsWritten(parent=ip, shell=ip, cache_size=ip.cache_size)
        ip.display_trap = DisplayTrap(hook=ip.displayhook)
        _replay.shell = shell
        try:
            yield shell
        finally:
            _replay.shell = None


@pytest.fixture
def ipdoctest_namespace(docs_shell: TorchmagicShell) -> dict[str, Any]:
    """What ipdoctest adds to a page's namespace: the function each example is rewritten to call.

    (ipdoctest sets up no autouse fixture under pytest 8, but it does ask for this one.)
    """

    def run_cell(source: str) -> None:
        docs_shell.run(source)

    docs_shell.ip.user_ns_hidden[RUN_CELL] = run_cell
    return {RUN_CELL: run_cell}
