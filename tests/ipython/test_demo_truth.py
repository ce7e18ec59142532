"""Every diagram the demo notebook draws passes the diagram property (tests/unit/truth.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

import torchmagic
import torchmagic.errors

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "unit"))
import truth  # noqa: E402


def test_every_demo_diagram_is_true(shell):
    notebook = nbformat.read(ROOT / "demo.ipynb", as_version=4)
    checked, last = 0, None
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        raises = "raises-exception" in cell.metadata.get("tags", [])  # part 13 stops itself at a NaN
        shell.run(cell.source, expect_error=torchmagic.errors.NonFiniteGradient if raises else None)
        trace = torchmagic.last_trace()
        if trace is not None and trace is not last:
            last = trace
            for options in ({}, {"fold": False}):
                trace.set_view(**options)
                truth.check(trace)
            checked += 1
    assert checked >= 10  # every traced cell of the demo
