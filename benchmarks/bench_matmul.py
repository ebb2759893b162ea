"""manualbp's Triton matmul against torch.mm (cuBLAS) on a square product and on a layer's three: the matmul ceiling.

    python benchmarks/bench_matmul.py                    # GPU: 4096^3 and the layers' products, bf16, fp32, TF32
    python benchmarks/bench_matmul.py --problems linear8192x1024x4096 --products forward,grad_weight --dtypes bf16
    python benchmarks/bench_matmul.py --size 4096        # the square product alone

Problems: `squareN` (A B, both [N, N] row-major) and bench_dense.py's `linearMxINxOUT`, whose products are the
plain matmuls under a layer (X [M, IN], W [OUT, IN], δ [M, OUT], all row-major as the layer holds them; no
bias, activation or δ prologue: the ceiling the fused kernels are measured against):

    forward       X Wᵀ   [M, IN] @ [IN, OUT]   b = W read through swapped strides (column-major)
    grad_x        δ W    [M, OUT] @ [OUT, IN]  both row-major
    grad_weight   δᵀ X   [OUT, M] @ [M, IN]    a = δ read through swapped strides: the sum runs over the M rows

cuBLAS gets the same views (torch.mm). For each product and dtype: the first call's time (compile + autotune over
matmul_configs(), what a user waits for once per shape), then triton.testing.do_bench medians (p20/p80; L2
flushed between calls) of both, TFLOP/s (2 m n k / t) and the ratio to cuBLAS (cuBLAS ms / Triton ms: above 1,
faster); the max relative error of each against a float64 product checks that the timed kernels compute the right
thing. Rows are appended, as measured, to benchmarks/results/bench_matmul_<device>.csv (the device's name, as
bench_dense.py names its files) with the device, versions and date; a plot of the ratios beside it.

--warm-only runs each product once and times nothing; with --worker i --workers N every autotuned launch offers
only its i-th config (warm_caches.py's way), so N processes side by side fill Triton's cache before a timed run.

On the CPU (TRITON_INTERPRET=1) it runs small sizes through the interpreter, so that the script itself can be
tested; bf16 and TF32 rows are skipped there (said so), and its timings mean nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dense  # noqa: E402

DTYPES = bench_dense.DTYPES
PRODUCTS = ("forward", "grad_x", "grad_weight")
SYMBOLS = {"square": "A B", "forward": "X Wᵀ", "grad_x": "δ W", "grad_weight": "δᵀ X"}
GPU_PROBLEMS = "square4096,linear8192x1024x4096,linear8192x4096x1024"
GPU_DTYPES = "bf16,fp32,fp32-tf32"
CPU_PROBLEMS = "square40,linear48x24x40"  # the interpreter: a check of the script, not a timing
CPU_DTYPES = "fp32,fp16"


def products(problem: str, names) -> list:
    """[(product, m, n, k)] of a problem name: squareN's one, or the named products of linearMxINxOUT."""
    square = re.fullmatch(r"square(\d+)", problem)
    if square:
        n = int(square.group(1))
        return [("square", n, n, n)]
    layer = bench_dense.Problem.from_name(problem, "identity")  # a ValueError names what a name must read
    if layer.kind != "linear":
        raise ValueError(f"{problem}: a matmul problem is squareN or linearMxINxOUT")
    m, k_in, k_out = layer.m, layer.dims[0], layer.dims[1]
    shapes = {"forward": (m, k_out, k_in), "grad_x": (m, k_in, k_out), "grad_weight": (k_out, k_in, m)}
    return [(name, *shapes[name]) for name in names]


