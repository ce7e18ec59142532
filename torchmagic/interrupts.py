"""Ctrl-C while traced code runs is raised on the user's own lines, not inside torch's or torchmagic's internals.

Python raises KeyboardInterrupt wherever the main thread happens to be when the signal is
handled. Two places are harmful while a trace records: a weakref callback (the garbage
collector, which recording makes busy, runs them; Python prints "Exception ignored in ..."
and drops the interrupt, so the loop runs on), and torch's or torchmagic's own frames (an
interrupt between torch popping and pushing back a function mode leaves the mode stack
damaged, and IPython cannot format a frame stopped on an instruction without a line number).
``InterruptDeferral`` holds such an interrupt back and raises it at the next point outside
them. Nothing here imports IPython.
"""

from __future__ import annotations

import _thread
import _weakrefset
import os
import signal
import sysconfig
import threading
import time
import weakref
from types import FrameType
from typing import Any

import torch

_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)
_CALLBACK_FILES = frozenset(os.path.abspath(module.__file__) for module in (weakref, _weakrefset))
_STDLIB_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[key]) + os.sep for key in ("stdlib", "platstdlib")})


def _is_stdlib(filename: str) -> bool:
    """The standard library (``contextlib``, ``threading``...): its frames act for whoever called them."""
    if filename.startswith("<frozen "):
        return True
    return filename.startswith(_STDLIB_DIRS) and "-packages" + os.sep not in filename


def _where(frame: FrameType | None) -> str:
    """Where an exception raised in ``frame`` would land.

    "callback" when a weakref callback or ``__del__`` is anywhere on the stack (the exception
    would be dropped at its boundary); else "internal" when the innermost frame outside the
    standard library is torch's or torchmagic's (torch pops and pushes function modes inside
    ``contextlib`` helpers); else "user".
    """
    innermost = None
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        if code.co_name == "__del__" or os.path.abspath(filename) in _CALLBACK_FILES:
            return "callback"
        if innermost is None and not _is_stdlib(filename):
            innermost = "internal" if filename.startswith(_INTERNAL_DIRS) else "user"
        frame = frame.f_back
    return innermost or "user"


class InterruptDeferral:
    """A SIGINT handler for the time a recording is active: ``install()`` then ``restore()``.

    An interrupt that lands in a weakref callback or ``__del__`` waits for the next frame
    outside them; one that lands in torch's or torchmagic's code waits for the user's code,
    at most ``patience`` seconds (a blocking call inside torch must stay interruptible). Then
    the handler that was installed before runs, as if the signal had arrived there. While
    an interrupt is held back, a helper thread asks again every millisecond
    (``_thread.interrupt_main``); nothing runs while none is.
    """

    def __init__(self, patience: float = 0.5) -> None:
        self.patience = patience
        self._previous: Any = None
        self._pending_since: float | None = None
        self._active = False
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None
        self._handling = False  # the handler itself can be interrupted (starting the helper thread waits)

    def install(self) -> bool:
        """Take over SIGINT (main thread only, and only from a Python handler); True if it did."""
        if self._active or threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):  # SIG_IGN, SIG_DFL or a handler not set from Python: leave it alone
            return False
        self._previous = previous
        self._pending_since = None
        self._active = True
        signal.signal(signal.SIGINT, self._handle)
        return True

    def restore(self) -> None:
        """Give SIGINT back; an interrupt still held back is dropped (the traced code is over).

        ``signal.signal`` runs pending handlers before it switches, so a re-requested interrupt
        reaches ``_handle`` here, sees the deferral inactive and is dropped.
        """
        if not self._active:
            return
        with self._lock:  # the helper thread asks again only while active
            self._active = False
            self._pending_since = None
        if signal.getsignal(signal.SIGINT) == self._handle:  # the user's code may have set its own
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._active or self._handling:
            return  # a nested call: the helper thread asks again
        self._handling = True
        try:
            where = _where(frame)
            now = time.monotonic()
            if self._pending_since is None:
                self._pending_since = now
            if where == "callback" or (where == "internal" and now - self._pending_since < self.patience):
                # Asking again from here would be handled at once, inside this very handler: a thread asks.
                if self._watcher is None or not self._watcher.is_alive():
                    self._watcher = threading.Thread(target=self._ask_again, name="torchmagic-interrupt",
                                                     daemon=True)
                    self._watcher.start()
                return
            self._pending_since = None
        finally:
            self._handling = False
        # Ctrl-C during a trace: raised here, once your code runs (the frame above), not inside torch or torchmagic
        self._previous(signum, frame)

    def _ask_again(self) -> None:
        while True:
            time.sleep(0.001)
            with self._lock:
                if not self._active or self._pending_since is None:
                    return
                _thread.interrupt_main(signal.SIGINT)
