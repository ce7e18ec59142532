"""Session operations IPython offers: reset, del, reload, unload, config, nested cells, syntax errors."""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError

import torchmagic

SEED = "import torch\nx = torch.ones(2, 2, requires_grad=True)\ny = x + 2\nz = (y * y * 3).mean()\nz.backward()"
AFTER = ("import torch\nw = [1.0, 2.0]\nw.requires_grad_(True)\n(w * 3).sum().backward()")
RESETS = ["%reset -f", "%reset", "%reset -f in", "%reset -f out", "%reset_selective -f .", "%reset_selective -f w",
          "%xdel x", "del x", "get_ipython().reset()", "%reset -f array"]


@pytest.mark.parametrize("operation", RESETS)
def test_on_modes_survive_namespace_operations(hostile, monkeypatch, operation):
    monkeypatch.setattr(hostile.ip, "ask_yes_no", lambda *args, **kwargs: True)  # the user answers y
    hostile.run("x = 1")
    hostile.run("%autograd_trace on --text")
    hostile.run("%tensor on")
    hostile.run(operation)
    hostile.run(AFTER)  # every instrumented assignment still runs
    assert isinstance(hostile.ns["w"], torch.Tensor) and torch.equal(torchmagic.last_trace().grad("w"),
                                                                      torch.tensor([3.0, 3.0]))
    hostile.run("%autograd_trace off")
    hostile.run("%tensor off")
    hostile.assert_clean()


@pytest.mark.parametrize("operation", ["%reset -f", "%reset_selective -f .", "del x"])
@pytest.mark.parametrize("magic", ["%%autograd_trace --text", "%%tensor"])
def test_cell_magics_after_namespace_operations(hostile, operation, magic):
    hostile.run("x = 1")
    hostile.run(operation)
    hostile.run(f"{magic}\n" + SEED)
    assert isinstance(hostile.ns["z"], torch.Tensor)
    hostile.assert_clean()


def test_reset_in_the_middle_of_a_traced_cell(hostile):
    hostile.run("%%autograd_trace --text\nimport torch\na = torch.ones(2, requires_grad=True)\n"
                "get_ipython().run_line_magic('reset', '-f')\nimport torch\nb = torch.ones(2, requires_grad=True)\n"
                "(b * 2).sum().backward()")
    assert "a" not in hostile.ns and hostile.ns["b"].grad is not None
    hostile.assert_clean()


def test_reset_lets_every_tensor_go(hostile):
    hostile.run("%autograd_trace on --text")
    hostile.run(SEED)
    hostile.run("%tensor on")
    hostile.run("import numpy as np\narr = np.ones(4)\nlst = [1.0, 2.0]")
    hostile.run("%autograd_trace off")
    hostile.run("%tensor off")
    hostile.assert_collectable("x", "y", "z", "arr", "lst")
    assert torchmagic.last_trace() is None and torchmagic.last_conversion() is None


def test_reload_with_on_modes_active(hostile):
    hostile.run("%autograd_trace on")
    hostile.run("%tensor on")
    hostile.run("%reload_ext torchmagic")
    hostile.run("v = [1, 2]")
    assert hostile.ns["v"] == [1, 2]  # a reload starts with the modes off
    hostile.run("%autograd_trace status")
    assert hostile.printed()[0].strip().endswith("autograd tracing is off")
    hostile.assert_clean()


def test_unload_inside_an_on_mode_cell_takes_everything_away(hostile):
    hostile.run("%device meta")
    hostile.run("%autograd_trace on")
    hostile.run("%tensor on")
    hostile.run("import torch\na = [1.0]\nget_ipython().run_line_magic('unload_ext', 'torchmagic')\nb = [2.0]")
    assert hostile.session is None and hostile.ns["b"] == [2.0]
    assert torch._C._len_torch_function_stack() == 0 and torch.get_default_device() == torch.device("cpu")
    assert "%autograd_trace" not in hostile.ip.magics_manager.lsmagic()["line"]
    hostile.run("c = [3.0]")
    assert hostile.ns["c"] == [3.0]
    hostile.run("%load_ext torchmagic")
    hostile.assert_clean()


def test_magics_are_gone_after_unload(hostile):
    hostile.run("%unload_ext torchmagic")
    hostile.printed()
    hostile.run("%autograd_trace on", expect_error=UsageError)
    assert "Line magic function `%autograd_trace` not found" in hostile.printed()[1]
    hostile.run("%load_ext torchmagic")


def test_loading_twice_keeps_one_session(hostile):
    session = hostile.session
    hostile.run("%load_ext torchmagic")
    assert hostile.session is session
    hostile.assert_clean()


def test_reload_with_a_refused_value_in_ipythons_config(hostile):
    hostile.run("%config TorchMagic.small_values = 4")
    hostile.ip.config.TorchMagic.max_nodes = -3
    hostile.ip.config.TorchMagic.memory_budget = "lots"
    hostile.printed()
    hostile.run("%reload_ext torchmagic")
    err = hostile.printed()[1].strip().splitlines()
    assert len(err) == 2 and all(line.startswith("torchmagic: TorchMagic.") for line in err)
    options = hostile.session.options
    assert (options.max_nodes, options.memory_budget, options.small_values) == (500, 256 * 2**20, 4)
    hostile.run("%%autograd_trace --text\n" + SEED)
    hostile.assert_clean()


