"""Renderers: golden DOT for representative graphs, SVG in-process, escaping, the node limit.

Regenerate the golden files on purpose with ``TORCHMAGIC_REGEN_GOLDEN=1 pytest tests/unit/test_render.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import scenes
import torch
from graphs import seed

import torchmagic

GOLDEN = Path(__file__).parent / "golden"


def seed_graph():
    return seed()[0]


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


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(4)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return x + torch.relu(self.lin(self.norm(x)))


class Net(torch.nn.Module):
    def __init__(self, blocks: int = 4) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(3, 4)
        self.blocks = torch.nn.Sequential(*[Block() for _ in range(blocks)])
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.blocks(self.inp(x)))


def blocks_trace(**view):
    torch.manual_seed(0)
    net = Net()
    data = torch.randn(5, 3)
    with torchmagic.trace(**view) as t:
        loss = net(data).square().mean()
        loss.backward()
    return t


def blocks_folded():
    return blocks_trace()


def blocks_depth2():
    return blocks_trace(depth=2)


def blocks_expand():
    return blocks_trace(depth=2, expand=("net.blocks.2",))


def rnn_folded():
    return scenes.rnn_loop(5)


def blocks_cell_folded():
    return scenes.folded_blocks_cell()


def blocks_cell_depth1():
    return scenes.folded_blocks_cell(depth=1)


def dcgan_calls_depth0():
    return scenes.fill_scope_by_calls(scenes.dcgan_step(depth=0), "netD", "bce")


@pytest.mark.parametrize("build", [seed_graph, split_graph, mlp_graph, nan_graph, blocks_folded, blocks_depth2,
                                   blocks_expand, rnn_folded, blocks_cell_folded, blocks_cell_depth1,
                                   dcgan_calls_depth0], ids=lambda f: f.__name__)
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
    assert "graphs.py, line" in svg and "z = y * y * 3" in svg  # hovering shows the source line


def test_svg_rendering_writes_nothing_to_fd2(capfd):
    seed_graph().svg()
    assert capfd.readouterr().err == ""


def test_digraph_is_a_graphviz_digraph():
    import graphviz

    assert isinstance(seed_graph().digraph, graphviz.Digraph)


def test_node_limit_summarises_what_was_left_out():
    with torchmagic.trace(max_nodes=10, fold=False) as t:
        x = torch.ones(3, requires_grad=True)
        h = x
        for _ in range(50):
            h = h * 1.01
        h.sum().backward()
    dot = t.to_dot()
    assert "more tensors not drawn (max_nodes=10)" in dot
    assert dot.count("shape=ellipse") + dot.count("shape=box") <= 2 * 10  # a named tensor is an op and a box
    assert len(t.nodes) == 52  # the trace keeps them all


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


def test_repeated_blocks_fold_into_one_drawing_and_keep_every_layer():
    t = blocks_trace()
    view = t.view()
    (fold,) = view.folds.values()
    assert fold.paths == [f"net.blocks.{i}" for i in range(4)] and fold.kind == "Block"
    dot = t.to_dot()
    assert "net.blocks.0 … 3 · Block ×4" in dot and "net.blocks.1.lin" not in dot
    # nothing is lost: each layer's parameters still carry their own gradient statistics
    norms = {t.node(f"net.blocks.{i}.lin.weight").grad.norm for i in range(4)}
    assert len(norms) == 4 and all(n > 0 for n in norms)
    # the saved DOT is the whole graph: every block drawn, nothing folded
    full = t.to_dot(full=True)
    assert all(f"net.blocks.{i}.lin.weight" in full for i in range(4)) and "×4" not in full


def test_depth_collapses_modules_into_boxes_with_parameters_and_gradient_norm():
    t = blocks_trace(depth=0)
    view = t.view()
    assert set(view.collapsed) == {("net", 1)} and view.box_count <= 5
    unit = view.collapsed[("net", 1)]
    assert unit.params == sum(p.numel() for p in Net().parameters())
    params = [n for n in t.nodes if n.kind == "param"]
    assert unit.grad_norm == pytest.approx(sum(n.grad.norm ** 2 for n in params) ** 0.5)
    assert "net · Net" in t.to_dot() and "modules deeper than level 0 (as asked)" in t.text()


def test_expand_opens_one_block_and_names_unknown_paths():
    t = blocks_trace(depth=2, expand=("net.blocks.2", "net.nope"))
    view = t.view()
    assert ("net.blocks.2", 1) not in view.collapsed and ("net.blocks.3", 1) in view.collapsed
    # the weight sits beside its Linear, inside the open block
    assert view.chain[t.node("net.blocks.2.lin.weight").id] == ("net#1", "net.blocks#1", "net.blocks.2#1")
    assert "--expand net.nope: no such module in this trace" in t.text()


def test_default_depth_is_the_deepest_that_fits_and_says_what_it_collapsed():
    t = blocks_trace()
    assert t.view().depth is None and not t.view().collapsed  # small enough to open everything
    from torchmagic.trace.view import plan

    tight = plan(t.nodes, t.modules, auto_target=6)
    assert tight.auto and tight.depth is not None and tight.box_count <= 6
    assert any("chosen to fit" in note for note in tight.notes())


def test_every_layout_runs_in_a_worker_that_is_stopped_on_time(monkeypatch):
    from scenes import rnn_loop

    from torchmagic.errors import LayoutTimeout
    from torchmagic.render import drawing
    from torchmagic.render.svg import WORKER

    t = blocks_trace()
    svg = t.svg()  # laid out in the worker process, within the default limit
    assert svg.startswith("<svg") and "net.blocks.0 … 3 · Block ×4" in svg and WORKER.running
    # an unrolled loop whose weights are drawn once, with edges to every step: minutes of layout
    monkeypatch.setattr(drawing, "REFERENCE_FANOUT", 10**9)
    slow = rnn_loop(100, fold=False, max_nodes=5000)
    slow.layout_timeout = 0.5
    with pytest.raises(LayoutTimeout, match="was stopped"):
        slow.svg()
    assert not WORKER.running  # the worker was killed, not left laying out
    bundle = slow._repr_mimebundle_()  # the failure is kept: no second wait
    assert set(bundle) == {"text/plain"}  # the front end shows the text view, with the reason
    assert "diagram unavailable: LayoutTimeout" in bundle["text/plain"] and "graph (inputs first):" in bundle["text/plain"]
    t.set_view()  # forget the cached SVG
    assert t.svg().startswith("<svg")  # the next diagram starts a fresh worker


def test_a_smaller_node_limit_makes_the_default_depth_shallower():
    t = blocks_trace(max_nodes=8)
    view = t.view()
    assert view.auto and view.box_count <= 8 and view.collapsed
    assert "elided" not in t.to_dot()  # collapsing made it fit; nothing had to be left out


class SqrtBlock(torch.nn.Module):
    """sqrt at 0 in backward: an infinite gradient, then NaN, inside this block only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return x + torch.sqrt(torch.relu(self.lin(x)))


def test_the_module_with_the_first_nan_is_drawn_open_even_when_collapsed_by_default():
    torch.manual_seed(0)
    net = Net()
    net.blocks[2] = SqrtBlock()
    data = torch.randn(5, 3)
    with torchmagic.trace(max_nodes=8) as t:  # small enough that blocks collapse by default
        loss = net(data).square().mean()
        loss.backward()
    origin = t.nonfinite_origin
    assert origin is not None and origin.module.startswith("net.blocks.2")
    view = t.view()
    assert view.revealed == origin.module and origin.id not in view.owner and origin.id not in view.stand_in
    assert f"{view.revealed} drawn open: the first NaN/Inf gradient is inside it" in t.text()
    assert "first NaN/Inf gradient here" in t.to_dot()
    assert t.set_view(depth=1).view().revealed is None  # a depth asked for is kept as asked
