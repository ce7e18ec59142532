"""A real kernel through jupyter_client: the trace arrives as display_data with an SVG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernel


def _execute(client, code: str, timeout: float = 60):
    msg_id = client.execute(code)
    outputs = []
    while True:
        msg = client.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["header"]["msg_type"]
        if kind == "status" and msg["content"]["execution_state"] == "idle":
            break
        outputs.append((kind, msg["content"]))
    reply = client.get_shell_msg(timeout=timeout)
    return reply["content"], outputs


def _start(kernel_name: str, env: dict | None = None):
    from jupyter_client.manager import start_new_kernel

    return start_new_kernel(kernel_name=kernel_name, env=env if env is not None else dict(os.environ))


def test_trace_arrives_as_display_data_with_svg():
    manager, client = _start("python3")
    try:
        reply, _ = _execute(client, "%load_ext torchmagic")
        assert reply["status"] == "ok"
        reply, outputs = _execute(client, "%%autograd_trace\nimport torch\nx = torch.ones(2, 2, requires_grad=True)\n"
                                          "y = x + 2\nz = y * y * 3\nout = z.mean()\nout.backward()")
        assert reply["status"] == "ok"
        displays = [content for kind, content in outputs if kind == "display_data"]
        assert len(displays) == 1
        data = displays[0]["data"]
        assert data["image/svg+xml"].lstrip().startswith("<svg") and ">out<" in data["image/svg+xml"]
        assert "grad [[0.25, 0.25], [0.25, 0.25]]" in data["text/plain"]
        streams = [content["text"] for kind, content in outputs if kind == "stream"]
        assert not any("Fontconfig" in s or "Warning" in s for s in streams)  # bundled Graphviz noise stays out
        reply, outputs = _execute(client, "%device nope")
        assert reply["status"] == "error" and reply["ename"] == "UsageError"
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_installed_kernel_spec_preloads_the_extension(tmp_path):
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "torchmagic", "install-kernel", "--prefix", str(prefix),
                    "--name", "tm-test"], check=True, capture_output=True)
    spec_dir = prefix / "share" / "jupyter" / "kernels" / "tm-test"
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["display_name"] == "Python 3 (torchmagic)"
    env = dict(os.environ, JUPYTER_PATH=str(prefix / "share" / "jupyter"))
    os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]
    try:
        manager, client = _start("tm-test", env=env)
        try:
            reply, outputs = _execute(client, "%autograd_trace status")  # no %load_ext
            assert reply["status"] == "ok"
            assert any("autograd tracing is off" in c.get("text", "") for k, c in outputs if k == "stream")
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)
    finally:
        del os.environ["JUPYTER_PATH"]
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    manager.kernel_dirs = [str(prefix / "share" / "jupyter" / "kernels")]
    manager.remove_kernel_spec("tm-test")
    assert not Path(spec_dir).exists()


def test_a_live_cell_updates_one_display_in_place_then_shows_the_trace_there():
    manager, client = _start("python3")
    try:
        reply, _ = _execute(client, "%load_ext torchmagic")
        assert reply["status"] == "ok"
        code = ("%%autograd_trace --live\n"
                "import time, torch\n"
                "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))\n"
                "opt = torch.optim.SGD(model.parameters(), lr=0.05)\n"
                "xb, yb = torch.randn(16, 4), torch.randn(16, 1)\n"
                "start = time.monotonic()\n"
                "while time.monotonic() - start < 3:\n"
                "    opt.zero_grad()\n"
                "    loss = (model(xb) - yb).pow(2).mean()\n"
                "    loss.backward()\n"
                "    opt.step()\n"
                "    time.sleep(0.01)\n")
        reply, outputs = _execute(client, code)
        assert reply["status"] == "ok"
        first = [c for kind, c in outputs if kind == "display_data"]
        updates = [c for kind, c in outputs if kind == "update_display_data"]
        assert len(first) == 1 and first[0]["data"]["text/plain"].startswith("live:")
        display_id = first[0]["transient"]["display_id"]
        assert {u["transient"]["display_id"] for u in updates} == {display_id}
        live = [u for u in updates if u["data"]["text/plain"].startswith("live:")]
        assert len(live) >= 5  # four refreshes a second for three seconds, at most
        counts = [int(u["data"]["text/plain"].split()[1]) for u in live]
        assert counts == sorted(counts) and counts[-1] > counts[0]
        final = updates[-1]["data"]
        assert final["text/plain"].startswith("autograd trace of") and "<svg" in final["image/svg+xml"]
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
