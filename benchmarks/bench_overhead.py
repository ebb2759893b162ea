"""Benchmark: manualbp's call overhead, on layers too small for the math to matter.

    python benchmarks/bench_overhead.py                  # CPU: reference backend; GPU: triton
    python benchmarks/bench_overhead.py --rounds 4000 --tag cpu_2core
    python benchmarks/bench_overhead.py --depth          # the call chain from Linear.forward to the first kernel

Problems: one layer, x [4, 16] -> 16 with gelu, a 3-layer MLP 16 -> 16 -> 16 -> 16
(gelu, gelu, identity), and a gated MLP (``manualbp.GatedMLP(16, 16, "silu")``, SwiGLU, no biases), each beside
the same model of ``nn.Linear`` + ``nn.GELU`` (``nn.Sequential`` for the MLP; for the gated MLP
bench_dense's ``GatedEager``, transformers' LlamaMLP written out, holding the same parameters: manualbp.revert
leaves a GatedMLP's gating manualbp's); and one matrix product [4, 16] [16, 16]: ``torch.mm``, the
same inside a ``torch.library.custom_op`` defined here (the price of a bare custom_op call)
and ``torch.ops.manualbp.matmul`` (where the installed manualbp has it).
At this size a call is all Python and dispatch: the time is the overhead.

Timing: the implementations take turns, ``--calls`` calls each per turn, for
``--rounds`` rounds (the first to go rotates), so that a slow spell of a busy
machine hits every implementation alike; the table gives the median over rounds of
the time per call, in µs, p20/p80, and the ratio to nn's median. On the CPU the
clock is the thread's CPU time (``time.thread_time``) and PyTorch runs on one
thread, so all the work of a call (the CPU autograd engine runs the backward on the
calling thread) is counted and time spent preempted on a busy machine is not;
``--clock wall`` uses ``time.perf_counter`` instead. On a GPU the clock is wall time. ``fwd+bwd`` is
``model(x).backward(grad)`` with x and the parameters requiring grad (grads cleared
before every call); ``fwd`` is the same forward alone (grad mode on, graph built).

The CPU rows are the reference backend. The triton backend on the CPU runs through
Triton's interpreter, whose cost per kernel launch dwarfs everything measured here:
its numbers would say nothing about overhead, so the CPU run does not time it. On a
GPU the triton rows include the launches, synchronised once per turn.
Prints a header and a fixed-width table, appends CSV rows tagged with the device,
versions and date, and draws a PNG of the ratios.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import manualbp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_dense beside this file, however it is run
from bench_dense import (CsvRows, GatedEager, _triton_version, check_choices, finish_bar_plot,  # noqa: E402
                         pick_device, pyplot)

ROWS, WIDTH = 4, 16
MLP_SIZES = [WIDTH, WIDTH, WIDTH, WIDTH]
GATED_ACTIVATION = "silu"  # SwiGLU, the gated tests' most common activation
PROBLEMS = ("linear", "mlp", "gated", "op")
MODES = ("fwd", "fwd+bwd")


def build(problem: str, impl: str, device, dtype):
    """The model of impl ('nn' or 'manualbp') for problem, with the same parameters."""
    torch.manual_seed(0)
    if problem == "linear":
        ours = manualbp.Linear(WIDTH, WIDTH, activation="gelu", device=device, dtype=dtype)
        if impl == "manualbp":
            return ours
        theirs = nn.Sequential(nn.Linear(WIDTH, WIDTH, device=device, dtype=dtype), nn.GELU())
        theirs[0].load_state_dict(ours.state_dict())
        return theirs
    if problem == "gated":
        ours = manualbp.GatedMLP(WIDTH, WIDTH, GATED_ACTIVATION, device=device, dtype=dtype)
        if impl == "manualbp":
            return ours
        theirs = GatedEager(WIDTH, WIDTH, GATED_ACTIVATION, device, dtype)
        theirs.load_state_dict(ours.state_dict())  # the same keys: gate_proj, up_proj, down_proj .weight
        return theirs
    ours = manualbp.MLP(MLP_SIZES, activation="gelu", device=device, dtype=dtype)
    return ours if impl == "manualbp" else ours.to_sequential()


@torch.library.custom_op("bench_overhead::mm", mutates_args=())
def _bare_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b)


def prepare(problem: str, impl: str, mode: str, device, dtype, backend: str):
    """(fn, tensors whose .grad is cleared before each call), or None where impl/mode do not apply."""
    if problem == "op":
        if mode != "fwd":
            return None
        a = torch.randn(ROWS, WIDTH, device=device, dtype=dtype)
        b = torch.randn(WIDTH, WIDTH, device=device, dtype=dtype)
        if impl == "nn":
            return (lambda: torch.mm(a, b)), []
        if impl == "custom_op":
            op = torch.ops.bench_overhead.mm.default
            return (lambda: op(a, b)), []
        if not hasattr(torch.ops.manualbp, "matmul"):  # manualbp before its operators were the launchers
            return None
        op = torch.ops.manualbp.matmul.default
        return (lambda: op(a, b, backend)), []
    if impl == "custom_op":
        return None
    model = build(problem, impl, device, dtype)
    x = torch.randn(ROWS, WIDTH, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(ROWS, WIDTH, device=device, dtype=dtype)
    if mode == "fwd":
        return (lambda: model(x)), [x, *model.parameters()]
    return (lambda: model(x).backward(grad)), [x, *model.parameters()]


def time_turns(cases: dict, rounds: int, calls: int, sync, clock) -> dict:
    """{impl: (median, p20, p80)} in µs per call, over rounds; the cases take turns, calls each."""
    for fn, reset in cases.values():  # warm-up
        for _ in range(max(10, calls)):
            for t in reset:
                t.grad = None
            fn()
    sync()
    samples = {impl: [] for impl in cases}
    order = list(cases.items())
    for index in range(rounds):
        turn = order[index % len(order):] + order[:index % len(order)]  # rotate who goes first
        for impl, (fn, reset) in turn:
            elapsed = 0.0
            for _ in range(calls):
                for t in reset:
                    t.grad = None
                start = clock()
                fn()
                elapsed += clock() - start
            sync()
            samples[impl].append(elapsed / calls * 1e6)
    result = {}
    for impl, values in samples.items():
        q = statistics.quantiles(values, n=10)
        result[impl] = (statistics.median(values), q[1], q[7])
    return result


def call_chain(device, dtype) -> list:
    """The Python frames from manualbp.Linear.forward down to the first torch kernel (addmm/mm), forward with grad.

    C++ frames (Function.apply's, the dispatcher's) do not show; the first kernel call is
    the first of torch.addmm, torch.mm or torch._C._nn.linear seen by sys.setprofile.
    """
    layer = manualbp.Linear(WIDTH, WIDTH, activation="gelu", device=device, dtype=dtype)
    x = torch.randn(ROWS, WIDTH, device=device, dtype=dtype, requires_grad=True)
    layer(x)  # first-call work (imports, caches) out of the way
    chains = []

    def watch(frame, event, arg):
        if event == "c_call" and not chains and getattr(arg, "__name__", "") in ("addmm", "mm", "linear"):
            chain = []
            while frame is not None:
                code = frame.f_code
                chain.append(f"{os.path.basename(os.path.dirname(code.co_filename))}/"
                             f"{os.path.basename(code.co_filename)}:{code.co_name}")
                if code.co_name == "forward" and code.co_filename.endswith(os.path.join("manualbp", "modules.py")):
                    break
                frame = frame.f_back
            chains.append(chain[::-1])

    sys.setprofile(watch)
    try:
        layer(x)
    finally:
        sys.setprofile(None)
    return chains[0] if chains else []


def header(device, dtype_name: str, backend: str, clock_name: str, args) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "manualbp": manualbp.__version__,
        "manualbp_path": os.path.dirname(manualbp.__file__),
        "backend": backend,
        "threads": torch.get_num_threads(),
        "clock": clock_name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print("# manualbp call-overhead benchmark")
    for key, value in info.items():
        print(f"#   {key:13s} {value}")
    print(f"#   dtype         {dtype_name}   x [{ROWS}, {WIDTH}]   MLP {MLP_SIZES}   "
          f"gated MLP {WIDTH} -> {WIDTH} -> {WIDTH} ({GATED_ACTIVATION})   "
          f"rounds {args.rounds} x {args.calls} calls per implementation")
    print("#   µs per call: median over rounds (p20, p80); ratio = this median / nn's median")
    return info


def plot(rows, path):
    plt = pyplot(path)
    if plt is None:
        return
    wanted = [r for r in rows if r["impl"] == "manualbp"]
    if not wanted:
        return
    labels = [f"{r['problem']} {r['mode']}\n{r['label']} {r['date'][11:]}" for r in wanted]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(wanted)), 4))
    xs = range(len(wanted))
    ax.bar(list(xs), [r["ratio_to_nn"] for r in wanted], width=0.6)
    ax.axhline(1.2, color="r", linewidth=0.8, linestyle="--", label="1.2x target")
    finish_bar_plot(fig, ax, xs, labels, "time / nn's time (lower is better)",
                    f"manualbp call overhead on {wanted[0]['device']}", path, fontsize=7)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp64"])
    parser.add_argument("--problems", default=",".join(PROBLEMS), help=f"comma list of {list(PROBLEMS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--rounds", type=int, default=2000, help="turns per implementation (medians over these)")
    parser.add_argument("--calls", type=int, default=5, help="calls per turn")
    parser.add_argument("--clock", default="auto", choices=["auto", "thread", "wall"],
                        help="auto: thread CPU time on the CPU, wall time on a GPU")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU")
    parser.add_argument("--depth", action="store_true",
                        help="print the Python frames from Linear.forward to the first kernel, and stop")
    parser.add_argument("--label", default="", help="free text for the CSV's label column (e.g. the commit)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--tag", default=None, help="file name stem (default: from the device name)")
    args = parser.parse_args(argv)

    device = pick_device(parser, args.device)
    problems = check_choices(parser, "problem", args.problems, PROBLEMS)
    modes = check_choices(parser, "mode", args.modes, MODES)
    if args.rounds < 5 or args.calls < 1:
        parser.error("--rounds must be at least 5 and --calls at least 1")
    # The reference on the CPU; on a GPU the triton kernels (see the docstring for the interpreter).
    backend = "triton" if device.type == "cuda" else "reference"
    manualbp.set_backend(backend)
    dtype = {"fp32": torch.float32, "fp64": torch.float64}[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock_name = args.clock if args.clock != "auto" else ("wall" if device.type == "cuda" else "thread")
    if clock_name == "thread" and device.type == "cuda":
        parser.error("--clock thread does not see GPU time; use --clock wall on a GPU")
    clock = time.thread_time if clock_name == "thread" else time.perf_counter
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    if args.depth:
        chain = call_chain(device, dtype)
        print(f"# {len(chain)} Python frames from manualbp.Linear.forward to the first kernel "
              f"(manualbp at {os.path.dirname(manualbp.__file__)}, torch {torch.__version__}, backend {backend}):")
        for index, frame in enumerate(chain, 1):
            print(f"  {index:2d} {frame}")
        return 0
    info = header(device, args.dtype, backend, clock_name, args)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = args.tag or ("".join(c if c.isalnum() else "_" for c in info["device"]).strip("_")[:40])
    csv_path = os.path.join(args.out_dir, f"bench_overhead_{stem}.csv")
    writer = CsvRows(csv_path)
    rows = []
    cols = f"{'problem':8s} {'mode':8s} {'impl':9s} {'median µs':>10s} {'p20':>8s} {'p80':>8s} {'x nn':>7s}"
    print(cols)
    print("-" * len(cols))
    for problem in problems:
        for mode in modes:
            cases = {}
            for impl in ("nn", "custom_op", "manualbp"):
                case = prepare(problem, impl, mode, device, dtype, backend)
                if case is not None:
                    cases[impl] = case
            if not cases:
                continue
            results = time_turns(cases, args.rounds, args.calls, sync, clock)
            base = results["nn"][0]
            for impl, (median, p20, p80) in results.items():
                row = dict(info, label=args.label, dtype=args.dtype, problem=problem, mode=mode, impl=impl,
                           rows=ROWS, width=WIDTH, rounds=args.rounds, calls=args.calls, median_us=median,
                           p20_us=p20, p80_us=p80, ratio_to_nn=median / base)
                rows.append(row)
                writer.add(row)
                print(f"{problem:8s} {mode:8s} {impl:9s} {median:10.1f} {p20:8.1f} {p80:8.1f} {median / base:7.3f}")
            sys.stdout.flush()
    print(f"csv: {csv_path} (+{len(rows)} rows)")
    if rows:  # every run in the CSV, labelled, so that before/after sit side by side
        with open(csv_path, newline="") as handle:
            every_run = [dict(r, ratio_to_nn=float(r["ratio_to_nn"])) for r in csv.DictReader(handle)]
        plot([r for r in every_run if r["mode"] == "fwd+bwd" or r["problem"] == "op"],
             os.path.join(args.out_dir, f"bench_overhead_{stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