def operands(product: str, m: int, n: int, k: int, device, dtype):
    """(a [m, k], b [k, n]) in the layout the layer's matmul reads them: see the module docstring."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    if product == "forward":  # X [M, IN], W [OUT, IN]: X Wᵀ
        return randn(m, k), randn(n, k).t()
    if product == "grad_weight":  # δ [M, OUT], X [M, IN]: δᵀ X
        return randn(k, m).t(), randn(k, n)
    return randn(m, k), randn(k, n)  # square A B; grad_x: δ [M, OUT], W [OUT, IN]


def layout(a, b) -> str:
    """Which of each operand's dimensions is contiguous: row (a row-major matrix) or col (its transpose's view)."""
    def one(t):
        return "row" if t.stride(1) == 1 else "col"

    return f"a:{one(a)} b:{one(b)}"


def input_precision(dense, dtype_name: str, device) -> str:
    """What the products multiply: the 16-bit inputs themselves, or float32 as IEEE or TF32, as the kernel reads
    PyTorch's setting (cuBLAS reads the same)."""
    if DTYPES[dtype_name] != torch.float32:
        return dtype_name
    return dense._input_precision(torch.float32, device)


def max_rel_error(out, exact) -> float:
    return (out.double() - exact).abs().max().item() / (exact.abs().max().item() or 1.0)


