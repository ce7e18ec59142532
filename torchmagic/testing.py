"""The pytest plugin: ``torchmagic_shell``, a real IPython shell with torchmagic loaded, for tests."""

from __future__ import annotations

import atexit
import textwrap
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import pytest
import torch
from torch.nn.modules import module as nn_module

import torchmagic

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from .trace import Trace


def torch_state() -> dict[str, Any]:
    """What a shell must leave as it found it: torch function modes, default device, global hooks, grad mode."""
    return {
        "torch function modes on the stack": torch._C._len_torch_function_stack(),
        "default device": torch.get_default_device(),
        "global module forward pre-hooks": len(nn_module._global_forward_pre_hooks),
        "global module forward hooks": len(nn_module._global_forward_hooks),
        "grad mode": torch.is_grad_enabled(),
    }


class TorchmagicShell:
    """An IPython ``InteractiveShell`` for tests: torchmagic loaded, displays captured, cell errors raised.

    ``run(cell)`` runs a cell as a user would type it (history on, so traces say ``In [N]``)
    and raises the cell's own exception if it fails; ``trace(cell)`` runs it under
    ``%%autograd_trace`` and returns the ``Trace``. Displays are captured as ``outputs`` and
    ``displayed()``; ``formats`` are the MIME types asked for (a terminal's ``text/plain``
    by default, so no diagram is laid out; ``None`` for all). ``close()`` unloads the
    extension, drops the shell and checks that no torch state was left behind. The shell
    becomes IPython's current one while open (``get_ipython()``, ``display()``); one that
    was current before (a kernel running the tests) is put back on close.
    """

    def __init__(self, *, load_extension: bool = True, formats: Sequence[str] | None = ("text/plain",),
                 capture_displays: bool = True, config: Config | None = None) -> None:
        self.load_extension = load_extension
        self.formats = None if formats is None else list(formats)
        self.capture_displays = capture_displays
        self.config = config
        self.outputs: list[dict[str, Any]] = []
        self._ip: InteractiveShell | None = None
        self._saved_singletons: list[tuple[type, Any]] = []
        self._saved_history: list[Any] = []
        self._saved_conversion: Any = None
        self._torch_before: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> TorchmagicShell:
        from IPython.core.displaypub import CapturingDisplayPublisher
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        self._torch_before = torch_state()
        self._saved_history = list(torchmagic._history)
        self._saved_conversion = torchmagic._last_conversion
        self._saved_singletons = _detach_current_shell()
        config = Config()
        config.HistoryManager.hist_file = ":memory:"  # no file, no saving thread
        if self.config is not None:
            config.merge(self.config)
        ip = InteractiveShell.instance(config=config)
        self._ip = ip
        if self.capture_displays:
            ip.display_pub = CapturingDisplayPublisher(shell=ip)
        if self.formats is not None:
            ip.display_formatter.active_types = list(self.formats)
        ip.run_line_magic("colors", "nocolor")  # tracebacks as plain text in the test's output
        if self.load_extension:  # not as a cell: the test's first cell is In [1]
            ip.extension_manager.load_extension("torchmagic")
        return self

    def close(self) -> None:
        """Unload the extension, drop the shell, put back IPython's previous shell; fail on leaked torch state."""
        ip, self._ip = self._ip, None
        if ip is None:
            return
        from IPython.core.interactiveshell import InteractiveShell

        try:
            if "torchmagic" in ip.extension_manager.loaded:
                ip.extension_manager.unload_extension("torchmagic")
        finally:
            ip.atexit_operations()  # empties the namespace, closes the history
            atexit.unregister(ip.atexit_operations)  # else atexit keeps every shell alive
            InteractiveShell.clear_instance()
            for cls, instance in self._saved_singletons:
                cls._instance = instance
            torchmagic._history[:] = self._saved_history
            torchmagic._last_conversion = self._saved_conversion
        # grad mode is put back quietly (a cell that switches it off does not mean it for the next test)
        if torch.is_grad_enabled() != self._torch_before["grad mode"]:
            torch.set_grad_enabled(self._torch_before["grad mode"])
        after = torch_state()
        leaked = {key: (self._torch_before[key], value) for key, value in after.items()
                  if value != self._torch_before[key]}
        if leaked:
            lines = [f"  {key}: {before} before, {now} after" for key, (before, now) in leaked.items()]
            raise AssertionError("the shell left torch state behind:\n" + "\n".join(lines))

    def __enter__(self) -> TorchmagicShell:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- use --------------------------------------------------------------------------------
    @property
    def ip(self) -> InteractiveShell:
        """The IPython shell itself (``run_line_magic``, ``display_formatter``, ``user_ns``...)."""
        if self._ip is None:
            raise RuntimeError("the shell is not running: use start(), a with block, or the torchmagic_shell fixture")
        return self._ip

    @property
    def ns(self) -> dict[str, Any]:
        """The user namespace: what the cells defined."""
        return self.ip.user_ns

    def run(self, cell: str) -> Any:
        """Run ``cell`` as the next input and return its value (what ``Out[N]`` would show), or None.

        The cell is dedented, so it can be written indented inside a test. If it fails, its
        exception is raised here, with the cell's traceback.
        """
        ip = self.ip
        if self.capture_displays:
            ip.display_pub.outputs.clear()
        result = ip.run_cell(_cell_text(cell), store_history=True)
        if self.capture_displays:
            self.outputs = list(ip.display_pub.outputs)
        result.raise_error()
        return result.result

    def trace(self, cell: str, options: str = "") -> Trace:
        """Run ``cell`` under ``%%autograd_trace [options]`` and return its ``Trace``.

        The cell's first line is line 2 of the traced cell (the magic is line 1), as in a notebook.
        """
        before = torchmagic.last_trace()
        self.run(f"%%autograd_trace {options}".rstrip() + "\n" + _cell_text(cell))
        trace = torchmagic.last_trace()
        if trace is None or trace is before:
            raise RuntimeError("%%autograd_trace made no trace: is the torchmagic extension loaded?")
        return trace

    def displayed(self, mime: str = "text/plain") -> list[str]:
        """What the last cell displayed, in the MIME type ``mime``."""
        return [output["data"][mime] for output in self.outputs if mime in output["data"]]


def _detach_current_shell() -> list[tuple[type, Any]]:
    """Unset IPython's current shell (a kernel's, if tests run in one) and return how to put it back."""
    from IPython.core.interactiveshell import InteractiveShell

    if not InteractiveShell.initialized():
        return []
    current = InteractiveShell.instance()
    saved = [(cls, cls.__dict__["_instance"]) for cls in type(current).__mro__ if "_instance" in cls.__dict__]
    type(current).clear_instance()
    return saved


def _cell_text(cell: str) -> str:
    """A cell written inside a test: dedented, without the blank lines around it."""
    return textwrap.dedent(cell).strip("\n").rstrip()


@pytest.fixture
def torchmagic_shell() -> Iterator[TorchmagicShell]:
    """A real IPython shell with torchmagic loaded: ``run(cell)``, ``trace(cell)``, ``ns``, ``outputs``.

    A failing cell raises its exception in the test. Torn down after the test: the extension
    unloaded, the namespace emptied, and an error if torch state was left behind.
    """
    with TorchmagicShell() as shell:
        yield shell
