"""The speed targets of the persistent-kernel work, read from one GPU run's CSVs: each met, missed or not measured.

    python benchmarks/perf_targets.py --matmul benchmarks/results/bench_matmul_NVIDIA_H200.csv \
        --dense benchmarks/results/bench_dense_NVIDIA_H200.csv

benchmarks/gpu_perf_check.sh ends with it, with --since its start: a file the benchmarks append to may hold
earlier runs' rows, and only this run's count (each row's date is its run's start, to the minute). The targets, bf16
unless said, M = 8192:

    matmul       bench_matmul's ratio to cuBLAS: bf16 >= 0.95 at every product (4096^3 and a layer's X Wᵀ, δ W,
                 δᵀ X); float32 IEEE >= 0.9; TF32 >= 0.8 ("matmul error": Triton's error at most 1.5x cuBLAS's)
    kernels      bench_dense --timing graph, forward+backward, manualbp against eager: >= 1.15x at the (1024 -> 4096)
                 and (4096 -> 1024) layers, first and hidden; >= 1.0x at the 16384-wide shapes
    host         bench_dense --timing host, forward+backward: every problem >= 1.0x eager and >= 1.0x torch.compile;
                 the (1024 -> 4096) layers and the 1024/4096 MLP >= 1.15x eager
    dense error  every manualbp row's error against float64 at most 1.5x eager's

A target no row speaks to is printed as NOT MEASURED, never as met.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

TARGET_SHAPES = ("linear8192x1024x4096", "linear8192x4096x1024")
WIDE_SHAPES = ("linear8192x4096x16384", "linear8192x16384x4096", "mlp8192x4096x16384")
HOST_115 = ("linear8192x1024x4096", "mlp8192x1024x4096")
MATMUL_BOUNDS = {"bf16": 0.95, "fp32": 0.9, "fp32-tf32": 0.8}


def read_rows(paths, since: str = "") -> list:
    """The rows of the CSV files dated since (bench_dense's "YYYY-MM-DD HH:MM UTC", which sorts as text)."""
    rows = []
    for path in paths:
        if not os.path.exists(path):  # a run cut short before the benchmark wrote it: its targets are unmeasured
            print(f"perf_targets: no file {path}")
            continue
        with open(path, newline="") as handle:
            rows += [r for r in csv.DictReader(handle) if r.get("date", "") >= since]
    return rows


def checks(matmul_rows: list, dense_rows: list) -> list:
    """[(target, what, value, bound)]: value None where no row measured it. A speed is met at value >= bound; an
    error (a target named "... error", value the ratio of errors) at value <= bound."""
    found = []
    for dtype, bound in MATMUL_BOUNDS.items():
        rows = [r for r in matmul_rows if r["dtype"] == dtype]
        found += [("matmul", f"{r['problem']} {r['symbol']} {dtype}", float(r["x_cublas"]), bound) for r in rows]
        found += [("matmul", f"{dtype}: no row", None, bound)] if not rows else []
        found += [("matmul error", f"{r['problem']} {r['symbol']} {dtype}: Triton's / cuBLAS's",
                   float(r["err_triton"]) / max(float(r["err_cublas"]), 1e-300), 1.5) for r in rows]
    mine = [r for r in dense_rows if r["impl"] == "manualbp" and r["mode"] == "fwd+bwd" and r["dtype"] == "bf16"]

    def speed(timing, pairs, key, bound, target):
        for problem, layer in pairs:
            rows = [r for r in mine if r["problem"] == problem and r.get("timing", "host") == timing
                    and r.get("layer", "hidden") == layer]
            what = f"{problem} {layer} {key}"
            if not rows:
                found.append((target, what, None, bound))
            found.extend((target, f"{what} {r['activation']}", float(r[key]), bound) for r in rows)

    speed("graph", [(p, layer) for p in TARGET_SHAPES for layer in ("hidden", "first")], "speedup_vs_eager", 1.15,
          "kernels")
    speed("graph", [(p, "hidden") for p in WIDE_SHAPES], "speedup_vs_eager", 1.0, "kernels")
    speed("host", [(p, "hidden") for p in HOST_115], "speedup_vs_eager", 1.15, "host")
    every = sorted({(r["problem"], r.get("layer", "hidden")) for r in mine if r.get("timing", "host") == "host"})
    every = every or [("(any problem)", "hidden")]
    speed("host", every, "speedup_vs_eager", 1.0, "host")
    speed("host", every, "speedup_vs_compile", 1.0, "host")
    found += [("dense error", f"{r['problem']} {r.get('layer', 'hidden')} {r['activation']} {r.get('timing', 'host')}: "
                              f"manualbp's / eager's", float(r["err_vs_eager"]), 1.5)
              for r in mine if r["err_vs_eager"] not in ("", "nan")]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matmul", nargs="*", default=[], help="bench_matmul.py's CSV files")
    parser.add_argument("--dense", nargs="*", default=[], help="bench_dense.py's CSV files")
    parser.add_argument("--since", default="", help='only rows dated from this on ("YYYY-MM-DD HH:MM UTC")')
    args = parser.parse_args(argv)
    results = checks(read_rows(args.matmul, args.since), read_rows(args.dense, args.since))
    missed = unmeasured = 0
    for target, what, value, bound in results:
        at_most = target.endswith("error")
        if value is None:
            verdict, unmeasured = "NOT MEASURED", unmeasured + 1
        elif (value <= bound) if at_most else (value >= bound):
            verdict = "met"
        else:
            verdict, missed = "MISSED", missed + 1
        shown = "" if value is None else f"{value:.3f}"
        print(f"{target:12s} {what:72s} {shown:>8s} {'<=' if at_most else '>='} {bound:<5} {verdict}")
    print(f"targets: {len(results) - missed - unmeasured} met, {missed} missed, {unmeasured} not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
