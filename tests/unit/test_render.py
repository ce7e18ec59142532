"""Renderers: golden DOT for representative graphs, SVG in-process, escaping, the node limit.

Regenerate the golden files on purpose with ``TORCHMAGIC_REGEN_GOLDEN=1 pytest tests/unit/test_render.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torchmagic

GOLDEN = Path(__file__).parent / "golden"


def seed_graph():
    with torchmagic.trace() as t:
        x = torch.ones(2, 2, requires_grad=True)
        y = x + 2
        z = y * y * 3
        out = z.mean()
        out.backward()
    return t


def split_graph():
    with torchmagic.trace() as t:
        x = torch.arange(4.0, requires_grad=True)
        a, b = torch.split(x, 2)
        out = (a * 3).sum() + b.sum()
        out.backward()
    return t


def mlp_graph():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    data = torch.ones(2, 3)
    with torchmagic.trace() as t:
        loss = torch.nn.functional.mse_loss(model(data), torch.zeros(2, 1))
        loss.backward()
    return t


def nan_graph():
    with torchmagic.trace() as t:
        x = torch.tensor([0.0, 4.0], requires_grad=True)
        r = torch.sqrt(x)
        out = r.sum()
        out.backward()
    return t


@pytest.mark.parametrize("build", [seed_graph, split_graph, mlp_graph, nan_graph], ids=lambda f: f.__name__)
def test_golden_dot(build):
    dot = build().to_dot()
    path = GOLDEN / f"{build.__name__}.dot"
    if os.environ.get("TORCHMAGIC_REGEN_GOLDEN"):
        path.write_text(dot)
    assert dot == path.read_text(), f"DOT changed; regenerate {path.name} on purpose if intended"


def test_dot_is_deterministic():
    assert seed_graph().to_dot() == seed_graph().to_dot()


def test_svg_renders_in_process_with_labels():
    svg = seed_graph().svg()
    assert svg.startswith("<svg") and "</svg>" in svg
    for text in (">x<", ">out<", "grad [[4.5, 4.5], [4.5, 4.5]]", "grad [[0.25, 0.25], [0.25, 0.25]]"):
        assert text in svg
    assert "test_render.py, line" in svg and "z = y * y * 3" in svg  # hovering shows the source line


def test_svg_rendering_writes_nothing_to_fd2(capfd):
    seed_graph().svg()
    assert capfd.readouterr().err == ""


def test_digraph_is_a_graphviz_digraph():
    import graphviz

    assert isinstance(seed_graph().digraph, graphviz.Digraph)


def test_node_limit_summarises_what_was_left_out():
    with torchmagic.trace(max_nodes=10) as t:
        x = torch.ones(3, requires_grad=True)
        h = x
        for _ in range(50):
            h = h * 1.01
        h.sum().backward()
    dot = t.to_dot()
    assert "more tensors not drawn (max_nodes=10)" in dot
    assert dot.count("shape=ellipse") + dot.count("shape=box") <= 2 * 10  # a named tensor is an op and a box
    assert len(t.nodes) == 52  # the trace keeps them all
    assert "earlier tensors not shown" in t.text()


def test_nonfinite_origin_is_drawn_in_alarm_colour():
    dot = nan_graph().to_dot()
    assert "first NaN/Inf gradient here" in dot and 'fillcolor="#ff9a9a"' in dot


def test_save_by_extension(tmp_path):
    t = seed_graph()
    assert t.save(tmp_path / "a.svg").read_text().startswith("<svg")
    assert t.save(tmp_path / "a.gv").read_text().startswith("digraph")
    assert "graph (inputs first)" in t.save(tmp_path / "a.txt").read_text()
    with pytest.raises(torchmagic.errors.OptionError, match="cannot save a trace as '.png'"):
        t.save(tmp_path / "a.png")


def test_mimebundle_respects_include():
    t = seed_graph()
    assert set(t._repr_mimebundle_(include=["text/plain"])) == {"text/plain"}
    assert {"image/svg+xml", "text/html"} <= set(t._repr_mimebundle_())
