"""Ctrl-C during a recording reaches the user's code: never dropped in a weakref callback, never raised inside our frames."""

from __future__ import annotations

import _weakrefset
import os
import signal
import sys
import threading
import time
import traceback
import weakref

import pytest

import torchmagic
from torchmagic.interrupts import InterruptDeferral

# Functions whose code claims to live where the interrupt must not be raised: the frame check
# looks at the code's file name, so these stand in for WeakSet._remove and for our own modules.
_SOURCE = "def land_here(*_, then=None):\n    signal.raise_signal(signal.SIGINT)\n    if then:\n        then()\n"


def _function_in(filename: str):
    namespace = {"signal": signal}
    exec(compile(_SOURCE, filename, "exec"), namespace)
    return namespace["land_here"]


IN_CALLBACK = _function_in(_weakrefset.__file__)
IN_OUR_CODE = _function_in(os.path.join(os.path.dirname(torchmagic.__file__), "recorder_stand_in.py"))


@pytest.fixture
def deferral():
    before = signal.getsignal(signal.SIGINT)
    guard = InterruptDeferral(patience=0.5)
    assert guard.install()
    yield guard
    guard.restore()
    assert signal.getsignal(signal.SIGINT) is before


def _user_loop(seconds: float) -> None:
    """User code: the interrupt is expected to surface in this frame."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


class _Dies:
    pass


def test_without_the_deferral_python_drops_an_interrupt_in_a_weakref_callback(monkeypatch):
    """The failure being prevented, reproduced: "Exception ignored in ...", and the code runs on."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    obj = _Dies()
    ref = weakref.ref(obj, IN_CALLBACK)
    del obj
    _user_loop(0.05)  # reached: no KeyboardInterrupt here
    assert dropped == [KeyboardInterrupt] and ref() is None


def test_an_interrupt_in_a_weakref_callback_is_raised_in_the_users_code(deferral):
    obj = _Dies()
    ref = weakref.ref(obj, IN_CALLBACK)
    with pytest.raises(KeyboardInterrupt) as info:
        del obj
        _user_loop(2.0)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "_user_loop" in frames and "land_here" not in frames and ref() is None


def test_an_interrupt_in_our_code_is_raised_in_the_users_code(deferral):
    with pytest.raises(KeyboardInterrupt) as info:
        IN_OUR_CODE()
        _user_loop(2.0)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-2] == "_user_loop"  # the last frame is the handler raising it


def test_our_code_that_runs_long_is_interrupted_after_the_patience(deferral):
    stand_in = _function_in(os.path.join(os.path.dirname(torchmagic.__file__), "long_stand_in.py"))
    spin = {"time": time}
    exec(compile("def spin(seconds):\n    end = time.monotonic() + seconds\n    while time.monotonic() < end:\n"
                 "        pass\n", stand_in.__code__.co_filename, "exec"), spin)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        stand_in()
        spin["spin"](5.0)
    assert time.monotonic() - started < 3.0


def test_restore_drops_an_interrupt_still_held_back():
    previous = signal.getsignal(signal.SIGINT)
    guard = InterruptDeferral()
    guard.install()
    IN_OUR_CODE(then=guard.restore)  # held back, and the recording ends before any user frame runs
    _user_loop(0.05)  # nothing arrives once the recording is over
    assert signal.getsignal(signal.SIGINT) is previous


def test_a_handler_the_user_installed_meanwhile_is_kept():
    previous = signal.getsignal(signal.SIGINT)
    guard = InterruptDeferral()
    guard.install()

    def users_own(signum, frame):
        pass

    signal.signal(signal.SIGINT, users_own)
    try:
        guard.restore()
        assert signal.getsignal(signal.SIGINT) is users_own
    finally:
        signal.signal(signal.SIGINT, previous)


def test_only_the_main_thread_installs():
    results = []
    thread = threading.Thread(target=lambda: results.append(InterruptDeferral().install()))
    thread.start()
    thread.join()
    assert results == [False]
