"""`make test` runs the doc pages: pytest's configuration collects them, and only them, with ipdoctest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_plain_pytest_collects_every_doc_page_and_no_module_docstrings():
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    items = [line for line in run.stdout.splitlines() if "::" in line]
    pages = sorted(f"docs/{p.name}::{p.name}" for p in (ROOT / "docs").glob("*.md"))
    assert len(pages) >= 2 and set(pages) <= set(items)
    # everything else is a test of tests/: ipdoctest did not wander into torchmagic/ or the README
    assert [i for i in items if not i.startswith("tests/")] == pages
