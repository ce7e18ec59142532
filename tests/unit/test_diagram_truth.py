"""The diagram never lies: every edge a real autograd edge, no invented path, every name accounted for.

The property (``truth.check``) is checked over the test suite's representative graphs, each in
several views (default, collapsed, expanded, unfolded), and over random programs.
"""

from __future__ import annotations

import pytest
import scenes
import truth
from graphs import seed
from test_render import blocks_trace, mlp_graph, nan_graph, split_graph

GRAPHS = {
    "seed": lambda **v: seed()[0].set_view(**v),
    "split": lambda **v: split_graph().set_view(**v),
    "mlp": lambda **v: mlp_graph().set_view(**v),
    "nan": lambda **v: nan_graph().set_view(**v),
    "blocks": blocks_trace,
    "rnn5": lambda **v: scenes.rnn_loop(5, **v),
    "rnn40": lambda **v: scenes.rnn_loop(40, **v),
    "rnn_side_outputs": lambda **v: scenes.rnn_loop(12, side_outputs=True, **v),
    "lstm": scenes.lstm_loop,
    "alternating": scenes.alternating_loop,
    "two_loops": scenes.two_loops,
    "cell_loop": scenes.cell_loop,
    "folded_blocks_cell": scenes.folded_blocks_cell,
    "transformer": scenes.small_transformer,
}
VIEWS = {
    "default": {},
    "no_fold": {"fold": False},
    "depth0": {"depth": 0},
    "depth1": {"depth": 1},
    "depth2_expand": {"depth": 2, "expand": ("net.blocks.2",)},
}


@pytest.mark.parametrize("view", VIEWS, ids=str)
@pytest.mark.parametrize("graph", GRAPHS, ids=str)
def test_every_edge_is_real_and_every_name_accounted_for(graph, view):
    options = VIEWS[view]
    if graph in ("seed", "split", "mlp", "nan"):
        trace = GRAPHS[graph](**{"depth": None, **options})
    else:
        trace = GRAPHS[graph](**options)
    trace.max_nodes = 100_000
    truth.check(trace)


@pytest.mark.parametrize("seed_value", range(40))
def test_random_programs(seed_value):
    for options in ({}, {"fold": False}):
        trace = scenes.random_graph(seed_value, **options)
        truth.check(trace)


@pytest.mark.parametrize("view", ["default", "depth0", "depth1"])
@pytest.mark.parametrize("graph", ["dcgan", "siamese"])
def test_module_called_several_times_with_calls_filled_in(graph, view):
    """With call numbers in ``scope`` (as recorder v2 records them), each call is its own box."""
    build = {"dcgan": scenes.dcgan_step, "siamese": scenes.siamese}[graph]
    modules = {"dcgan": ("netD", "bce"), "siamese": ("encoder",)}[graph]  # bce: one loss module, three calls
    trace = scenes.fill_scope_by_calls(build(**VIEWS[view]), *modules)
    trace.max_nodes = 100_000
    truth.check(trace)


def test_the_checker_catches_a_false_path():
    """Without call numbers, a module called on two inputs is one box: the checker must notice
    (the recorder numbers calls; here they are taken away, as a recorder without them would)."""
    trace = scenes.siamese(depth=0)
    truth.check(trace)  # with the recorder's call numbers: two boxes, no false path
    for node in trace.nodes:
        node.scope = ()
    trace.set_view(depth=0)
    with pytest.raises(AssertionError, match="path a .* -> zb|path b .* -> za"):
        truth.check(trace)


def test_the_checker_catches_a_forged_edge_a_false_path_and_a_lost_name(monkeypatch):
    import copy

    from torchmagic.render import dot

    trace = scenes.rnn_loop(5)
    drawing = truth.check(trace)
    forged = copy.deepcopy(drawing)
    edge = next(e for e in forged.edges if e.witness[0] != e.witness[1])
    edge.witness = edge.witness[::-1]  # the same boxes, the autograd edge backwards
    edge.tail, edge.head = edge.head, edge.tail
    with pytest.raises(AssertionError, match="not an autograd edge"):
        truth.check(trace, drawing=forged)
    trace = scenes.folded_blocks_cell()
    truth.check(trace)
    with monkeypatch.context() as patch:
        patch.setattr(dot, "_twin_names", lambda *args: [])  # boxes stop saying "also h1 … h3"
        with pytest.raises(AssertionError, match="named tensor '(h1|model.blocks.[0-2].0.bias)' is neither drawn nor listed"):
            truth.check(trace)

    # two calls of one module merged into one box: each edge still real, but a path a -> zb appears
    trace = scenes.fill_scope_by_calls(scenes.siamese(depth=0), "encoder")
    drawing = truth.check(trace)
    first, second = [name for name, box in drawing.boxes.items() if box.kind == "module"]
    merged = copy.deepcopy(drawing)
    merged.boxes[first].members += merged.boxes.pop(second).members
    for edge in merged.edges:
        edge.tail = first if edge.tail == second else edge.tail
        edge.head = first if edge.head == second else edge.head
    with pytest.raises(AssertionError, match="has a path . .* -> z. .* but the autograd graph does not"):
        truth.check(trace, drawing=merged)


def test_ranges_are_read_as_the_names_they_stand_for():
    assert truth.mentions("also h (1…4)", "h (3)") and not truth.mentions("also h (1…4)", "h (5)")
    assert truth.mentions("also h1 … h3</FONT>", "h2") and not truth.mentions("also h1 … h3", "h4")
    assert truth.mentions("net.blocks.0…2.lin.weight", "net.blocks.1.lin.weight")
    assert not truth.mentions("net.blocks.0…2.lin.weight", "net.blocks.1.norm.weight")
