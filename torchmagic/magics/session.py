"""The cell lifecycle the magics share: IPython's cell events, the assignment hook, bodies run as cells, displays after the cell."""

from __future__ import annotations

import ast
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import CodeType
from typing import Any

from IPython.core.magic import Magics
from IPython.display import display

from ..assignments import AssignmentInstrumenter, Binder, dispatch
from ..trace.naming import default_cell_label
from .options import TorchMagic

EVENTS = ("pre_run_cell", "post_run_cell")
# Kept in user_ns_hidden only: `%reset` clears that dict and nothing else does, so its absence
# after a cell says the namespace was reset (IPython has no reset event).
RESET_MARKER = "__torchmagic_session__"


@dataclass
class CellBody:
    """A cell magic's body, compiled as IPython compiles a cell; ``last`` is the expression shown as Out[N]."""

    code: CodeType
    last: CodeType | None


@dataclass
class PendingDisplay:
    """Something to show once the cell is over: ``make()`` builds it (None: nothing to show)."""

    what: str
    make: Callable[[], Any]
    discard: Callable[[], None] = lambda: None
    text_only: bool = False
    # shows what make() built in place of something shown while the cell ran (a live view);
    # None: a display of its own
    replace: Callable[[Any, bool], None] | None = None


class SessionMagics(Magics):
    """A topic's Magics class, with the session's cell events (each a no-op unless overridden)."""

    def __init__(self, shell: Any, session: Session) -> None:
        super().__init__(shell)
        self.session = session

    def cell_started(self) -> None:
        """A top-level cell is about to run."""

    def cell_finished(self, result: Any) -> None:
        """That cell is over (``result`` is IPython's ExecutionResult)."""

    def forget(self) -> None:
        """``%reset`` emptied the namespace: let go of the user's data."""

    def close(self) -> None:
        """The extension unloads: take back everything this topic put in place."""


