"""Where a forward+backward's time goes on a GPU: each kernel's time on the GPU, the host's time per call, the tiles.

    python benchmarks/profile_step.py --problem linear8192x1024x4096 --activation relu
    python benchmarks/profile_step.py --problem mlp8192x1024x4096 --impls eager,manualbp

For each implementation (bench_dense.py's models, shapes and dtype): after a first call (compile, autotune),
--calls calls back to back; "host ms/call" is the time the Python thread took to issue them (kernels queue
behind it), "wall ms/call" the time until the GPU finished them. When host ≈ wall the step is bound by the
host (Python, dispatch, launches), not by the kernels. Then torch.profiler over the same calls: the kernels by
time on the GPU. Last, the tile the autotuner chose for every manualbp matmul launch it tuned.
With --cprofile N: also Python's profiler over N more calls of each implementation, the functions by their own
time and by cumulative time (where the host's time goes, for a step bound by it).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dense  # noqa: E402

import manualbp  # noqa: E402


def print_kernels_in_order(prof, calls: int) -> None:
    """Each kernel of one step by its place in the step (a step launches the same kernels in the same order: for a
    manualbp Linear the forward, then ∂C/∂X and ∂C/∂W, which the table above lumps under one name), mean device
    time over the profiled steps."""
    kernels = sorted((e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")),
                     key=lambda e: e.time_range.start)
    if not kernels or len(kernels) % calls:
        print(f"(kernels in order: {len(kernels)} kernel events for {calls} steps, not a whole number per step)")
        return
    per_step = len(kernels) // calls
    print(f"### kernels in launch order, mean over {calls} steps (µs on the GPU)")
    for place in range(per_step):
        events = kernels[place::per_step]
        times = [e.time_range.elapsed_us() for e in events]  # a device event's interval is its kernel's run
        names = {e.name for e in events}
        name = names.pop() if len(names) == 1 else f"{len(names)} different kernels"
        print(f"{place + 1:3d}. {sum(times) / len(times):10.1f}  {name[:100]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="linear8192x1024x4096", help="bench_dense.py's names, any sizes")
    parser.add_argument("--warm-only", action="store_true", help="one call of each (compile, autotune), no timing")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--dtype", default="bf16", choices=list(bench_dense.DTYPES))
    parser.add_argument("--impls", default="eager,manualbp")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rows", type=int, default=12, help="kernels (and functions) listed per implementation")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="Python's profiler over N calls")
    parser.add_argument("--no-kernels", action="store_true", help="skip torch.profiler's kernel table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("profile_step.py profiles GPU kernels: CUDA is not available")
    device = torch.device("cuda")
    manualbp.set_backend("triton")
    torch.set_float32_matmul_precision("high" if args.dtype == "fp32-tf32" else "highest")
    try:
        problem = bench_dense.Problem.from_name(args.problem, args.activation)
    except ValueError as error:
        parser.error(f"--problem: {error}")
    print(f"# {problem.name} {problem.activation} {args.dtype} fwd+bwd on {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    for impl in args.impls.split(","):
        case = bench_dense.prepare(impl, problem, "fwd+bwd", device, bench_dense.DTYPES[args.dtype])
        if case is None:
            continue
        for _ in range(1 if args.warm_only else 3):  # compile / autotune, then warm
            bench_dense._clear(case.reset)
            case.fn()
        torch.cuda.synchronize()
        if args.warm_only:
            continue
        start = time.perf_counter()
        for _ in range(args.calls):
            bench_dense._clear(case.reset)
            case.fn()
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        print(f"\n## {impl}: host {1e3 * host / args.calls:.3f} ms/call, wall {1e3 * wall / args.calls:.3f} ms/call")
        if args.cprofile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.cprofile):
                bench_dense._clear(case.reset)
                case.fn()
            torch.cuda.synchronize()
            profiler.disable()
            for order in ("tottime", "cumulative"):
                print(f"### Python profile, {args.cprofile} calls, by {order}")
                pstats.Stats(profiler, stream=sys.stdout).sort_stats(order).print_stats(args.rows)
        if args.no_kernels:
            continue
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.calls):
                bench_dense._clear(case.reset)
                case.fn()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        for key in ("device_time_total", "cuda_time_total"):
            try:
                print(averages.table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
                break
            except (AttributeError, KeyError, ValueError):
                continue
        print_kernels_in_order(prof, args.calls)
    if "manualbp" in args.impls and not args.warm_only:
        dense = manualbp.backends.kernels()
        print("\n## tiles the autotuner chose (key: sizes by bucket, flags, dtypes)")
        for kernel in dense.MATMUL_KERNELS:
            for key, config in getattr(dense._autotuned_matmul(kernel), "cache", {}).items():
                print(f"{kernel}: {config}  <-  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
