"""A real `ipython` process in a pseudo-terminal, driven as a user types into it."""

from __future__ import annotations

import os
import random
import re
import sys
import time

import pytest

pexpect = pytest.importorskip("pexpect", reason="the terminal test needs pexpect (the test extra)")

pytestmark = pytest.mark.terminal

SEED = [
    "%%autograd_trace",
    "import torch",
    "x = torch.ones(2, 2, requires_grad=True)",
    "y = x + 2",
    "z = y * y * 3",
    "out = z.mean()",
    "out.backward()",
]


@pytest.fixture
def ipython(tmp_path):
    env = dict(os.environ, TERM="dumb", IPYTHONDIR=str(tmp_path / "ipython"), COLUMNS="120")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "IPython", "--simple-prompt", "--colors=NoColor", "--no-banner",
         "--HistoryManager.hist_file=:memory:"],
        env=env, encoding="utf-8", timeout=90, dimensions=(60, 120),
    )
    child.expect(r"In \[1\]: ")
    yield child
    child.sendline("exit")
    child.expect(pexpect.EOF)


def run(child, lines: list[str], number: int) -> str:
    """Type a cell line by line; a blank line ends it (two for a cell magic). Return what it printed."""
    for line in lines:
        child.sendline(line)
    child.sendline("")
    if lines[0].startswith("%%"):
        child.sendline("")
    child.expect(rf"In \[{number + 1}\]: ")
    return child.before.replace("\r\n", "\n")


def test_traced_cell_prints_the_text_graph_and_gradient_table(ipython):
    assert "Error" not in run(ipython, ["%load_ext torchmagic"], 1)
    screen = run(ipython, SEED, 2)
    printed = screen[screen.index("autograd trace of"):]
    assert printed.startswith("autograd trace of In [2] · 5 tensors, 4 ops · 1 backward pass")
    # The graph, inputs first, with each tensor's gradient.
    assert re.search(r"^  x +=  ones +\(2, 2\) float32 +grad \[\[4\.5, 4\.5\], \[4\.5, 4\.5\]\]$", printed, re.M)
    assert re.search(r"^  z +=  mul\(%2\) .* grad \[\[0\.25, 0\.25\], \[0\.25, 0\.25\]\]$", printed, re.M)
    assert re.search(r"^  out +=  mean\(z\) .* output +grad 1$", printed, re.M)
    # The gradient table, with the user's own source lines.
    table = printed[printed.index("gradients:"):]
    assert re.search(r"^  name +shape +mean +min +max +norm +NaN +Inf +source$", table, re.M)
    assert re.search(r"^  y +\(2, 2\) +4\.5 +4\.5 +4\.5 +9 +0 +0 +In \[2\], line 4: y = x \+ 2$", table, re.M)
    # A terminal gets text, never markup or an object repr.
    assert "<svg" not in printed and "<table" not in printed and "at 0x" not in printed


def test_error_in_a_traced_cell_points_at_the_users_line(ipython):
    run(ipython, ["%load_ext torchmagic"], 1)
    screen = run(ipython, ["%%autograd_trace", "import torch", "a = torch.ones(2, requires_grad=True)",
                           "b = torch.log(a - 1)", "1 / 0"], 2)
    assert "ZeroDivisionError" in screen and "----> 5 1 / 0" in screen and "Cell In[2], line 5" in screen
    assert "the code raised ZeroDivisionError" in screen
    # The session goes on: the next cell runs and sees no leftover mode.
    after = run(ipython, ["import torch; print('modes', torch._C._len_torch_function_stack())"], 3)
    assert "modes 0" in after


TRAINING_LOOP = ["for step in range(10**9):", "    x = torch.randn(4, 8)", "    loss = model(x).pow(2).mean()",
                 "    opt.zero_grad()", "    loss.backward()", "    opt.step()"]
BROKEN = ("Exception ignored", "Unexpected exception formatting", "escaped interact", "Error in callback",
          "mode stack", "During handling of the above exception")


