"""%autograd_trace as a user types it, through an IPython shell."""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError

import torchmagic
from torchmagic.magics.trace import TraceMagics

SEED = """%%autograd_trace
import torch
x = torch.ones(2, 2, requires_grad=True)
y = x + 2
z = y * y * 3
out = z.mean()
out.backward()
"""


def test_cell_magic_shows_svg_and_text_with_the_seed_gradients(shell):
    shell.run(SEED)
    (bundle,) = [o["data"] for o in shell.outputs]
    assert {"text/plain", "image/svg+xml", "text/html"} <= set(bundle)
    assert bundle["image/svg+xml"].startswith("<svg")
    assert "grad [[4.5, 4.5], [4.5, 4.5]]" in bundle["text/plain"]
    assert "grad [[0.25, 0.25], [0.25, 0.25]]" in bundle["text/plain"]
    for label in (">x<", ">y<", ">z<", ">out<", "4.5", "0.25"):
        assert label in bundle["image/svg+xml"]
    assert "<table" in bundle["text/html"] and "<svg" in bundle["text/html"]
    t = torchmagic.last_trace()
    assert str(t.node("z").source).endswith("line 5: z = y * y * 3")  # the magic's line is line 1
    number = shell.ip.execution_count - 1  # the cell that just ran
    assert t.cell == f"In [{number}]" and t.node("z").source.cell == f"In [{number}]"


def test_on_mode_names_the_cell_that_ran(shell):
    shell.run("%autograd_trace on")
    shell.run("import torch\nw = torch.ones(3, requires_grad=True)\n(w * 2).sum().backward()")
    shell.run("%autograd_trace off")
    t = torchmagic.last_trace()
    number = shell.ip.execution_count - 2  # before the `off` cell
    assert t.cell == f"In [{number}]" and t.node("w").source.cell == f"In [{number}]"


def test_an_empty_cell_run_inside_a_cell_does_not_end_its_on_recording(shell):
    """IPython fires post_run_cell, not pre_run_cell, for an empty cell: it is no cell's end."""
    shell.run("%autograd_trace on --text")
    shell.run("import torch\nw = torch.ones(3, requires_grad=True)\nget_ipython().run_cell('  ')\n"
              "y = w * 2\ny.sum().backward()")
    shell.run("%autograd_trace off")
    t = torchmagic.last_trace()
    assert t.cell == f"In [{shell.ip.execution_count - 2}]"
    assert [n.name for n in t.nodes if n.op == "mul"] == ["y"] and torch.equal(t.grad("w"), torch.full((3,), 2.0))


def test_terminal_gets_text_only(shell):
    shell.ip.display_formatter.active_types = ["text/plain"]
    shell.run(SEED)
    (bundle,) = [o["data"] for o in shell.outputs]
    assert set(bundle) == {"text/plain"}
    assert "graph (inputs first):" in bundle["text/plain"] and "at 0x" not in bundle["text/plain"]


def test_text_option_and_save(shell, tmp_path):
    target = tmp_path / "trace.dot"
    shell.run(f"%%autograd_trace --text --save {target}\nimport torch\nx = torch.ones(2, requires_grad=True)\n(x * 2).sum().backward()")
    (bundle,) = [o["data"] for o in shell.outputs]
    assert set(bundle) == {"text/plain"}
    assert target.read_text().startswith("digraph autograd_trace")


def test_last_expression_is_returned_once(shell):
    result = shell.run("%%autograd_trace\nimport torch\nx = torch.ones(2, requires_grad=True)\n(x * 3).sum()")
    assert isinstance(result.result, torch.Tensor) and result.result.item() == 6.0
    assert torchmagic.last_trace().node("x").missing_reason == "backward not called yet"


