"""The IPython layer: ``load`` and ``unload`` put in place, and take away, the options, the session and the magics."""

from __future__ import annotations

from typing import Any

from .device import DeviceMagics
from .options import TorchMagic
from .session import Session
from .tensor import TensorMagics
from .trace import TraceMagics

ATTRIBUTE = "_torchmagic_session"  # where the shell keeps the session (never in the user's namespace)


def load(shell: Any) -> Session:
    """Register the options, the session's events and one Magics class per topic; a second load replaces the first."""
    if getattr(shell, ATTRIBUTE, None) is not None:
        unload(shell)
    options = TorchMagic(parent=shell)  # a refused stored value warns on one line and keeps the default
    shell.configurables.append(options)
    session = Session(shell, options)
    setattr(shell, ATTRIBUTE, session)
    try:
        session.magics = [TensorMagics(shell, session), TraceMagics(shell, session), DeviceMagics(shell, session)]
        for magics in session.magics:
            shell.register_magics(magics)
        session.open()
    except BaseException:
        unload(shell)
        raise
    return session


def unload(shell: Any) -> None:
    """Remove everything ``load`` and the magics installed: events, transformer, binders, modes, device, magics."""
    session = getattr(shell, ATTRIBUTE, None)
    if session is None:
        return
    setattr(shell, ATTRIBUTE, None)
    try:
        session.close()
    finally:
        ours = [session.options, *session.magics]
        for kind in ("line", "cell"):
            registry = shell.magics_manager.magics[kind]
            for name, func in list(registry.items()):
                owner = getattr(func, "__self__", None)
                if any(owner is magics for magics in session.magics):
                    del registry[name]
        for magics in session.magics:
            if shell.magics_manager.registry.get(type(magics).__name__) is magics:
                del shell.magics_manager.registry[type(magics).__name__]
        shell.configurables[:] = [c for c in shell.configurables if not any(c is o for o in ours)]
