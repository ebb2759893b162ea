"""Fill the compile caches that a GPU benchmark run would otherwise fill one kernel at a time.

    python benchmarks/warm_caches.py --worker 3 --workers 9 --problems linear8192x1024x4096 --activations relu,gelu
    python benchmarks/warm_caches.py --compile --worker 0 --workers 2

Triton's autotuner compiles its configs one after another, each a few seconds of ptxas, inside the
benchmark's first call: at the benchmark's shapes that is minutes, which a short GPU run cannot spare.
This script runs what bench_dense.py runs (the same modules, shapes, dtype, hence the same kernel
specialisations), once, with no timing, in N processes side by side: in worker i every autotuned launch
offers only the i-th of the configs the autotuner would keep for it (i mod how many it keeps), so the N
workers together compile every config of every launch into Triton's on-disk cache, on N CPU cores (one worker
alone compiles them all, as the autotuner would). The benchmark's autotuner then loads them and only times
them. Nothing here is measured or written besides the caches; timings of a run that used it exclude compilation, first-call times then include loading only.

--compile does the same for the torch.compile rows (Inductor's caches), the problems split among workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dense  # noqa: E402

import manualbp  # noqa: E402


def offer_one_config(dense, worker: int) -> None:
    """Make every autotuned launch of this process keep one config: the worker-th of those it would keep (the dense
    layer's matmuls and the gated layer's)."""
    from manualbp.triton_kernels import gated

    def keep_one(prune):
        def one(*args, **kwargs):
            kept = prune(*args, **kwargs)
            return [kept[worker % len(kept)]]
        return one

    # read when an autotuner is built, on its first launch
    dense._prune_configs, gated._prune_configs = keep_one(dense._prune_configs), keep_one(gated._prune_configs)
    dense._autotuned_matmul.cache_clear()
    gated._autotuned.cache_clear()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=int, required=True, help="this worker's index, 0..workers-1")
    parser.add_argument("--workers", type=int, required=True, help="how many workers run side by side")
    parser.add_argument("--compile", action="store_true", help="warm torch.compile's caches instead of Triton's")
    parser.add_argument("--compile-impls", default="compile",
                        help="with --compile, bench_dense.py's compiled impls to warm (comma list)")
    parser.add_argument("--dtypes", default="bf16", help=f"comma list of {list(bench_dense.DTYPES)}")
    parser.add_argument("--activations", default="relu,gelu")
    parser.add_argument("--problems", default=None, help="comma list of problem names (default: all)")
    parser.add_argument("--modes", default="fwd+bwd", help="fwd+bwd covers the forward's and backward's launches")
    parser.add_argument("--matmul-dtypes", default="", help="also bench_matmul.py's product at --matmul-size in "
                                                            "these dtypes")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--layers", default="hidden", help="bench_dense.py's layers: hidden and/or first (no input "
                                                           "gradient: a backward of its own)")
    args = parser.parse_args(argv)
    if not 0 <= args.worker < args.workers:
        parser.error(f"--worker must be in 0..{args.workers - 1}, got {args.worker}")
    bench_dense.check_choices(parser, "layer", args.layers, bench_dense.LAYERS)
    if not torch.cuda.is_available():
        parser.error("warm_caches.py fills GPU compile caches: CUDA is not available")
    device = torch.device("cuda")
    manualbp.set_backend("triton")
    dense = manualbp.backends.kernels()
    if not args.compile and args.workers > 1:
        offer_one_config(dense, args.worker)

    problems = bench_dense.gpu_problems(args.activations.split(","))
    if args.problems:
        keep = args.problems.split(",")
        problems = [p for p in problems if p.name in keep]
    impls = args.compile_impls.split(",") if args.compile else ["manualbp", "manualbp-recompute"]
    start = time.perf_counter()
    done = failed = 0
    for dtype_name in args.dtypes.split(","):
        torch.set_float32_matmul_precision("high" if dtype_name == "fp32-tf32" else "highest")
        for index, problem in enumerate(problems):
            if args.compile and index % args.workers != args.worker:
                continue
            for mode in args.modes.split(","):
                for impl, layer in [(impl, layer) for impl in impls for layer in args.layers.split(",")]:
                    try:
                        case = bench_dense.prepare(impl, problem, mode, device, bench_dense.DTYPES[dtype_name], layer)
                        if case is None:
                            continue
                        case.fn()
                        torch.cuda.synchronize()
                        done += 1
                    except Exception as error:  # the benchmark reports it again, per impl; go on here
                        failed += 1
                        print(f"warm {problem.name} {problem.activation} {dtype_name} {mode} {impl}: "
                              f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
                    finally:
                        case = None
                        torch.cuda.empty_cache()
    if not args.compile:
        for dtype_name in filter(None, args.matmul_dtypes.split(",")):
            torch.set_float32_matmul_precision("high" if dtype_name == "fp32-tf32" else "highest")
            n = args.matmul_size
            a = torch.randn(n, n, device=device, dtype=bench_dense.DTYPES[dtype_name])
            dense.matmul(a, a)
            torch.cuda.synchronize()
            done += 1
    print(f"warm worker {args.worker}/{args.workers}{' (compile)' if args.compile else ''}: {done} runs, "
          f"{failed} failed, {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
