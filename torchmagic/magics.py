"""The IPython layer: magics, configuration traits, error translation and display.

Everything that does the work lives in the core (``trace``, ``convert``, ``device``); this
module parses arguments, runs cells, turns the core's exceptions into one-line
``UsageError``s and displays results.
"""

from __future__ import annotations

import ast
from typing import Any

import torch
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Float, Int, TraitError, Unicode, validate

import torchmagic

from . import device as devices
from .assignments import BIND_NAME, AssignmentInstrumenter, BindDispatcher
from .convert import ConversionOptions, Converter, parse_dtype
from .errors import TorchMagicError
from .trace import Recorder, Trace
from .trace.naming import default_cell_label

_EVENTS = ("pre_run_cell", "post_run_cell")


def _usage_error(error: Exception) -> UsageError:
    """One line for the user; the exact UsageError class, so IPython prints no traceback."""
    return UsageError(str(error))


@magics_class
class TorchMagic(Magics):
    """torchmagic's magics and their options (``%config TorchMagic`` lists them)."""

    layout_timeout = Float(
        10.0, help="Seconds a big diagram's layout may take; it then stops and the text view is shown."
    ).tag(config=True)
    max_nodes = Int(500, help="Diagrams draw at most this many tensors; the rest are summarised.").tag(config=True)
    small_values = Int(
        16, help="Gradients with at most this many elements are shown as values, larger ones as statistics."
    ).tag(config=True)
    memory_budget = Int(
        64 * 2**20,
        help="Bytes of gradient tensors a trace keeps whole; past it, gradients are kept as statistics only.",
    ).tag(config=True)
    history_size = Int(3, help="How many past traces are kept (torchmagic.last_trace(), %autograd_trace show).").tag(
        config=True
    )
    default_device = Unicode(
        "", help="Default device applied when the extension loads (cpu, cuda, cuda:N, mps, meta, auto); empty: leave it."
    ).tag(config=True)

    @validate("max_nodes", "history_size")
    def _positive(self, proposal):
        if proposal["value"] < 1:
            raise TraitError(f"{proposal['trait'].name} must be at least 1")
        return proposal["value"]

    @validate("small_values", "memory_budget")
    def _non_negative(self, proposal):
        if proposal["value"] < 0:
            raise TraitError(f"{proposal['trait'].name} must not be negative")
        return proposal["value"]

    def __init__(self, shell: Any, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.dispatcher = BindDispatcher()
        self.instrumenter = AssignmentInstrumenter()
        self.trace_on: dict[str, Any] | None = None  # the options of `%autograd_trace on`
        self._cell_recorder: Recorder | None = None  # the `on` mode's recording of the running cell
        self._pending: list[tuple[Any, list[str] | None]] = []  # shown after the cell
        self.tensor_on: dict[str, Any] | None = None  # the options of `%tensor on`
        self._cell_converter: Converter | None = None

    # -- shared machinery -------------------------------------------------------------
    def _labeler(self):
        filename_map = getattr(self.shell.compile, "_filename_map", {})

        def label(filename: str) -> str:
            number = filename_map.get(filename)
            return f"In [{number}]" if number is not None else default_cell_label(filename)

        return label

    def _sync_transformer(self) -> None:
        """Our AST transformer is installed exactly while some `on` mode needs it."""
        transformers = self.shell.ast_transformers
        wanted = self.trace_on is not None or getattr(self, "tensor_on", None) is not None
        present = self.instrumenter in transformers
        if wanted and not present:
            transformers.append(self.instrumenter)
        elif present and not wanted:
            transformers.remove(self.instrumenter)

    def run_body(self, cell: str) -> Any:
        """Run a cell magic's body like a cell: the user's namespace, line numbers and traceback.

        Follows ``%time``: transform, parse, AST transformers, exec, then eval the last
        expression and return its value (IPython shows it as Out[N]). The body is cached
        under its own file name, one line down, so tracebacks and source lines match the
        cell as the user sees it (the magic's own line is line 1).
        """
        __tracebackhide__ = True  # noqa: F841 (IPython hides this frame from tracebacks)
        shell = self.shell
        source = "\n" + shell.transform_cell(cell)
        filename = shell.compile.cache(source, self._cell_number(), raw_code="\n" + cell)
        tree = shell.compile.ast_parse(source, filename=filename)
        tree = shell.transform_ast(tree)
        if self.instrumenter not in shell.ast_transformers:
            tree = self.instrumenter.visit(tree)
            ast.fix_missing_locations(tree)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        namespace = shell.user_ns
        exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            return eval(compile(last, filename, "eval"), namespace)
        return None

    def _cell_number(self) -> int:
        """The running cell's In[N]: IPython counts the next cell's number while one runs."""
        running = getattr(self.shell.displayhook, "exec_result", None)
        if running is not None and running.execution_count is not None:
            return running.execution_count
        return self.shell.execution_count

    def show(self, obj: Any, text_only: bool = False) -> None:
        include = ["text/plain"] if text_only else self.shell.display_formatter.active_types
        display(obj, include=include)

    def _remember(self, trace: Trace) -> None:
        history = torchmagic._history
        history.append(trace)
        del history[: max(0, len(history) - self.history_size)]

    # -- load and unload --------------------------------------------------------------
    def on_load(self) -> None:
        self._device_at_load = devices.global_default()
        if self.default_device:
            try:
                self._set_default_device(self.default_device)
            except TorchMagicError as error:
                print(f"torchmagic: TorchMagic.default_device not applied: {error}")

    def on_unload(self) -> None:
        """Put back the default device the session had before the extension loaded."""
        if devices.global_default() != self._device_at_load:
            torch.set_default_device(self._device_at_load)

    # -- events -------------------------------------------------------------------------
    def pre_run_cell(self, info: Any = None) -> None:
        if self.tensor_on is not None and self._cell_converter is None:
            self._cell_converter = Converter(self.tensor_on["conversion"])
            self.dispatcher.binders["tensor"] = self._cell_converter
        if self.trace_on is not None and self._cell_recorder is None:
            recorder = Recorder(memory_budget=self.memory_budget, small_values=self.small_values)
            self.dispatcher.binders["trace"] = recorder.bind
            recorder.start()
            self._cell_recorder = recorder

    def post_run_cell(self, result: Any = None) -> None:
        """Finish the `on` recording and show what the cell produced; never breaks the cell."""
        try:
            converter, self._cell_converter = self._cell_converter, None
            if converter is not None:
                self.dispatcher.binders.pop("tensor", None)
                self._deliver_conversions(converter, self.tensor_on or {"quiet": False})
            recorder, self._cell_recorder = self._cell_recorder, None
            if recorder is not None:
                self._finish_on_recording(recorder, result)
            pending, self._pending = self._pending, []
            for obj, include in pending:
                display(obj, include=include or self.shell.display_formatter.active_types)
        except Exception:
            self.shell.showtraceback()

    def _finish_on_recording(self, recorder: Recorder, result: Any) -> None:
        options = self.trace_on or {}
        try:
            recorder.stop()
        finally:
            self.dispatcher.binders.pop("trace", None)
            value = getattr(result, "result", None)
            number = getattr(result, "execution_count", None) or self._cell_number()
            trace = self._new_trace(options, f"In [{number}]")
            trace.fill(recorder, self.shell.user_ns, self._labeler(), [value] if isinstance(value, torch.Tensor) else [])
        error = getattr(result, "error_in_exec", None)
        if error is not None:
            trace.error = f"{type(error).__name__}: {error}"
        if trace.nodes or trace.missing:
            self._deliver(trace, options)

    def _new_trace(self, options: dict[str, Any], cell: str) -> Trace:
        trace = Trace(max_nodes=options.get("max_nodes") or self.max_nodes, memory_budget=self.memory_budget,
                      small_values=self.small_values, cell=cell, depth=options.get("depth"),
                      expand=options.get("expand", ()), fold=options.get("fold", True))
        trace.layout_timeout = self.layout_timeout
        return trace

    def _deliver(self, trace: Trace, options: dict[str, Any]) -> None:
        self._remember(trace)
        if options.get("save"):
            try:
                trace.save(options["save"])
            except (TorchMagicError, OSError) as error:
                print(f"torchmagic: could not save the trace: {error}")
        self._pending.append((trace, ["text/plain"] if options.get("text") else None))

    def _discard_cell_recording(self) -> None:
        recorder, self._cell_recorder = self._cell_recorder, None
        if recorder is not None:
            recorder.stop()
            recorder.release()
        self.dispatcher.binders.pop("trace", None)

    # -- %autograd_trace ----------------------------------------------------------------
    @no_var_expand
    @magic_arguments()
    @argument("action", nargs="?", choices=["on", "off", "status", "show"],
              help="Line magic only: trace every following cell (on) until off; status; show the last trace again.")
    @argument("--max-nodes", type=int, default=None, help="Draw at most N tensors (default: TorchMagic.max_nodes).")
    @argument("--save", metavar="PATH", default=None, help="Also write the trace to PATH: .svg, .dot/.gv or .txt.")
    @argument("--text", action="store_true", help="Show the text rendering only (no diagram).")
    @argument("--depth", type=int, default=None, metavar="N",
              help="Draw modules N levels deep (model=1, model.layers.3=3); deeper ones are one box each. "
                   "Default: the deepest level that keeps the diagram readable.")
    @argument("--expand", action="append", default=[], metavar="PATH",
              help="Open the module PATH (e.g. model.layers.3.self_attn) fully; may be given several times.")
    @argument("--no-fold", action="store_true",
              help="Draw every block of a repeated run (the 12 layers of a transformer) instead of one with xN.")
    @line_cell_magic
    def autograd_trace(self, line: str, cell: str | None = None) -> Any:
        """Show the autograd graph a cell builds, with the intermediate gradients PyTorch discards.

        As a cell magic, traces that cell: a diagram of the graph (your variable names, module
        paths for parameters, source lines on hover) and a table of every gradient, with NaN/Inf
        flagged and the first non-finite gradient marked. Hooks are placed on the graph only
        while backward runs and removed afterwards; your tensors are not changed.
        """
        __tracebackhide__ = True  # noqa: F841
        args = parse_argstring(self.autograd_trace, line)
        if args.max_nodes is not None and args.max_nodes < 1:
            raise UsageError("--max-nodes must be at least 1")
        if args.depth is not None and args.depth < 0:
            raise UsageError("--depth must be 0 or more")
        if args.save:
            import os

            from .trace.trace import SAVE_FORMATS

            if os.path.splitext(args.save)[1].lower() not in SAVE_FORMATS:
                raise UsageError(f"--save: cannot write {args.save!r}; use a file ending in {', '.join(SAVE_FORMATS)}")
        options = {"max_nodes": args.max_nodes, "save": args.save, "text": args.text, "depth": args.depth,
                   "expand": tuple(args.expand), "fold": not args.no_fold}
        if cell is None:
            return self._trace_line(args.action, options)
        if args.action is not None:
            raise UsageError(f"%%autograd_trace takes no action ({args.action!r}); use the line magic for on/off/status/show")
        self._discard_cell_recording()  # `on` mode would record this cell too: the cell magic takes over
        recorder = Recorder(memory_budget=self.memory_budget, small_values=self.small_values)
        self.dispatcher.binders["trace"] = recorder.bind
        value = error = None
        recorder.start()
        try:
            value = self.run_body(cell)
            return value
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                recorder.stop()
            finally:
                self.dispatcher.binders.pop("trace", None)
                trace = self._new_trace(options, f"In [{self._cell_number()}]")
                trace.fill(recorder, self.shell.user_ns, self._labeler(),
                           [value] if isinstance(value, torch.Tensor) else [])
                if error is not None:
                    trace.error = f"{type(error).__name__}: {error}"
                self._deliver(trace, options)

    def _trace_line(self, action: str | None, options: dict[str, Any]) -> Any:
        if action is None:
            raise UsageError("%autograd_trace needs on, off, status or show (or use %%autograd_trace on a cell)")
        if action == "on":
            self.trace_on = options
            self._sync_transformer()
            print("autograd tracing is on for every following cell (%autograd_trace off stops it)")
        elif action == "off":
            self._discard_cell_recording()
            self.trace_on = None
            self._sync_transformer()
            print("autograd tracing is off")
        elif action == "status":
            if self.trace_on is None:
                print("autograd tracing is off")
            else:
                opts = ", ".join(f"{k}={v}" for k, v in self.trace_on.items() if v)
                print("autograd tracing is on" + (f" ({opts})" if opts else ""))
        elif action == "show":
            trace = torchmagic.last_trace()
            if trace is None:
                raise UsageError("no trace yet: run a cell with %%autograd_trace or after %autograd_trace on")
            unknown = [path for path in options["expand"] if path not in trace.modules]
            if unknown:
                known = ", ".join(list(trace.modules)[:8]) or "none"
                raise UsageError(f"--expand: no module {unknown[0]!r} in the last trace (modules: {known})")
            # show draws the last trace again, with this line's view options where given
            if options["depth"] is not None or options["expand"] or not options["fold"] or options["max_nodes"]:
                trace.set_view(depth=options["depth"], expand=options["expand"], fold=options["fold"],
                               max_nodes=options["max_nodes"] or trace.max_nodes)
            self.show(trace, text_only=bool(options.get("text")))
        return None


    # -- %tensor ----------------------------------------------------------------------------
    @no_var_expand
    @magic_arguments()
    @argument("expression", nargs="*", help="Line magic: on, off, or an expression whose value is converted "
              "and returned (t = %%tensor [[1, 2], [3, 4]]).")
    @argument("--dtype", default=None, help="dtype of the results (float32, int64, ...); a dtype change copies.")
    @argument("--device", default=None, help="Put results on this device (a non-CPU device copies).")
    @argument("--requires-grad", action="store_true", help="Results that are floating point require grad.")
    @argument("--copy", action="store_true", help="Always copy ndarrays instead of sharing their memory.")
    @argument("--quiet", action="store_true", help="Show no report.")
    @line_cell_magic
    def tensor(self, line: str, cell: str | None = None) -> Any:
        """Turn the lists and NumPy arrays a cell assigns into tensors as it runs, and report it.

        Each value bound by the cell's own statements is converted when it is assigned, so later
        lines already see tensors. NumPy arrays share memory with the tensor (torch.from_numpy)
        unless --copy, a dtype change, a non-CPU device or the array itself forces a copy; the
        report says which, and why. Empty lists, tuples and anything else are left alone.
        """
        __tracebackhide__ = True  # noqa: F841
        option_text, expression = _split_leading_options(line)
        first, _, after = expression.partition(" ")
        if first in ("on", "off"):  # `%tensor on --requires-grad`: options may follow the action
            more_options, leftover = _split_leading_options(after)
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
            raise _usage_error(error) from error
        settings = {"conversion": options, "quiet": args.quiet}
        if cell is not None:
            if expression:
                raise UsageError(f"%%tensor takes options only, not {expression!r}")
            converter = Converter(options)
            previous = self.dispatcher.binders.get("tensor")
            self.dispatcher.binders["tensor"] = converter
            try:
                return self.run_body(cell)
            finally:
                if previous is None:
                    self.dispatcher.binders.pop("tensor", None)
                else:
                    self.dispatcher.binders["tensor"] = previous
                self._deliver_conversions(converter, settings)
        if expression in ("on", "off"):
            self.tensor_on = settings if expression == "on" else None
            if expression == "off":
                self._cell_converter = None
                self.dispatcher.binders.pop("tensor", None)
            self._sync_transformer()
            print(f"%tensor conversion is {expression}")
            return None
        if not expression:
            raise UsageError("%tensor needs an expression, on or off (or use %%tensor on a cell)")
        try:
            value = eval(expression, self.shell.user_ns)
        except SyntaxError as error:
            raise UsageError(f"%tensor: not a Python expression: {error.msg}") from None
        converter = Converter(options)
        result = converter("<expression>", value)
        if not converter.report.converted:
            raise UsageError(f"%tensor: left {type(value).__name__} alone: "
                             + (converter.report.conversions[0].note if converter.report.conversions else "not a list or ndarray"))
        torchmagic._last_conversion = converter.report
        return result

    def _deliver_conversions(self, converter: Converter, settings: dict[str, Any]) -> None:
        report = converter.report
        torchmagic._last_conversion = report
        if report and not settings.get("quiet"):
            self._pending.append((report, None))

    # -- %device ----------------------------------------------------------------------------
    @no_var_expand
    @magic_arguments()
    @argument("spec", nargs="?", help="cpu, cuda, cuda:N, mps, meta or auto (cuda, then mps, then cpu). "
              "Without it: show the devices.")
    @argument("--move", action="store_true", help="Line magic: also move the tensors, modules and optimizer "
              "state in the namespace to that device.")
    @line_cell_magic
    def device(self, line: str, cell: str | None = None) -> Any:
        """See the devices, set the default device for new tensors, move data between devices.

        %device shows the default device, versions, the CPU, CUDA devices and MPS.
        %device SPEC sets the default device for the session; %%device SPEC for one cell
        (the previous default comes back afterwards, also when the cell raises).
        %device SPEC --move also moves what the namespace holds, each object all or nothing.
        A non-CPU default device makes torch route every factory call through a mode that
        fills in device=, a small cost on every torch call (see benchmarks/run.py).
        """
        __tracebackhide__ = True  # noqa: F841
        args = parse_argstring(self.device, line)
        if args.spec is None:
            if cell is not None:
                raise UsageError("%%device needs a device: %%device cuda, %%device meta, ...")
            if args.move:
                raise UsageError("--move needs a device: %device cuda --move")
            self.show(devices.describe())
            return None
        try:
            target = devices.parse_device(args.spec)
        except TorchMagicError as error:
            raise _usage_error(error) from error
        if cell is not None:
            if args.move:
                raise UsageError("--move works with the line magic only (%device SPEC --move)")
            with devices.default_device(target):
                return self.run_body(cell)
        self._set_default_device(target)
        print(f"default device: {torch.get_default_device()}")
        if args.move:
            report = devices.move_namespace(self.shell.user_ns, target)
            self.show(report)
        return None

    def _set_default_device(self, spec: Any) -> None:
        target = devices.parse_device(spec) if isinstance(spec, str) else spec
        devices.set_default_device(target)


def _split_leading_options(line: str) -> tuple[str, str]:
    """``--dtype float64 [[1, 2]]`` -> (``--dtype float64``, ``[[1, 2]]``): options come first."""
    takes_value = {"--dtype", "--device"}
    rest = line.strip()
    options = []
    while rest.startswith("-"):
        token, _, rest = rest.partition(" ")
        rest = rest.strip()
        options.append(token)
        if token in takes_value and "=" not in token:
            value, _, rest = rest.partition(" ")
            options.append(value)
            rest = rest.strip()
    return " ".join(options), rest


_BIND_ATTR = "_torchmagic_magics"


def load(shell: Any) -> TorchMagic:
    """Register the magics, events and the bind function; a second load replaces the first."""
    if getattr(shell, _BIND_ATTR, None) is not None:
        unload(shell)
    magics = TorchMagic(shell)
    shell.register_magics(magics)
    for event in _EVENTS:
        shell.events.register(event, getattr(magics, event))
    shell.user_ns[BIND_NAME] = magics.dispatcher
    shell.user_ns_hidden[BIND_NAME] = magics.dispatcher
    setattr(shell, _BIND_ATTR, magics)
    magics.on_load()
    return magics


def unload(shell: Any) -> None:
    """Remove everything ``load`` and the magics installed."""
    magics = getattr(shell, _BIND_ATTR, None)
    if magics is None:
        return
    try:
        magics.on_unload()
    finally:
        magics._discard_cell_recording()
        magics.trace_on = None
        magics.tensor_on = None
        magics._cell_converter = None
        magics.dispatcher.binders.clear()
        magics._sync_transformer()
        for event in _EVENTS:
            try:
                shell.events.unregister(event, getattr(magics, event))
            except ValueError:
                pass
        for kind in ("line", "cell"):
            registry = shell.magics_manager.magics[kind]
            for name, func in list(registry.items()):
                if getattr(func, "__self__", None) is magics:
                    del registry[name]
        shell.magics_manager.registry.pop(type(magics).__name__, None)
        shell.user_ns.pop(BIND_NAME, None)
        shell.user_ns_hidden.pop(BIND_NAME, None)
        setattr(shell, _BIND_ATTR, None)
