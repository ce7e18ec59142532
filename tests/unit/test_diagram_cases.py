"""The issue's cases: loops folded by iteration, module calls apart, folds that name what they hide,
layouts that cannot block, bounded output, complex gradients."""

from __future__ import annotations

import re
import time

import pytest
import scenes
import torch
import truth

import torchmagic
from torchmagic.errors import LayoutTimeout
from torchmagic.render import drawing as drawing_module
from torchmagic.render.svg import render_svg
from torchmagic.render.text import loop_history


def test_rnn_loop_is_one_iteration_with_its_recurrent_edge_and_gradient_plot():
    t = scenes.rnn_loop(40)
    (loop,) = t.view().loops
    assert loop.count == 40 and loop.first == 1 and len(loop.drawn) == 5
    assert t.view().box_count <= 12  # 5 ops, 3 weights, the loss: not 205 tensors
    dot = t.to_dot()
    assert "loop ×40" in dot and dot.count('label="next iteration"') == 1
    assert "grad norm of h per iteration (log scale)" in dot  # vanishing: spans many orders of magnitude
    # the plot is the carried tensor's gradient at each step, first step first
    tanh = [n for n in t.nodes if n.op == "tanh"]
    (values,) = loop_history(t.nodes, t.view().loops).values()
    assert [v for _, v in values] == [n.grad.norm for n in tanh]
    assert values[0][1] < 1e-6 < 1 < values[-1][1]  # the gradient vanishes back through time
    assert "gradient norm per loop iteration" in t.text() and "<polyline" in t.html()
    truth.check(t)


def test_no_fold_draws_every_iteration():
    t = scenes.rnn_loop(40, fold=False)
    assert not t.view().loops
    assert t.to_dot().count(">tanh<") == 40 and "next iteration" not in t.to_dot()


def test_loop_with_per_step_outputs_and_running_loss_folds_them_into_the_iteration():
    t = scenes.rnn_loop(12, side_outputs=True)
    (loop,) = t.view().loops
    ops = sorted(t.nodes[i].op for i in loop.drawn)
    assert ops == sorted(["matmul", "matmul", "add", "add", "tanh", "matmul", "square", "sum", "add"])
    assert t.to_dot().count('label="next iteration"') == 2  # h, and the running loss
    truth.check(t)


def test_two_carried_tensors_and_two_loops():
    (loop,) = scenes.lstm_loop(6).view().loops
    assert loop.count == 5 and loop.first == 2  # step 1 has no cat: its h and c need no gradient
    loops = scenes.two_loops().view().loops
    assert sorted(loop.count for loop in loops) == [4, 5]  # each entered from a tensor before it


def test_a_loop_whose_graph_changes_each_step_is_drawn_as_it_is():
    t = scenes.alternating_loop()
    assert not t.view().loops and "loop" not in t.to_dot()


@pytest.mark.parametrize("steps", [40, 200])
def test_rnn_loop_shows_well_within_the_layout_bound(steps):
    """Time bound with a wide margin: the folded diagram is a dozen boxes (about 0.1 s here)."""
    t = scenes.rnn_loop(steps)
    t.layout_timeout = 5.0
    start = time.perf_counter()
    bundle = t._repr_mimebundle_()
    assert time.perf_counter() - start < t.layout_timeout + 1
    assert bundle["image/svg+xml"].startswith("<svg") and f"loop ×{steps}" in bundle["image/svg+xml"]


def test_unrolled_200_step_loop_returns_within_the_bound_with_a_diagram_or_the_reason():
    t = scenes.rnn_loop(200, fold=False)
    t.layout_timeout = 2.0
    start = time.perf_counter()
    bundle = t._repr_mimebundle_()
    assert time.perf_counter() - start < t.layout_timeout + 1
    assert "image/svg+xml" in bundle or "diagram unavailable: LayoutTimeout" in bundle["text/plain"]


def test_a_layout_that_would_take_minutes_is_stopped_at_the_limit(monkeypatch):
    # without drawing the weights again at each use, the unrolled loop's long edges take Graphviz
    # over a minute (measured: still running after 60 s)
    monkeypatch.setattr(drawing_module, "REFERENCE_FANOUT", 10**9)
    source = scenes.rnn_loop(100, fold=False, max_nodes=5000).to_dot()
    start = time.perf_counter()
    with pytest.raises(LayoutTimeout):
        render_svg(source, timeout=1.0)
    assert time.perf_counter() - start < 2.0


