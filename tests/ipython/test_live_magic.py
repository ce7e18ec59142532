"""--live and --stop-on-nan in a shell: one display updated in place, then the trace in its place;
a loop stopped at the pass where its NaN first appears, with the op and line named."""

from __future__ import annotations

import torch

import torchmagic
from torchmagic.errors import NonFiniteGradient

TRAINING = """\
import torch, time
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
xb, yb = torch.randn(16, 4), torch.randn(16, 1)
for step in range(40):
    opt.zero_grad()
    loss = (model(xb) - yb).pow(2).mean()
    loss.backward()
    opt.step()
    time.sleep(0.004)
"""

NAN_AT_37 = """\
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
xb = torch.randn(8, 3)
for step in range(60):
    model.zero_grad()
    energy = model(xb).pow(2).mean()
    d = energy - energy.detach() if step == 37 else energy
    s = torch.sqrt(d)
    loss = s * 2
    loss.backward()
"""


def _updates(outputs):
    """(display id, data) of each output that belongs to a display with an id, in order."""
    found = []
    for output in outputs:
        display_id = (output.get("transient") or {}).get("display_id")
        if display_id is not None:
            found.append((display_id, output.get("update", False), output["data"]))
    return found


def test_live_shows_one_display_updated_in_place_then_the_trace_in_its_place(shell):
    shell.run("%config TorchMagic.live_interval = 0.02")
    shell.run("%%autograd_trace --live\n" + TRAINING)
    updates = _updates(shell.outputs)
    assert len({display_id for display_id, _, _ in updates}) == 1  # one display, never a growing list
    assert not updates[0][1] and all(update for _, update, _ in updates[1:])
    live = [data for _, _, data in updates if data["text/plain"].startswith("live:")]
    assert len(live) >= 3
    counts = [int(data["text/plain"].split()[1]) for data in live]
    assert counts == sorted(counts) and counts[-1] <= 40
    assert "loss" in live[-1]["text/plain"] and "<svg" in live[-1]["text/html"]
    final = updates[-1][2]
    assert final["text/plain"].startswith("autograd trace of") and "40 backward passes" in final["text/plain"]
    assert len([o for o in shell.outputs if "display_id" not in (o.get("transient") or {})]) == 0


def test_an_interrupted_live_cell_keeps_the_trace_so_far_and_leaves_nothing(shell):
    shell.run("%config TorchMagic.live_interval = 0.01")
    body = TRAINING.replace("    time.sleep(0.004)\n", "    time.sleep(0.004)\n    if step == 12:\n"
                                                          "        raise KeyboardInterrupt\n")
    shell.run("%%autograd_trace --live --text\n" + body, expect_error=KeyboardInterrupt)
    trace = torchmagic.last_trace()
    assert trace.error == "KeyboardInterrupt" and len(trace.passes) == 13
    final = _updates(shell.outputs)[-1][2]["text/plain"]
    assert final.startswith("autograd trace of") and "13 backward passes" in final
    trace_magics = next(m for m in shell.session.magics if type(m).__name__ == "TraceMagics")
    assert torch._C._len_torch_function_stack() == 0 and trace_magics._on_recording is None


def test_live_in_the_on_mode(shell):
    shell.run("%config TorchMagic.live_interval = 0.02")
    shell.run("%autograd_trace on --live")
    shell.run(TRAINING)
    assert len({display_id for display_id, _, _ in _updates(shell.outputs)}) == 1
    shell.run("%autograd_trace off")


def test_stop_on_nan_stops_the_cell_at_step_37_naming_the_op_and_line(shell):
    shell.run("import torch")
    result = shell.run("%%autograd_trace --stop-on-nan --text\n" + NAN_AT_37, expect_error=NonFiniteGradient)
    assert shell.ns["step"] == 37
    message = str(result.error_in_exec)
    number = result.execution_count
    assert message.startswith(f"backward pass 38 (In [{number}], line 11: loss.backward())")
    assert f"d () (In [{number}], line 8: d = energy - energy.detach() if step == 37 else energy)" in message
    assert f"it came out of the backward of s = sqrt(d) at In [{number}], line 9: s = torch.sqrt(d)" in message
    assert "fed by the gradient of s, which was finite: 2" in message
    trace = torchmagic.last_trace()  # the trace up to that point is shown
    assert trace.error.startswith("NonFiniteGradient: backward pass 38") and trace.nonfinite_origin.name == "d"
    assert shell.displayed()[-1].startswith(f"autograd trace of In [{number}]")


def test_stop_on_nan_lets_a_finite_loop_run_to_its_end(shell):
    shell.run("%%autograd_trace --stop-on-nan --text\n" + TRAINING)
    assert shell.ns["step"] == 39 and len(torchmagic.last_trace().passes) == 40


def test_per_node_hooks_runs_a_hook_on_an_accumulate_grad_node(shell):
    shell.run("%%autograd_trace --per-node-hooks --text\n"
              "import torch\n"
              "w = torch.ones(3, requires_grad=True)\n"
              "moved = []\n"
              "node = w.view_as(w).grad_fn.next_functions[0][0]\n"
              "handle = node.register_hook(lambda *_: moved.append(w.grad.clone()))\n"
              "loss = (w * torch.tensor([1.0, 2.0, 3.0])).sum()\n"
              "loss.backward()\n")
    assert len(shell.ns["moved"]) == 1 and torch.equal(shell.ns["moved"][0], torch.tensor([1.0, 2.0, 3.0]))
    trace = torchmagic.last_trace()
    assert trace.passes[0].strategy == "hooks" and "--per-node-hooks" in trace.passes[0].note
    assert torch.equal(trace.grad("w"), torch.tensor([1.0, 2.0, 3.0]))
