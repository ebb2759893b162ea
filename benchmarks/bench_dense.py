"""Benchmark: manualbp against eager PyTorch and torch.compile, dense layers, MLPs and gated (Llama) MLPs.

    python benchmarks/bench_dense.py                     # everything, on the GPU if there is one
    python benchmarks/bench_dense.py --dtypes bf16 --modes fwd+bwd --impls eager,compile,manualbp

On a GPU: the Triton backend; medians (and p20/p80) from triton.testing.do_bench,
warm-up excluded, fresh random inputs per problem; peak memory from
torch.cuda.max_memory_allocated. On the CPU: the reference backend against eager
at smaller sizes, medians of perf_counter timings, and the bytes saved for backward.

    python benchmarks/bench_dense.py --timing host,graph --layers hidden,first --impls eager,manualbp

--timing host (the default) times each call with the host's work in it (Python, dispatch, launches); --timing graph
times the kernels alone: each implementation's call (forward+backward for fwd+bwd), after its warm-up and
autotuning, captured in a CUDA graph, eager's the same way, and replayed (graph_times; GPU only: skipped on the CPU,
saying so). Each row says its timing; speedups compare rows of one timing. --layers first: the input needs no
gradient, as a network's first layer (no ∂C/∂X of the products that read it; the TFLOP/s count it out).

Every row: median time, TFLOP/s (forward 2MNK, backward 4MNK, both 6MNK per layer),
speedup vs eager and vs torch.compile, memory, and the bytes the forward keeps for the backward
(manualbp.saved_bytes, beyond the input: the "saved MiB" column, on every device). Gated MLP
problems (gatedMxDxH: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases, as Llama's) count
three products, 6MDH forward and 12MDH backward. cuBLAS (torch.mm) rows give the
matmul ceiling for the same shapes. Prints a header and a fixed-width table, appends
CSV rows tagged with the device, versions and date, and draws a PNG of speedups.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

import manualbp

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-tf32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
# compile-ro: torch.compile(mode="reduce-overhead") (CUDA graphs); manualbp-compile(-ro): the manualbp model compiled,
# its operators opaque to Inductor, by default and with reduce-overhead (issue 24: the compiled rows beside eager's)
IMPLS = ("cublas", "eager", "compile", "compile-max", "compile-ro", "manualbp", "manualbp-recompute",
         "manualbp-compile", "manualbp-compile-ro")
REDUCE_OVERHEAD = ("compile-ro", "manualbp-compile-ro")
ACT_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
               "identity": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
# host: do_bench of each call, the host's work included (Python, launches); graph: the call captured in a CUDA graph
# and replayed, the GPU's time alone (kernels only, as bench_backward.py times the backward's ways)
TIMINGS = ("host", "graph")
LAYERS = ("hidden", "first")  # first: the input needs no gradient (no ∂C/∂X of the products that read it)


@dataclass(frozen=True)
class Problem:
    kind: str  # "linear": one layer (in, out); "mlp": Linear(d, h) + act + Linear(h, d); "gated": a Llama MLP (d, h)
    m: int
    dims: tuple  # (in, out) or (d, h)
    activation: str

    @property
    def sizes(self):
        return list(self.dims) if self.kind == "linear" else [self.dims[0], self.dims[1], self.dims[0]]

    def flops(self, mode: str, layer: str = "hidden") -> float:
        per_layer = [2 * self.m * k * n for k, n in zip(self.sizes[:-1], self.sizes[1:])]
        reading_x = 2 if self.kind == "gated" else 1  # gate_proj and up_proj: two products of the first shape
        per_layer += [per_layer[0]] * (reading_x - 1)
        factor = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
        skipped = reading_x * per_layer[0] if layer == "first" and mode != "fwd" else 0  # no ∂C/∂X there
        return factor * sum(per_layer) - skipped

    @property
    def name(self) -> str:
        return f"{self.kind}{self.m}x{'x'.join(map(str, self.dims))}"

    @classmethod
    def from_name(cls, name: str, activation: str) -> "Problem":
        """The problem a name reads (linearMxINxOUT, mlpMxDxH, gatedMxDxH: any sizes; the MLP's activation is
        gelu, the gated MLP's silu), or a ValueError saying what a name must read."""
        match = re.fullmatch(r"(linear|mlp|gated)(\d+)x(\d+)x(\d+)", name)
        if not match:
            raise ValueError(f"a problem name must read linearMxINxOUT, mlpMxDxH or gatedMxDxH, got {name!r}")
        kind, m, d1, d2 = match.group(1), *map(int, match.groups()[1:])
        return cls(kind, m, (d1, d2), {"linear": activation, "mlp": "gelu", "gated": "silu"}[kind])


def gpu_problems(activations):
    m = 8192
    # in_features 2048: between 1024, where δ formed in the backward's loads won, and 4096, where a δ pass did
    # (triton_kernels/dense.py's PROLOGUE_MAX_K)
    linear = [(1024, 4096), (4096, 1024), (4096, 16384), (16384, 4096), (2048, 4096), (2048, 1024)]
    mlp = [(1024, 4096), (4096, 16384)]
    gated = [(4096, 11008), (4096, 14336)]  # Llama-2 7B's MLP, Llama-3 8B's and Mistral 7B's
    return ([Problem("linear", m, d, a) for d in linear for a in activations]
            + [Problem("mlp", m, d, "gelu") for d in mlp] + [Problem("gated", m, d, "silu") for d in gated])


def cpu_problems(activations):
    m = 1024
    linear = [(256, 1024), (1024, 256)]
    mlp = [(256, 1024)]
    return ([Problem("linear", m, d, a) for d in linear for a in activations]
            + [Problem("mlp", m, d, "gelu") for d in mlp] + [Problem("gated", m, (256, 688), "silu")])


class GatedEager(nn.Module):
    """transformers' LlamaMLP: down_proj(act(gate_proj(x)) * up_proj(x)), no biases."""

    def __init__(self, d: int, h: int, activation: str, device, dtype):
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(d, h, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(h, d, bias=False, device=device, dtype=dtype)
        self.act_fn = ACT_MODULES[activation]()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def build(impl: str, problem: Problem, device, dtype):
    """The model under test, or None when impl does not apply to the problem."""
    sizes, act = problem.sizes, problem.activation
    if impl in ("manualbp-compile", "manualbp-compile-ro"):
        model = build("manualbp", problem, device, dtype)
        return torch.compile(model, mode="reduce-overhead" if impl in REDUCE_OVERHEAD else None)
    if problem.kind == "gated":
        return _build_gated(impl, problem, device, dtype)
    if impl in ("eager", "compile", "compile-max", "compile-ro"):
        layers = []
        for i, (k, n) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(k, n, device=device, dtype=dtype))
            if problem.kind == "linear" or i < len(sizes) - 2:
                layers.append(ACT_MODULES[act]())
        model = nn.Sequential(*layers)
        if impl == "compile":
            model = torch.compile(model)
        elif impl == "compile-max":
            model = torch.compile(model, mode="max-autotune")
        elif impl == "compile-ro":
            model = torch.compile(model, mode="reduce-overhead")
        return model
    if impl == "manualbp":
        if problem.kind == "linear":
            return manualbp.Linear(sizes[0], sizes[1], activation=act, device=device, dtype=dtype)
        return manualbp.MLP(sizes, activation=act, device=device, dtype=dtype)
    if impl == "manualbp-recompute":
        if problem.kind == "linear":
            return None
        return manualbp.MLP(sizes, activation=act, recompute=True, device=device, dtype=dtype)
    raise ValueError(impl)


def _build_gated(impl: str, problem: Problem, device, dtype):
    d, h = problem.dims
    if impl in ("eager", "compile", "compile-max", "compile-ro"):
        model = GatedEager(d, h, problem.activation, device, dtype)
        modes = {"compile": "default", "compile-max": "max-autotune", "compile-ro": "reduce-overhead"}
        return model if impl == "eager" else torch.compile(model, mode=modes[impl])
    if impl in ("manualbp", "manualbp-recompute"):
        return manualbp.GatedMLP(d, h, problem.activation, recompute=impl == "manualbp-recompute", device=device,
                                 dtype=dtype)
    raise ValueError(impl)


@dataclass
class Case:
    """One implementation on one problem and mode, ready to time."""

    fn: Callable[[], object]
    reset: list  # tensors whose .grad is cleared before every call (fresh accumulation each time)
    flops: float
    memory_mib: Callable[[], float]
    saved_mib: Callable[[], float] = lambda: float("nan")  # bytes kept for the backward, beyond the input
    error: Optional[Callable[[], float]] = None  # max relative error against float64 (see prepare); None: unchecked


def prepare(impl, problem, mode, device, dtype, layer: str = "hidden") -> Optional[Case]:
    """The Case for impl, or None where impl does not apply to the problem; a first layer's input needs no
    gradient."""
    m, k_in, k_out = problem.m, problem.sizes[0], problem.sizes[-1]
    if impl == "cublas":
        if problem.kind != "linear" or mode != "fwd":
            return None
        a = torch.randn(m, k_in, device=device, dtype=dtype)
        b = torch.randn(k_in, k_out, device=device, dtype=dtype)
        return Case(lambda: torch.mm(a, b), [], 2 * m * k_in * k_out, lambda: float("nan"))
    model = build(impl, problem, device, dtype)
    if model is None:
        return None
    x = torch.randn(m, k_in, device=device, dtype=dtype, requires_grad=layer == "hidden")
    params = list(model.parameters())
    grad_out = torch.randn(m, k_out, device=device, dtype=dtype)
    if mode == "fwd":
        fn = lambda: model(x)  # noqa: E731 -- a training forward: grad enabled, saves for backward
    elif mode == "bwd":
        out = model(x)
        fn = lambda: out.backward(grad_out, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: model(x).backward(grad_out)  # noqa: E731
    if impl in REDUCE_OVERHEAD:  # each call a new step of the CUDA-graph trees (its outputs may be overwritten)
        step = fn
        fn = lambda: (torch.compiler.cudagraph_mark_step_begin(), step())  # noqa: E731
    reset = [x, *params]

    def saved_mib() -> float:
        return manualbp.saved_bytes(model, x, count_inputs=False) / 2**20

    def memory_mib() -> float:
        if device.type != "cuda":
            return saved_mib()  # activation memory
        _clear(reset)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def error() -> float:
        """The largest of max|ours - exact| / max|exact| over the output and every gradient the mode computes,
        exact being the same model (its own parameters, as state_dict) in float64 on the same inputs: the timed
        implementation computes the right thing, to its dtype's accuracy (eager's own error is the yardstick)."""
        reference = build("eager", problem, device, torch.float64)
        own = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        # nn.Sequential(Linear, act) for a layer; a manualbp.Linear's parameters are its first module's
        target = reference if isinstance(own, nn.Sequential) or problem.kind != "linear" else reference[0]
        target.load_state_dict({name: value.double() for name, value in own.state_dict().items()})
        worst = 0.0
        for ours, exact in zip(_results(model, x, grad_out, mode, reset),
                               _results(reference, x.detach().double().requires_grad_(x.requires_grad),
                                        grad_out.double(), mode, list(reference.parameters()))):
            if exact is None:  # a first layer's input: no gradient on either side
                continue
            scale = exact.abs().max().item() or 1.0
            worst = max(worst, (ours.double() - exact).abs().max().item() / scale)
        return worst

    return Case(fn, reset, problem.flops(mode, layer), memory_mib, saved_mib, error)


def _results(model, x, grad_out, mode, reset) -> list:
    """One call's output and (unless mode is fwd) the gradients of x and of every parameter, fresh."""
    _clear(reset)
    x.grad = None
    out = model(x)
    if mode == "fwd":
        return [out.detach()]
    out.backward(grad_out)
    return [out.detach(), x.grad, *[p.grad for p in model.parameters()]]


def _clear(tensors) -> None:
    for t in tensors:
        t.grad = None


def time_cases(cases: dict, device, rep_ms: float) -> dict:
    """{impl: (median, p20, p80)} in milliseconds.

    GPU: triton.testing.do_bench per case (warm-up excluded, L2 flushed between calls).
    CPU: the cases take turns, one call each per round, so that a slow spell of a
    busy machine hits every implementation alike instead of whichever ran then;
    rounds go on for rep_ms per case (at least 5, at most 200).
    """
    if device.type == "cuda":
        import triton.testing

        return {impl: tuple(triton.testing.do_bench(case.fn, warmup=max(25, rep_ms // 4), rep=rep_ms,
                                                    grad_to_none=case.reset, quantiles=[0.5, 0.2, 0.8]))
                for impl, case in cases.items()}
    for case in cases.values():  # warm-up
        _clear(case.reset)
        case.fn()
    times = {impl: [] for impl in cases}
    deadline = time.perf_counter() + rep_ms * len(cases) / 1000
    rounds = 0
    while rounds < 5 or (time.perf_counter() < deadline and rounds < 200):
        order = list(cases.items())
        order = order[rounds % len(order):] + order[:rounds % len(order)]  # rotate who goes first
        for impl, case in order:
            _clear(case.reset)
            start = time.perf_counter()
            case.fn()
            times[impl].append((time.perf_counter() - start) * 1000)
        rounds += 1
    result = {}
    for impl, samples in times.items():
        q = statistics.quantiles(samples, n=10)
        result[impl] = (statistics.median(samples), q[1], q[7])
    return result


def graph_times(case: Case, rep_ms: float) -> tuple:
    """(median, p20, p80) ms of case.fn's kernels alone: the call captured in a CUDA graph and replayed (no host
    time, no L2 flush between replays).

    Run three times first on a side stream (any autotuning and compiling done, the caching allocator warm), as
    torch.cuda.graph's capture needs. The gradients are cleared before the capture, so the captured step assigns
    fresh gradients, as the host-timed calls do, and each replay recomputes them into the same buffers instead of
    accumulating. Twenty samples, each the replays that fill a twentieth of rep_ms back to back between two events.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            _clear(case.reset)
            case.fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        _clear(case.reset)
        with torch.cuda.graph(graph):
            case.fn()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        end.synchronize()
        replays = max(1, int(rep_ms / 20 / max(start.elapsed_time(end) / 5, 1e-3)))
        samples = []
        for _ in range(20):
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / replays)
    finally:
        _clear(case.reset)  # the gradients live in the graph's memory: dropped with it
        del graph
        torch.cuda.synchronize()
    q = statistics.quantiles(samples, n=10)
    return statistics.median(samples), q[1], q[7]


class CsvRows:
    """Appends rows to a CSV file, writing the header when the file is new; flushed per row."""

    def __init__(self, path: str):
        self.path = path
        self.fields = None

    def add(self, row: dict) -> None:
        if self.fields is None and os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as handle:
                self.fields = next(csv.reader(handle))
        if self.fields is not None and set(row) - set(self.fields):  # new columns: the file is rewritten with all
            with open(self.path, newline="") as handle:
                old_rows = list(csv.DictReader(handle))
            self.fields = self.fields + [name for name in row if name not in self.fields]
            with open(self.path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(old_rows)
        new_file = self.fields is None
        self.fields = self.fields or list(row)
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, restval="")
            if new_file:
                writer.writeheader()
            writer.writerow(row)


def run_info(device) -> dict:
    """What every benchmark's CSV rows carry: the device, the versions, the backend timed and the date."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "manualbp": manualbp.__version__,
        "backend": "triton" if device.type == "cuda" else "reference",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def device_stem(device_name: str) -> str:
    """The benchmarks' file names end with the device's: benchmarks/results/bench_dense_NVIDIA_H200.csv."""
    return "".join(c if c.isalnum() else "_" for c in device_name).strip("_")[:40]


def header(device, args) -> dict:
    info = run_info(device)
    print("# manualbp dense benchmark")
    for key, value in info.items():
        print(f"#   {key:9s} {value}")
    print(f"#   dtypes    {args.dtypes}   modes {args.modes}   impls {args.impls}")
    if device.type == "cuda":  # δ in the loads is not launched there: its rows time the δ-pass plan (docs/kernels.md)
        from manualbp.triton_kernels import toolchain

        hazard = toolchain.rs_operand_hazard(device, torch.bfloat16)
        if hazard:
            print(f"#   NOTE      no δ in the matmuls' loads on this toolchain ({hazard}): rows that ask for it "
                  f"time the δ-pass plan")
    print("#   MiB       GPU: peak memory allocated during one call; CPU: bytes saved for backward")
    print("#   saved MiB bytes the forward keeps for the backward beyond the input (manualbp.saved_bytes), any device")
    return info


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:
        return "not installed"


def pyplot(path):
    """matplotlib.pyplot on the Agg backend, or None (said so) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no plot; pip install matplotlib to get {path})")
        return None
    return plt


def plot(rows, path):
    plt = pyplot(path)
    if plt is None:
        return
    wanted = [r for r in rows if r["impl"].startswith("manualbp") and r["mode"] == "fwd+bwd"]
    if not wanted:
        return
    labels = [f"{r['problem']}\n{r['activation']} {r['dtype']}" + (" rc" if "recompute" in r["impl"] else "")
              + (" first" if r["layer"] == "first" else "") + (" graph" if r["timing"] == "graph" else "")
              for r in wanted]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(wanted)), 4))
    xs = range(len(wanted))
    ax.bar([i - 0.2 for i in xs], [r["speedup_vs_eager"] for r in wanted], width=0.4, label="vs eager")
    ax.bar([i + 0.2 for i in xs], [r["speedup_vs_compile"] for r in wanted], width=0.4, label="vs torch.compile")
    finish_bar_plot(fig, ax, xs, labels, "speedup (fwd+bwd, higher is better)", f"manualbp on {wanted[0]['device']}",
                    path, fontsize=6)


def finish_bar_plot(fig, ax, ticks, labels, ylabel: str, title: str, path, fontsize: int) -> None:
    """How the benchmarks' bar plots end: a line at 1.0, the bars' labels turned upright, a legend, saved."""
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks(list(ticks), labels, rotation=90, fontsize=fontsize)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    print(f"plot: {path}")


# An implementation whose error against float64 exceeds eager's by more than this is flagged in the table: the
# tests' own bound for a result "as accurate as PyTorch's" is 2x eager's error plus a few ulps (tests/checks.py).
ERROR_FLAG_RATIO = 4.0


def _flag(err: float, eager_err: float) -> str:
    """A mark for a row whose error is not a number (a NaN or inf in its results) or far above eager's."""
    bad = err != err or (eager_err > 0 and err > ERROR_FLAG_RATIO * eager_err)
    return "  CHECK" if bad else ""


def pick_device(parser, name: str) -> torch.device:
    """--device: 'auto' (cuda if available), 'cuda' or 'cpu'; a parser error for cuda without CUDA."""
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          ("cpu" if name == "auto" else name))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    return device


def check_choices(parser, what: str, text: str, allowed) -> list:
    """The comma list text, each entry one of allowed; else a parser error naming the bad entry."""
    names = text.split(",")
    for name in names:
        if name not in allowed:
            parser.error(f"unknown {what} {name!r}; expected {list(allowed)}")
    return names


def _report_failure(label: str, impl: str, error) -> None:
    print(f"{label} {impl:18s} FAILED: {type(error).__name__}: "
          f"{str(error).splitlines()[0][:120] if str(error) else ''}")


def measure(problem, mode: str, layer: str, dtype_name: str, impls, timings, device, rep_ms: float) -> list:
    """One CSV row (less the run's info) per implementation and timing that ran, each printed as a table row; an
    implementation that fails (to build, to run, to be captured) is reported and left out, the others go on."""
    label = f"{problem.name:24s} {problem.activation:6s} {dtype_name:9s} {mode:7s} {layer:6s}"
    cases = {}
    for impl in impls:
        torch.manual_seed(0)
        try:
            case = prepare(impl, problem, mode, device, DTYPES[dtype_name], layer)
            if case is not None and device.type == "cuda":
                case.fn()  # compile / autotune now, so that a failure is reported per impl
        except Exception as error:  # report and go on: one failing impl must not hide the rest
            _report_failure(f"{label} {'':6s}", impl, error)
            continue
        if case is not None:
            cases[impl] = case
    times = {timing: {} for timing in timings}
    if "host" in timings:
        times["host"] = time_cases(cases, device, rep_ms)
    if "graph" in timings:
        for impl, case in cases.items():
            try:
                times["graph"][impl] = graph_times(case, rep_ms)
            except Exception as error:  # said, not replaced by a host-inclusive time
                _report_failure(f"{label} {'graph':6s}", impl, error)
                torch.cuda.synchronize()
    results = {}
    for impl, case in cases.items():
        if not any(impl in by_impl for by_impl in times.values()):
            continue
        try:
            mem = case.memory_mib()
        except Exception as error:
            _report_failure(f"{label} {'':6s}", impl, error)
            continue
        try:
            saved = case.saved_mib()
        except Exception as error:  # torch.compile under saved-tensor hooks, on some versions
            _report_failure(f"{label} {'':6s}", impl, error)
            saved = float("nan")
        err = float("nan")
        if case.error is not None:
            try:
                err = case.error()
            except Exception as error:
                _report_failure(f"{label} {'':6s}", impl, error)
        results[impl] = dict(mem_mib=mem, saved_mib=saved, max_rel_err=err, flops=case.flops,
                             checked=case.error is not None)
    del cases
    eager_err = results.get("eager", {}).get("max_rel_err", float("nan"))
    rows = []
    for timing, by_impl in times.items():
        eager = by_impl.get("eager", (None,))[0] if "eager" in results else None
        compiled = by_impl.get("compile", (None,))[0] if "compile" in results else None
        for impl, (med, p20, p80) in by_impl.items():
            if impl not in results:
                continue
            r = results[impl]
            row = dict(problem=problem.name, kind=problem.kind, m=problem.m, dims="x".join(map(str, problem.dims)),
                       activation=problem.activation, dtype=dtype_name, mode=mode, impl=impl, median_ms=med,
                       p20_ms=p20, p80_ms=p80, tflops=r["flops"] / med / 1e9, mem_mib=r["mem_mib"],
                       saved_mib=r["saved_mib"], max_rel_err=r["max_rel_err"],
                       speedup_vs_eager=(eager / med) if eager else float("nan"),
                       speedup_vs_compile=(compiled / med) if compiled else float("nan"),
                       err_vs_eager=r["max_rel_err"] / eager_err if eager_err > 0 else float("nan"),
                       layer=layer, timing=timing)
            rows.append(row)
            print(f"{label} {timing:6s} {impl:18s} {med:10.4f} {p20:8.4f} {p80:8.4f} {row['tflops']:8.2f} "
                  f"{row['speedup_vs_eager']:8.3f} {row['speedup_vs_compile']:9.3f} {r['mem_mib']:8.1f} "
                  f"{r['saved_mib']:9.1f} {r['max_rel_err']:9.2e} {row['err_vs_eager']:6.2f}"
                  f"{_flag(r['max_rel_err'], eager_err) if r['checked'] else ''}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,fp32-tf32", help=f"comma list of {list(DTYPES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--impls", default=None, help=f"comma list of {list(IMPLS)} (default: all on GPU; "
                                                      "cublas,eager,manualbp,manualbp-recompute on CPU)")
    parser.add_argument("--activations", default="relu,gelu", help="activations of the single-layer problems")
    parser.add_argument("--problems", default=None, help="comma list of problem names to run, in this order (e.g. linear8192x1024x4096)")
    parser.add_argument("--rep-ms", type=float, default=None, help="time spent timing each measurement (ms)")
    parser.add_argument("--timing", default="host", help="comma list of host (do_bench: the host's work included) "
                                                         "and graph (kernels only: each call captured in a CUDA "
                                                         "graph and replayed; GPU only)")
    parser.add_argument("--layers", default="hidden", help=f"comma list of {list(LAYERS)} (first: the input "
                                                           "needs no gradient)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--tag", default=None, help="file name stem (default: from the device name)")
    args = parser.parse_args(argv)

    device = pick_device(parser, args.device)
    check_choices(parser, "dtype", args.dtypes, DTYPES)
    if args.impls is None:
        args.impls = ",".join(IMPLS) if device.type == "cuda" else "cublas,eager,manualbp,manualbp-recompute"
    check_choices(parser, "impl", args.impls, IMPLS)
    check_choices(parser, "mode", args.modes, MODES)
    timings = check_choices(parser, "timing", args.timing, TIMINGS)
    layers = check_choices(parser, "layer", args.layers, LAYERS)
    if "graph" in timings and device.type != "cuda":
        print("bench_dense: --timing graph (kernels only: each call captured in a CUDA graph and replayed) needs a "
              "CUDA GPU: skipped on the CPU")
        timings.remove("graph")
        if not timings:
            return 0
    rep_ms = args.rep_ms or (100 if device.type == "cuda" else 300)
    if device.type == "cuda":
        manualbp.set_backend("triton")
    else:
        manualbp.set_backend("reference")  # the CPU comparison is the reference backend against eager

    info = header(device, args)
    activations = args.activations.split(",")
    problems = gpu_problems(activations) if device.type == "cuda" else cpu_problems(activations)
    if args.problems:  # in the order given: a run cut short by a time limit has measured the first ones
        keep = args.problems.split(",")
        unknown = sorted(set(keep) - {p.name for p in problems})
        if unknown:
            parser.error(f"unknown problem(s) {unknown}; expected some of {sorted({p.name for p in problems})}")
        problems = [p for name in keep for p in problems if p.name == name]
    impls = args.impls.split(",")
    os.makedirs(args.out_dir, exist_ok=True)
    stem = args.tag or device_stem(info["device"])
    csv_path = os.path.join(args.out_dir, f"bench_dense_{stem}.csv")
    # Rows are appended as they are measured: a run cut short by a time limit keeps what it measured.
    writer = CsvRows(csv_path)
    rows = []
    cols = f"{'problem':24s} {'act':6s} {'dtype':9s} {'mode':7s} {'layer':6s} {'timing':6s} {'impl':18s} " \
           f"{'median ms':>10s} {'p20':>8s} {'p80':>8s} {'TFLOP/s':>8s} {'x eager':>8s} {'x compile':>9s} " \
           f"{'MiB':>8s} {'saved MiB':>9s} {'rel err':>9s} {'/eager':>6s}"
    print(cols)
    print("-" * len(cols))
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high" if dtype_name == "fp32-tf32" else "highest")
        elif dtype_name == "fp32-tf32":
            continue  # no TF32 on the CPU
        for problem in problems:
            for mode in args.modes.split(","):
                for layer in layers:
                    for row in measure(problem, mode, layer, dtype_name, impls, timings, device, rep_ms):
                        row = dict(info, **row)
                        rows.append(row)
                        writer.add(row)
                    sys.stdout.flush()
    print(f"csv: {csv_path} (+{len(rows)} rows)")
    if rows:
        plot(rows, os.path.join(args.out_dir, f"bench_dense_{stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