def test_graphviz_writes_nothing_to_the_cell(capfd):
    t = scenes.rnn_loop(250, fold=False, max_nodes=1300)  # over 1,000 boxes: Graphviz warns
    t.svg()
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_folded_blocks_lead_from_first_input_to_last_output_and_name_what_they_hide():
    t = scenes.folded_blocks_cell()
    text = t.text()
    (row,) = [line for line in text.split("gradients:")[0].splitlines() if line.strip().startswith("hf ")]
    assert re.search(r"=\s+layer_norm\(h4, ", row) and "layer_norm(h1" not in text and "also h1 … h3" in text
    dot = t.to_dot()
    h0, h4, hf = (t.node(n).id for n in ("h0", "h4", "hf"))
    lines = dot.splitlines()
    assert f"\tt{h4} -> o{t.nodes[hf].op_id}" in lines  # h4 (not h1) feeds ln_f
    first_linear = next(n for n in t.nodes if n.op == "linear" and h0 in n.inputs)
    drawn = t.view().drawn_as(first_linear.id)
    assert f"\tt{h0} -> o{t.nodes[drawn].op_id}" in lines  # the first block's input enters the fold
    assert "also h1 … h3" in dot and "blocks.0 … 3 · Sequential ×4" in dot
    truth.check(t)


def test_named_tensors_inside_a_collapsed_module_are_listed_on_its_box():
    t = scenes.folded_blocks_cell(depth=1)
    (unit,) = [u for u in t.view().collapsed.values() if u.kind == "ModuleList"]
    assert unit.names == ["h1", "h2", "h3"]
    assert "inside: h1 … h3" in t.to_dot() and "inside: h1 … h3" in t.text()
    assert f"t{t.node('h4').id} [" in t.to_dot()  # what leaves the box is drawn after it, by name


def _netd_boxes(dot: str) -> list[str]:
    return sorted(line.split("<B>")[1].split("</B>")[0] for line in dot.splitlines() if "<B>netD" in line)


def test_dcgan_with_call_numbers_draws_each_discriminator_call_apart():
    t = scenes.fill_scope_by_calls(scenes.dcgan_step(depth=0), "netD", "bce")
    assert _netd_boxes(t.to_dot()) == [f"netD · Sequential (call {k} of 3)" for k in (1, 2, 3)]
    drawing = truth.check(t)
    fake = t.node("fake").id
    fed_by_fake = {e.head for e in drawing.edges if e.tail == f"t{fake}"}
    assert len(fed_by_fake) == 1  # only the generator step's call; fake.detach() starts a new graph
    t.set_view()  # open: one cluster per call
    assert sum("(call" in line and "label=" in line for line in t.to_dot().splitlines()) >= 3
    truth.check(t)


def test_wgan_gp_draws_d_real_and_d_fake_from_their_own_calls_not_from_d_of_the_mix():
    t = scenes.fill_scope_by_calls(scenes.wgan_gp_step(depth=0), "D")
    drawing = truth.check(t, paths=False)  # the penalty's double backward reads inside D(interp)
    feeds = {name: [e.tail for e in drawing.edges if e.head == f"o{t.node(name).op_id}"]
             for name in ("d_real", "d_fake", "d_interp")}
    interp_call = next(e.tail for e in drawing.edges if e.head == f"t{t.node('d_interp').id}")
    boxes = [feeds["d_real"], feeds["d_fake"]]
    assert all(len(b) == 1 and drawing.boxes[b[0]].kind == "module" for b in boxes)
    assert len({b[0] for b in boxes} | {interp_call}) == 3  # three calls, three boxes


@pytest.mark.parametrize("depth", [None, 0])
def test_dcgan_step_has_no_false_edge(depth):
    """The real trace: three discriminator calls, each its own box (or cluster), no false path."""
    t = scenes.dcgan_step(depth=depth)
    truth.check(t)
    labels = [line for line in t.to_dot().splitlines() if "netD · Sequential (call" in line]
    assert all(any(f"(call {k} of 3)" in line for line in labels) for k in (1, 2, 3))


