"""The backward of one dense layer, kernels only: manualbp's ways of forming δ against eager's, host time excluded.

    python benchmarks/bench_backward.py                          # GPU: the issue's (1024, 4096) shapes, bf16
    python benchmarks/bench_backward.py --problems linear8192x4096x1024 --activations relu,gelu --layers first

bench_dense.py times whole steps; at the (1024, 4096) shapes they are bound by the host (Python, launches), so
the kernels' own speed cannot be read from them. Here each way is captured in a CUDA graph and replayed
(triton.testing.do_bench_cudagraph): the GPU's time only. For a `first` layer (X needs no gradient: ∂C/∂W, ∂C/∂b)
and a `hidden` one (∂C/∂X too), from G and the tensor the forward saved (A, Z or f'(Z): function.saved_kind):

    fused        δ formed in a matmul's operand loads (dense.linear_backward(delta_in_loads=True)): a first
                 layer's ∂C/∂W launch forms δ there and ∂C/∂b beside it, a hidden layer's ∂C/∂X launch stores δ
                 for a plain ∂C/∂W launch that sums ∂C/∂b
    delta+dW     δ by a pass first (delta_in_loads=False): the δ pass stores δ (no sums), then plain matmuls,
                 ∂C/∂b by the ∂C/∂W launch (so the same bits as the fused way's)
    (manualbp's default is one of these two by in_features: dense.PROLOGUE_MAX_K, set from this benchmark)
    unsplit      the fused way with split-K off (grad_weight_split=1); listed only where the plan splits ∂C/∂W
                 (dense.grad_weight_splits: few output tiles for the SMs, e.g. linear8192x2048x1024), where the
                 fused, delta+dW and unfused ways are the split plan (its S printed before the table's rows; the
                 unfused way's δᵀ X is dense.matmul's, split by the same rule)
    unfused      MANUALBP_DELTA_PROLOGUE=0's path: the δ pass with ∂C/∂b's partial sums, then plain matmuls
    eager        what autograd runs for nn.Linear + the activation: its backward op, mm, (mm,) sum

Every way's gradients are checked against float64 (max |ours - exact| / max |exact|, eager's the yardstick).
With --warm-only each way runs once (compile, autotune) and nothing is timed: run it beside other work, in
parallel processes, to fill Triton's cache before timing. On the CPU (TRITON_INTERPRET=1) it checks the ways at a
small size; its timings there mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dense  # noqa: E402

import manualbp  # noqa: E402
from manualbp import activations, function  # noqa: E402

WAYS = ("fused", "unsplit", "delta+dW", "unfused", "eager")
LAYERS = ("first", "hidden")
GPU_PROBLEMS = "linear8192x1024x4096,linear8192x4096x1024"
CPU_PROBLEMS = "linear64x48x80"  # the interpreter: a check of the ways, not a timing


def eager_delta(name: str, grad_a, z, a, slope: float):
    """δ as autograd's backward op for the activation computes it (the op eager runs)."""
    aten = torch.ops.aten
    if name == "identity":
        return grad_a  # no backward op: G is δ
    if name == "relu":
        return aten.threshold_backward(grad_a, a, 0)
    if name == "leaky_relu":
        return aten.leaky_relu_backward(grad_a, z, slope, False)
    if name == "gelu":
        return aten.gelu_backward(grad_a, z, approximate="none")
    if name == "gelu_tanh":
        return aten.gelu_backward(grad_a, z, approximate="tanh")
    if name == "tanh":
        return aten.tanh_backward(grad_a, a)
    if name == "sigmoid":
        return aten.sigmoid_backward(grad_a, a)
    if name == "silu":
        return aten.silu_backward(grad_a, z)
    raise ValueError(f"no eager backward op for {name!r}")


