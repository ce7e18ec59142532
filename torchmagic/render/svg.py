"""Lay out and render DOT to SVG in-process through pygraphviz (its wheels bundle Graphviz)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


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


def render_svg(dot_source: str) -> str:
    """SVG text for ``dot_source``, laid out with ``dot``."""
    import pygraphviz

    with _quiet_stderr():
        graph = pygraphviz.AGraph(string=dot_source)
        data = graph.draw(format="svg", prog="dot")
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    # drop the XML prolog and DOCTYPE so the SVG can be inlined in HTML
    start = text.find("<svg")
    return text[start:] if start > 0 else text
