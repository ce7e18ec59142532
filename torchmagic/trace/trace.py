"""The Trace object users hold: the recorded graph as data, and its views."""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import OptionError
from .build import CHANGED_IN_PLACE, Builder, build, remember_log, summarize_gradients
from .checks import TraceChecks
from .model import MissingGradient, PassInfo, TraceNode
from .naming import Labeler, snapshot
from .recorder import Recorder

SVG_BUDGET = 800_000  # bytes of SVG a display holds at most: with the bounded tables, a page stays under 1 MB
MAX_ROWS = 50  # default rows of the text view and the gradient table (the rest: "N more in t.nodes")
SAVE_FORMATS = {".svg": "svg", ".dot": "dot", ".gv": "dot", ".txt": "text"}


def frame_names(frame: Any) -> dict[str, Any]:
    """The tensors and modules a frame's code can name, globals then locals.

    Python 3.11 keeps the dict that ``f_locals`` builds on a function's frame, holding every local
    as it was, until the frame ends: emptied after the snapshot, so a trace keeps nothing alive
    through it (the next ``f_locals`` or ``locals()`` builds it afresh from the frame).
    """
    names = snapshot(frame.f_globals)
    if frame.f_code.co_flags & inspect.CO_OPTIMIZED:  # a function: its locals are a snapshot dict
        local = frame.f_locals
        names.update(snapshot(local))
        if type(local) is dict:  # (3.13 answers a write-through proxy: clearing it would delete the locals)
            local.clear()
    else:
        names.update(snapshot(frame.f_locals))
    return names


def _EMPTY_DATA() -> dict[str, Any]:  # noqa: N802 - a constructor of the empty trace's data
    return dict(nodes=[], grad_tensors={}, grad_versions={}, summaries={}, pass_values={}, missing=[], passes=[],
                grad_history={}, op_count=0, modules={}, module_calls={}, notes=[])


