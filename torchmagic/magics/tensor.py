"""``%tensor``: lists and ndarrays become tensors as a cell assigns them, or one expression's value."""

from __future__ import annotations

import re
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

import torchmagic

from .. import device as devices
from ..convert import ConversionOptions, ConversionReport, Converter, convert, parse_dtype
from ..errors import TorchMagicError
from .session import PendingDisplay, Session, SessionMagics

_TAKES_VALUE = ("--dtype", "--device")
# an option written after the expression (`%tensor [1.0] --requires-grad`) would be evaluated as Python
_TRAILING_OPTION = re.compile(r"\s--(?:(?:dtype|device)\s+\S+|requires-grad|copy|quiet)\s*$")


def split_leading_options(line: str) -> tuple[str, str]:
    """``--dtype float64 [[1, 2]]`` -> (``--dtype float64``, ``[[1, 2]]``): options come first."""
    rest = line.strip()
    options = []
    while rest.startswith("-"):
        token, _, rest = rest.partition(" ")
        rest = rest.strip()
        options.append(token)
        if token in _TAKES_VALUE:
            value, _, rest = rest.partition(" ")
            options.append(value)
            rest = rest.strip()
    return " ".join(options), rest


@magics_class
class TensorMagics(SessionMagics):
    """``%tensor`` and ``%%tensor``."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell, session)
        self.on_settings: tuple[ConversionOptions, bool] | None = None  # `%tensor on`: (options, quiet)
        self._on_converter: Converter | None = None

    @no_var_expand
    @magic_arguments()
    @argument("expression", nargs="*", help="Line magic: on, off, or an expression whose value is converted "
              "and returned (t = %%tensor [[1, 2], [3, 4]]).")
    @argument("--dtype", default=None, help="dtype of the results (float32, int64, ...); a dtype change copies.")
    @argument("--device", default=None, help="Put results on this device (a non-CPU device copies).")
    @argument("--requires-grad", action="store_true", help="Results that are floating point require grad "
              "(the line form refuses an integer result; a cell leaves integer tensors as they are and says so).")
    @argument("--copy", action="store_true", help="Always copy ndarrays instead of sharing their memory.")
    @argument("--quiet", action="store_true", help="Show no report.")
    @line_cell_magic
    def tensor(self, line: str, cell: str | None = None) -> Any:
        """Turn the lists and NumPy arrays a cell assigns into tensors as it runs, and report it.

        Each value bound by the cell's own statements is converted when it is assigned, so later
        lines already see tensors. NumPy arrays share memory with the tensor (torch.from_numpy)
        unless --copy, a dtype change, a non-CPU device or the array itself forces a copy; the
        report says which, and why. Empty lists, tuples and anything else are left alone, and so
        is data that would not convert exactly (a list that contains itself, integers outside
        int64, a NumPy dtype torch lacks), with the reason.

        In a terminal::

            In [1]: %load_ext torchmagic

            In [2]: import numpy as np

            In [3]: t = %tensor [[1, 2], [3, 4]]

            In [4]: t.dtype
            Out[4]: torch.int64

            In [5]: %%tensor --quiet
               ...: a = np.arange(3.0)
               ...: a[0] = 7.0

            In [6]: a
            Out[6]: tensor([7., 1., 2.], dtype=torch.float64)
        """
        __tracebackhide__ = True  # noqa: F841
        option_text, expression = split_leading_options(line)
        first, _, after = expression.partition(" ")
        if first in ("on", "off"):  # `%tensor on --requires-grad`: options may follow the action
            more_options, leftover = split_leading_options(after)
            if leftover:
                raise UsageError(f"%tensor {first}: unexpected {leftover!r}")
            option_text, expression = f"{option_text} {more_options}".strip(), first
        args = parse_argstring(self.tensor, option_text)
        try:
            options = ConversionOptions(
                dtype=parse_dtype(args.dtype) if args.dtype else None,
                device=devices.parse_device(args.device) if args.device else None,
                requires_grad=args.requires_grad,
                copy=args.copy,
            )
        except TorchMagicError as error:
            raise UsageError(str(error)) from error
        if cell is not None:
            if expression:
                raise UsageError(f"%%tensor takes options only, not {expression!r}")
            return self._cell(cell, options, args.quiet)
        if expression in ("on", "off"):
            self._switch(expression == "on", options, args.quiet)
            return None
        if not expression:
            raise UsageError("%tensor needs an expression, on or off (or use %%tensor on a cell)")
        return self._expression(expression, options)

    def _cell(self, cell: str, options: ConversionOptions, quiet: bool) -> Any:
        __tracebackhide__ = True  # noqa: F841
        body = self.session.compile_body(cell, instrument=True)
        if body is None:
            return None  # a syntax error, shown as for a plain cell; nothing ran
        converter = Converter(options)
        try:
            with self.session.binding("tensor", converter):
                return self.session.run_body(body)
        finally:
            self._deliver(converter, quiet)

    def _switch(self, on: bool, options: ConversionOptions, quiet: bool) -> None:
        self.on_settings = (options, quiet) if on else None
        if not on:
            self._drop_on_converter()
        self.session.instrument_every_cell("tensor", on)
        print(f"%tensor conversion is {'on' if on else 'off'}")

    def _expression(self, expression: str, options: ConversionOptions) -> Any:
        tensor, refusal = self._convert_expression(expression, options)
        if refusal is not None:
            raise UsageError(refusal)  # from this frame, which holds none of the user's data
        return tensor

    def _convert_expression(self, expression: str, options: ConversionOptions) -> tuple[Any, str | None]:
        """(the tensor, None) or (None, why not): the expression is evaluated in the user's namespace."""
        misplaced = (f"%tensor: options go before the expression (%tensor --dtype float64 [1, 2]), "
                     f"not in {expression!r}")
        try:
            value = eval(expression, self.shell.user_global_ns, self.shell.user_ns)
        except SyntaxError as error:
            if " --" in f" {expression}":
                return None, misplaced
            return None, f"%tensor: not a Python expression: {error.msg}"
        except Exception as error:
            if _TRAILING_OPTION.search(expression):  # (x --copy with a variable named copy is Python, and works)
                return None, misplaced
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return None, f"%tensor: evaluating {expression!r} raised {type(error).__name__}: {text}"
        conversion = convert(value, "<expression>", options)
        if not conversion.converted:
            if conversion.note == "empty list":
                return None, ("%tensor: left the empty list alone: an empty list has no dtype to convert "
                              "(torch.tensor([]) would make a float32 tensor of shape (0,))")
            return None, f"%tensor: left {type(value).__name__} alone: {conversion.note}"
        tensor = conversion.tensor
        if options.requires_grad and not tensor.requires_grad:
            return None, (f"%tensor --requires-grad: the value becomes a {str(tensor.dtype).removeprefix('torch.')} "
                          "tensor, and only floating point and complex tensors can require grad "
                          "(write floats, e.g. [1.0, 2.0], or add --dtype float32)")
        torchmagic._last_conversion = ConversionReport([conversion])
        return tensor, None

    # -- the `on` mode, cell by cell --------------------------------------------------------------
    def cell_started(self) -> None:
        if self.on_settings is not None and self._on_converter is None:
            self._on_converter = Converter(self.on_settings[0])
            self.session.set_binder("tensor", self._on_converter)

    def cell_finished(self, result: Any) -> None:
        converter = self._drop_on_converter()
        if converter is not None:
            self._deliver(converter, self.on_settings[1] if self.on_settings else False)

    def _drop_on_converter(self) -> Converter | None:
        converter, self._on_converter = self._on_converter, None
        if converter is not None:
            self.session.remove_binder("tensor", converter)
        return converter

    def _deliver(self, converter: Converter, quiet: bool) -> None:
        report = converter.report
        torchmagic._last_conversion = report
        if report and not quiet:
            self.session.show_after_cell(PendingDisplay("the conversion report", lambda: report))

    def forget(self) -> None:
        self._drop_on_converter()
        torchmagic._last_conversion = None

    def close(self) -> None:
        self._drop_on_converter()
        self.on_settings = None
        self.session.instrument_every_cell("tensor", False)