def test_graph_first_then_gradients_in_a_later_cell(shell):
    shell.run("%autograd_trace on")
    shell.run("import torch\nx = torch.ones(2, requires_grad=True)\ny = x * 2\nout = y.sum()")
    first = torchmagic.last_trace()
    assert first.node("y").grad is None
    shell.run("out.backward()")
    second = torchmagic.last_trace()
    assert second is not first and torch.equal(second.grad("y"), torch.ones(2))
    shell.run("%autograd_trace off")


def test_on_mode_labels_every_step_of_a_loop(shell):
    shell.run("%autograd_trace on --text")
    shell.run("import torch\nx = torch.ones(2, requires_grad=True)\nh = x\nfor _ in range(3):\n    h = torch.tanh(h)\nh.sum().backward()")
    t = torchmagic.last_trace()
    assert [n.name for n in t.nodes if n.op == "tanh"] == ["h (1)", "h (2)", "h (3)"]
    assert t.node("x").kind == "leaf"
    shell.run("%autograd_trace status")
    shell.run("%autograd_trace off")
    shell.run("y = x * 5")
    assert torchmagic.last_trace() is t  # nothing traced once off


def test_show_repeats_the_last_trace(shell):
    shell.run(SEED)
    shell.run("%autograd_trace show --text")
    assert "grad [[4.5, 4.5], [4.5, 4.5]]" in shell.displayed()[0]


def test_error_in_the_cell_shows_user_traceback_and_partial_graph(shell, capsys):
    shell.run("%%autograd_trace\nimport torch\na = torch.ones(2, requires_grad=True)\nb = a * 2\n1 / 0",
              expect_error=ZeroDivisionError)
    err = capsys.readouterr().out
    assert "----> 5 1 / 0" in err and "torchmagic/magics.py" not in err
    # The body's frame is named after the cell the user ran, not the next one.
    number = shell.ip.execution_count - 1
    assert f"Cell In[{number}], line 5" in err and f"Cell In[{number + 1}]" not in err
    t = torchmagic.last_trace()
    assert t.error.startswith("ZeroDivisionError") and [n.name for n in t.nodes] == ["a", "b"]


def test_keyboard_interrupt_leaves_nothing_behind(shell):
    shell.run("%%autograd_trace\nimport torch\na = torch.ones(2, requires_grad=True)\nb = a * 2\nraise KeyboardInterrupt",
              expect_error=KeyboardInterrupt)
    assert torch._C._len_torch_function_stack() == 0


def test_syntax_error_in_on_mode_is_harmless(shell):
    shell.run("%autograd_trace on")
    shell.run("x = = 1", expect_error=SyntaxError)
    shell.run("%autograd_trace off")


@pytest.mark.parametrize("line, message", [
    ("%autograd_trace --max-nodes x", "invalid int value"),
    ("%autograd_trace bogus", "invalid choice"),
    ("%autograd_trace", "needs on, off, status or show"),
    ("%autograd_trace on --save out.png", "cannot write 'out.png'"),
    ("%autograd_trace --max-nodes 0 on", "at least 1"),
])
def test_bad_input_is_one_usage_line_and_changes_nothing(shell, capsys, line, message):
    capsys.readouterr()
    shell.run(line, expect_error=UsageError)
    out = capsys.readouterr()
    text = out.out + out.err
    assert message in text and "Traceback" not in text
    assert shell.topic(TraceMagics).on_view is None


def test_usage_lists_every_option(shell):
    doc = shell.ip.find_line_magic("autograd_trace").__doc__
    for option in ("--max-nodes", "--save", "--text", "on", "off", "status", "show"):
        assert option in doc


def test_config_traits(shell):
    shell.run("%config TorchMagic.max_nodes = 3")
    assert shell.session.options.max_nodes == 3
    shell.run("%config TorchMagic.max_nodes = 0")  # refused on one line: the option keeps its value
    assert shell.session.options.max_nodes == 3
    shell.run("%config TorchMagic")
    help_text = shell.session.options.class_get_help()
    for option in ("max_nodes", "small_values", "memory_budget", "history_size", "default_device"):
        assert f"TorchMagic.{option}" in help_text