def test_big_trace_shows_a_bounded_summary():
    leaf = torch.randn(10, 10, requires_grad=True)
    with torchmagic.trace(fold=False) as t:
        h = leaf
        for i in range(3000):
            h = h * 1.0001 if i % 2 else h + 0.001
        h.sum().backward()
    text = t.text()
    assert "tensors not listed (max_rows=50); every tensor is in t.nodes" in text
    assert len(text.splitlines()) < 80
    t.set_view(fold=False, max_rows=5)
    graph = t.text().split("gradients:")[0]
    assert sum(" = " in line for line in graph.splitlines()) == 5
    assert "leaf" in graph  # the named leaf outranks the unnamed intermediates
    html = t.html()
    assert len(html.encode()) < 1_000_000 and html.count("<tr") <= 5 + 2


def test_nan_and_inf_rows_come_first_when_rows_are_bounded():
    with torchmagic.trace() as t:
        x = torch.tensor([0.0, 4.0], requires_grad=True)
        parts = [torch.sqrt(x) * float(k) for k in range(30)]
        out = sum(p.sum() for p in parts)
        out.backward()
    t.set_view(max_rows=3)
    lines = t.text().split("gradients:")[1]
    assert "NaN" in t.text() and "x" in lines.split("\n")[2]


def test_complex_gradients_show_complex_values_and_say_their_statistics_are_magnitudes():
    with torchmagic.trace() as t:
        z = torch.tensor([1 + 2j, 3 - 1j], requires_grad=True)
        w = z * (2 - 1j)
        loss = w.abs().sum()
        loss.backward()
    assert "grad [1+2j, 2.121-0.7071j]  (complex)" in t.to_dot()  # the values, as complex numbers
    assert "z |complex|" in t.text() and "over its elements' magnitudes" in t.text()  # the table's statistics
    assert "|complex|" in t.html()


def _one_call_per_step(trace):
    """Call numbers as recorder v2 records them for ``cell_loop``: each RNNCell call ends with its
    ``rnn_tanh_cell``, and a call's operations come after the previous call's in graph order."""
    call = 1
    for node in trace.nodes:
        if node.kind == "op" and node.module == "cell":
            node.scope = (("cell", call),)
            call += node.op == "rnn_tanh_cell"
    return trace.set_view(depth=trace.depth)


def test_a_module_called_once_per_step_is_one_drawn_call_standing_for_all():
    t = _one_call_per_step(scenes.cell_loop(8))
    (loop,) = t.view().loops
    assert loop.count == 8
    assert "cell · RNNCell (calls 1…8 of 8)" in t.to_dot()
    truth.check(t)
    t.set_view(depth=0)  # each call a box: the last drawn for all eight, fed back its own output
    drawn = t.view().collapsed[("cell", 8)]
    assert drawn.call_text == "calls 1…8 of 8" and "calls 1…8 of 8" in t.to_dot()
    drawing = truth.check(t)
    (box,) = [name for name, b in drawing.boxes.items() if b.kind == "module"]
    h = t.node("h").id
    assert [(e.tail, e.head) for e in drawing.edges if e.recurrent] == [(f"t{h}", box)]


def test_a_loop_draws_the_iteration_where_the_first_nan_appeared():
    x = torch.tensor([4.0, 9.0], requires_grad=True)
    scale, shift = torch.ones(8), torch.ones(8)
    scale[3] = shift[3] = 0.0  # step 4 takes sqrt(0): an infinite derivative, times 0: NaN
    with torchmagic.trace() as t:
        h = x
        for step in range(8):
            h = torch.sqrt(h * scale[step] + shift[step])
        loss = h.sum()
        loss.backward()
    (loop,) = t.view().loops
    origin = t.nonfinite_origin
    assert loop.count == 8 and loop.drawn_number == 4 and origin.id in loop.drawn
    dot = t.to_dot()
    assert "first NaN/Inf gradient here" in dot and "iteration 4 drawn" in dot
    assert "!!!" in t.text()  # the plot marks the steps whose gradient is NaN
    truth.check(t)


def test_html_stays_under_a_megabyte_with_hundreds_of_parameters_over_many_passes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(150)])
    data = torch.randn(4, 8)
    with torchmagic.trace(fold=False, depth=99) as t:
        for _ in range(4):
            model.zero_grad()
            model(data).square().mean().backward()
    assert len(t.grad_history) == 300 and len(t.nodes) > 500
    html = t.html()
    assert len(html.encode()) < 1_000_000
    assert "250 more series not listed (max_rows=50)" in html
    assert "tensors not listed (max_rows=50)" in t.text() and "250 more series not listed" in t.text()


