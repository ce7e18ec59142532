"""Speed and memory figures as ratios measured side by side in one run (never asserted in tests).

    python benchmarks/run.py            # full sizes (a few minutes)
    python benchmarks/run.py --smoke    # tiny sizes, for CI: proves every row still runs

Rows that need an optional package (torchviz, torchlens, psutil: `pip install -e .[bench]`) say
so and are skipped when it is missing. torchlens wraps torch functions globally once used, so its
row runs in a child process, apart from the other rows.
"""

from __future__ import annotations

import argparse
import ast
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

import torchmagic
from torchmagic.assignments import dispatch, instrument
from torchmagic.convert import ConversionOptions, Converter, convert
from torchmagic.render.svg import render_svg


def timeit(fn, repeat: int) -> float:
    """Median wall time of ``fn`` in seconds."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def paired(plain, other, repeat: int, warmup: int = 2) -> tuple[float, float]:
    """Medians of the two, interleaved so machine noise hits both alike."""
    for _ in range(warmup):
        plain()
        other()
    a, b = [], []
    for _ in range(repeat):
        a.append(timeit(plain, 1))
        b.append(timeit(other, 1))
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
    print(f"{label:<66} {value:>14}   {target}", flush=True)


def ratio_rows(label: str, step, repeat: int, target: str, threads: int | None = None) -> None:
    """Recording alone, then recording plus the first read of the trace (the lazy build and the
    gradient statistics a display computes), so no cost hides in the build."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        # warm-up: the first traces import and cache what later ones reuse
        plain, tr = paired(step, traced(step), repeat, warmup=5)
        suffix = f", {threads} thread{'s' if threads != 1 else ''}" if threads is not None else ""
        row(f"traced / plain, {label}{suffix}", f"{tr / plain:.2f}x", f"target {target}")
        plain, tr = paired(step, traced(step, summarise=True), repeat, warmup=5)
        row("  the same, plus the first read (build + gradient statistics)", f"{tr / plain:.2f}x", "")
    finally:
        torch.set_num_threads(previous)


def mlp_model(width: int):
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 10))


def transformer_model(layers: int, d_model: int):
    layer = torch.nn.TransformerEncoderLayer(d_model=d_model, nhead=8, dim_feedforward=4 * d_model,
                                             batch_first=True, dropout=0.0)
    return torch.nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def diagram_seconds(trace) -> float:
    """Statistics, view, DOT, layout and SVG of a fresh trace: what showing it costs."""
    start = time.perf_counter()
    trace.svg()
    return time.perf_counter() - start


def torchviz_seconds(output, params: dict) -> float | None:
    try:
        from torchviz import make_dot
    except ImportError:
        return None
    start = time.perf_counter()
    dot = make_dot(output, params=params)
    render_svg(dot.source)  # the same in-process renderer (torchviz itself needs a system `dot`)
    return time.perf_counter() - start


