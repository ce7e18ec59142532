"""Lay out and render DOT to SVG in-process through pygraphviz (its wheels bundle Graphviz)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile

from ..errors import LayoutTimeout

# Graphviz lays out in C and cannot be interrupted in-process. Diagrams with more boxes than
# this are laid out in a child process that is killed after the time limit instead.
IN_PROCESS_BOXES = 600
_CHILD = (
    "import sys, pygraphviz\n"
    "data = pygraphviz.AGraph(string=sys.stdin.read()).draw(format='svg', prog='dot')\n"
    "sys.stdout.buffer.write(data if isinstance(data, bytes) else data.encode())\n"
)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the bundled fontconfig and Graphviz write there, not to sys.stderr).

    In a kernel, whatever reaches fd 2 lands in the cell's output.
    """
    try:
        sys.stderr.flush()
    except Exception:
        pass
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def render_svg(dot_source: str, *, boxes: int = 0, timeout: float = 10.0) -> str:
    """SVG text for ``dot_source``, laid out with ``dot``.

    Small diagrams (``boxes`` at most IN_PROCESS_BOXES) render in-process; bigger ones in a child
    process stopped after ``timeout`` seconds, raising LayoutTimeout, so a cell never freezes.
    """
    if boxes > IN_PROCESS_BOXES:
        text = _render_in_child(dot_source, timeout, boxes)
    else:
        import pygraphviz

        with _quiet_stderr():
            graph = pygraphviz.AGraph(string=dot_source)
            data = graph.draw(format="svg", prog="dot")
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    # drop the XML prolog and DOCTYPE so the SVG can be inlined in HTML
    start = text.find("<svg")
    return text[start:] if start > 0 else text


def _render_in_child(dot_source: str, timeout: float, boxes: int) -> str:
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD], input=dot_source.encode("utf-8"),
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise LayoutTimeout(f"laying out {boxes} boxes took over {timeout:g} s and was stopped; "
                            "the text view shows the graph (--depth, --max-nodes or --save trace.dot "
                            "for a smaller or offline diagram)") from None
    if done.returncode != 0:
        raise RuntimeError(f"Graphviz failed: {done.stderr.decode(errors='replace').strip()[-300:]}")
    return done.stdout.decode("utf-8")
