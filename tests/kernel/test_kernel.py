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