def plot(rows, path) -> None:
    """Bars of Triton's speed over cuBLAS's, per problem, product and dtype."""
    plt = bench_dense.pyplot(path)
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(list(xs), [float(r["x_cublas"]) for r in rows], width=0.6, label="Triton / cuBLAS")
    labels = [f"{r['problem']}\n{r['symbol']} {r['dtype']} {r['input_precision']}" for r in rows]
    bench_dense.finish_bar_plot(fig, ax, xs, labels, "x cuBLAS (higher is better)",
                                f"manualbp's matmul on {rows[0]['device']}", path, fontsize=6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default=None,
                        help=f"comma list of squareN and linearMxINxOUT (default: {GPU_PROBLEMS} on a GPU, "
                             f"{CPU_PROBLEMS} on the CPU)")
    parser.add_argument("--size", type=int, default=None, help="only the square product n x n x n (--problems squareN)")
    parser.add_argument("--products", default=",".join(PRODUCTS), help=f"a layer's products: comma list of "
                                                                       f"{list(PRODUCTS)}")
    parser.add_argument("--dtypes", default=None, help=f"comma list of {list(DTYPES)} (default: {GPU_DTYPES} on a "
                                                       f"GPU, {CPU_DTYPES} on the CPU)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's time per measurement (ms)")
    parser.add_argument("--warm-only", action="store_true", help="run each product once (compile, autotune); no "
                                                                 "timing, no CSV")
    parser.add_argument("--worker", type=int, default=0, help="with --warm-only: this worker's index")
    parser.add_argument("--workers", type=int, default=1, help="with --warm-only: how many run side by side")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--tag", default=None, help="file name stem (default: from the device name)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.size is not None:
        if args.size < 1:
            parser.error("--size must be positive")
        if args.problems:
            parser.error("--size and --problems: give one")
        args.problems = f"square{args.size}"
    names = bench_dense.check_choices(parser, "product", args.products, PRODUCTS)
    dtype_names = bench_dense.check_choices(parser, "dtype", args.dtypes or (GPU_DTYPES if cuda else CPU_DTYPES),
                                            DTYPES)
    if not 0 <= args.worker < args.workers:
        parser.error(f"--worker must be in 0..{args.workers - 1}, got {args.worker}")
    cases = []
    for problem in (args.problems or (GPU_PROBLEMS if cuda else CPU_PROBLEMS)).split(","):
        try:
            cases += [(problem, *shape) for shape in products(problem, names)]
        except ValueError as error:
            parser.error(f"--problems: {error}")
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_matmul: no CUDA GPU; set TRITON_INTERPRET=1 to run the kernels through the CPU interpreter")
        return 2
    import triton.testing

    import manualbp

    dense = manualbp.backends.kernels()
    device = torch.device("cuda" if cuda else "cpu")
    if args.warm_only and args.workers > 1:
        import warm_caches

        warm_caches.offer_one_config(dense, args.worker)
    info = bench_dense.run_info(device)
    info["backend"] = "triton" if cuda else "triton (interpreter)"
    rows = None
    if not args.warm_only:
        print("# manualbp matmul benchmark: Triton against torch.mm (cuBLAS on a GPU)")
        for key, value in info.items():
            print(f"#   {key:9s} {value}")
        os.makedirs(args.out_dir, exist_ok=True)
        stem = args.tag or bench_dense.device_stem(info["device"])
        rows = bench_dense.CsvRows(os.path.join(args.out_dir, f"bench_matmul_{stem}.csv"))
        head = (f"{'problem':22s} {'product':6s} {'layout':11s} {'dtype':10s} {'first s':>7s} {'triton ms':>10s} "
                f"{'p20':>8s} {'p80':>8s} {'TFLOP/s':>8s} {'cuBLAS ms':>10s} {'TFLOP/s':>8s} {'x cuBLAS':>8s} "
                f"{'err triton':>10s} {'err cuBLAS':>10s}")
        print(head)
        print("-" * len(head))
    written = []
    precision = torch.get_float32_matmul_precision()
    started = time.perf_counter()
    try:
        for dtype_name in dtype_names:
            if not cuda and dtype_name in ("bf16", "fp32-tf32"):
                print(f"{dtype_name}: skipped: the CPU interpreter has no {dtype_name} products")
                continue
            torch.set_float32_matmul_precision("high" if dtype_name == "fp32-tf32" else "highest")
            for problem, product, m, n, k in cases:
                a, b = operands(product, m, n, k, device, DTYPES[dtype_name])
                start = time.perf_counter()
                out = dense.matmul(a, b)
                if cuda:
                    torch.cuda.synchronize()
                first = time.perf_counter() - start
                if args.warm_only:
                    continue
                exact = a.double() @ b.double()
                err_triton, err_cublas = max_rel_error(out, exact), max_rel_error(torch.mm(a, b), exact)
                del out, exact
                if cuda:
                    ours = triton.testing.do_bench(lambda: dense.matmul(a, b), rep=args.rep_ms,
                                                   quantiles=[0.5, 0.2, 0.8])
                    theirs = triton.testing.do_bench(lambda: torch.mm(a, b), rep=args.rep_ms,
                                                     quantiles=[0.5, 0.2, 0.8])
                    timed_by = "do_bench"
                else:  # the interpreter: one more call each, for the table's shape only
                    ours, theirs = [_wall_ms(lambda: dense.matmul(a, b))] * 3, [_wall_ms(lambda: torch.mm(a, b))] * 3
                    timed_by = "cpu wall (interpreter)"
                flops = 2.0 * m * n * k
                row = dict(info, problem=problem, product=product, symbol=SYMBOLS[product], m=m, n=n, k=k,
                           layout=layout(a, b), dtype=dtype_name, input_precision=input_precision(dense, dtype_name, device),
                           first_call_s=first, triton_ms=ours[0], triton_p20_ms=ours[1], triton_p80_ms=ours[2],
                           triton_tflops=flops / ours[0] / 1e9, cublas_ms=theirs[0], cublas_p20_ms=theirs[1],
                           cublas_p80_ms=theirs[2], cublas_tflops=flops / theirs[0] / 1e9,
                           x_cublas=theirs[0] / ours[0], err_triton=err_triton, err_cublas=err_cublas,
                           timed_by=timed_by)
                rows.add(row)
                written.append(row)
                print(f"{problem:22s} {SYMBOLS[product]:6s} {row['layout']:11s} {dtype_name:10s} {first:7.2f} "
                      f"{ours[0]:10.4f} {ours[1]:8.4f} {ours[2]:8.4f} {row['triton_tflops']:8.1f} {theirs[0]:10.4f} "
                      f"{row['cublas_tflops']:8.1f} {row['x_cublas']:8.3f} {err_triton:10.2e} {err_cublas:10.2e}")
                sys.stdout.flush()
    finally:
        torch.set_float32_matmul_precision(precision)
    if args.warm_only:
        print(f"warm bench_matmul worker {args.worker}/{args.workers}: {len(cases)} products x "
              f"{len(dtype_names)} dtypes, {time.perf_counter() - started:.1f} s")
        return 0
    print(f"csv: {rows.path} (+{len(written)} rows)")
    plot(written, os.path.splitext(rows.path)[0] + ".png")
    return 0


def _wall_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


if __name__ == "__main__":
    sys.exit(main())
