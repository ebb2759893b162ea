"""manualbp's Triton matmul against torch.mm (cuBLAS) on square problems: the matmul ceiling.

    python benchmarks/bench_matmul.py                    # 4096^3 in bf16, fp16, fp32 (TF32 off), fp32 (TF32 on)
    python benchmarks/bench_matmul.py --size 8192 --dtypes bf16

For each dtype: the first call's time (compile + autotune over matmul_configs(),
what a user waits for once per shape), then do_bench medians (p20/p80) of both,
TFLOP/s (2 n^3 / t) and the ratio Triton / cuBLAS; the max relative error of each
against a float64 product checks that the timed kernels compute the right thing.
On the CPU (TRITON_INTERPRET=1) it runs a small size through the interpreter, so
the script itself can be tested; its timings there mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-tf32": torch.float32}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="n of the n x n x n product (default 4096)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32,fp32-tf32", help=f"comma list of {list(DTYPES)}")
    args = parser.parse_args(argv)
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; expected {list(DTYPES)}")
    if args.size < 1:
        parser.error("--size must be positive")

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_matmul: no CUDA GPU; set TRITON_INTERPRET=1 to run the kernels through the CPU interpreter")
        return 2
    import triton
    import triton.testing

    import manualbp

    dense = manualbp.backends.kernels()
    device = torch.device("cuda" if cuda else "cpu")
    n = args.size
    print(f"# matmul {n}x{n}x{n}  device {torch.cuda.get_device_name() if cuda else 'CPU (interpreter)'}  "
          f"torch {torch.__version__}  triton {triton.__version__}")
    header = f"{'dtype':10s} {'first call s':>12s} {'triton ms':>10s} {'p20':>8s} {'p80':>8s} {'TFLOP/s':>8s} " \
             f"{'cuBLAS ms':>10s} {'TFLOP/s':>8s} {'x cuBLAS':>8s} {'err triton':>10s} {'err cuBLAS':>10s}"
    print(header)
    print("-" * len(header))
    flops = 2.0 * n ** 3
    precision = torch.get_float32_matmul_precision()
    try:
        for name in args.dtypes.split(","):
            if not cuda and name in ("bf16", "fp32-tf32"):
                print(f"{name:10s} skipped: not on the CPU interpreter")
                continue
            torch.set_float32_matmul_precision("high" if name == "fp32-tf32" else "highest")
            dtype = DTYPES[name]
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            start = time.perf_counter()
            out = dense.matmul(a, b)
            if cuda:
                torch.cuda.synchronize()
            first = time.perf_counter() - start
            exact = a.double() @ b.double()
            scale = exact.abs().max().item()
            err_triton = (out.double() - exact).abs().max().item() / scale
            err_cublas = ((a @ b).double() - exact).abs().max().item() / scale
            if cuda:
                t_med, t_20, t_80 = triton.testing.do_bench(lambda: dense.matmul(a, b), quantiles=[0.5, 0.2, 0.8])
                c_med = triton.testing.do_bench(lambda: torch.mm(a, b), quantiles=[0.5, 0.2, 0.8])[0]
            else:
                t_med = t_20 = t_80 = first * 1000
                start = time.perf_counter()
                torch.mm(a, b)
                c_med = (time.perf_counter() - start) * 1000
            print(f"{name:10s} {first:12.2f} {t_med:10.4f} {t_20:8.4f} {t_80:8.4f} {flops / t_med / 1e9:8.1f} "
                  f"{c_med:10.4f} {flops / c_med / 1e9:8.1f} {c_med / t_med:8.3f} {err_triton:10.2e} {err_cublas:10.2e}")
            sys.stdout.flush()
    finally:
        torch.set_float32_matmul_precision(precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
