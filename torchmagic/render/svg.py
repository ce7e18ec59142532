"""Lay out DOT and render it to SVG in a worker process, so no layout can block the caller.

Graphviz lays out in C and cannot be interrupted in-process. Every layout therefore runs in a
long-lived child process (pygraphviz, whose wheels bundle Graphviz): started on first use
(about 50 ms), reused for every diagram after that (about 1 ms per diagram beyond the layout
itself), and killed when a layout overruns its time limit; the next diagram starts a fresh one.
Graphviz's own messages (fontconfig warnings, "graph has N nodes... layout may take a long
time") go to the worker's stderr, which is discarded: none of it reaches a notebook cell.
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import threading

from ..errors import LayoutTimeout

# The worker reads "<length>\n<dot bytes>" and answers "ok <length>\n<svg bytes>" or
# "error <length>\n<message>". It imports nothing but pygraphviz.
_WORKER = r"""
import sys, warnings
warnings.simplefilter("ignore")
import pygraphviz
source, sink = sys.stdin.buffer, sys.stdout.buffer
while True:
    header = source.readline()
    if not header:
        break
    dot = source.read(int(header)).decode("utf-8")
    try:
        data = pygraphviz.AGraph(string=dot).draw(format="svg", prog="dot")
        status = b"ok"
    except Exception as error:
        data, status = f"{type(error).__name__}: {error}".encode("utf-8", "replace"), b"error"
    sink.write(b"%s %d\n" % (status, len(data)))
    sink.write(data)
    sink.flush()
"""


class LayoutError(RuntimeError):
    """Graphviz could not lay out or render the diagram."""


class LayoutWorker:
    """One child process that lays out DOT on request; restarted after it is stopped."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._owner = os.getpid()
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _start(self) -> subprocess.Popen:
        if self._owner != os.getpid():  # a forked child (a DataLoader worker) starts its own, never the parent's
            self._process, self._owner, self._lock = None, os.getpid(), threading.Lock()
        if not self.running:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, close_fds=True,
            )
        return self._process

    def stop(self) -> None:
        """Kill the worker now (the next layout starts a new one)."""
        process, self._process = self._process, None
        if process is not None and self._owner == os.getpid():
            process.kill()
            process.wait()
            for pipe in (process.stdin, process.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass

    def render(self, dot_source: str, timeout: float) -> str:
        """SVG text for ``dot_source``; LayoutTimeout after ``timeout`` seconds (the worker is killed)."""
        with self._lock:
            process = self._start()
            answer: list = []
            reader = threading.Thread(target=_exchange, args=(process, dot_source.encode("utf-8"), answer),
                                      daemon=True)
            reader.start()
            reader.join(timeout)
            if reader.is_alive():
                self.stop()  # closes the pipes; the reader thread then ends on its own
                raise LayoutTimeout(f"layout took over {timeout:g} s and was stopped")
            if not answer or isinstance(answer[0], BaseException):
                self.stop()
                reason = answer[0] if answer else "no answer"
                raise LayoutError(f"the layout process failed ({reason})")
            status, data = answer
            if status != b"ok":
                raise LayoutError(f"Graphviz failed: {data.decode('utf-8', 'replace')[-300:]}")
            return data.decode("utf-8")


def _exchange(process: subprocess.Popen, request: bytes, answer: list) -> None:
    """Send one request and read one answer (runs in a helper thread, so the caller can time out)."""
    try:
        process.stdin.write(b"%d\n" % len(request))
        process.stdin.write(request)
        process.stdin.flush()
        header = process.stdout.readline()
        if not header:
            raise EOFError("the layout process exited")
        status, length = header.split()
        answer += [status, _read_exactly(process.stdout, int(length))]
    except BaseException as error:  # reported to the caller, which stops the worker
        answer[:] = [error]


def _read_exactly(stream, length: int) -> bytes:
    chunks, left = [], length
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("the layout process exited mid-answer")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


WORKER = LayoutWorker()
atexit.register(WORKER.stop)


def render_svg(dot_source: str, *, timeout: float = 10.0) -> str:
    """SVG text for ``dot_source``, laid out with ``dot`` in the worker process.

    Raises LayoutTimeout when the layout takes longer than ``timeout`` seconds, so a cell
    never freezes; the caller shows the text view instead.
    """
    text = WORKER.render(dot_source, timeout)
    # drop the XML prolog and DOCTYPE so the SVG can be inlined in HTML
    start = text.find("<svg")
    return compact(text[start:] if start > 0 else text)


_FONT = ' font-family="Helvetica,sans-Serif"'


def compact(svg: str) -> str:
    """Graphviz's SVG, smaller: no comments, and the font named once on the root element (it is
    inherited) instead of on every text; about a sixth less for a big diagram."""
    svg = re.sub(r"<!--.*?-->\n?", "", svg, flags=re.S)
    if _FONT in svg:
        svg = svg.replace(_FONT, "").replace("<svg ", "<svg" + _FONT + " ", 1)
    return svg
