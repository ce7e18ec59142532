"""The session survives what IPython can do to it: %reset, del, a refused %config value, reloads, syntax errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from IPython.core.error import UsageError

import torchmagic
from torchmagic.magics.tensor import TensorMagics
from torchmagic.magics.trace import TraceMagics

SEED = "import torch\nx = torch.ones(2, 2, requires_grad=True)\ny = x + 2\nz = y * y * 3\nout = z.mean()\nout.backward()"


@pytest.mark.parametrize("reset", ["%reset -f", "%reset", "%reset_selective -f .", "del __torchmagic_bind__"])
def test_namespace_operations_do_not_brick_the_on_modes(shell, monkeypatch, reset):
    monkeypatch.setattr(shell.ip, "ask_yes_no", lambda *args, **kwargs: True)  # `%reset` asks first
    shell.run("%autograd_trace on --text")
    shell.run("%tensor on")
    shell.run(reset, expect_error=NameError if reset.startswith("del") else None)  # the name never existed
    shell.run("import torch\nw = [1.0, 2.0]\nw.requires_grad_(True)\n(w * 3).sum().backward()")
    assert isinstance(shell.ns["w"], torch.Tensor) and torch.equal(shell.ns["w"].grad, torch.tensor([3.0, 3.0]))
    assert torch.equal(torchmagic.last_trace().grad("w"), torch.tensor([3.0, 3.0]))
    shell.run("%autograd_trace off")
    shell.run("%tensor off")
    shell.run("%unload_ext torchmagic")
    shell.run("%load_ext torchmagic")


@pytest.mark.parametrize("cell", ["%%autograd_trace\n" + SEED, "%%tensor\nimport torch\nv = [1, 2]"])
def test_cell_magics_work_after_a_reset(shell, cell):
    shell.run("%reset -f")
    shell.run(cell)
    assert isinstance(shell.ns.get("x", shell.ns.get("v")), torch.Tensor)


def test_reset_lets_go_of_the_users_tensors_and_keeps_the_modes(shell):
    shell.run("%autograd_trace on --text")
    shell.run(SEED)
    shell.run("%%tensor\nimport numpy as np\nbig = np.ones(10)")
    assert torchmagic.last_trace() is not None and torchmagic.last_conversion() is not None
    refs = [weakref.ref(shell.ns[name]) for name in ("x", "y", "z", "out", "big")]
    shell.run("%reset -f")
    gc.collect()
    assert [r() for r in refs] == [None] * 5  # no trace, report or recorder of ours keeps them
    assert torchmagic.last_trace() is None and torchmagic.last_conversion() is None
    assert shell.topic(TraceMagics).on_view is not None  # the extension's own settings stay
    shell.run(SEED)
    assert torchmagic.last_trace().node("z").grad is not None
    shell.run("%autograd_trace off")


def test_del_inside_a_traced_cell_does_not_break_later_assignments(shell):
    shell.run("%%autograd_trace\nimport torch\na = torch.ones(2, requires_grad=True)\ndel a\nb = torch.ones(2, "
              "requires_grad=True)\n(b * 2).sum().backward()")
    assert torchmagic.last_trace().node("b").kind == "leaf"


def test_a_refused_config_value_does_not_break_a_reload(shell, capsys):
    shell.run("%config TorchMagic.max_nodes = 3")
    shell.run("%config TorchMagic.max_nodes = 0")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TorchMagic.max_nodes = 0 not applied: must be at least 1; it stays 3" in err
    assert shell.session.options.max_nodes == 3
    shell.ip.config.TorchMagic.max_nodes = 0  # what IPython's own config may still hold
    shell.run("%reload_ext torchmagic")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TorchMagic.max_nodes = 0 not applied" in err
    assert shell.session.options.max_nodes == 500 and shell.ip.find_line_magic("autograd_trace") is not None
    shell.run("%%autograd_trace --text\n" + SEED)
    assert torchmagic.last_trace().max_nodes == 500


@pytest.mark.parametrize("line, message", [
    ("%config TorchMagic.history_size = -2", "must be at least 1"),
    ("%config TorchMagic.memory_budget = -1", "must not be negative"),
    ("%config TorchMagic.layout_timeout = 'soon'", "expected a number, not str"),
    ("%config TorchMagic.default_device = 'gpu'", "unknown device 'gpu'"),
])
def test_every_option_refuses_bad_values_on_one_line(shell, capsys, line, message):
    before = dict(shell.session.options.trait_values())
    shell.run(line)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    after = dict(shell.session.options.trait_values())
    assert {k: v for k, v in after.items() if k != "config"} == {k: v for k, v in before.items() if k != "config"}


def test_config_lists_every_option(shell, capsys):
    shell.run("%config TorchMagic")
    out = capsys.readouterr().out
    for option in ("max_nodes", "small_values", "memory_budget", "history_size", "layout_timeout", "default_device"):
        assert f"TorchMagic.{option}" in out


@pytest.mark.parametrize("magic", ["%%autograd_trace", "%%tensor", "%%device meta"])
def test_a_syntax_error_in_a_cell_magic_reads_like_a_plain_cells(shell, capsys, magic):
    shell.run(SEED.replace("import torch", "%%autograd_trace\nimport torch"))
    before = torchmagic.last_trace()
    capsys.readouterr()
    result = shell.run(f"{magic}\nx = = 1", expect_error=SyntaxError)
    printed = capsys.readouterr()
    text = printed.out + printed.err
    number = shell.ip.execution_count - 1
    assert f"Cell In[{number}], line 2" in text and "SyntaxError: invalid syntax" in text
    assert "Traceback" not in text and "torchmagic" not in text and "run_cell_magic" not in text
    assert not result.success
    assert torchmagic.last_trace() is before  # the last trace is left alone
    shell.run("x = 1")  # the session goes on


def test_save_takes_a_quoted_path_with_spaces(shell, tmp_path):
    target = tmp_path / "my trace.txt"
    shell.run(f'%%autograd_trace --text --save "{target}"\n' + SEED)
    assert target.read_text().startswith("autograd trace of")


def test_tensor_of_an_empty_list_says_what_is_true(shell, capsys):
    shell.run("%tensor []", expect_error=UsageError)
    err = capsys.readouterr().err
    assert "left the empty list alone: an empty list has no dtype" in err and "not a list or ndarray" not in err


def test_requires_grad_on_integers_is_refused_in_the_line_form(shell, capsys):
    shell.run("t = %tensor --requires-grad [1, 2]", expect_error=UsageError)
    err = capsys.readouterr().err
    assert "only floating point and complex tensors can require grad" in err and "--dtype float32" in err
    assert "t" not in shell.ns
    shell.run("t = %tensor --requires-grad --dtype float32 [1, 2]")
    assert shell.ns["t"].requires_grad and shell.ns["t"].dtype == torch.float32


def test_tensor_cells_never_wrap_integers(shell):
    shell.run("%%tensor\nimport numpy as np\nbig = [2**64 - 1, 2**63, 5]\nu = np.array(big, dtype=np.uint64)")
    assert shell.ns["big"] == [2**64 - 1, 2**63, 5] and shell.ns["u"].dtype.name == "uint64"
    text = shell.displayed()[0]
    assert "integers outside int64's range" in text and "above int64's maximum" in text


def test_a_self_referential_list_is_refused_with_a_note(shell, capsys):
    shell.run("%%tensor\nrec = []\nrec.append(rec)\nsame = rec")
    assert shell.ns["same"] is shell.ns["rec"] and shell.ns["rec"][0] is shell.ns["rec"]
    assert "same: list, contains itself (a self-referential list)" in shell.displayed()[0]
    shell.run("%tensor rec", expect_error=UsageError)
    assert "left list alone: contains itself" in capsys.readouterr().err


def test_a_failing_binder_never_breaks_the_users_cell(shell, capsys, monkeypatch):
    tensor_magics = shell.topic(TensorMagics)
    shell.run("%tensor on")

    class Exploding:
        def __call__(self, name, value):
            raise RuntimeError("binder bug")

        report = None

    monkeypatch.setattr(tensor_magics, "cell_started", lambda: shell.session.set_binder("tensor", Exploding()))
    shell.run("a = [1, 2]\nb = a")
    assert shell.ns["b"] == [1, 2]
    assert "torchmagic: could not convert 'a' (RuntimeError: binder bug); left as it was" in capsys.readouterr().err
    monkeypatch.undo()
    shell.run("%tensor off")


@pytest.mark.parametrize("setting", ["layout_timeout = float('nan')", "live_interval = float('inf')",
                                     "max_nodes = True"])
def test_config_refuses_what_is_not_a_number(shell, capsys, setting):
    name = setting.split(" =")[0]
    before = getattr(shell.session.options, name)
    shell.run(f"%config TorchMagic.{setting}")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not applied" in err
    assert getattr(shell.session.options, name) == before


def test_config_refuses_a_number_too_large_for_a_float(shell, capsys):
    shell.run("%config TorchMagic.layout_timeout = 10**400")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not applied: too large a number" in err
    assert shell.session.options.layout_timeout == 10.0