def speed(smoke: bool, repeat: int) -> None:
    width, batch = (64, 8) if smoke else (512, 64)
    mlp = mlp_model(width)
    x = torch.randn(batch, width)

    def mlp_step():
        mlp.zero_grad()
        mlp(x).pow(2).mean().backward()

    ratio_rows(f"3-layer MLP (width {width}, batch {batch}) fwd+bwd", mlp_step, repeat * 4, "<= 1.15x")
    ratio_rows(f"3-layer MLP (width {width}, batch {batch}) fwd+bwd", mlp_step, repeat * 4, "<= 1.15x", threads=1)

    n_ops, size = (50, 10) if smoke else (1000, 100)
    leaf = torch.randn(size, size, requires_grad=True)

    def elementwise():
        h = leaf
        for i in range(n_ops):
            h = h * 1.0001 if i % 2 else h + 0.001
        h.sum().backward()

    ratio_rows(f"{n_ops} elementwise ops on {size}x{size} + backward", elementwise, repeat * 2, "<= 2x")
    ratio_rows(f"{n_ops} elementwise ops on {size}x{size} + backward", elementwise, repeat * 2, "<= 2x", threads=1)

    layers, d_model, seq, tbatch = (2, 32, 8, 2) if smoke else (12, 256, 64, 8)
    model = transformer_model(layers, d_model)
    src = torch.randn(tbatch, seq, d_model)

    def transformer_step():
        model.zero_grad()
        model(src).pow(2).mean().backward()

    ratio_rows(f"{layers}-layer TransformerEncoder (d_model {d_model}, seq {seq}, batch {tbatch})",
               transformer_step, max(3, repeat // 2), "<= 1.2x")

    steps = 10 if smoke else 100
    optimizer = torch.optim.SGD(mlp.parameters(), lr=1e-3)

    def training_loop():
        for _ in range(steps):
            optimizer.zero_grad()
            mlp(x).pow(2).mean().backward()
            optimizer.step()

    plain, tr = paired(training_loop, traced(training_loop), max(3, repeat // 3), warmup=1)
    row(f"traced / plain, MLP training loop of {steps} steps in one cell", f"{tr / plain:.2f}x", "per pass as MLP")
    live_rows(training_loop, steps, max(3, repeat // 3))

    # diagrams: ours (statistics + view + layout + SVG) next to torchviz make_dot + the same renderer
    chain = 50 if smoke else 500
    with torchmagic.trace(max_nodes=chain + 10, fold=False) as t:  # every node drawn, as torchviz does
        h = leaf
        for _ in range(chain):
            h = torch.tanh(h)
        out = h.sum()
        out.backward(retain_graph=True)
    row(f"diagram time (stats + DOT + layout + SVG), {len(t.nodes)}-node chain", f"{diagram_seconds(t):.3f} s",
        "target < 0.3 s")
    viz = torchviz_seconds(out, {"leaf": leaf})
    row("  torchviz make_dot + the same in-process renderer, same graph",
        "not installed" if viz is None else f"{viz:.3f} s", "reported")

    with torchmagic.trace() as t:
        loss = model(src).pow(2).mean()
        loss.backward(retain_graph=True)
    seconds = diagram_seconds(t)
    view = t.view()
    row(f"diagram time, {layers}-layer transformer ({len(t.nodes)} tensors), collapsed by default",
        f"{seconds:.3f} s", "target < 2 s")
    print(f"    drawn: {view.box_count} boxes at depth {view.depth}; " + " / ".join(view.notes()))
    viz = torchviz_seconds(loss, dict(model.named_parameters()))
    row("  torchviz make_dot + the same in-process renderer, same graph (every node)",
        "not installed" if viz is None else f"{viz:.3f} s", "reported")


def live_rows(training_loop, steps: int, repeat: int) -> None:
    """What --live and --stop-on-nan add to a traced training loop, and detect_anomaly next to them."""
    from torchmagic.trace.live import LiveView

    def with_live():
        with torchmagic.trace() as t:
            view = LiveView(t._recorder, lambda v: (v.text(), v.html()), interval=0.25)
            training_loop()
            view.refresh()
        return view

    traced_loop = traced(training_loop)
    base, live = paired(traced_loop, with_live, repeat, warmup=1)
    row(f"--live (refresh every 0.25 s) / traced, the {steps}-step loop", f"{live / base:.3f}x", "target <= 1.02x")

    def stop_on_nan():
        with torchmagic.trace(stop_on_nan=True):
            training_loop()

    def anomaly():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Anomaly Detection has been enabled", every time
            with torch.autograd.detect_anomaly(check_nan=True):
                training_loop()

    plain, ours = paired(training_loop, stop_on_nan, repeat, warmup=1)
    row(f"--stop-on-nan (traced) / plain, the {steps}-step loop", f"{ours / plain:.2f}x", "cheaper than anomaly")
    plain, theirs = paired(training_loop, anomaly, repeat, warmup=1)
    row("  torch.autograd.detect_anomaly / plain, the same loop", f"{theirs / plain:.2f}x", "reported")


def rnn_trace(steps: int, **view):
    """The hand-written RNN loop of issue 11: ``h = tanh(xs[t] @ Wx + h @ Wh + b)``, ``steps`` times."""
    torch.manual_seed(0)
    xs = torch.randn(steps, 1, 8)
    Wx = torch.randn(8, 16, requires_grad=True)
    Wh = (torch.randn(16, 16) * 0.3).requires_grad_()
    b = torch.zeros(16, requires_grad=True)
    with torchmagic.trace(**view) as t:
        h = torch.zeros(1, 16)
        for step in range(steps):
            h = torch.tanh(xs[step] @ Wx + h @ Wh + b)
        h.pow(2).sum().backward()
    return t


def display_seconds(trace) -> tuple[float, dict[str, str]]:
    """What a notebook cell pays to show a fresh trace: text, SVG and HTML (statistics, loops, view, layout)."""
    start = time.perf_counter()
    bundle = trace._repr_mimebundle_()
    return time.perf_counter() - start, bundle


def diagrams(smoke: bool) -> None:
    """Issue 11: loops folded by iteration, a 500-box layout, a 20,000-op display, the layout worker."""
    from torchmagic.errors import LayoutTimeout
    from torchmagic.render import drawing
    from torchmagic.render.drawing import draw

    steps = 40 if smoke else 200
    seconds, bundle = display_seconds(rnn_trace(steps))
    row(f"display time, {steps}-step RNN loop ({steps * 5 + 5} tensors), folded by iteration", f"{seconds:.3f} s",
        "target < 1 s")
    seconds, bundle = display_seconds(rnn_trace(steps, fold=False))
    row("  the same unrolled (--no-fold, max_nodes 500)", f"{seconds:.3f} s",
        f"{len(bundle.get('text/html', '')) / 1e3:.0f} KB HTML")

    steps = 20 if smoke else 100
    t = rnn_trace(steps, fold=False, max_nodes=600)
    boxes = draw(t.nodes, t.view(), 600).boxes.values()
    tensors = sum(box.kind in ("op", "tensor", "module") for box in boxes)
    repeats = sum(box.kind == "ref" for box in boxes)
    source = t.to_dot()
    render_svg(source)  # the worker is warm, as after a notebook's first diagram
    seconds = timeit(lambda: render_svg(source), 3)
    row(f"layout + SVG, {tensors}-box diagram ({steps}-step loop unrolled; +{repeats} small weight repeats)",
        f"{seconds:.3f} s", "target < 1 s")
    limit = 2.0 if smoke else 10.0
    saved = drawing.REFERENCE_FANOUT
    drawing.REFERENCE_FANOUT = 10**9
    try:
        slow = rnn_trace(steps, fold=False, max_nodes=600).to_dot()
        start = time.perf_counter()
        render_svg(slow, timeout=limit)
        value = f"{time.perf_counter() - start:.3f} s"
    except LayoutTimeout:
        value = f"> {limit:g} s (stopped)"
    finally:
        drawing.REFERENCE_FANOUT = saved
    row("  the same with each weight drawn once (edges across every step)", value, "why weights repeat")

    ops = 2000 if smoke else 20000
    leaf = torch.randn(100, 100, requires_grad=True)
    for fold in (True, False):
        with torchmagic.trace(fold=fold) as t:
            h = leaf
            for i in range(ops):
                h = h * 1.0001 if i % 2 else h + 0.001
            h.sum().backward()
        seconds, bundle = display_seconds(t)
        sizes = " / ".join(f"{len(bundle[k].encode()) / 1e3:.0f}" for k in ("text/plain", "image/svg+xml", "text/html"))
        how = "folded" if fold else "unrolled, max_nodes 500"
        row(f"display, {ops}-op trace ({how}): time; text / SVG / HTML KB", f"{seconds:.2f} s  {sizes}",
            "HTML < 1,000 KB")

    import pygraphviz

    small = rnn_trace(3).to_dot()

    def in_process():  # fd 2 silenced around it: the bundled fontconfig warns once per process
        saved = os.dup(2)
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                pygraphviz.AGraph(string=small).draw(format="svg", prog="dot")
            finally:
                os.dup2(saved, 2)
                os.close(saved)

    in_process()
    plain, ours = paired(in_process, lambda: render_svg(small), max(5, 20 if not smoke else 5))
    row("small diagram: worker process / in-process layout (bounded vs not)", f"{ours / plain:.2f}x",
        f"{(ours - plain) * 1e3:+.1f} ms each")
    code = ("import time; from torchmagic.render.svg import render_svg\n"
            "s = time.perf_counter(); render_svg('digraph { a -> b }'); print(time.perf_counter() - s)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    row("first diagram of a session: starting the layout worker", f"{float(done.stdout) * 1e3:.0f} ms", "once")


def conversion(smoke: bool, repeat: int) -> None:
    elements = 2**20 if smoke else 2**27  # 1 GiB of float64 at full size
    big = np.ones(elements)
    seconds = timeit(lambda: convert(big, "big"), repeat)
    row(f"%%tensor ndarray -> tensor, {big.nbytes / 2**20:.0f} MiB (shares memory)", f"{seconds * 1e6:.1f} us",
        "well under 1 ms")
    big = None  # free the GiB before the list benchmark
    values = [float(i) for i in range(10_000 if smoke else 1_000_000)]
    plain, ours = paired(lambda: torch.tensor(values), lambda: convert(values, "v"), max(3, repeat // 3))
    row(f"%%tensor list of {len(values)} floats / torch.tensor", f"{ours / plain:.2f}x", "<= 1x (+ noise)")

    cell = "\n".join(f"v{i} = {i}" for i in range(1000))
    plain_code = compile(cell, "<cell>", "exec")
    instrumented = compile(instrument(ast.parse(cell)), "<cell>", "exec")
    dispatch.binders["tensor"] = Converter(ConversionOptions())
    dispatch.binders["trace"] = lambda name, value: value
    ns_plain, ns_inst = {}, {}
    try:
        plain, ours = paired(lambda: exec(plain_code, ns_plain), lambda: exec(instrumented, ns_inst), repeat)
    finally:
        dispatch.binders.clear()
    row("per-assignment overhead of the instrumentation", f"{(ours - plain) / 1000 * 1e6:.2f} us", "a few us")

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


def _quiet_shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=config)
    shell.display_pub.publish = lambda *args, **kwargs: None  # a front end that shows and forgets
    return shell


def ipython_costs(smoke: bool, repeat: int) -> None:
    shell = _quiet_shell()
    cell = "a = 1\nb = a + 1"
    cells = 50 if smoke else 300

    def run_cells():
        for _ in range(cells):
            shell.run_cell(cell, store_history=False)

    before = timeit(run_cells, max(3, repeat // 3))
    shell.run_line_magic("load_ext", "torchmagic")
    after = timeit(run_cells, max(3, repeat // 3))
    row("per-cell cost, extension loaded and tracing off", f"{(after - before) / cells * 1e3:+.3f} ms",
        "target < 1 ms")

    code = (
        "import time, torch, IPython\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        "start = time.perf_counter()\n"
        "shell.run_line_magic('load_ext', 'torchmagic')\n"
        "print(time.perf_counter() - start)\n"
    )
    samples = []
    for _ in range(1 if smoke else 3):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        samples.append(float(done.stdout.strip().splitlines()[-1]))
    row("%load_ext torchmagic, beyond import torch (fresh process)", f"{statistics.median(samples) * 1e3:.0f} ms",
        "target < 150 ms")

    try:
        import psutil
    except ImportError:
        row("memory growth over traced cells", "psutil missing", "pip install -e .[bench]")
        return
    process = psutil.Process()
    traced_cell = ("%%autograd_trace\nx = torch.ones(2, 2, requires_grad=True)\ny = x + 2\n"
                   "z = y * y * 3\nout = z.mean()\nout.backward()")
    shell.run_cell("import torch", store_history=False)
    count = 100 if smoke else 1000
    for _ in range(20):  # warm caches (linecache, fonts, layout) before measuring
        shell.run_cell(traced_cell, store_history=False)
    gc.collect()
    start = process.memory_info().rss
    for _ in range(count):
        shell.run_cell(traced_cell, store_history=False)
    gc.collect()
    growth = (process.memory_info().rss - start) / 2**20
    last = torchmagic.last_trace()
    if last is None or len(last.nodes) != 5:
        raise RuntimeError("the traced cells did not trace: the memory figure would mean nothing")
    row(f"memory growth over {count} traced cells in one shell (each shown)", f"{growth:.1f} MB", "target < 50 MB")
    print(f"    {len(torchmagic._history)} past traces kept (TorchMagic.history_size); RSS {start / 2**20:.0f} MB before")
    shell.run_line_magic("unload_ext", "torchmagic")


_TORCHLENS = """
import json, statistics, sys, time, torch
import torchlens as tl
width, batch, repeat = {width}, {batch}, {repeat}
mlp = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                          torch.nn.ReLU(), torch.nn.Linear(width, 10))
x = torch.randn(batch, width)
plain = lambda: mlp(x)
lens = lambda: tl.trace(mlp, x)
for _ in range(2):
    plain(); lens()
a, b = [], []
for _ in range(repeat):
    s = time.perf_counter(); plain(); a.append(time.perf_counter() - s)
    s = time.perf_counter(); lens(); b.append(time.perf_counter() - s)
print(json.dumps(statistics.median(b) / statistics.median(a)))
"""


def torchlens_row(smoke: bool, repeat: int) -> None:
    width, batch = (64, 8) if smoke else (512, 64)
    if importlib.util.find_spec("torchlens") is None:
        row("torchlens trace / plain, same MLP, forward", "not installed", "pip install -e .[bench]")
        return
    code = _TORCHLENS.format(width=width, batch=batch, repeat=max(3, repeat // 2))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        row("torchlens trace / plain, same MLP, forward", "failed", done.stderr.strip().splitlines()[-1][:60])
        return
    ratio = json.loads(done.stdout.strip().splitlines()[-1])
    row(f"torchlens.trace / plain, same MLP (width {width}), forward only", f"{ratio:.1f}x",
        "reported next to ours")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke
    repeat = 3 if smoke else 15
    torch.manual_seed(0)
    print(f"torchmagic benchmark · torch {torch.__version__} · {platform.machine()} · {os.cpu_count()} CPUs · "
          f"{torch.get_num_threads()} threads{' · smoke sizes' if smoke else ''}")
    speed(smoke, repeat)
    diagrams(smoke)
    torchlens_row(smoke, repeat)
    conversion(smoke, repeat)
    ipython_costs(smoke, repeat)


if __name__ == "__main__":
    main()
