"""``--live``: a trace's LiveView shown while the cell runs, then replaced by the finished trace.

In a notebook the view is one display, updated in place through its display id; in a terminal
it is one status line, rewritten in place with a carriage return.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any

from IPython.display import display

from ..trace.live import LiveView


class LiveDisplay:
    """Shows a recording's LiveView until the trace is ready, then puts the trace in its place."""

    def __init__(self, session: Any, recorder: Any, *, interval: float, cell: str) -> None:
        self.session = session
        types = session.shell.display_formatter.active_types
        self.rich = "text/html" in types or "image/svg+xml" in types  # a front end that renders HTML
        self.handle: Any = None
        self._line_length = 0
        self.view = LiveView(recorder, self.publish, interval=interval, names=lambda: session.shell.user_ns,
                             cell=cell)

    def publish(self, view: LiveView) -> None:
        if self.rich:
            include = ["text/plain", "text/html"]
            if self.handle is None:
                self.handle = display(view, display_id=True, include=include)
            else:
                self.handle.update(view, include=include)
            return
        width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
        line = view.text()[:width]
        sys.stdout.write("\r" + line + " " * max(0, self._line_length - len(line)))
        sys.stdout.flush()
        self._line_length = len(line)

    def finish(self) -> None:
        """Stop listening; in a terminal, end the status line."""
        self.view.detach()
        if not self.rich and self._line_length:
            self.view.refresh()  # the final count, then a new line for what follows
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._line_length = 0
        self.view.publish = lambda view: None

    def replace(self, obj: Any, text_only: bool) -> None:
        """Show ``obj`` (the finished trace) where the live view was."""
        self.finish()
        if self.rich and self.handle is not None:
            include = ["text/plain"] if text_only else self.session.shell.display_formatter.active_types
            self.handle.update(obj, include=include)
        else:
            self.session.show(obj, text_only=text_only)
