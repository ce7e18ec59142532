"""Execute demo.ipynb headless and write it as HTML whose diagrams are static inline SVG.

No JavaScript and no network: the HTML is nbconvert's ``basic`` body in a small page.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parent.parent

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>torchmagic demo</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; }}
pre {{ background: #f6f6f6; padding: 6px; overflow-x: auto; }}
.jp-InputPrompt, .jp-OutputPrompt {{ color: #888; font-family: monospace; font-size: 12px; }}
.jp-Cell {{ margin-bottom: 1em; }}
</style></head><body>
{body}
</body></html>
"""


def run(source: Path, out_dir: Path, timeout: int = 600) -> Path:
    notebook = nbformat.read(source, as_version=4)
    with tempfile.TemporaryDirectory(prefix="torchmagic-demo-") as sockets:
        # Local sockets (IPC) where the OS has them: a TCP kernel warns that its traffic is unencrypted.
        manager = KernelManager(kernel_name="python3")
        if os.name == "posix":
            manager.transport, manager.ip = "ipc", os.path.join(sockets, "kernel")
        try:
            NotebookClient(notebook, km=manager, timeout=timeout, resources={"metadata": {"path": str(ROOT)}}).execute()
        finally:
            if manager.has_kernel:  # a client given a manager leaves its kernel running
                manager.shutdown_kernel()
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out_dir / "demo.ipynb")
    exporter = HTMLExporter(template_name="basic")
    body, _ = exporter.from_notebook_node(notebook)
    html_path = out_dir / "demo.html"
    html_path.write_text(PAGE.format(body=body), encoding="utf-8")
    return html_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--notebook", type=Path, default=ROOT / "demo.ipynb")
    parser.add_argument("--out", type=Path, default=ROOT / "out")
    args = parser.parse_args()
    path = run(args.notebook, args.out)
    print(f"executed notebook: {args.out / 'demo.ipynb'}")
    print(f"HTML with inline SVG diagrams: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
