"""Where a forward+backward's host time goes on a GPU machine, measured without Python's profiler.

    python benchmarks/host_breakdown.py                        # linear8192x1024x4096 relu, bf16
    python benchmarks/host_breakdown.py --problem linear8192x4096x1024 --activation gelu

On the H200 (docs/performance.md) a manualbp step at (1024, 4096) took 1.2-1.3 ms of host time against eager's
0.45; Python's profiler put ~40% of it in Triton's JITFunction.run, but launching the compiled kernel directly
past it changed nothing (1.33 against 1.31 ms): the profiler inflates Python calls. This times the parts one by
one instead, each as the median over --rounds rounds of --calls back-to-back calls (time.perf_counter, µs per
call, the GPU synchronised between rounds only, so the time is what the host spends issuing):

  eager step               nn.Linear + the activation, forward+backward (bench_dense.py's model)
  manualbp step            manualbp.Linear, forward+backward
  manualbp, no launches    the same with every Triton matmul launch replaced by a no-op: manualbp's Python,
                           autograd and allocations (the launches' share is the difference)
  N launches, replayed     the step's N matmul launches again, with the arguments one step gave them
    their JITFunction.run, warmup   the same through JITFunction.run(warmup=True): binder, cache key, no launch
    their compiled launches         the compiled kernels launched directly (what JITFunction.run does last)
    their compiled launches, ints   the same with every tensor argument passed as its data_ptr(): Triton's
                                    C launcher (getPointer) asks the driver, cuPointerGetAttribute, about each
                                    tensor pointer (8 a matmul launch), and takes an int as it is; the
                                    difference is those queries (a guess at the ~175 µs, not yet measured)
  triton launch, empty     a kernel that does nothing, one program, through JITFunction.run
  triton launch, 8 tensors the same with 8 tensor arguments (the launcher's per-pointer work, 7 more times)
  torch launch, tiny       x.add_(1) on a 16-element tensor: one PyTorch kernel launch, for scale
  torch.empty              one [M, N] allocation from PyTorch's caching allocator

Prints a header (device, versions) and a fixed-width table; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dense  # noqa: E402

import manualbp  # noqa: E402


@triton.jit
def _nothing(x_ptr):
    pass


@triton.jit
def _nothing_of_8(p0, p1, p2, p3, p4, p5, p6, p7):  # as many tensor pointers as a matmul launch passes
    pass


def per_call_us(fn, calls: int, rounds: int) -> tuple:
    """(median, p20, p80) over rounds of the host's µs per call, calls back to back."""
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    samples.sort()
    return statistics.median(samples), samples[len(samples) // 5], samples[(4 * len(samples)) // 5]


def launch_parts(dense, step) -> dict:
    """The step's matmul launches (recorded from one step, so the same arguments), replayed part by part, each item
    the time for all of them: whole (dense._launch_autotuned: the chosen tile's lookup, then JITFunction.run),
    JITFunction.run with warmup=True (its binder, cache key and checks, no launch), the compiled kernel's
    launch alone (kernel[grid](*args, *constexprs), as JITFunction.run ends), and that launch with the tensors
    passed as their addresses (no driver query per pointer in the launcher). Where a part cannot be built on this
    Triton, it is left out, saying why."""
    calls = []
    real_launch = dense._launch_autotuned
    dense._launch_autotuned = lambda *args: (calls.append(args), real_launch(*args))
    try:
        step()
    finally:
        dense._launch_autotuned = real_launch
    torch.cuda.synchronize()
    replayed = {f"{len(calls)} launches, replayed": lambda: [real_launch(*call) for call in calls]}
    try:
        prepared = []
        for tuner, grid, args, flags, buckets in calls:
            config = dense._chosen_tiles[dense._tile_key(tuner, args, flags, buckets)]
            run = dict(grid=grid, **flags, **config.all_kwargs())
            kernel = tuner.fn.run(*args, warmup=True, **run)
            meta = {**flags, **config.kwargs}
            constexprs = tuple(meta[p.name] if p.name in meta else p.default for p in tuner.fn.params[len(args):])
            addresses = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
            prepared.append((tuner.fn, args, run, kernel, grid(meta), constexprs, addresses))
        split = {
            "  their JITFunction.run, warmup": lambda: [fn.run(*args, warmup=True, **run)
                                                        for fn, args, run, *_ in prepared],
            "  their compiled launches": lambda: [kernel[grid](*args, *constexprs)
                                                  for _, args, _, kernel, grid, constexprs, _ in prepared],
            "  their compiled launches, ints": lambda: [kernel[grid](*addresses, *constexprs)
                                                        for _, _, _, kernel, grid, constexprs, addresses in prepared],
        }
        for part in split.values():
            part()  # once before timing: a part that fails is left out here, saying why
        torch.cuda.synchronize()
    except Exception as error:  # an internal that moved: said, and the whole replay still timed
        print(f"# (launch parts not split on triton {triton.__version__}: {type(error).__name__}: {error})")
        return replayed
    return {**replayed, **split}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="linear8192x1024x4096", help="linearMxINxOUT (bench_dense.py's names)")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--dtype", default="bf16", choices=list(bench_dense.DTYPES))
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("host_breakdown.py times a GPU machine's host work: CUDA is not available")
    try:
        problem = bench_dense.Problem.from_name(args.problem, args.activation)
    except ValueError as error:
        parser.error(f"--problem: {error}")
    if problem.kind != "linear":
        parser.error(f"--problem must be a single layer (linearMxINxOUT), got {args.problem!r}")
    m, k_out = problem.m, problem.dims[1]
    device, dtype = torch.device("cuda"), bench_dense.DTYPES[args.dtype]
    manualbp.set_backend("triton")
    print(f"# host breakdown: {problem.name} {args.activation} {args.dtype} fwd+bwd on {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}; "
          f"median of {args.rounds} rounds of {args.calls} calls, µs per call")

    items = {}
    for impl in ("eager", "manualbp"):
        case = bench_dense.prepare(impl, problem, "fwd+bwd", device, dtype)
        step = lambda case=case: (bench_dense._clear(case.reset), case.fn())  # noqa: E731
        for _ in range(3):  # compile, autotune, warm
            step()
        items[f"{impl} step"] = step
    dense = manualbp.backends.kernels()
    real_launch = dense._launch_autotuned
    manualbp_step = items["manualbp step"]

    def no_launches():
        dense._launch_autotuned = lambda *a, **k: None
        try:
            manualbp_step()
        finally:
            dense._launch_autotuned = real_launch

    items["manualbp, no launches"] = no_launches
    items.update(launch_parts(dense, manualbp_step))
    tiny = torch.zeros(16, device=device)
    _nothing[(1,)](tiny)
    items["triton launch, empty"] = lambda: _nothing[(1,)](tiny)
    _nothing_of_8[(1,)](*[tiny] * 8)
    items["triton launch, 8 tensors"] = lambda: _nothing_of_8[(1,)](*[tiny] * 8)
    items["torch launch, tiny"] = lambda: tiny.add_(1)
    items["torch.empty"] = lambda: torch.empty((m, k_out), device=device, dtype=dtype)

    print(f"{'item':32s} {'median us':>10s} {'p20':>8s} {'p80':>8s}")
    print("-" * 61)
    for name, fn in items.items():
        med, p20, p80 = per_call_us(fn, args.calls, args.rounds)
        print(f"{name:32s} {med:10.1f} {p20:8.1f} {p80:8.1f}")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