def test_a_collapsed_calls_output_used_inside_the_call_draws_no_cycle():
    """A VAE encoder returns mu and also uses it (z = mu + ...): collapsed, mu leaves the box, and
    its use inside is no arrow back into the box (that drew a path mu -> model -> logvar)."""
    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            mu, logvar = self.a(x), self.b(x)
            z = mu + torch.exp(0.5 * logvar)
            return z, mu, logvar

    torch.manual_seed(0)
    model = Encoder()
    xb = torch.randn(4, 3)
    with torchmagic.trace() as t:
        z, mu, logvar = model(xb)
        loss = z.sum() + mu.pow(2).sum() + logvar.sum()
        loss.backward()
    t.set_view(depth=0)
    drawing = truth.check(t)
    (box,) = [name for name, b in drawing.boxes.items() if b.kind == "module"]
    assert not [e for e in drawing.edges if e.head == box and e.tail.startswith("t")]
    assert {f"t{t.node(n).id}" for n in ("mu", "logvar", "z")} <= {e.head for e in drawing.edges if e.tail == box}


def test_blocks_whose_outputs_the_parent_also_uses_are_not_folded():
    """``x = block(x) + x`` written in the parent: a fold would draw every block's output as the
    last block's, and the adds fed from the final output (a cycle). Such blocks are drawn apart;
    blocks that only feed each other still fold."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.lin(x))

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(4))

        def forward(self, x):
            for block in self.blocks:
                x = block(x) + x
            return x

    class Chain(Residual):
        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    xb = torch.randn(2, 4)
    for kind, folds in ((Residual, 0), (Chain, 1)):
        model = kind()
        with torchmagic.trace() as t:
            y = model(xb)
            loss = y.pow(2).sum()
            loss.backward()
        assert len(t.view().folds) == folds, kind.__name__
        truth.check(t)


def test_a_loop_that_sums_a_loss_plots_its_hidden_state_not_the_sum():
    """``loss = loss + ...`` is carried from step to step too, but its gradient is 1 throughout:
    the plot is of ``hidden``, the state the next step computes with, as retain_grad has it."""
    torch.manual_seed(0)
    i2h, h2h, h2o = torch.nn.Linear(5, 12), torch.nn.Linear(12, 12), torch.nn.Linear(12, 3)
    xs, ys = torch.randn(10, 1, 5), torch.randint(0, 3, (10, 1))
    states = []
    with torchmagic.trace() as t:
        hidden = torch.zeros(1, 12)
        loss = 0
        for step in range(10):
            hidden = torch.tanh(i2h(xs[step]) + h2h(hidden))
            hidden.retain_grad()
            states.append(hidden)
            loss = loss + torch.nn.functional.cross_entropy(h2o(hidden), ys[step])
        loss.backward()
    (loop,) = t.view().loops
    ((label, history),) = loop_history(t.nodes, [loop]).items()
    assert label.startswith("hidden")
    expected = [h.grad.norm().item() for h in states][-len(history):]
    assert [norm for _, norm in history] == pytest.approx(expected, rel=1e-5)
    assert "grad norm of hidden per iteration" in t.to_dot()


def test_the_char_rnn_tutorials_loop_plots_hidden():
    """PyTorch's char-RNN tutorial: combined = cat(x, hidden); hidden = i2h(combined). The plot is
    hidden's gradient per step (retain_grad's), not the cat's (which adds the input's)."""
    class CharRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.i2h, self.i2o = torch.nn.Linear(5 + 8, 8), torch.nn.Linear(5 + 8, 3)

        def forward(self, x, hidden):
            combined = torch.cat((x, hidden), 1)
            return torch.log_softmax(self.i2o(combined), dim=1), self.i2h(combined)

    torch.manual_seed(0)
    rnn = CharRNN()
    xs, ys = torch.randn(10, 1, 5), torch.randint(0, 3, (10, 1))
    states = []
    with torchmagic.trace() as t:
        hidden = torch.zeros(1, 8)
        loss = 0
        for step in range(10):
            output, hidden = rnn(xs[step], hidden)
            hidden.retain_grad()
            states.append(hidden)
            loss += torch.nn.functional.nll_loss(output, ys[step])
        loss.backward()
    (loop,) = t.view().loops
    ((_, history),) = loop_history(t.nodes, [loop]).items()
    plotted = [round(norm, 5) for _, norm in history]
    norms = [round(h.grad.norm().item(), 5) for h in states if h.grad is not None]  # (the last: unused)
    assert any(norms[i:i + len(plotted)] == plotted for i in range(len(norms) - len(plotted) + 1)), (plotted, norms)


def _has_cycle(drawing) -> bool:
    succ: dict[str, set[str]] = {}
    for edge in drawing.edges:
        if not edge.recurrent:
            succ.setdefault(edge.tail, set()).add(edge.head)
    state: dict[str, int] = {}

    def visit(box: str) -> bool:
        state[box] = 1
        for nxt in succ.get(box, ()):
            if state.get(nxt) == 1 or (nxt not in state and visit(nxt)):
                return True
        state[box] = 2
        return False

    return any(box not in state and visit(box) for box in list(succ))


class _InterleavedLayers(torch.nn.Module):
    """ViT's layout: containers never called, whose two parts the parent interleaves with adds."""

    def __init__(self, count: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]) for _ in range(count))

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


