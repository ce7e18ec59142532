"""Bad options of every magic: one plain UsageError line that says what is wrong, and nothing ran or changed."""

from __future__ import annotations

import pytest
import torch

import torchmagic

SEED = "import torch\nx = torch.ones(2, 2, requires_grad=True)\ny = x + 2\nz = (y * y * 3).mean()\nz.backward()"

TRACE_LINES = [
    ("%autograd_trace --max-nodes x", "invalid int value: 'x'"),
    ("%autograd_trace --max-nodes 0 on", "--max-nodes must be at least 1"),
    ("%autograd_trace --max-nodes -5 on", "--max-nodes must be at least 1"),
    ("%autograd_trace bogus", "invalid choice: 'bogus'"),
    ("%autograd_trace", "needs on, off, status or show"),
    ("%autograd_trace on --save out.png", "--save: cannot write 'out.png'"),
    ("%autograd_trace on --save noextension", "--save: cannot write 'noextension'"),
    ("%autograd_trace on --save", "expected one argument"),
    ("%autograd_trace on --depth x", "invalid int value: 'x'"),
    ("%autograd_trace on --depth -1", "--depth must be 0 or more"),
    ("%autograd_trace on --expand", "expected one argument"),
    ("%autograd_trace on extra", "unrecognized arguments: extra"),
    ("%autograd_trace --unknown on", "unrecognized arguments: --unknown"),
    ("%autograd_trace show", "no trace yet"),
    ("%autograd_trace show --save out.bmp", "--save: cannot write 'out.bmp'"),
]


@pytest.mark.parametrize("line, message", TRACE_LINES)
def test_trace_line_options(hostile, line, message):
    assert message in hostile.usage_error(line)
    assert hostile.session.magics[1].on_view is None and torchmagic.last_trace() is None
    hostile.assert_clean()


TRACE_CELLS = [
    ("%%autograd_trace on", "takes no action ('on')"),
    ("%%autograd_trace --max-nodes 0", "--max-nodes must be at least 1"),
    ("%%autograd_trace --save out.png", "--save: cannot write 'out.png'"),
    ("%%autograd_trace --depth -2", "--depth must be 0 or more"),
    ("%%autograd_trace --text extra", "invalid choice: 'extra'"),
]


@pytest.mark.parametrize("line, message", TRACE_CELLS)
def test_trace_cell_options_run_nothing(hostile, line, message):
    assert message in hostile.usage_error(f"{line}\nran = True\n" + SEED)
    assert "ran" not in hostile.ns and torchmagic.last_trace() is None
    hostile.assert_clean()


@pytest.mark.parametrize("line, message", [
    ("%autograd_trace show --expand nowhere", "--expand: no module 'nowhere' in the last trace"),
    ("%autograd_trace show --depth -1", "--depth must be 0 or more"),
    ("%autograd_trace show --max-nodes 0", "--max-nodes must be at least 1"),
])
def test_show_options_leave_the_last_trace_as_it_was(hostile, line, message):
    hostile.run("%%autograd_trace --text\n" + SEED)
    trace = torchmagic.last_trace()
    view = (trace.depth, trace.expand, trace.fold, trace.max_nodes)
    assert message in hostile.usage_error(line)
    assert torchmagic.last_trace() is trace and (trace.depth, trace.expand, trace.fold, trace.max_nodes) == view


TENSOR_LINES = [
    ("%tensor --dtype floaty [1]", "unknown dtype 'floaty'"),
    ("%tensor --dtype", "expected one argument"),
    ("%tensor --device gpu [1]", "unknown device 'gpu'"),
    ("%tensor --device cuda:7 [1]", "available here: cpu"),
    ("%tensor --device xla [1]", "unsupported device 'xla'"),
    ("%tensor --bogus [1]", "unrecognized arguments: --bogus"),
    ("%tensor", "needs an expression, on or off"),
    ("%tensor on extra", "%tensor on: unexpected 'extra'"),
    ("%tensor off --dtype floaty", "unknown dtype 'floaty'"),
    ("%tensor [1, 2] --dtype float64", "options go before the expression"),
    ("%tensor [1,", "not a Python expression"),
    ("%tensor undefined_name", "raised NameError: name 'undefined_name' is not defined"),
    ("%tensor 1 / 0", "raised ZeroDivisionError: division by zero"),
]


@pytest.mark.parametrize("line, message", TENSOR_LINES)
def test_tensor_line_options(hostile, line, message):
    assert message in hostile.usage_error(line)
    assert hostile.session.magics[0].on_settings is None and torchmagic.last_conversion() is None
    hostile.assert_clean()


@pytest.mark.parametrize("line, message", [
    ("%%tensor --dtype nope", "unknown dtype 'nope'"),
    ("%%tensor --device gpu", "unknown device 'gpu'"),
    ("%%tensor [1, 2]", "%%tensor takes options only, not '[1, 2]'"),
    ("%%tensor --copy --copy --wat", "unrecognized arguments: --wat"),
])
def test_tensor_cell_options_run_nothing(hostile, line, message):
    assert message in hostile.usage_error(f"{line}\nran = [1, 2]")
    assert "ran" not in hostile.ns and torchmagic.last_conversion() is None
    hostile.assert_clean()


DEVICE_LINES = [
    ("%device gpu", "unknown device 'gpu'"),
    ("%device cuda:99", "available here: cpu"),
    ("%device xla", "unsupported device 'xla'"),
    ("%device cpu:3", "there is no 'cpu:3'"),
    ("%device --move", "--move needs a device"),
    ("%device meta extra", "unrecognized arguments: extra"),
    ("%device --bogus", "unrecognized arguments: --bogus"),
    ("%device gpu --move", "unknown device 'gpu'"),
]


@pytest.mark.parametrize("line, message", DEVICE_LINES)
def test_device_line_options_change_nothing(hostile, line, message):
    hostile.run("import torch\nw = torch.ones(2)")
    assert message in hostile.usage_error(line)
    assert torch.get_default_device() == torch.device("cpu") and hostile.ns["w"].device.type == "cpu"
    hostile.assert_clean()


@pytest.mark.parametrize("line, message", [
    ("%%device", "%%device needs a device"),
    ("%%device meta --move", "--move works with the line magic only"),
    ("%%device gpu", "unknown device 'gpu'"),
])
def test_device_cell_options_run_nothing(hostile, line, message):
    assert message in hostile.usage_error(f"{line}\nran = True")
    assert "ran" not in hostile.ns and torch.get_default_device() == torch.device("cpu")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_where_there_is_none(hostile):
    assert "MPS is not available on this machine" in hostile.usage_error("%device mps")
