"""`make test` runs the docs: pytest's configuration collects the doc pages and the magics' docstring
sessions with ipdoctest, and nothing else outside tests/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_plain_pytest_collects_every_doc_page_and_the_magics_docstrings():
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    items = [line for line in run.stdout.splitlines() if "::" in line]
    pages = sorted(f"docs/{p.name}::{p.name}" for p in (ROOT / "docs").glob("*.md"))
    assert len(pages) >= 2 and set(pages) <= set(items)
    magics = {"torchmagic/magics/trace.py::torchmagic.magics.trace.TraceMagics.autograd_trace",
              "torchmagic/magics/tensor.py::torchmagic.magics.tensor.TensorMagics.tensor",
              "torchmagic/magics/device.py::torchmagic.magics.device.DeviceMagics.device"}
    # everything else is a test of tests/: ipdoctest did not wander into the core or the README
    assert set(i for i in items if not i.startswith("tests/")) == set(pages) | magics
