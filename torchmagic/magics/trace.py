"""``%autograd_trace``: the magics, and the one place in the IPython layer that drives a recorder and builds a trace."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from IPython.core.error import UsageError
from IPython.core.magic import line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

import torchmagic

from ..errors import TorchMagicError
from ..interrupts import InterruptDeferral
from ..trace import Recorder, Trace
from ..trace.trace import SAVE_FORMATS
from .live import LiveDisplay
from .options import TorchMagic
from .session import PendingDisplay, Session, SessionMagics


@dataclass(frozen=True)
class TraceView:
    """The options of one ``%autograd_trace`` line: how the trace is drawn, and where it is saved."""

    max_nodes: int | None = None
    save: str | None = None
    text: bool = False
    depth: int | None = None
    expand: tuple[str, ...] = ()
    fold: bool = True
    live: bool = False  # show a live view while the cell runs
    stop_on_nan: bool = False  # stop the cell at the first backward pass with a NaN/Inf gradient
    per_node_hooks: bool = False  # record every pass node by node, the engine running it as untraced


def describe_error(error: BaseException) -> str:
    """``ZeroDivisionError: division by zero``; the bare name for a KeyboardInterrupt (it has no message)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def unquote(text: str) -> str:
    """IPython's argument splitter keeps quotes (``--save "my trace.txt"``): take them off."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


class Recording:
    """One recorded stretch of code: start, stop, then build its Trace or discard it.

    While it records, a Ctrl-C is held back out of torch's and torchmagic's internals
    (``InterruptDeferral``); stopping puts torch's function mode stack back to the depth it
    had, even when an interrupt damaged it.
    """

    def __init__(self, options: TorchMagic, view: TraceView, session: Session) -> None:
        self.options = options
        self.view = view
        self.session = session
        self.recorder = Recorder(memory_budget=options.memory_budget, small_values=options.small_values)
        self.value: Any = None  # the cell's last value (a tensor there is a root of the graph)
        self.error: str | None = None  # what the recorded code raised
        self._interrupts = InterruptDeferral()
        self._modes_before = 0
        self._stopped = True
        self.live: LiveDisplay | None = None

    def start(self, cell: str = "") -> None:
        self._modes_before = torch._C._len_torch_function_stack()
        self._stopped = False
        self._interrupts.install()
        self.session.set_binder("trace", self.recorder.bind)
        recorder = self.recorder
        recorder.stop_on_nonfinite = self.view.stop_on_nan
        recorder.per_node_hooks = self.view.per_node_hooks
        recorder.namespace_source = lambda: self.session.shell.user_ns
        recorder.labeler = self.session.labeler()
        try:
            if self.view.live:
                self.live = LiveDisplay(self.session, recorder, interval=self.options.live_interval, cell=cell)
            recorder.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Safe to call twice; leaves no mode, hook, binder or signal handler of ours behind."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.recorder.stop()
        except Exception as error:  # an interrupt inside torch's mode push/pop left the stack uneven
            while torch._C._len_torch_function_stack() > self._modes_before:
                torch._C._pop_torch_function_stack()
            print(f"torchmagic: the trace's torch function mode was not where it was left "
                  f"({describe_error(error)}); the stack is back as it was before the trace", file=sys.stderr)
        finally:
            self.session.remove_binder("trace", self.recorder.bind)
            self.recorder.namespace_source = None
            self._interrupts.restore()

    def build(self, cell: str) -> Trace:
        """The Trace of what was recorded, built now (it is shown next); the recorder lets go of
        everything either way."""
        self.stop()
        view, options = self.view, self.options
        trace = Trace(max_nodes=view.max_nodes or options.max_nodes, memory_budget=options.memory_budget,
                      small_values=options.small_values, cell=cell, depth=view.depth, expand=view.expand,
                      fold=view.fold)
        trace.layout_timeout = options.layout_timeout
        trace.max_rows = options.max_rows
        roots = [self.value] if isinstance(self.value, torch.Tensor) else []
        self.value = None
        try:
            trace.fill(self.recorder, self.session.shell.user_ns, self.session.labeler(), roots)
            trace.nodes  # noqa: B018 - build now: the trace is shown next, and the recorder is let go
        finally:
            self.recorder.release()
        trace.error = self.error
        return trace

    def discard(self) -> None:
        try:
            self.stop()
        finally:
            if self.live is not None:
                self.live.finish()
            self.recorder.release()
            self.value = None


@magics_class
class TraceMagics(SessionMagics):
    """``%autograd_trace`` and ``%%autograd_trace``."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell, session)
        self.on_view: TraceView | None = None  # the options of `%autograd_trace on`
        self._on_recording: Recording | None = None  # the `on` mode's recording of the running cell

    @no_var_expand
    @magic_arguments()
    @argument("action", nargs="?", choices=["on", "off", "status", "show"],
              help="Line magic only: trace every following cell (on) until off; status; show the last trace "
                   "again, with this line's view options (the defaults where not given).")
    @argument("--max-nodes", type=int, default=None, help="Draw at most N tensors (default: TorchMagic.max_nodes).")
    @argument("--save", metavar="PATH", default=None,
              help="Also write the trace to PATH: .svg, .dot/.gv or .txt (quote a path with spaces).")
    @argument("--text", action="store_true", help="Show the text rendering only (no diagram).")
    @argument("--depth", type=int, default=None, metavar="N",
              help="Draw modules N levels deep (model=1, model.layers.3=3); deeper ones are one box each. "
                   "Default: the deepest level that keeps the diagram readable.")
    @argument("--expand", action="append", default=[], metavar="PATH",
              help="Open the module PATH (e.g. model.layers.3.self_attn) fully; may be given several times.")
    @argument("--no-fold", action="store_true",
              help="Draw every block of a repeated run (the 12 layers of a transformer) instead of one with xN.")
    @argument("--live", action="store_true",
              help="While the cell runs, show its backward passes as they happen (count, rate, loss, each "
                   "module's gradient norm per pass, NaN/Inf), updated in place; the trace replaces it at the end.")
    @argument("--stop-on-nan", action="store_true",
              help="Stop the cell at the first backward pass that computes a NaN or Inf gradient, with one error "
                   "naming where it appeared, the op whose backward made it, its line and what fed it.")
    @argument("--per-node-hooks", action="store_true",
              help="Record every backward pass with a hook on each node, the engine running it exactly as untraced "
                   "(slower): for code with hooks put directly on a leaf's AccumulateGrad node, which the default "
                   "one-call capture does not run.")
    @line_cell_magic
    def autograd_trace(self, line: str, cell: str | None = None) -> Any:
        """Show the autograd graph a cell builds, with the intermediate gradients PyTorch discards.

        As a cell magic, traces that cell: a diagram of the graph (your variable names, module
        paths for parameters, source lines on hover) and a table of every gradient, with NaN/Inf
        flagged and the first non-finite gradient marked. Nothing is written on your tensors or
        their graph, and the cell computes exactly what it computes untraced.

        In a terminal (a notebook draws the diagram too)::

            In [1]: %load_ext torchmagic

            In [2]: %%autograd_trace --text
               ...: import torch
               ...: x = torch.tensor([1.0, 2.0], requires_grad=True)
               ...: y = x * x
               ...: loss = y.sum()
               ...: loss.backward()
            autograd trace of In [2] · 3 tensors, 2 ops · 1 backward pass
            graph (inputs first):
              x     =  tensor     (2,) float32          grad [2, 4]
              y     =  mul(x, x)  (2,) float32          grad [1, 1]
              loss  =  sum(y)     () float32    output  grad 1
            gradients:
            ...

            In [3]: %autograd_trace show --text
            autograd trace of In [2] · 3 tensors, 2 ops · 1 backward pass
            ...
        """
        __tracebackhide__ = True  # noqa: F841
        args = parse_argstring(self.autograd_trace, line)
        view = self._view(args)
        if cell is None:
            return self._line(args.action, view)
        if args.action is not None:
            raise UsageError(f"%%autograd_trace takes no action ({args.action!r}); use the line magic for on/off/status/show")
        body = self.session.compile_body(cell, instrument=True)
        if body is None:
            return None  # a syntax error, shown as for a plain cell; the last trace is left alone
        self._discard_on_recording()  # `on` mode would record this cell too: the cell magic takes over
        recording = Recording(self.session.options, view, self.session)
        recording.start(f"In [{self.session.cell_number()}]")
        try:
            recording.value = self.session.run_body(body)
            return recording.value
        except BaseException as error:
            recording.error = describe_error(error)
            raise
        finally:
            try:
                recording.stop()
            finally:
                self._deliver(recording, f"In [{self.session.cell_number()}]", always=True)

    @staticmethod
    def _view(args: Any) -> TraceView:
        if args.max_nodes is not None and args.max_nodes < 1:
            raise UsageError("--max-nodes must be at least 1")
        if args.depth is not None and args.depth < 0:
            raise UsageError("--depth must be 0 or more")
        save = os.path.expanduser(unquote(args.save)) if args.save is not None else None
        if save is not None and os.path.splitext(save)[1].lower() not in SAVE_FORMATS:
            raise UsageError(f"--save: cannot write {save!r}; use a file ending in {', '.join(SAVE_FORMATS)}")
        if save is not None:  # checked before the cell runs: a cell is not run for a trace that cannot be saved
            save = os.path.abspath(save)  # (the cell may change the working directory)
            folder = os.path.dirname(save)
            if not os.path.isdir(folder):
                raise UsageError(f"--save: no folder {folder!r} to write {os.path.basename(save)!r} in")
            if (os.path.isdir(save) or not os.access(folder, os.W_OK)
                    or (os.path.exists(save) and not os.access(save, os.W_OK))):
                raise UsageError(f"--save: cannot write {save!r} (a folder, or no permission to write it)")
        return TraceView(max_nodes=args.max_nodes, save=save, text=args.text, depth=args.depth,
                         expand=tuple(unquote(path) for path in args.expand), fold=not args.no_fold,
                         live=args.live, stop_on_nan=args.stop_on_nan, per_node_hooks=args.per_node_hooks)

    def _line(self, action: str | None, view: TraceView) -> None:
        if action is None:
            raise UsageError("%autograd_trace needs on, off, status or show (or use %%autograd_trace on a cell)")
        if action == "on":
            self.on_view = view
            self.session.instrument_every_cell("trace", True)
            print("autograd tracing is on for every following cell (%autograd_trace off stops it)")
        elif action == "off":
            self._discard_on_recording()
            self.on_view = None
            self.session.instrument_every_cell("trace", False)
            print("autograd tracing is off")
        elif action == "status":
            if self.on_view is None:
                print("autograd tracing is off")
            else:
                options = ", ".join(f"{k}={v}" for k, v in asdict(self.on_view).items() if v)
                print("autograd tracing is on" + (f" ({options})" if options else ""))
        elif action == "show":
            self._show_last(view)

    def _show_last(self, view: TraceView) -> None:
        trace = torchmagic.last_trace()
        if trace is None:
            raise UsageError("no trace yet: run a cell with %%autograd_trace or after %autograd_trace on")
        unknown = [path for path in view.expand if path not in trace.modules]
        if unknown:
            known = ", ".join(list(trace.modules)[:8]) or "none"
            raise UsageError(f"--expand: no module {unknown[0]!r} in the last trace (modules: {known})")
        # show draws the last trace again with this line's view options, the defaults where not given
        # (so `show --no-fold`, then `show`, folds again)
        trace.set_view(depth=view.depth, expand=view.expand, fold=view.fold,
                       max_nodes=view.max_nodes or self.session.options.max_nodes)
        if view.save:
            self._save(trace, view.save)
        self.session.show(trace, text_only=view.text)

    # -- the `on` mode, cell by cell --------------------------------------------------------------
    def cell_started(self) -> None:
        if self.on_view is not None and self._on_recording is None:
            recording = Recording(self.session.options, self.on_view, self.session)
            recording.start(f"In [{self.session.cell_number()}]")
            self._on_recording = recording

    def cell_finished(self, result: Any) -> None:
        recording, self._on_recording = self._on_recording, None
        if recording is None:
            return
        try:
            recording.stop()
        finally:
            recording.value = getattr(result, "result", None)
            error = getattr(result, "error_in_exec", None)
            recording.error = describe_error(error) if error is not None else None
            number = getattr(result, "execution_count", None) or self.session.cell_number()
            self._deliver(recording, f"In [{number}]", always=False)

    def _discard_on_recording(self) -> None:
        recording, self._on_recording = self._on_recording, None
        if recording is not None:
            recording.discard()

    def forget(self) -> None:
        self._discard_on_recording()
        torchmagic._history.clear()

    def close(self) -> None:
        self._discard_on_recording()
        self.on_view = None
        self.session.instrument_every_cell("trace", False)

    # -- after the cell ----------------------------------------------------------------------------
    def _deliver(self, recording: Recording, cell: str, *, always: bool) -> None:
        """Build and show the trace once the cell is over (an interrupt there stops only the display)."""

        def make() -> Trace | None:
            trace = recording.build(cell)
            if not always and not (trace.nodes or trace.missing):
                return None
            self._remember(trace)
            if recording.view.save:
                self._save(trace, recording.view.save)
            return trace

        live = recording.live
        self.session.show_after_cell(PendingDisplay(f"the trace of {cell}", make, recording.discard,
                                                    text_only=recording.view.text,
                                                    replace=live.replace if live is not None else None))

    def _remember(self, trace: Trace) -> None:
        """The newest trace keeps its gradient tensors; older ones in the history keep statistics only."""
        history = torchmagic._history
        for older in history:
            older.drop_gradients()
        history.append(trace)
        del history[: max(0, len(history) - self.session.options.history_size)]

    @staticmethod
    def _save(trace: Trace, path: str) -> None:
        try:
            trace.save(path)
        except (TorchMagicError, OSError) as error:
            print(f"torchmagic: could not save the trace: {describe_error(error)}")