def interrupt(child, lines: list[str], after: float) -> str:
    """Type a long-running cell, press Ctrl-C after ``after`` seconds; return what it printed.

    A swallowed interrupt lets the loop run on: the prompt then never comes back and expect times out.
    """
    for line in lines:
        child.sendline(line)
    child.sendline("")
    if lines[0].startswith("%%"):
        child.sendline("")
    time.sleep(after)
    child.sendintr()
    child.expect(r"In \[\d+\]: ", timeout=45)
    return child.before.replace("\r\n", "\n")


@pytest.mark.parametrize("mode", ["on", "cell"])
def test_ctrl_c_in_a_traced_training_loop_stops_it_cleanly_every_time(ipython, mode):
    """Real SIGINTs at varied moments: each stops the loop at the user's line, and nothing is left behind."""
    run(ipython, ["%load_ext torchmagic"], 1)
    ipython.sendline("import torch; torch.manual_seed(0); model = torch.nn.Sequential(torch.nn.Linear(8, 16), "
                     "torch.nn.ReLU(), torch.nn.Linear(16, 1)); opt = torch.optim.SGD(model.parameters(), lr=0.01)")
    ipython.expect(r"In \[3\]: ")
    loop = TRAINING_LOOP
    if mode == "on":
        ipython.sendline("%autograd_trace on --text")
        ipython.expect(r"In \[4\]: ")
    else:
        loop = ["%%autograd_trace --text", *TRAINING_LOOP]
    delays = random.Random(12).sample([0.3 + 0.15 * i for i in range(12)], 8)
    for delay in delays:
        screen = interrupt(ipython, loop, delay)
        assert "KeyboardInterrupt" in screen, screen[-2000:]
        assert not [problem for problem in BROKEN if problem in screen], screen[-3000:]
        traceback = screen[screen.index("KeyboardInterrupt"):]
        assert re.search(r"Cell In\[\d+\], line \d+", traceback), traceback[:2000]  # the user's own line
        assert "autograd trace of" in screen and "the code raised KeyboardInterrupt; showing what ran" in screen
    ipython.sendline("%autograd_trace off")
    ipython.expect(r"In \[\d+\]: ")
    ipython.sendline("from torch.nn.modules import module as m; import signal; print('left', "
                     "torch._C._len_torch_function_stack(), len(m._global_forward_hooks), "
                     "len(m._global_forward_pre_hooks), signal.getsignal(signal.SIGINT).__name__)")
    ipython.expect(r"In \[\d+\]: ")
    assert "left 0 0 0 default_int_handler" in ipython.before


def test_live_is_one_status_line_rewritten_in_place_then_the_text_trace(ipython):
    assert "Error" not in run(ipython, ["%load_ext torchmagic"], 1)
    run(ipython, ["%config TorchMagic.live_interval = 0.05"], 2)
    cell = [
        "%%autograd_trace --live",
        "import time, torch",
        "model = torch.nn.Linear(4, 1)",
        "opt = torch.optim.SGD(model.parameters(), lr=0.05)",
        "xb = torch.randn(16, 4)",
        "for step in range(60):",
        "    opt.zero_grad()",
        "    loss = model(xb).pow(2).mean()",
        "    loss.backward()",
        "    opt.step()",
        "    time.sleep(0.01)",
        "",
    ]
    for line in cell:
        ipython.sendline(line)
    ipython.sendline("")
    ipython.expect(r"In \[4\]: ")
    raw = ipython.before
    statuses = re.findall(r"\rlive: (\d+) backward pass", raw)
    assert len(statuses) >= 3  # the line was rewritten in place several times
    counts = [int(count) for count in statuses]
    assert counts == sorted(counts) and counts[-1] == 60  # the last refresh shows every pass
    after = raw[raw.rindex("\rlive:"):]
    assert "\nautograd trace of In [3]" in after.replace("\r\n", "\n")  # then the text trace, on a line of its own
    assert "<svg" not in raw and "LiveView" not in raw
