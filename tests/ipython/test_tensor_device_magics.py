"""%tensor and %device through an IPython shell."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from IPython.core.error import UsageError

import torchmagic


def test_cell_converts_as_it_runs_and_reports(shell):
    result = shell.run(
        "%%tensor\nimport numpy as np\narr = np.arange(4.0)\nb = [[1, 2], [3, 4]]\nc = b.sum()\n"
        "acc = []\nbad = [1, None]\nshape = (2, 3)\nfor i in range(2):\n    e = [i, i]\nb"
    )
    ns = shell.ns
    assert isinstance(ns["arr"], torch.Tensor) and isinstance(ns["b"], torch.Tensor)
    assert ns["c"].item() == 10  # a later line of the same cell already saw a tensor
    assert ns["acc"] == [] and ns["shape"] == (2, 3) and ns["bad"] == [1, None]
    assert isinstance(result.result, torch.Tensor)
    report = torchmagic.last_conversion()
    assert [c.name for c in report.converted] == ["arr", "b", "e"]
    assert report.converted[0].shares_memory
    text = shell.displayed()[0]
    assert "shares memory with the ndarray" in text and "bad: list, list contains None" in text
    assert "e (x2)" in text


def test_sharing_is_visible_by_mutation(shell):
    shell.run("%%tensor --quiet\nimport numpy as np\nsrc = np.zeros(3)\nshared = src\ncopied = np.zeros(3)")
    assert shell.outputs == []
    shell.ns["src"]  # already a tensor: the ndarray itself is gone from the namespace, its memory is shared
    arr = np.zeros(3)
    shell.ns["arr"] = arr
    shell.run("%%tensor\nt = arr")
    arr[1] = 5.0
    assert shell.ns["t"][1].item() == 5.0


def test_line_form_returns_the_tensor(shell):
    shell.run("t = %tensor --dtype float64 [[1, 2], [3, 4]]")
    assert shell.ns["t"].dtype == torch.float64 and shell.ns["t"].shape == (2, 2)


def test_on_off_applies_to_following_cells(shell):
    shell.run("%tensor on --requires-grad")
    shell.run("w = [1.0, 2.0]\nn = [1, 2]")
    assert shell.ns["w"].requires_grad and not shell.ns["n"].requires_grad
    assert "int64 tensors cannot require grad" in shell.displayed()[0]
    shell.run("%tensor off")
    shell.run("v = [1.0]")
    assert shell.ns["v"] == [1.0]


def test_functions_defined_in_the_cell_are_left_alone(shell):
    shell.run("%%tensor\ndef f():\n    inner = [1, 2]\n    return inner\nr = f()")
    assert isinstance(shell.ns["r"], torch.Tensor)  # the cell's own assignment converts
    assert shell.ns["f"]() == [1, 2]  # the body, run later, does not


@pytest.mark.parametrize("line, message", [
    ("%tensor --dtype floaty [1]", "unknown dtype 'floaty'"),
    ("%tensor --device gpu [1]", "unknown device 'gpu'"),
    ("%tensor (1, 2)", "left tuple alone"),
    ("%tensor", "needs an expression"),
    ("%tensor --dtype uint8 [-1, -129]", "do not fit uint8"),  # torch.tensor would wrap them to 255, 127
    ("%tensor [1.0, 2.0] --requires-grad", "options go before the expression"),
])
def test_tensor_bad_input(shell, capsys, line, message):
    shell.run(line, expect_error=UsageError)
    assert message in capsys.readouterr().err


def test_bad_option_does_not_run_the_cell(shell):
    shell.run("%%tensor --dtype nope\nran = True", expect_error=UsageError)
    assert "ran" not in shell.ns


def test_tensor_and_trace_together(shell):
    shell.run("%autograd_trace on")
    shell.run("%%tensor --requires-grad\nimport torch\nw = [1.0, 2.0, 3.0]\nloss = (w * w).sum()\nloss.backward()")
    shell.run("%autograd_trace off")
    t = torchmagic.last_trace()
    assert t.node("w").kind == "leaf"
    assert torch.equal(t.grad("w"), torch.tensor([2.0, 4.0, 6.0]))


def test_device_shows_devices(shell):
    shell.run("%device")
    text = shell.displayed()[0]
    assert "default device" in text and "torch" in text
    if not torch.cuda.is_available():
        assert "no CUDA device available" in text


def test_cell_device_restores_default_even_on_error(shell):
    shell.run("%%device meta\nimport torch\nm = torch.ones(2)")
    assert shell.ns["m"].device.type == "meta" and torch.get_default_device().type == "cpu"
    shell.run("%%device meta\nraise ValueError('x')", expect_error=ValueError)
    assert torch.get_default_device().type == "cpu"


def test_set_and_move(shell):
    shell.run("import torch\nmodel = torch.nn.Linear(2, 2)\nopt = torch.optim.Adam(model.parameters())\nw = torch.ones(2, requires_grad=True)")
    shell.run("%device meta --move")
    assert torch.get_default_device().type == "meta"
    assert shell.ns["w"].device.type == "meta" and shell.ns["w"].is_leaf
    assert shell.ns["model"].weight.device.type == "meta"
    assert "moved to meta" in shell.displayed()[0]
    shell.run("%device cpu")
    assert torch.get_default_device().type == "cpu"


@pytest.mark.parametrize("line, message", [
    ("%device gpu", "unknown device 'gpu'"),
    ("%device cuda:99", "available here: cpu"),
    ("%device --move", "--move needs a device"),
])
def test_device_bad_input_changes_nothing(shell, capsys, line, message):
    shell.run(line, expect_error=UsageError)
    assert message in capsys.readouterr().err
    assert torch.get_default_device().type == "cpu"


def test_unload_restores_the_default_device(shell):
    shell.run("%device meta")
    shell.run("%unload_ext torchmagic")
    assert torch.get_default_device().type == "cpu"
    shell.run("%load_ext torchmagic")


def test_a_float_list_goes_to_meta(shell):
    shell.run("m = %tensor --device meta [1.0, 2.0]")
    assert shell.ns["m"].is_meta and shell.ns["m"].shape == (2,)


def test_cpu_0_is_the_cpu_and_puts_no_mode_on_the_stack(shell):
    shell.run("%device cpu:0")
    assert torch.get_default_device() == torch.device("cpu")
    assert torch._C._len_torch_function_stack() == 0


def test_move_says_what_it_left_in_containers_and_where_optimizer_state_came_from(shell):
    shell.run("import torch\nt = torch.ones(2)\nbatch = [torch.ones(2), {'y': torch.zeros(1)}]\n"
              "w = torch.nn.Parameter(torch.ones(4))\nopt = torch.optim.Adam([w])\n"
              "w.grad = torch.ones(4)\nopt.step()")
    try:
        shell.run("%device meta --move")
        report = shell.displayed()[-1]
        assert "batch" in report and "a list holding tensors" in report
        assert shell.ns["batch"][0].device.type == "cpu"  # left alone, and said so
        assert "optimizer state" in report and "cpu -> meta" in report.split("optimizer state")[1].splitlines()[0]
    finally:
        shell.run("%device cpu")


def test_a_list_is_a_cpu_tensor_whatever_the_default_device(shell):
    shell.run("%device meta")
    try:
        shell.run("a = %tensor [1, 2]\nb = %tensor --dtype uint8 [1, 2]")
    finally:
        shell.run("%device cpu")
    assert shell.ns["a"].device.type == "cpu" and shell.ns["b"].dtype == torch.uint8


def test_an_expression_that_is_python_is_not_taken_for_a_misplaced_option(shell):
    shell.run("import numpy as np\nx = np.ones(3)\ncopy = np.full(3, 2.0)\nt = %tensor x --copy")
    assert shell.ns["t"].tolist() == [3.0, 3.0, 3.0]  # x - (-copy)


def test_move_says_nothing_of_containers_whose_tensors_moved_or_stay_put(shell):
    shell.run("import torch\nmodel = torch.nn.Linear(2, 2)\nparams = list(model.parameters())\n"
              "xs = [torch.ones(2)]")
    shell.run("%device cpu:0 --move")
    report = shell.displayed()[-1]
    assert "nothing moved" in report and "xs" not in report
    try:
        shell.run("%device meta --move")
        report = shell.displayed()[-1]
        assert "params" not in report and "xs" in report
    finally:
        shell.run("%device cpu")