class Session:
    """One per shell: owns the cell events, the binders of the assignment hook and the displays after a cell.

    The topic magics (``%autograd_trace``, ``%tensor``, ``%device``) do their work through
    it; nothing of it lives in the user's namespace, so ``%reset`` and ``del`` cannot take
    it away.
    """

    def __init__(self, shell: Any, options: TorchMagic) -> None:
        self.shell = shell
        self.options = options
        self.magics: list[SessionMagics] = []
        self.instrumenter = AssignmentInstrumenter()
        self._instrumenting: set[str] = set()  # topics whose `on` mode instruments every cell
        self._pending: list[PendingDisplay] = []
        self._depth = 0  # nested run_cell calls: only the outermost cell starts and finishes work

    # -- load and unload ------------------------------------------------------------------
    def open(self) -> None:
        for event in EVENTS:
            self.shell.events.register(event, getattr(self, event))
        self.shell.user_ns_hidden[RESET_MARKER] = None

    def close(self) -> None:
        """Take back everything the session and its magics put in place; each step runs even if one fails."""
        try:
            for magics in reversed(self.magics):
                _run_all(magics.close)
        finally:
            self._discard_pending()
            for key in dispatch.ORDER:
                dispatch.binders.pop(key, None)
            dispatch.errors.clear()
            self._instrumenting.clear()
            self._sync_instrumenter()
            for event in EVENTS:
                with contextlib.suppress(ValueError):
                    self.shell.events.unregister(event, getattr(self, event))
            self.shell.user_ns_hidden.pop(RESET_MARKER, None)

    # -- the assignment hook ----------------------------------------------------------------
    def set_binder(self, key: str, binder: Binder) -> None:
        dispatch.binders[key] = binder

    def remove_binder(self, key: str, binder: Binder) -> None:
        """Remove ``binder`` if it is still the one installed under ``key``."""
        if dispatch.binders.get(key) == binder:
            del dispatch.binders[key]

    @contextlib.contextmanager
    def binding(self, key: str, binder: Binder) -> Iterator[None]:
        """``binder`` for the block; the one it replaced (an `on` mode's) afterwards."""
        previous = dispatch.binders.get(key)
        dispatch.binders[key] = binder
        try:
            yield
        finally:
            if previous is None:
                dispatch.binders.pop(key, None)
            else:
                dispatch.binders[key] = previous

    def instrument_every_cell(self, topic: str, wanted: bool) -> None:
        """Our AST transformer is on IPython's list exactly while some topic's `on` mode needs it."""
        if wanted:
            self._instrumenting.add(topic)
        else:
            self._instrumenting.discard(topic)
        self._sync_instrumenter()

    def _sync_instrumenter(self) -> None:
        transformers = self.shell.ast_transformers
        present = self.instrumenter in transformers
        if self._instrumenting and not present:
            transformers.append(self.instrumenter)
        elif present and not self._instrumenting:
            transformers.remove(self.instrumenter)

    # -- cell magic bodies --------------------------------------------------------------------
    def compile_body(self, cell: str, *, instrument: bool) -> CellBody | None:
        """Compile a cell magic's body like a cell; None after showing a syntax error as for a plain cell.

        Follows ``%time``: transform, parse, AST transformers. The body is cached under its
        own file name, one line down, so tracebacks and source lines match the cell as the
        user sees it (the magic's own line is line 1). A syntax error is shown without our
        frames and fails the cell (so "Run All" stops), and nothing has run.
        """
        shell = self.shell
        try:
            source = "\n" + shell.transform_cell(cell)
            filename = shell.compile.cache(source, self.cell_number(), raw_code="\n" + cell)
            tree = shell.compile.ast_parse(source, filename=filename)
            tree = shell.transform_ast(tree)
            if instrument and self.instrumenter not in shell.ast_transformers:
                tree = ast.fix_missing_locations(self.instrumenter.visit(tree))
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = compile(ast.Expression(tree.body.pop().value), filename, "eval")
            code = compile(tree, filename, "exec")
        except SyntaxError as error:
            shell.showsyntaxerror()
            self.fail_cell(error)
            return None
        return CellBody(code, last)

    def run_body(self, body: CellBody) -> Any:
        """Run a compiled body in the user's namespace; return the value of its last expression."""
        __tracebackhide__ = True  # noqa: F841 (IPython hides this frame from tracebacks)
        exec(body.code, self.shell.user_global_ns, self.shell.user_ns)
        if body.last is not None:
            return eval(body.last, self.shell.user_global_ns, self.shell.user_ns)
        return None

    def fail_cell(self, error: BaseException) -> None:
        """Mark the running cell as failed, its error already shown (a kernel then replies "error")."""
        running = getattr(self.shell.displayhook, "exec_result", None)
        if running is not None and running.error_in_exec is None:
            running.error_in_exec = error

    def cell_number(self) -> int:
        """The running cell's In[N]: IPython counts the next cell's number while one runs."""
        running = getattr(self.shell.displayhook, "exec_result", None)
        if running is not None and running.execution_count is not None:
            return running.execution_count
        return self.shell.execution_count

    def labeler(self) -> Callable[[str], str]:
        """File name of a cell -> ``In [N]``, for source lines in traces."""
        filename_map = getattr(self.shell.compile, "_filename_map", {})

        def label(filename: str) -> str:
            number = filename_map.get(filename)
            return f"In [{number}]" if number is not None else default_cell_label(filename)

        return label

    # -- displays ----------------------------------------------------------------------------------
    def show(self, obj: Any, *, text_only: bool = False) -> None:
        """Display now, asking only for the formats this front end shows."""
        include = ["text/plain"] if text_only else self.shell.display_formatter.active_types
        display(obj, include=include)

    def show_after_cell(self, pending: PendingDisplay) -> None:
        self._pending.append(pending)

    def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for index, item in enumerate(pending):
            try:
                obj = item.make()
                if obj is not None and item.replace is not None:
                    item.replace(obj, item.text_only)
                elif obj is not None:
                    self.show(obj, text_only=item.text_only)
            except KeyboardInterrupt:
                for rest in pending[index + 1:]:
                    _run_all(rest.discard)
                print(f"torchmagic: interrupted while preparing {item.what}; it is not shown", file=sys.stderr)
                return
            except Exception:
                self.shell.showtraceback()

    def _discard_pending(self) -> None:
        pending, self._pending = self._pending, []
        for item in pending:
            _run_all(item.discard)

    # -- events -------------------------------------------------------------------------------------
    def pre_run_cell(self, info: Any = None) -> None:
        self._depth += 1
        if self._depth > 1:
            return
        dispatch.errors.clear()
        for magics in self.magics:
            self._guarded(magics.cell_started, f"starting {type(magics).__name__} for the cell")

    def post_run_cell(self, result: Any = None) -> None:
        """Finish the cell's work and show what it produced; never breaks the cell.

        Also fires for the cell that loaded the extension (its pre_run_cell came before), and for
        an empty cell, whose pre_run_cell IPython skips: that one is not a cell's end.
        """
        raw = getattr(getattr(result, "info", None), "raw_cell", None)
        if isinstance(raw, str) and (not raw or raw.isspace()):
            return
        self._depth = max(0, self._depth - 1)
        if self._depth:
            return
        if RESET_MARKER not in self.shell.user_ns_hidden:
            self._after_reset()
        for magics in self.magics:
            self._guarded(lambda magics=magics: magics.cell_finished(result), "finishing the cell's work")
        self._report_binder_errors()
        self._flush_pending()

    def _after_reset(self) -> None:
        """``%reset`` ran in this cell: let go of the old namespace's data; the extension stays as it was."""
        self._discard_pending()
        for magics in self.magics:
            self._guarded(magics.forget, "forgetting the old namespace")
        self.shell.user_ns_hidden[RESET_MARKER] = None

    def _report_binder_errors(self) -> None:
        errors = list(dispatch.errors)
        dispatch.errors.clear()
        for key, name, error in errors[:3]:
            what = {"tensor": "convert", "trace": "record"}.get(key, key)
            text = str(error).strip().splitlines()[0] if str(error).strip() else ""
            print(f"torchmagic: could not {what} {name!r} ({type(error).__name__}: {text}); left as it was",
                  file=sys.stderr)

    def _guarded(self, step: Callable[[], None], what: str) -> None:
        try:
            step()
        except KeyboardInterrupt:
            print(f"torchmagic: interrupted while {what}", file=sys.stderr)
        except Exception:
            self.shell.showtraceback()


def _run_all(step: Callable[[], None]) -> None:
    """Teardown: a failing step is reported on one line and the next one still runs."""
    try:
        step()
    except (Exception, KeyboardInterrupt) as error:  # teardown goes on
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"torchmagic: while cleaning up: {type(error).__name__}: {text}", file=sys.stderr)
