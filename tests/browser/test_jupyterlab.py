"""JupyterLab in headless Chromium: a traced cell's diagram and gradient table as the user sees them.

Uses Debian's chromium (/usr/bin/chromium) through Playwright's Python client: no browser download.
Where Chromium is missing the tests skip with a reason, unless TORCHMAGIC_REQUIRE_BROWSER=1 (CI sets
it), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("TORCHMAGIC_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "out" / "test-artifacts"
TOKEN = "torchmagic-test"
SEED = """%%autograd_trace
import torch
x = torch.ones(2, 2, requires_grad=True)
y = x + 2
z = y * y * 3
out = z.mean()
out.backward()"""


def _need(available: bool, reason: str) -> None:
    if available:
        return
    if os.environ.get("TORCHMAGIC_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (TORCHMAGIC_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on localhost serving a throwaway notebook; yields the notebook's URL."""
    _need(Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (Debian package 'chromium')")
    _need(shutil.which("jupyter-lab", path=str(Path(sys.executable).parent)) is not None,
          "JupyterLab is not installed (pip install -e '.[browser]')")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext torchmagic"),
        nbformat.v4.new_code_cell(SEED),
    ])
    root = tmp_path / "notebooks"
    root.mkdir()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, root / "trace.ipynb")
    port = _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    log = open(tmp_path / "lab.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={TOKEN}",
         "--ServerApp.allow_root=True", "--LabApp.news_url=None", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2).read()
                break
            except OSError as error:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()) from error
                time.sleep(0.3)
        yield f"{base}/lab/tree/trace.ipynb?token={TOKEN}&reset"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_traced_cell_renders_svg_with_names_and_gradient_table(lab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright (pip install -e '.[browser]')")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(lab, timeout=60_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=60_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            output = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea-output")
            svg = output.locator("svg").first
            try:
                # Run > Run All Cells, as a user would. Right after the page opens, JupyterLab can show
                # the kernel idle before its connection takes requests, and a run then does nothing
                # (both prompts stay "[ ]:") or asks which kernel to use (accepted: the default one);
                # only in those cases is the run asked for again.
                dialog_accept = page.locator(".jp-Dialog .jp-mod-accept")
                for attempt in range(3):
                    if dialog_accept.count():
                        dialog_accept.first.click()
                    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
                    deadline = time.monotonic() + 30
                    while not svg.count() and time.monotonic() < deadline:
                        if dialog_accept.count():
                            dialog_accept.first.click()
                        page.wait_for_timeout(250)
                    if svg.count():
                        break
                    prompt = page.locator(".jp-Notebook .jp-InputPrompt").first.inner_text()
                    if prompt.strip() not in ("[ ]:", "[*]:") or attempt == 2:
                        raise AssertionError(f"no diagram after running the cells (first prompt {prompt!r})")
                svg.wait_for(timeout=30_000)
                svg.scroll_into_view_if_needed()
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "jupyterlab-trace-failed.png"), full_page=True)
                raise
            page.screenshot(path=str(ARTIFACTS / "jupyterlab-trace.png"), full_page=True)

            labels = {label.strip() for label in svg.locator("text").all_text_contents()}
            assert {"x", "y", "z", "out"} <= labels, labels
            assert any("4.5" in label for label in labels), labels
            table = output.locator("table").first
            assert table.is_visible()
            text = table.inner_text()
            for expected in ("name", "norm", "NaN", "x", "y", "z", "out", "4.5", "0.25"):
                assert expected in text, (expected, text)
            assert output.locator(".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
        finally:
            browser.close()