class Trace(TraceChecks):
    """The autograd graph some code built, with the gradients that flowed through it.

    As a context manager it records the code in its block and is filled in on exit::

        with torchmagic.trace() as t:
            out = model(x).sum()
            out.backward()
        t.grad("out"); print(t.text())
    """

    def __init__(self, *, max_nodes: int = 500, memory_budget: int = 256 * 2**20, small_values: int = 16,
                 cell: str = "", depth: int | None = None, expand: tuple[str, ...] = (), fold: bool = True,
                 stop_on_nan: bool = False, per_node_hooks: bool = False) -> None:
        self.max_nodes = max_nodes
        self.stop_on_nan = stop_on_nan
        self.per_node_hooks = per_node_hooks
        self.layout_timeout = 10.0  # seconds any diagram's layout may take before it is stopped
        self.max_rows = MAX_ROWS  # rows the text view and the gradient table list at most
        self.depth = depth  # None: the deepest module level that keeps the diagram readable
        self.expand = tuple(expand)
        self.fold = fold
        self.memory_budget = memory_budget
        self.small_values = small_values
        self.cell = cell
        self.error: str | None = None
        self._data: dict[str, Any] | None = None  # what build() made; None until first read
        self._pending: tuple | None = None  # (recorder, namespace snapshot, labeler, extra roots) until then
        self._gradients_dropped = False
        self._stats_done = False
        self._recorder: Recorder | None = None
        self._svg: str | None = None
        self._svg_error: Exception | None = None  # a layout that failed is not tried again for the same view
        self._view = None  # the View for the current settings, computed once per display
        self._loops = None  # the loops found in the graph, whatever the view

    # -- recording ----------------------------------------------------------------------
    def recorder(self) -> Recorder:
        recorder = Recorder(memory_budget=self.memory_budget, small_values=self.small_values)
        recorder.stop_on_nonfinite = self.stop_on_nan
        recorder.per_node_hooks = self.per_node_hooks
        return recorder

    def fill(self, recorder: Recorder, namespace: Mapping[str, Any] | None, labeler: Labeler | None = None,
             extra_roots: Sequence[Any] = ()) -> Trace:
        """Take over what ``recorder`` saw; the trace is built when first read (the recorder is then released).

        The namespace's tensors and modules are noted now, so names are those of the moment the
        traced code ended.
        """
        remember_log(recorder.log)
        self._pending = (recorder, snapshot(namespace), labeler, list(extra_roots))
        self._data = None
        self._stats_done = False
        self._svg = None
        self._svg_error = None
        self._view = None
        self._loops = None
        return self

    def __enter__(self) -> Trace:
        recorder = self._recorder = self.recorder()
        frame = sys._getframe(1)

        def names() -> dict[str, Any]:  # the block's names, for describing a stop mid-block
            return frame_names(frame)

        recorder.namespace_source = names
        recorder.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        recorder, self._recorder = self._recorder, None
        recorder.stop()
        recorder.namespace_source = None  # it holds the block's frame
        names = frame_names(sys._getframe(1))
        if exc is not None:
            self.error = f"{exc_type.__name__}: {exc}"
        self.fill(recorder, names)

    @classmethod
    def snapshot(cls, recorder: Recorder, namespace: Mapping[str, Any] | None, labeler: Labeler | None = None) -> Trace:
        """A trace of what ``recorder`` has seen so far, built without disturbing the recording
        (``--stop-on-nan`` describes the pass it stops at from one)."""
        trace = cls(memory_budget=recorder.memory_budget, small_values=recorder.small_values)
        with torch._C.DisableTorchFunction():  # our own reads must not be recorded as the user's ops
            trace._data = Builder(recorder, snapshot(namespace), labeler, ()).run()
            trace.nodes  # noqa: B018 - statistics now, while torch functions are left alone
        return trace

    def _built(self) -> dict[str, Any]:
        if self._data is None:
            pending, self._pending = self._pending, None
            if pending is None:
                self._data = _EMPTY_DATA()
            else:
                recorder, namespace, labeler, extra_roots = pending
                self._data = build(recorder, namespace, labeler, extra_roots)
        return self._data

    # -- data -----------------------------------------------------------------------------
    @property
    def nodes(self) -> list[TraceNode]:
        """Every tensor of the graph, inputs first, with gradient statistics (computed on first use)."""
        data = self._built()
        if not self._stats_done:
            self._stats_done = True
            summarize_gradients(data["nodes"], data["grad_tensors"], data["summaries"], self.small_values)
        return data["nodes"]

    @property
    def missing(self) -> list[MissingGradient]:
        """Leaves that require grad but got no gradient in the graph shown, each with why."""
        return self._built()["missing"]

    @property
    def passes(self) -> list[PassInfo]:
        """Every backward call the code made, in order (``pass.kept``: whether its graph is shown)."""
        return self._built()["passes"]

    @property
    def grad_history(self) -> dict[str, list[tuple[int, float]]]:
        """Each leaf's gradient norm per backward pass: name -> [(pass index, norm)], taken when the
        pass ended (before clipping or zeroing)."""
        return self._built()["grad_history"]

    @property
    def op_count(self) -> int:
        return self._built()["op_count"]

    @property
    def modules(self) -> dict[str, str]:
        """Module path -> class name, for every module in the graph (and their parents)."""
        return self._built()["modules"]

    @property
    def module_calls(self) -> dict[str, int]:
        """Module path -> how many of its calls the graph shows (a GAN's discriminator: 3)."""
        return self._built()["module_calls"]

    @property
    def notes(self) -> list[str]:
        """What the trace left out or recorded another way, and why, one line each."""
        return self._built()["notes"]

    @property
    def names(self) -> list[str]:
        """Every tensor label in the trace (``h (2)`` for the second binding of ``h``)."""
        return [n.name for n in self.nodes if n.name is not None]

    def node(self, name: str) -> TraceNode:
        """The tensor labelled ``name``; a name rebound several times means its last binding."""
        nodes = self.nodes
        matches = [n for n in nodes if n.name == name or name in n.names]
        if not matches:
            matches = [n for n in nodes if n.name is not None and n.name.split(" (")[0] == name]
        if not matches:
            lost = next((m for m in self.missing if m.name == name), None)
            if lost is not None:
                raise KeyError(f"{name!r} has no gradient in this trace: {lost.reason}")
            known = ", ".join(self.names) or "none"
            raise KeyError(f"no tensor named {name!r} in this trace; known names: {known}")
        return matches[-1]

    def drop_gradients(self) -> None:
        """Keep the statistics, let go of the gradient tensors (``t.grad`` then raises LookupError).

        The magics do this to a trace once a newer one is shown, so that the traces kept in
        ``%autograd_trace show``'s history hold one trace's gradients at most.
        """
        if self._data is None and self._pending is None:
            return
        self.nodes  # noqa: B018 - statistics first, from the tensors
        data = self._built()
        data["grad_tensors"], data["grad_versions"], data["pass_values"] = {}, {}, {}
        self._gradients_dropped = True

    def grad(self, name: str, pass_index: int | None = None) -> torch.Tensor | None:
        """The gradient that flowed into the tensor named ``name`` in the last pass that reached it
        (None if none did); ``pass_index`` (0-based, as in ``t.passes``) asks for one pass.

        For a leaf it is what that pass contributed, before any clipping; ``t.node(name).leaf_grad``
        describes ``.grad`` itself where it differs. Raises KeyError for unknown names, and
        LookupError where the value was not kept (over the memory budget, or a pass whose graph a
        later pass from the same line replaced: ``t.grad_history`` has its norm).
        """
        node = self.node(name)
        data = self._built()
        if self._gradients_dropped:
            raise LookupError(f"this trace no longer keeps gradient tensors (a newer trace was shown); the statistics "
                              f"of {name!r} are in t.node({name!r}).grad")
        if pass_index is not None and pass_index != node.grad_pass:
            if not -len(self.passes) <= pass_index < len(self.passes):
                raise LookupError(f"no pass {pass_index}: the code made {len(self.passes)} backward passes")
            pass_index %= len(self.passes)
            value = data["pass_values"].get(node.id, {}).get(pass_index)
            if value is None:
                info = self.passes[pass_index]
                why = "its graph was replaced by a later pass from the same line" if not info.kept else \
                    "that pass did not reach it"
                raise LookupError(f"no gradient of {name!r} kept for pass {pass_index} ({why}); "
                                  "t.grad_history has each leaf's norm per pass")
            if not isinstance(value, torch.Tensor):
                raise LookupError(f"the gradient of {name!r} in pass {pass_index} was over the memory budget; "
                                  "only its statistics were kept")
            return value
        tensor = data["grad_tensors"].get(node.id)
        if tensor is not None:
            version = data["grad_versions"].get(node.id)
            if version is not None and tensor._version != version:
                raise LookupError(f"the gradient of {name!r} is shared with its .grad (or with a gradient the code "
                                  f"holds), which was changed in place since the trace was taken; "
                                  f"t.node({name!r}).grad has the statistics of the pass")
            return tensor
        if node.missing_reason == CHANGED_IN_PLACE:
            raise LookupError(f"the gradient of {name!r} was kept without a copy (a leaf's .grad, or a gradient "
                              "the code holds), which was changed in place by code the trace did not see (read the "
                              "trace first, or change it inside the traced code); t.grad_history has the leaves' "
                              "norms per pass")
        if node.grad is not None:
            raise LookupError(
                f"the gradient of {name!r} was over the memory budget; only its statistics were kept "
                f"(t.node({name!r}).grad); raise TorchMagic.memory_budget to keep it"
            )
        return None

    @property
    def nonfinite_origin(self) -> TraceNode | None:
        return next((n for n in self.nodes if n.nonfinite_origin), None)

    @property
    def structure_changed(self) -> bool:
        """Whether passes from one line of code saw graphs of different shapes."""
        by_line: dict[Any, set[int]] = {}
        for info in self.passes:
            by_line.setdefault((info.location, info.entry), set()).add(info.signature)
        return any(len(signatures) > 1 for signatures in by_line.values())

    # -- views --------------------------------------------------------------------------
    def title(self) -> str:
        parts = [f"autograd trace{' of ' + self.cell if self.cell else ''}"]
        ops = len({n.op_id for n in self.nodes if n.kind == 'op'})
        parts.append(f"{len(self.nodes)} tensors, {ops} ops")
        count = len(self.passes)
        if count:
            text = f"{count} backward pass{'es' if count != 1 else ''}"
            shown = sum(1 for p in self.passes if p.kept)
            if count > 1:
                text += ", graph of the last shown" if shown == 1 else f", graphs of {shown} shown (the last from each line)"
                if shown < count:
                    text += "; structure changed between passes" if self.structure_changed else "; same structure each pass"
            parts.append(text)
        else:
            parts.append("no backward yet")
        return " · ".join(parts)

    def set_view(self, *, depth: int | None = None, expand: tuple[str, ...] = (), fold: bool = True,
                 max_nodes: int | None = None, max_rows: int | None = None) -> Trace:
        """Change how the diagram shows modules (``depth``, ``expand``, ``fold``), its size limit and
        how many rows the text view and the gradient table list."""
        self.depth, self.expand, self.fold = depth, tuple(expand), fold
        if max_nodes is not None:
            self.max_nodes = max_nodes
        if max_rows is not None:
            self.max_rows = max_rows
        self._svg = None
        self._svg_error = None
        self._view = None
        return self

    def loops(self) -> list:
        """The loops whose iterations fold in the diagram (``torchmagic.trace.loops.Loop``), found once."""
        if self._loops is None:
            from .loops import find_loops

            self._loops = find_loops(self.nodes)
        return self._loops

    def view(self):
        """How the diagram shows modules: clusters, collapsed module calls, folded repeats (a ``View``)."""
        if self._view is not None:
            return self._view
        from .view import AUTO_DEPTH_NODES, plan

        origin = self.nonfinite_origin
        reveal = origin.module if origin is not None and origin.module and self.depth is None else None
        self._view = plan(self.nodes, self.modules, depth=self.depth, expand=self.expand, fold=self.fold,
                          auto_target=min(AUTO_DEPTH_NODES, self.max_nodes), reveal=reveal,
                          loops=self.loops() if self.fold else None)
        return self._view

    def _diagram(self, max_nodes: int | None = None, note: str = ""):
        from ..render.dot import to_digraph

        view = self.view()
        notes = view.notes() + ([note] if note else [])
        return to_digraph(self.nodes, title=self.title(), max_nodes=max_nodes or self.max_nodes, view=view,
                          notes=notes), view

    @property
    def digraph(self):
        """The diagram as a ``graphviz.Digraph`` (what torchviz users know)."""
        return self._diagram()[0]

    def to_dot(self, full: bool = False) -> str:
        """DOT source of the diagram; deterministic for the same code. ``full=True``: every tensor
        drawn, nothing collapsed, folded or left out (module clusters kept)."""
        if not full:
            return self.digraph.source
        from ..render.dot import to_digraph
        from .view import plan

        view = plan(self.nodes, self.modules, depth=None, expand=(), fold=False, auto_target=len(self.nodes))
        return to_digraph(self.nodes, title=self.title(), max_nodes=len(self.nodes) or 1, view=view).source

    def svg(self) -> str:
        """The diagram as SVG text, laid out in a worker process (no system Graphviz needed) and
        stopped after ``layout_timeout`` seconds (LayoutTimeout), so showing a trace never freezes.
        A diagram too big for a page (over SVG_BUDGET bytes) is drawn again with fewer boxes."""
        if self._svg_error is not None:
            raise self._svg_error
        if self._svg is None:
            from ..errors import LayoutTimeout
            from ..render.svg import render_svg

            start = time.perf_counter()
            graph, view = self._diagram()
            limit = min(self.max_nodes, max(view.box_count, 10))  # (scaled from what is drawn, not the cap)
            try:
                svg = render_svg(graph.source, timeout=self.layout_timeout)
                for _ in range(3):
                    if len(svg) <= SVG_BUDGET:
                        break
                    limit = max(10, int(limit * SVG_BUDGET / len(svg) * 0.85))
                    note = (f"drawn with at most {limit} tensors to keep the page under "
                            f"{SVG_BUDGET // 1000} KB (max_nodes={self.max_nodes}); the trace keeps them all")
                    graph, view = self._diagram(limit, note)
                    left = self.layout_timeout - (time.perf_counter() - start)
                    svg = render_svg(graph.source, timeout=max(left, 0.001))
                self._svg = svg
            except LayoutTimeout as error:
                boxes = min(view.box_count, limit)
                self._svg_error = LayoutTimeout(
                    f"laying out {boxes} boxes took over {self.layout_timeout:g} s and was stopped; the text view "
                    "shows the graph (--depth, --max-nodes or --save trace.dot for a smaller or offline diagram)")
                raise self._svg_error from error
        return self._svg

    def text(self) -> str:
        """Graph and gradient table as aligned text (what a terminal shows), at most ``max_rows`` rows each."""
        from ..render.passes import leaf_grad_lines, pass_lines
        from ..render.text import gradient_lines, graph_lines, loop_lines

        view = self.view()
        lines = [self.title()]
        if self.error:
            lines.append(f"  the code raised {self.error}; showing what ran")
        lines += pass_lines(self.passes, self.notes)
        lines.append("graph (inputs first):")
        lines += graph_lines(self.nodes, self.max_rows, view)
        grads = gradient_lines(self.nodes, self.missing, self.max_rows) + leaf_grad_lines(self.nodes)
        if grads:
            lines.append("gradients:")
            lines += grads
        if view.loops:
            lines.append("gradient norm per loop iteration:")
            lines += loop_lines(self.nodes, view.loops)
        if len(self.passes) > 1 and self.grad_history:
            from ..render.history import history_lines

            lines.append("gradient norm per backward pass:")
            lines += history_lines(self.grad_history, max_rows=self.max_rows)
        return "\n".join(lines)

    def html(self) -> str:
        """Diagram (inline SVG), loop plots and gradient table as one HTML fragment."""
        import html as html_module

        from ..render.html import gradient_table, loop_table
        from ..render.passes import leaf_grad_html, pass_html

        note = f"<p><b>the code raised</b> {html_module.escape(self.error)}; showing what ran</p>" if self.error else ""
        note += pass_html(self.passes, self.notes)
        history = ""
        if len(self.passes) > 1 and self.grad_history:
            from ..render.history import history_table

            history = history_table(self.grad_history, max_rows=self.max_rows)
        loops = loop_table(self.nodes, self.view().loops)
        table = gradient_table(self.nodes, self.missing, self.max_rows) + leaf_grad_html(self.nodes)
        return f'<div class="torchmagic-trace">{note}{self.svg()}{loops}{table}{history}</div>'

    def save(self, path: str | Path) -> Path:
        """Write the diagram as .svg, the whole graph as .dot/.gv, or the text view as .txt (by extension)."""
        path = Path(path)
        kind = SAVE_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise OptionError(f"cannot save a trace as {path.suffix or 'a file without extension'!r}: "
                              f"use one of {', '.join(SAVE_FORMATS)}")
        # a saved .dot is the whole graph; the SVG and the text are what the cell showed
        content = {"svg": self.svg, "dot": lambda: self.to_dot(full=True), "text": self.text}[kind]()
        path.write_text(content, encoding="utf-8")
        return path

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, str]:
        def wanted(mime: str) -> bool:
            return (include is None or mime in include) and not (exclude and mime in exclude)

        bundle = {"text/plain": self.text()}
        try:
            if wanted("image/svg+xml"):
                bundle["image/svg+xml"] = self.svg()
            if wanted("text/html"):
                bundle["text/html"] = self.html()
        except Exception as error:  # layout failure or timeout: the text view shows, with why
            bundle = {"text/plain": bundle["text/plain"] + f"\n(diagram unavailable: {type(error).__name__}: {error})"}
        return bundle

    def __repr__(self) -> str:
        return self.text()