def ways(problem, layer: str, device, dtype):
    """{way: fn() -> (grad_x or None, grad_weight, grad_bias)}, and the float64 exact results."""
    dense = manualbp.backends.kernels()
    m, k, n = problem.m, problem.sizes[0], problem.sizes[1]
    act = activations.get_activation(problem.activation)
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, k, generator=generator).to(device, dtype)
    weight = (torch.randn(n, k, generator=generator) / k ** 0.5).to(device, dtype)
    bias = torch.randn(n, generator=generator).to(device, dtype)
    grad_a = torch.randn(m, n, generator=generator).to(device, dtype)
    z = torch.addmm(bias, x, weight.t())
    a = act.f(z)
    kind = function.saved_kind("triton", act) or "z"
    saved = {"a": a, "z": z, "f_prime": act.f_grad(z) if kind == "f_prime" else None}[kind]
    want_x = layer == "hidden"
    slope = act.kernel_slope

    def fused():
        return dense.linear_backward(grad_a, x, weight, saved, act.kernel_id, slope, kind,
                                     want_x=want_x, want_weight=True, want_bias=True, delta_in_loads=True)

    def delta_then_matmuls():
        return dense.linear_backward(grad_a, x, weight, saved, act.kernel_id, slope, kind,
                                     want_x=want_x, want_weight=True, want_bias=True, delta_in_loads=False)

    def unfused():
        delta, grad_bias = dense.delta_and_bias_grad(grad_a, saved, act.kernel_id, slope, kind,
                                                     want_delta=True, want_bias=True)
        grad_x = dense.matmul(delta, weight) if want_x else None
        return grad_x, dense.matmul(delta.t(), x), grad_bias

    def eager():
        delta = eager_delta(act.name, grad_a, z, a, act.kernel_slope)
        return (delta.mm(weight) if want_x else None), delta.t().mm(x), delta.sum(0)

    def unsplit():
        with manualbp.config.override(grad_weight_split=1):
            return fused()

    found = {"fused": fused, "delta+dW": delta_then_matmuls, "unfused": unfused, "eager": eager}
    if act.name == "identity":
        found = {"fused": fused, "eager": eager}
    if dense.grad_weight_splits(m, n, k, device) > 1:  # split-K: the same way unsplit, beside it
        found["unsplit"] = unsplit
    z64 = z.double()
    delta64 = grad_a.double() * act.f_grad(z64)
    exact = ((delta64 @ weight.double()) if want_x else None, delta64.t() @ x.double(), delta64.sum(0))
    return found, exact


def max_rel_error(results, exact) -> float:
    worst = 0.0
    for ours, truth in zip(results, exact):
        if truth is None:
            continue
        scale = truth.abs().max().item() or 1.0
        worst = max(worst, (ours.double() - truth).abs().max().item() / scale)
    return worst


def device_ms(fn, cuda: bool, rep_ms: float) -> tuple[float, str]:
    """(median ms, how measured): a CUDA graph's replays on a GPU (the GPU's time only); on the CPU a wall clock."""
    if not cuda:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times), "cpu wall"
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"), "cudagraph"
    except Exception as error:  # said in the table: a way that cannot be captured is timed with its host
        print(f"#   (CUDA graph capture failed: {type(error).__name__}: {str(error)[:120]}; do_bench instead)")
        torch.cuda.synchronize()
    return triton.testing.do_bench(fn, rep=rep_ms, return_mode="median"), "do_bench"


