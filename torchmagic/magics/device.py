"""``%device``: see the devices, set the default device, move the namespace's data."""

from __future__ import annotations

import sys
from typing import Any

import torch
from IPython.core.error import UsageError
from IPython.core.magic import line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .. import device as devices
from ..errors import TorchMagicError
from ..move import move_namespace
from .session import Session, SessionMagics


@magics_class
class DeviceMagics(SessionMagics):
    """``%device`` and ``%%device``; applies ``TorchMagic.default_device`` at load and puts the old default back at unload."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell, session)
        self._device_at_load = devices.global_default()
        spec = session.options.default_device
        if spec:
            try:
                devices.set_default_device(devices.parse_device(spec))
            except TorchMagicError as error:
                print(f"torchmagic: TorchMagic.default_device not applied: {error}", file=sys.stderr)

    def close(self) -> None:
        if devices.global_default() != self._device_at_load:
            torch.set_default_device(self._device_at_load)

    @no_var_expand
    @magic_arguments()
    @argument("spec", nargs="?", help="cpu, cuda, cuda:N, mps, meta or auto (cuda, then mps, then cpu). "
              "Without it: show the devices.")
    @argument("--move", action="store_true", help="Line magic: also move the tensors, modules and optimizers "
              "in the namespace to that device, all or nothing.")
    @line_cell_magic
    def device(self, line: str, cell: str | None = None) -> Any:
        """See the devices, set the default device for new tensors, move data between devices.

        %device shows the default device, versions, the CPU, CUDA devices and MPS.
        %device SPEC sets the default device for the session; %%device SPEC for one cell
        (the previous default comes back afterwards, also when the cell raises).
        %device SPEC --move also moves what the namespace holds: modules in place, bare tensors
        (an optimizer holding one follows it), optimizer state. All or nothing: if anything
        cannot move, nothing has moved and the default device is unchanged.
        A non-CPU default device makes torch route every factory call through a mode that
        fills in device=, a small cost on every torch call (see benchmarks/run.py).

        In a terminal (``meta`` tensors have shapes and no data, on every machine)::

            In [1]: %load_ext torchmagic

            In [2]: import torch

            In [3]: %%device meta
               ...: m = torch.ones(2)

            In [4]: m.device, torch.ones(1).device
            Out[4]: (device(type='meta'), device(type='cpu'))
        """
        __tracebackhide__ = True  # noqa: F841
        args = parse_argstring(self.device, line)
        if args.spec is None:
            if cell is not None:
                raise UsageError("%%device needs a device: %%device cuda, %%device meta, ...")
            if args.move:
                raise UsageError("--move needs a device: %device cuda --move")
            self.session.show(devices.describe())
            return None
        try:
            target = devices.parse_device(args.spec)
        except TorchMagicError as error:
            raise UsageError(str(error)) from error
        if cell is not None:
            if args.move:
                raise UsageError("--move works with the line magic only (%device SPEC --move)")
            body = self.session.compile_body(cell, instrument=False)
            if body is None:
                return None
            with devices.default_device(target):
                return self.session.run_body(body)
        report = self._move(target) if args.move else None
        devices.set_default_device(target)
        print(f"default device: {torch.get_default_device()}")
        if report is not None:
            self.session.show(report)
        return None

    def _move(self, target: torch.device) -> Any:
        unchanged = f"nothing moved and the default device is still {torch.get_default_device()}"
        try:
            return move_namespace(self.shell.user_ns, target)
        except TorchMagicError as error:
            message = f"%device --move: {error}; {unchanged}"
        except KeyboardInterrupt:
            message = f"%device --move interrupted: {unchanged}"
        # outside the handlers: no chained exception keeps the tensors the move had allocated
        raise UsageError(message)
