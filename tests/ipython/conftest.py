"""An IPython shell fixture that fails loudly: a cell error raises in the test."""

from __future__ import annotations

import atexit
from dataclasses import dataclass, field

import pytest
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config


@dataclass
class Shell:
    ip: InteractiveShell
    outputs: list = field(default_factory=list)

    def run(self, code: str, *, expect_error: type[BaseException] | None = None):
        """Run a cell; return its ExecutionResult. Any error raises unless it is the expected one."""
        self.ip.display_pub.outputs.clear()
        result = self.ip.run_cell(code, store_history=True)
        error = result.error_before_exec or result.error_in_exec
        if expect_error is None:
            if error is not None:
                raise AssertionError(f"cell failed: {type(error).__name__}: {error}") from error
        else:
            assert isinstance(error, expect_error), f"expected {expect_error.__name__}, got {error!r}"
        self.outputs = list(self.ip.display_pub.outputs)
        return result

    def displayed(self, mime: str = "text/plain") -> list[str]:
        return [o["data"][mime] for o in self.outputs if mime in o["data"]]

    @property
    def ns(self) -> dict:
        return self.ip.user_ns

    @property
    def session(self):
        """The extension's session (None when it is not loaded)."""
        return getattr(self.ip, "_torchmagic_session", None)

    def topic(self, kind: type):
        """The loaded Magics instance of one topic (TraceMagics, TensorMagics, DeviceMagics)."""
        (magics,) = [m for m in self.session.magics if isinstance(m, kind)]
        return magics


@pytest.fixture
def shell():
    InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    ip.display_pub = CapturingDisplayPublisher()
    ip.run_line_magic("colors", "nocolor")
    ip.run_cell("%load_ext torchmagic")
    try:
        yield Shell(ip)
    finally:
        ip.run_cell("%unload_ext torchmagic")
        ip.reset()
        InteractiveShell.clear_instance()
        atexit.unregister(ip.atexit_operations)  # each shell would reset itself again at exit (seconds, for nothing)