def test_reload_leaves_one_copy_of_each_callback_and_unload_removes_all(shell):
    shell.run("%reload_ext torchmagic")
    shell.run("%reload_ext torchmagic")
    callbacks = shell.ip.events.callbacks["post_run_cell"]
    assert len([c for c in callbacks if getattr(c, "__self__", None).__class__.__name__ == "Session"]) == 1
    shell.run("%autograd_trace on")
    shell.run("%unload_ext torchmagic")
    assert "__torchmagic_bind__" not in shell.ip.user_ns
    assert not any(getattr(c, "__self__", None).__class__.__name__ == "Session"
                   for c in shell.ip.events.callbacks["post_run_cell"])
    assert shell.ip.find_line_magic("autograd_trace") is None
    assert not [t for t in shell.ip.ast_transformers if type(t).__name__ == "AssignmentInstrumenter"]
    shell.run("%load_ext torchmagic")


def test_nn_module_training_step_names_parameters(shell):
    shell.run("import torch\ntorch.manual_seed(0)\nmodel = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))\n"
              "opt = torch.optim.SGD(model.parameters(), lr=0.1)")
    shell.run("%%autograd_trace\nx = torch.randn(5, 4)\nloss = model(x).pow(2).mean()\nopt.zero_grad()\nloss.backward()\nopt.step()")
    t = torchmagic.last_trace()
    assert {"model.0.weight", "model.2.bias"} <= set(t.names)
    svg = shell.outputs[0]["data"]["image/svg+xml"]
    assert "model.0.weight" in svg


def test_user_text_is_escaped_in_html_and_dot(shell):
    shell.run('%%autograd_trace\nimport torch\nx = torch.ones(2, requires_grad=True)\ny = x * 2  # <script>alert("&")</script>\ny.sum().backward()')
    html = shell.outputs[0]["data"]["text/html"]
    assert "<script>" not in html and "&lt;script&gt;" in html


BLOCKS = """
import torch
torch.manual_seed(0)
blocks = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()) for _ in range(3)])
data = torch.randn(2, 4)
"""


def test_depth_expand_and_fold_options(shell):
    shell.run(BLOCKS)
    shell.run("%%autograd_trace --depth 1 --text\nloss = blocks(data).sum()\nloss.backward()")
    (text,) = shell.displayed()
    assert "modules deeper than level 1 (as asked) drawn collapsed: 3 (blocks.0, blocks.1, blocks.2)" in text
    # blocks.0 differs: its input needs no gradient, so its graph has one edge less; 1 and 2 fold
    assert "2 repeated Sequential blocks drawn once (×2)" in text
    t = torchmagic.last_trace()
    assert [n.name for n in t.nodes if n.kind == "param"].count("blocks.2.0.weight") == 1  # every layer kept

    shell.run("%autograd_trace show --depth 1 --expand blocks.1 --text")
    (text,) = shell.displayed()
    assert "blocks.1.0.weight" in text and "(×2)" not in text and "blocks.0" in text

    shell.run("%autograd_trace show --no-fold --text")
    (text,) = shell.displayed()
    assert "repeated" not in text and "blocks.2.0.weight" in text

    shell.run("%autograd_trace show --text")  # a plain show draws the default view again
    (text,) = shell.displayed()
    assert "repeated Sequential blocks drawn once" in text


@pytest.mark.parametrize("line, message", [
    ("%autograd_trace show --expand nowhere", "--expand: no module 'nowhere' in the last trace"),
    ("%autograd_trace show --depth -1", "--depth must be 0 or more"),
])
def test_bad_view_options_are_one_usage_line(shell, capsys, line, message):
    shell.run(BLOCKS)
    shell.run("%%autograd_trace\nloss = blocks(data).sum()\nloss.backward()")
    before = torchmagic.last_trace()
    view = (before.depth, before.expand, before.fold)
    shell.run(line, expect_error=UsageError)
    printed = capsys.readouterr()
    assert message in printed.err + printed.out
    assert torchmagic.last_trace() is before and (before.depth, before.expand, before.fold) == view


