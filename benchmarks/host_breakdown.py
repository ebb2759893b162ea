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
  manualbp, no launches    the same with every warm launch (launch.Plan.launch) replaced by a no-op: manualbp's
                           Python, the warm calls' lookups, autograd and allocations (the launches' share is the
                           difference)
  N warm launches (launch.run)  the step's N launches again through launch.run, with the arguments one step
                                gave them: the warm path itself (lookup, addresses, the launcher)
    their lookups                   each call's exact values (launch._Layout.exact: ints, sizes, per tensor its
                                    dtype, device and address mod 16) and the table lookup that finds its plan
    their addresses                 the tensors' data_ptr()s, as a plan passes them
    their JITFunction.run           the same launches through JITFunction.run (binder, cache key, launch): the
                                    path before launch plans, and their fallback
    compiled launcher, tensors      the compiled kernels' launcher given the tensors: Triton's C launcher then
                                    calls data_ptr() and cuPointerGetAttribute for each (8 a matmul launch)
    compiled launcher, addresses    the same given data_ptr() ints (fixed arguments, what a plan does): the
                                    difference is those queries
  triton launch, empty     a kernel that does nothing, one program, through JITFunction.run
  triton launch, 8 tensors the same with 8 tensor arguments (the launcher's per-pointer work, 7 more times)
    compiled, 8 addresses  its compiled kernel launched as a plan launches: the floor of a warm launch
  torch launch, tiny       x.add_(1) on a 16-element tensor: one PyTorch kernel launch, for scale
  torch.empty              one [M, N] allocation from PyTorch's caching allocator

Prints a header (device, versions), a fixed-width table, and a last line with issue 24's two figures: a warm
launch against the empty 8-tensor launch (target: at most 2x), the step against eager's; nothing is written.
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


def launch_parts(launch, step) -> dict:
    """The step's warm launches (recorded from one step through launch.run, so the same roles, options and
    arguments), replayed whole and part by part, each item the time for all of them: launch.run itself (the exact
    values' lookup, the addresses, the compiled launcher), the lookup alone (launch._Layout.exact and the table),
    the addresses alone, JITFunction.run (binder, cache lookup, launch) with the plan's constexprs, and the compiled
    launcher given the tensors (Triton's C launcher then calls data_ptr() and cuPointerGetAttribute for each)
    against the same given their addresses. Where a part cannot be built (a plan without a compiled launcher), it
    is left out, saying why."""
    runs = []
    real_run = launch.run

    def recording(role, options, args, M, N, make, *make_args):
        plan = real_run(role, options, args, M, N, make, *make_args)
        runs.append((role, options, args, M, N, (make, *make_args), plan))
        return plan

    launch.run = recording  # the launchers call launch.run through the module: every launch passes here
    try:
        step()
    finally:
        launch.run = real_run
    torch.cuda.synchronize()
    calls = [(plan, args, M, N) for _, _, args, M, N, _, plan in runs]
    layouts = [(launch._LAYOUTS[(role, options, len(args))], args, M, N) for role, options, args, M, N, *_ in runs]
    kinds = sorted({plan.kind for plan, *_ in calls})
    print(f"# {len(calls)} warm launches a step, roles {[plan.role for plan, *_ in calls]}, launchers {kinds}")
    parts = {
        f"{len(calls)} warm launches (launch.run)": lambda: [real_run(*call[:5], *call[5]) for call in runs],
        "  their lookups": lambda: [layout.warm.get(layout.exact(args, M, N)) for layout, args, M, N in layouts],
        "  their addresses": lambda: [launch._addresses(args) for _, args, _, _ in calls],
        "  their JITFunction.run": lambda: [plan.fn.run(*args, grid=plan.grid(M, N), warmup=False, **plan.constexprs)
                                            for plan, args, M, N in calls],
    }
    compiled = [(plan, args, M, N) for plan, args, M, N in calls if plan.kind == "compiled"]
    if len(compiled) != len(calls):
        print(f"# (compiled launcher parts left out: launchers {kinds})")
        return parts

    def launcher(use_addresses: bool):
        def run():
            for plan, args, M, N in compiled:
                _, call, function, metadata = plan.compiled
                grid = plan.grid(M, N)
                values = launch._addresses(args) if use_addresses else args
                call(grid[0], grid[1] if len(grid) > 1 else 1, 1, launch._raw_stream(plan.device_index), function,
                     metadata, None, None, None, *values, *plan.tail)
        return run

    parts["  compiled launcher, tensors"] = launcher(False)
    parts["  compiled launcher, addresses"] = launcher(True)
    return parts


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
    from manualbp.triton_kernels import launch

    real_launch = launch.Plan.launch
    manualbp_step = items["manualbp step"]

    def no_launches():
        launch.Plan.launch = lambda plan, args, M, N: None
        try:
            manualbp_step()
        finally:
            launch.Plan.launch = real_launch

    items["manualbp, no launches"] = no_launches
    items.update(launch_parts(launch, manualbp_step))
    tiny = torch.zeros(16, device=device)
    _nothing[(1,)](tiny)
    items["triton launch, empty"] = lambda: _nothing[(1,)](tiny)
    _nothing_of_8[(1,)](*[tiny] * 8)
    items["triton launch, 8 tensors"] = lambda: _nothing_of_8[(1,)](*[tiny] * 8)
    eight = _nothing_of_8.run(*[tiny] * 8, grid=(1,), warmup=True)  # its compiled kernel, launched directly:
    if launch.compiled_launch_available(eight):  # the floor a plan's launch can reach
        stream, address = launch._raw_stream(tiny.device.index), tiny.data_ptr()
        items["  compiled, 8 addresses"] = lambda: eight.run(1, 1, 1, stream, eight.function, eight.packed_metadata,
                                                             None, None, None, *[address] * 8)
    items["torch launch, tiny"] = lambda: tiny.add_(1)
    items["torch.empty"] = lambda: torch.empty((m, k_out), device=device, dtype=dtype)

    print(f"{'item':32s} {'median us':>10s} {'p20':>8s} {'p80':>8s}")
    print("-" * 61)
    medians = {}
    for name, fn in items.items():
        med, p20, p80 = per_call_us(fn, args.calls, args.rounds)
        medians[name] = med
        print(f"{name:32s} {med:10.1f} {p20:8.1f} {p80:8.1f}")
    torch.cuda.synchronize()
    warm = next(name for name in medians if name.endswith("warm launches (launch.run)"))
    per_launch = medians[warm] / int(warm.split()[0])
    print(f"# a warm launch: {per_launch:.1f} µs, {per_launch / medians['triton launch, 8 tensors']:.2f}x an empty "
          f"8-tensor launch through JITFunction.run (issue 24's target: at most 2x); manualbp step "
          f"{medians['manualbp step']:.1f} µs against eager's {medians['eager step']:.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