def _trace_interleaved_layers(count: int):
    torch.manual_seed(0)
    net = _InterleavedLayers(count)
    with torchmagic.trace() as t:
        loss = net(torch.randn(2, 4)).sum()
        loss.backward()
    return t


def test_a_container_never_called_whose_parts_the_parent_interleaves_is_drawn_open():
    """ViT: ``for attn, ff in self.layers: x = attn(x) + x; x = ff(x) + x``. Each ``layers.k`` is a
    ModuleList never called; one box for it would take attn's output out to the add and back in
    to ff: a cycle. Such a container is drawn open, its calls boxed apart."""
    t = _trace_interleaved_layers(2)
    for depth in (1, 2, None):
        t.set_view(depth=depth)
        drawing = truth.check(t)
        assert not _has_cycle(drawing), depth
    t.set_view(depth=2)
    assert "net.layers.0.0" in {path for path, _ in t.view().collapsed}


def test_a_diagram_over_the_page_budget_is_redrawn_smaller_whatever_max_nodes():
    """The redraw scales from the tensors drawn, not from max_nodes: with max_nodes far above the
    graph's size, scaling from it drew everything again."""
    from torchmagic.trace.trace import SVG_BUDGET

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.GELU())
                                for _ in range(70)])
    with torchmagic.trace() as t:
        loss = net(torch.randn(2, 8)).pow(2).mean()
        loss.backward()
    t.set_view(fold=False, depth=10, max_nodes=5000)
    assert len(t.svg()) <= SVG_BUDGET


def test_an_opened_containers_calls_keep_their_parameters_in_their_boxes():
    """Opening a container to avoid a cycle must not leave its calls' weights outside their boxes."""
    t = _trace_interleaved_layers(3)
    t.set_view(depth=1)
    shallow = t.view()
    t.set_view(depth=3)
    deep = t.view()
    assert set(shallow.collapsed) == set(deep.collapsed)
    assert shallow.box_count == deep.box_count
    assert shallow.owner[t.node("net.layers.0.0.weight").id] == ("net.layers.0.0", 1)


def test_a_loop_with_a_linear_output_at_each_step_folds():
    """pytorch/examples' time_sequence_prediction: an LSTMCell and a Linear head at each step. The
    head's t(weight), made at each call from the parameter alone, belongs to its step."""
    torch.manual_seed(0)
    cell, head = torch.nn.LSTMCell(1, 5), torch.nn.Linear(5, 1)
    xs = torch.randn(3, 8)
    hs = []
    with torchmagic.trace() as t:
        state = (torch.zeros(3, 5), torch.zeros(3, 5))
        outs = []
        for x_t in xs.split(1, dim=1):
            state = cell(x_t, state)
            state[0].retain_grad()
            hs.append(state[0])
            outs.append(head(state[0]))
        loss = torch.cat(outs, 1).pow(2).mean()
        loss.backward()
    (loop,) = t.view().loops
    assert loop.count >= 7 and "×" in t.to_dot()
    for view in ({}, {"depth": 0}, {"fold": False}):
        t.set_view(**view)
        truth.check(t)
    t.set_view()
    ((_, history),) = loop_history(t.nodes, [loop]).items()
    plotted = [norm for _, norm in history]
    assert plotted == pytest.approx([h.grad.norm().item() for h in hs][-len(plotted):], rel=1e-5)  # h's, as PyTorch has them