def plot(rows, path) -> None:
    """Bars of each manualbp way's speedup over eager's kernels, per problem, activation and layer."""
    plt = bench_dense.pyplot(path)
    if plt is None or not rows:
        return
    cases = list(dict.fromkeys((r["problem"], r["activation"], r["layer"]) for r in rows))
    ways = [w for w in WAYS if w != "eager" and any(r["way"] == w for r in rows)]
    speed = {(r["problem"], r["activation"], r["layer"], r["way"]): float(r["speedup_vs_eager"]) for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(cases)), 4))
    width = 0.8 / len(ways)
    for i, way in enumerate(ways):
        xs = [c + (i - (len(ways) - 1) / 2) * width for c in range(len(cases))]
        ax.bar(xs, [speed.get((*case, way), float("nan")) for case in cases], width=width, label=way)
    bench_dense.finish_bar_plot(fig, ax, range(len(cases)), [f"{p}\n{a} {layer}" for p, a, layer in cases],
                                "x eager's kernels (backward, higher is better)",
                                f"manualbp backward, kernels only, on {rows[0]['device']}", path, fontsize=6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=None,
                        help=f"bench_dense.py's linear names (default: {GPU_PROBLEMS} on a GPU, "
                             f"{CPU_PROBLEMS} on the CPU)")
    parser.add_argument("--activations", default="relu,gelu,leaky_relu,tanh")
    parser.add_argument("--layers", default=",".join(LAYERS), help=f"comma list of {list(LAYERS)}")
    parser.add_argument("--dtype", default=None, choices=list(bench_dense.DTYPES),
                        help="bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma list of {list(WAYS)} (eager always runs: "
                                                               "the yardstick)")
    parser.add_argument("--rep-ms", type=float, default=60.0)
    parser.add_argument("--warm-only", action="store_true", help="run each way once (compile, autotune); no timing")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--plot-csv", default="", metavar="CSV", help="only draw the plot of a CSV this wrote")
    args = parser.parse_args(argv)
    if args.plot_csv:
        with open(args.plot_csv, newline="") as handle:
            plot(list(csv.DictReader(handle)), os.path.splitext(args.plot_csv)[0] + ".png")
        return 0
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_backward: no CUDA GPU; set TRITON_INTERPRET=1 to check the ways through the CPU interpreter")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = bench_dense.DTYPES[dtype_name]
    problems = args.problems or (GPU_PROBLEMS if cuda else CPU_PROBLEMS)
    layers = bench_dense.check_choices(parser, "layer", args.layers, LAYERS)
    chosen = bench_dense.check_choices(parser, "way", args.ways, WAYS)
    manualbp.set_backend("triton")
    torch.set_float32_matmul_precision("high" if dtype_name == "fp32-tf32" else "highest")
    if not args.warm_only:
        info = bench_dense.header(device, argparse.Namespace(dtypes=dtype_name, modes="bwd", impls=",".join(WAYS)))
        info["backend"] = "triton"
        head = (f"{'problem':24s} {'act':10s} {'layer':6s} {'way':9s} {'median ms':>10s} {'TFLOP/s':>8s} "
                f"{'x eager':>8s} {'max rel err':>11s} {'timed by':>9s}")
        print(head)
        print("-" * len(head))
        os.makedirs(args.out_dir, exist_ok=True)
        stem = bench_dense.device_stem(info["device"])
        rows = bench_dense.CsvRows(os.path.join(args.out_dir, f"bench_backward_{stem}.csv"))
    for problem_name in problems.split(","):
        for activation in args.activations.split(","):
            try:
                problem = bench_dense.Problem.from_name(problem_name, activation)
            except ValueError as error:
                parser.error(f"--problems: {error}")
            if problem.kind != "linear":
                parser.error(f"--problems: {problem_name} is not a single layer (linearMxINxOUT)")
            splits = manualbp.backends.kernels().grad_weight_splits(problem.m, problem.sizes[1], problem.sizes[0],
                                                                    device)
            if splits > 1 and not args.warm_only:
                print(f"# {problem.name}: ∂C/∂W split in {splits} (dense.grad_weight_splits); the unsplit way "
                      "beside it")
            for layer in layers:
                found, exact = ways(problem, layer, device, dtype)
                flops = (6 if layer == "hidden" else 4) * problem.m * problem.sizes[0] * problem.sizes[1] / 3
                eager_ms = None
                for way in ("eager", *[w for w in WAYS if w != "eager" and w in found and w in chosen]):
                    fn = found[way]
                    results = fn()  # compile, autotune
                    if args.warm_only:
                        continue
                    error = max_rel_error(results, exact)
                    ms, how = device_ms(fn, cuda, args.rep_ms)
                    eager_ms = ms if way == "eager" else eager_ms
                    speedup = eager_ms / ms if eager_ms else float("nan")
                    print(f"{problem.name:24s} {activation:10s} {layer:6s} {way:9s} {ms:10.4f} "
                          f"{flops / ms / 1e9:8.1f} {speedup:8.3f} {error:11.3e} {how:>9s}")
                    rows.add({**info, "dtype": dtype_name, "problem": problem.name, "activation": activation,
                              "layer": layer, "way": way, "median_ms": ms, "tflops": flops / ms / 1e9,
                              "speedup_vs_eager": speedup, "max_rel_err": error, "timed_by": how})
    if not args.warm_only:
        print(f"csv: {rows.path}")
        with open(rows.path, newline="") as handle:  # this run's rows and any the file had before, as bench_dense
            plot(list(csv.DictReader(handle)), os.path.splitext(rows.path)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
