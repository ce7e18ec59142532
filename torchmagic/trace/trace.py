"""The Trace object users hold: the recorded graph as data, and its views."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import OptionError
from .build import build, summarize_gradients
from .model import MissingGradient, PassInfo, TraceNode
from .naming import Labeler
from .recorder import Recorder

SVG_BUDGET = 800_000  # bytes of SVG a display holds at most: with the bounded tables, a page stays under 1 MB
MAX_ROWS = 50  # default rows of the text view and the gradient table (the rest: "N more in t.nodes")
SAVE_FORMATS = {".svg": "svg", ".dot": "dot", ".gv": "dot", ".txt": "text"}


class Trace:
    """The autograd graph some code built, with the gradients that flowed through it.

    As a context manager it records the code in its block and is filled in on exit::

        with torchmagic.trace() as t:
            out = model(x).sum()
            out.backward()
        t.grad("out"); print(t.text())
    """

    def __init__(self, *, max_nodes: int = 500, memory_budget: int = 64 * 2**20, small_values: int = 16,
                 cell: str = "", depth: int | None = None, expand: tuple[str, ...] = (), fold: bool = True) -> None:
        self.max_nodes = max_nodes
        self.layout_timeout = 10.0  # seconds any diagram's layout may take before it is stopped
        self.max_rows = MAX_ROWS  # rows the text view and the gradient table list at most
        self.depth = depth  # None: the deepest module level that keeps the diagram readable
        self.expand = tuple(expand)
        self.fold = fold
        self.memory_budget = memory_budget
        self.small_values = small_values
        self.cell = cell
        self._nodes: list[TraceNode] = []
        self._stats_done = True
        self.missing: list[MissingGradient] = []
        self.passes: list[PassInfo] = []
        self.grad_history: dict[str, list[tuple[int, float]]] = {}
        self.op_count = 0
        self.modules: dict[str, str] = {}  # module path -> class name, for every module in the graph
        self.error: str | None = None
        self._grad_tensors: dict[int, torch.Tensor] = {}
        self._recorder: Recorder | None = None
        self._svg: str | None = None
        self._svg_error: Exception | None = None  # a layout that failed is not tried again for the same view
        self._view = None  # the View for the current settings, computed once per display
        self._loops = None  # the loops found in the graph, whatever the view

    # -- recording ----------------------------------------------------------------------
    def recorder(self) -> Recorder:
        return Recorder(memory_budget=self.memory_budget, small_values=self.small_values)

    def fill(self, recorder: Recorder, namespace: Mapping[str, Any] | None, labeler: Labeler | None = None,
             extra_roots: list[torch.Tensor] = ()) -> Trace:
        """Take over what ``recorder`` saw (it is released afterwards)."""
        data = build(recorder, namespace, labeler, extra_roots)
        self._nodes = data["nodes"]
        self._stats_done = False
        self._grad_tensors = data["grad_tensors"]
        self.missing = data["missing"]
        self.passes = data["passes"]
        self.grad_history = data["grad_history"]
        self.op_count = data["op_count"]
        self.modules = data["modules"]
        self._svg = None
        self._svg_error = None
        self._view = None
        self._loops = None
        return self

    def __enter__(self) -> Trace:
        self._recorder = self.recorder()
        self._recorder.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        recorder, self._recorder = self._recorder, None
        recorder.stop()
        caller = sys._getframe(1)
        namespace = dict(caller.f_globals)
        namespace.update(caller.f_locals)
        del caller
        if exc is not None:
            self.error = f"{exc_type.__name__}: {exc}"
        self.fill(recorder, namespace)

    # -- data -----------------------------------------------------------------------------
    @property
    def nodes(self) -> list[TraceNode]:
        """Every tensor of the graph, inputs first, with gradient statistics (computed on first use)."""
        if not self._stats_done:
            self._stats_done = True
            summarize_gradients(self._nodes, self._grad_tensors, self.small_values)
        return self._nodes

    @property
    def names(self) -> list[str]:
        """Every tensor label in the trace (``h (2)`` for the second binding of ``h``)."""
        return [n.name for n in self.nodes if n.name is not None]

    def node(self, name: str) -> TraceNode:
        """The tensor labelled ``name``; a name rebound several times means its last binding."""
        matches = [n for n in self.nodes if n.name == name or name in n.names]
        if not matches:
            matches = [n for n in self.nodes if n.name is not None and n.name.split(" (")[0] == name]
        if not matches:
            known = ", ".join(self.names) or "none"
            raise KeyError(f"no tensor named {name!r} in this trace; known names: {known}")
        return matches[-1]

    def grad(self, name: str) -> torch.Tensor | None:
        """The gradient that flowed into the tensor named ``name`` (None if none reached it).

        Raises KeyError for unknown names, and LookupError when the gradient was over the
        memory budget and only its statistics were kept (``t.node(name).grad``).
        """
        node = self.node(name)
        if node.id in self._grad_tensors:
            return self._grad_tensors[node.id]
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
        return len({p.signature for p in self.passes}) > 1

    # -- views --------------------------------------------------------------------------
    def title(self) -> str:
        parts = [f"autograd trace{' of ' + self.cell if self.cell else ''}"]
        ops = len({n.op_id for n in self.nodes if n.kind == 'op'})
        parts.append(f"{len(self.nodes)} tensors, {ops} ops")
        count = len(self.passes)
        if count:
            text = f"{count} backward pass{'es' if count != 1 else ''}"
            if count > 1:
                text += ", graph of the last shown"
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
            limit = self.max_nodes
            try:
                svg = render_svg(graph.source, timeout=self.layout_timeout)
                for _ in range(2):
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
        from ..render.text import gradient_lines, graph_lines, loop_lines

        view = self.view()
        lines = [self.title()]
        if self.error:
            lines.append(f"  the code raised {self.error}; showing what ran")
        lines.append("graph (inputs first):")
        lines += graph_lines(self.nodes, self.max_rows, view)
        grads = gradient_lines(self.nodes, self.missing, self.max_rows)
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

        note = f"<p><b>the code raised</b> {html_module.escape(self.error)}; showing what ran</p>" if self.error else ""
        history = ""
        if len(self.passes) > 1 and self.grad_history:
            from ..render.history import history_table

            history = history_table(self.grad_history, max_rows=self.max_rows)
        loops = loop_table(self.nodes, self.view().loops)
        table = gradient_table(self.nodes, self.missing, self.max_rows)
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
