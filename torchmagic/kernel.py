"""Install (opt-in) a Jupyter kernel spec whose kernel starts with torchmagic already loaded."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

DEFAULT_NAME = "torchmagic"
DEFAULT_DISPLAY_NAME = "Python 3 (torchmagic)"


def kernel_spec(display_name: str = DEFAULT_DISPLAY_NAME, python: str = sys.executable) -> dict:
    return {
        "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}", "--ext=torchmagic"],
        "display_name": display_name,
        "language": "python",
        "metadata": {"debugger": True},
    }


def install(name: str = DEFAULT_NAME, display_name: str = DEFAULT_DISPLAY_NAME, *, user: bool = False,
            prefix: str | None = None) -> str:
    """Install the spec; returns the directory it went to."""
    from jupyter_client.kernelspec import KernelSpecManager

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernel.json").write_text(json.dumps(kernel_spec(display_name), indent=1))
        return KernelSpecManager().install_kernel_spec(tmp, kernel_name=name, user=user, prefix=prefix)


def uninstall(name: str = DEFAULT_NAME) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    KernelSpecManager().remove_kernel_spec(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torchmagic", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("install-kernel", help="install the 'Python 3 (torchmagic)' kernel spec")
    where = add.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for this user")
    where.add_argument("--sys-prefix", action="store_true", help="install into sys.prefix (the active environment)")
    where.add_argument("--prefix", help="install under this prefix")
    add.add_argument("--name", default=DEFAULT_NAME)
    add.add_argument("--display-name", default=DEFAULT_DISPLAY_NAME)
    remove = commands.add_parser("uninstall-kernel", help="remove the kernel spec")
    remove.add_argument("--name", default=DEFAULT_NAME)
    args = parser.parse_args(argv)
    if args.command == "install-kernel":
        prefix = sys.prefix if args.sys_prefix else args.prefix
        path = install(args.name, args.display_name, user=args.user, prefix=prefix)
        print(f"installed kernel spec {args.name!r} ({args.display_name}) in {path}")
    else:
        try:
            uninstall(args.name)
        except KeyError:
            print(f"no kernel spec named {args.name!r}", file=sys.stderr)
            return 1
        print(f"removed kernel spec {args.name!r}")
    return 0