@pytest.mark.parametrize("line, message", [
    ("%config TorchMagic.max_nodes = 0", "must be at least 1"),
    ("%config TorchMagic.history_size = 0", "must be at least 1"),
    ("%config TorchMagic.small_values = -1", "must not be negative"),
    ("%config TorchMagic.memory_budget = 'much'", "expected a number, not str"),
    ("%config TorchMagic.layout_timeout = -1.0", "must not be negative"),
    ("%config TorchMagic.default_device = 'cuda:9'", "available here: cpu"),
])
def test_a_refused_config_value_is_one_line_and_changes_nothing(hostile, line, message):
    options = hostile.session.options
    before = {name: getattr(options, name) for name in options.trait_names(config=True)}
    hostile.printed()
    hostile.run(line)
    err = hostile.printed()[1]
    assert err.count("\n") == 1 and message in err and "it stays" in err
    assert {name: getattr(options, name) for name in before} == before


def test_a_default_device_from_the_config_is_applied_and_taken_back(hostile):
    hostile.run("%config TorchMagic.default_device = 'meta'")
    hostile.run("%reload_ext torchmagic")
    assert torch.get_default_device() == torch.device("meta")
    hostile.run("%unload_ext torchmagic")
    assert torch.get_default_device() == torch.device("cpu")
    hostile.ip.config.TorchMagic.default_device = ""
    hostile.run("%load_ext torchmagic")


@pytest.mark.parametrize("cell, error", [
    ("%%autograd_trace\nx = = 1", SyntaxError),
    ("%%autograd_trace\ndef f(:\n    pass", SyntaxError),
    ("%%tensor\nfor\n", SyntaxError),
    ("%%device meta\n)(", SyntaxError),
    ("%%autograd_trace --text\nimport torch\nx = torch.ones(2)\n  y = 1", IndentationError),
])
def test_syntax_errors_in_a_body_read_like_a_plain_cells(hostile, cell, error):
    hostile.run("%%autograd_trace --text\n" + SEED)
    last = torchmagic.last_trace()
    hostile.printed()
    result = hostile.run(cell, expect_error=error)
    out, err = hostile.printed()
    assert not result.success
    assert "Traceback" not in out + err and "torchmagic" not in out + err and "Cell In[" in out + err
    assert torchmagic.last_trace() is last
    hostile.assert_clean()


def test_a_syntax_error_with_the_on_mode(hostile):
    hostile.run("%autograd_trace on")
    hostile.run("%%autograd_trace --text\n" + SEED)
    last = torchmagic.last_trace()
    hostile.run("x = = 1", expect_error=SyntaxError)
    hostile.run("%autograd_trace off")
    assert torchmagic.last_trace() is last


def test_a_nested_cell_makes_one_trace(hostile):
    hostile.run("%autograd_trace on --text")
    hostile.run("import torch\nx = torch.ones(2, requires_grad=True)\n"
                "get_ipython().run_cell('y = (x * 3).sum()\\ny.backward()')\nz = (x * 2).sum()")
    shown = hostile.displayed()
    hostile.run("%autograd_trace off")
    assert len(shown) == 1 and torch.equal(torchmagic.last_trace().grad("x"), torch.tensor([3.0, 3.0]))
    hostile.assert_clean()


def test_a_cell_magic_inside_the_on_mode_makes_one_trace(hostile):
    hostile.run("%autograd_trace on --text")
    hostile.run("%%autograd_trace --text\n" + SEED)
    shown = hostile.displayed()
    hostile.run("%autograd_trace off")
    assert len(shown) == 1 and "x " in shown[0]


def test_turning_off_inside_a_traced_cell(hostile):
    hostile.run("%autograd_trace on --text")
    hostile.run(SEED + "\nget_ipython().run_line_magic('autograd_trace', 'off')")
    assert hostile.displayed() == [] and torchmagic.last_trace() is None
    hostile.assert_clean()


def test_the_cell_magic_called_from_code_in_a_loop(hostile):
    hostile.run("import torch\nfor i in range(3):\n    get_ipython().run_cell_magic('autograd_trace', '--text', "
                "'a = torch.ones(2, requires_grad=True)\\n(a * i).sum().backward()')")
    assert len(hostile.displayed()) == 3 and len(torchmagic._history) == 3
    hostile.assert_clean()


def test_history_keeps_history_size_traces(hostile):
    hostile.run("%config TorchMagic.history_size = 2")
    for _ in range(4):
        hostile.run("%%autograd_trace --text\n" + SEED)
    assert len(torchmagic._history) == 2


def test_status_and_show_after_a_reset(hostile):
    hostile.run("%%autograd_trace --text\n" + SEED)
    hostile.run("%reset -f")
    assert "no trace yet" in hostile.usage_error("%autograd_trace show")
