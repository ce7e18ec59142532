"""demo.ipynb executed headless: no errors, an SVG diagram in every traced cell, HTML keeps them."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

pytestmark = pytest.mark.notebook


def test_demo_runs_and_keeps_its_diagrams(tmp_path, capfd):
    from run_demo import run

    html_path = run(ROOT / "demo.ipynb", tmp_path)
    assert "without encryption" not in capfd.readouterr().err  # `make demo` is a new user's first command
    notebook = nbformat.read(tmp_path / "demo.ipynb", as_version=4)
    errors = [(c, o) for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    # only part 13 raises, on purpose: --stop-on-nan stops its exploding training loop
    assert [o["ename"] for _, o in errors] == ["NonFiniteGradient"]
    assert "raises-exception" in errors[0][0].metadata.get("tags", [])
    traced = [c for c in notebook.cells if c.cell_type == "code"
              and (c.source.startswith("%%autograd_trace") or "loss.backward()" in c.source and "opt.step()" in c.source)]
    assert len(traced) == 10
    for cell in traced:
        svgs = [o for o in cell.outputs if o.output_type == "display_data" and "image/svg+xml" in o["data"]]
        assert svgs, f"no diagram under: {cell.source[:40]!r}"
    stderr = [o.text for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "stream" and o.name == "stderr"]
    assert not any("Fontconfig" in s for s in stderr)
    html = html_path.read_text()
    assert html.count("<svg") >= 5 and "<script" not in html
    assert "grad [[0.25, 0.25], [0.25, 0.25]]" in html and "first NaN/Inf gradient here" in html
    # part 10: the transformer's layers folded, deep modules collapsed; part 11: norms per pass
    assert "TransformerEncoderLayer ×" in html and "drawn collapsed" in html
    assert "200 backward passes, graph of the last shown; same structure each pass" in html
    assert "gradient norm per backward pass" in html and "<polyline" in html
    # part 12: the RNN loop drawn as one iteration with its recurrent edge and per-step gradient plot
    assert html.count("loop ×50") >= 2 and "next iteration" in html
    assert html.count("grad norm of h per iteration (log scale)") >= 2 and "gradient norm per loop iteration" in html
    # part 13: the live view, replaced by the trace of what ran until --stop-on-nan stopped it
    live_cell = errors[0][0]
    displays = [o for o in live_cell.outputs if o.output_type == "display_data"]
    assert len(displays) == 1  # one display, updated in place (nbclient applies the updates to it)
    assert displays[0]["data"]["text/plain"].startswith("autograd trace of") and "image/svg+xml" in displays[0]["data"]
    message = errors[0][1]["evalue"]
    assert "computed a NaN/Inf gradient" in message and "an exploding gradient" in message
    assert "stopped at step 14; the trace keeps every pass so far: 15" in html