def test_only_the_newest_trace_keeps_its_gradient_tensors(shell):
    cell = "%%autograd_trace --text\nimport torch\nw = torch.ones(3, requires_grad=True)\nloss = (w * 2).sum()\nloss.backward()"
    shell.run(cell)
    first = torchmagic.last_trace()
    assert torch.equal(first.grad("w"), torch.full((3,), 2.0))
    shell.run(cell)
    with pytest.raises(LookupError, match="no longer keeps gradient tensors"):
        first.grad("w")
    assert first.node("w").grad.values == [2.0, 2.0, 2.0]  # its statistics stay
    assert torch.equal(torchmagic.last_trace().grad("w"), torch.full((3,), 2.0))


def test_a_view_named_in_the_cell_keeps_its_name_through_an_optimizer_step(shell):
    """The cell names tensors as they are assigned, so ``wt`` is the t() the pass went through even
    after ``opt.step()`` gives it a new grad_fn; a view made in an earlier cell is not listed."""
    shell.run("import torch\n"
              "lin = torch.nn.Linear(3, 2)\n"
              "xb = torch.randn(4, 3)\n"
              "opt = torch.optim.SGD(lin.parameters(), lr=0.1)\n"
              "earlier = lin.weight.t()\n")
    shell.run("%%autograd_trace --text\n"
              "wt = lin.weight.t()\n"
              "wt.retain_grad()\n"
              "loss = (xb @ wt).pow(2).sum()\n"
              "loss.backward()\n"
              "opt.step()\n")
    trace = torchmagic.last_trace()
    assert torch.equal(trace.grad("wt"), shell.ns["wt"].grad)
    assert trace.missing == []


def test_save_into_a_missing_folder_is_refused_before_the_cell_runs(shell, capsys, tmp_path):
    shell.run("import torch\nw = torch.ones(3, requires_grad=True)\ncounter = 0")
    missing = tmp_path / "nowhere" / "trace.svg"
    shell.run(f"%%autograd_trace --save {missing}\ncounter += 1\n(w * 2).sum().backward()", expect_error=UsageError)
    assert "--save: no folder" in capsys.readouterr().err
    assert shell.ns["counter"] == 0 and shell.ns["w"].grad is None


def test_a_backward_that_raises_part_way_says_so_for_the_leaves_it_did_not_reach(shell):
    shell.run("import torch\n"
              "class Boom(torch.autograd.Function):\n"
              "    @staticmethod\n    def forward(ctx, x):\n        return x * 2\n"
              "    @staticmethod\n    def backward(ctx, g):\n        raise ValueError('boom in backward')\n")
    shell.run("%%autograd_trace --text\nx = torch.ones(2, requires_grad=True)\na = Boom.apply(x)\n"
              "out = (a * 3).sum()\nout.backward()", expect_error=ValueError)
    reason = torchmagic.last_trace().node("x").missing_reason
    assert reason.startswith("backward pass 1 raised before it reached it") and "boom in backward" in reason


def test_one_pass_on_the_meta_device_says_nothing_of_grad(shell):
    shell.run("import torch")
    shell.run("%device meta")
    try:
        shell.run("%%autograd_trace --text\nx = torch.ones(2, requires_grad=True)\n(x * 3).sum().backward()")
    finally:
        shell.run("%device cpu")
    assert torchmagic.last_trace().node("x").leaf_grad_note is None


def test_save_expands_the_home_folder(shell, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    shell.run("import torch\nw = torch.ones(3, requires_grad=True)")
    shell.run("%%autograd_trace --text --save ~/trace.txt\n(w * 2).sum().backward()")
    assert (tmp_path / "trace.txt").read_text().startswith("autograd trace")
