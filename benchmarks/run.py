"""Speed figures as ratios measured side by side in one run (never asserted in tests).

    python benchmarks/run.py            # full sizes
    python benchmarks/run.py --smoke    # tiny sizes, for CI: proves every row still runs
"""

from __future__ import annotations

import argparse
import ast
import platform
import statistics
import time

import numpy as np
import torch

import torchmagic
from torchmagic.assignments import BIND_NAME, BindDispatcher, instrument
from torchmagic.convert import ConversionOptions, Converter, convert


def timeit(fn, repeat: int) -> float:
    """Median wall time of ``fn`` in seconds."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def paired(plain, traced, repeat: int) -> tuple[float, float]:
    """Interleave the two so machine noise hits both alike."""
    a, b = [], []
    for _ in range(repeat):
        a.append(timeit(plain, 1))
        b.append(timeit(traced, 1))
    return statistics.median(a), statistics.median(b)


def traced(fn, summarise: bool = False):
    """Record ``fn``; with ``summarise``, also compute the gradient statistics a display needs."""
    def run():
        with torchmagic.trace() as t:
            fn()
        if summarise:
            t.nodes  # noqa: B018 - computes the statistics
    return run


def row(label: str, value: str, target: str = "") -> None:
    print(f"{label:<62} {value:>14}   {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke
    repeat = 3 if smoke else 15
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads{' (smoke sizes)' if smoke else ''}")

    width, batch = (64, 8) if smoke else (512, 64)
    mlp = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                              torch.nn.ReLU(), torch.nn.Linear(width, 10))
    x = torch.randn(batch, width)

    def mlp_step():
        mlp.zero_grad()
        mlp(x).pow(2).mean().backward()

    plain, tr = paired(mlp_step, traced(mlp_step), repeat)
    row(f"traced / plain, 3-layer MLP (width {width}, batch {batch}) fwd+bwd", f"{tr / plain:.2f}x", "target <= 1.15x")
    plain, tr = paired(mlp_step, traced(mlp_step, summarise=True), repeat)
    row("  the same, plus the gradient statistics a display computes", f"{tr / plain:.2f}x", "")

    n_ops, size = (50, 10) if smoke else (1000, 100)
    leaf = torch.randn(size, size, requires_grad=True)

    def elementwise():
        h = leaf
        for i in range(n_ops):
            h = h * 1.0001 if i % 2 else h + 0.001
        h.sum().backward()

    plain, tr = paired(elementwise, traced(elementwise), repeat)
    row(f"traced / plain, {n_ops} elementwise ops on {size}x{size} + backward", f"{tr / plain:.2f}x", "target <= 2x")
    plain, tr = paired(elementwise, traced(elementwise, summarise=True), repeat)
    row("  the same, plus the gradient statistics a display computes", f"{tr / plain:.2f}x", "")

    with torchmagic.trace(max_nodes=600) as t:
        h = leaf
        for _ in range(500 if not smoke else 50):
            h = torch.tanh(h)
        h.sum().backward()
    start = time.perf_counter()
    t._svg = None
    t.svg()
    row(f"diagram time (DOT + layout + SVG), {len(t.nodes)}-node graph", f"{time.perf_counter() - start:.3f} s",
        "target < 0.3 s")

    # %%tensor
    elements = 2**20 if smoke else 2**27  # 1 GiB of float64 at full size
    big = np.ones(elements)
    seconds = timeit(lambda: convert(big, "big"), repeat)
    row(f"%%tensor ndarray -> tensor, {big.nbytes / 2**20:.0f} MiB (shares memory)", f"{seconds * 1e6:.1f} us",
        "target well under 1 ms")
    big = None  # free the GiB before the list benchmark
    values = [float(i) for i in range(10_000 if smoke else 1_000_000)]
    plain, ours = paired(lambda: torch.tensor(values), lambda: convert(values, "v"), max(3, repeat // 3))
    row(f"%%tensor list of {len(values)} floats / torch.tensor", f"{ours / plain:.2f}x", "target <= 1x (+ noise)")

    cell = "\n".join(f"v{i} = {i}" for i in range(1000))
    plain_code = compile(cell, "<cell>", "exec")
    instrumented = compile(instrument(ast.parse(cell)), "<cell>", "exec")
    dispatcher = BindDispatcher()
    dispatcher.binders["tensor"] = Converter(ConversionOptions())
    dispatcher.binders["trace"] = lambda name, value: value
    ns_plain, ns_inst = {}, {BIND_NAME: dispatcher}
    plain, ours = paired(lambda: exec(plain_code, ns_plain), lambda: exec(instrumented, ns_inst), repeat)
    row("per-assignment overhead of the instrumentation", f"{(ours - plain) / 1000 * 1e6:.2f} us", "a few us")

    # default device cost: every factory call goes through torch's DeviceContext mode
    calls = 200 if smoke else 5000

    def factories():
        for _ in range(calls):
            torch.empty(4)

    def factories_meta():
        with torch.device("meta"):
            factories()

    plain, ours = paired(factories, factories_meta, repeat)
    row("per torch call, a non-CPU default device (meta) vs none", f"{(ours - plain) / calls * 1e6:+.2f} us",
        "reported in %device?")


if __name__ == "__main__":
    main()
