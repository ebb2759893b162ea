"""What the gated layer's matmul kernels compile to on Hopper (sm_90), on a CPU machine: no GPU needed.

    python benchmarks/compile_report_gated.py                  # every launch below at every shipped config, sm_90
    python benchmarks/compile_report_gated.py --quick          # silu's three kernels and ∂C/∂X of a stored δ,
                                                               # each at its first config
    python benchmarks/compile_report_gated.py --dtype fp32     # float32 (IEEE: FMA loops) at float32's configs
    python benchmarks/compile_report_gated.py --dtype tf32     # float32 with TF32 products (wgmma)
    python benchmarks/compile_report_gated.py --sweep --only fwd   # a wider list of tiles (sweep_configs), to choose
    python benchmarks/compile_report_gated.py --out-dir benchmarks/results   # also writes the table and the JSON

The gated layer's launches (GatedMLP 4096 -> 11008, M = 8192 rows, bf16 by default: Llama-2 7B's MLP; the backward
in both plans for δ_g, δ_u, formed in the loads and stored, "δ stored") are captured from its launchers
(triton_kernels/gated.py) on meta tensors, as compile_report.py captures the dense layer's, and compiled with that
report's Compiler for ``GPUTarget("cuda", arch, 32)`` at every config the autotuner could pick
(``gated.matmul_configs(role)`` after its pruning at the target's shared memory). The columns are
compile_report.py's (see its docstring; no tutorial twin here, so no "x tut"); "press" counts the two products of a
K step where a kernel does two (the forward; ∂C/∂X's δ_g W_g + δ_u W_u; ∂C/∂W's two gradients).
All compiler output, no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # compile_report beside this file
import compile_report as report  # noqa: E402  (sets the compiled, untuned mode before torch loads)

import torch  # noqa: E402

ROLES = {"fwd": "gated_forward", "dX": "gated_grad_x", "dW": "gated_grad_weight"}


def package_launches(gated, M, K, N, dtype, quick):
    """label -> (role, kernel, args, kwargs without tile or launch options): the launches of one gated layer."""
    from manualbp.triton_kernels import launch

    meta = dict(device="meta", dtype=dtype)
    x, w_gate, w_up = torch.empty(M, K, **meta), torch.empty(N, K, **meta), torch.empty(N, K, **meta)
    bias = torch.empty(N, **meta)
    g, z_gate, z_up = (torch.empty(M, N, **meta) for _ in range(3))
    ids = {"silu": 5, "gelu": 3, "gelu_tanh": 4, "relu": 1}

    def fwd(act, biases=False, save=True):
        b = bias if biases else None
        return lambda: gated.gated_forward(x, w_gate, w_up, b, b, ids[act], 0.0, save)

    def bwd(act, needs, in_loads=True):  # δ_g, δ_u formed in the loads, or stored (one kernel for every f)
        return lambda: gated.gated_backward(g, x, w_gate, w_up, None, None, z_gate, z_up, ids[act], 0.0, needs,
                                            delta_in_loads=in_loads)

    launches = [
        ("fwd silu (A, Z)", fwd("silu")), ("fwd silu (A)", fwd("silu", save=False)),
        ("fwd gelu (A, Z)", fwd("gelu")), ("fwd gelu_tanh+bias (A, Z)", fwd("gelu_tanh", biases=True)),
        ("fwd silu (Z: recompute)", lambda: gated._recomputed(x, w_gate, w_up, None, None, ids["silu"], 0.0)),
        ("dX silu", bwd("silu", (True, False, False, False, False))),
        ("dX gelu", bwd("gelu", (True, False, False, False, False))),
        ("dW silu", bwd("silu", (False, True, True, False, False))),
        ("dW gelu", bwd("gelu", (False, True, True, False, False))),
        ("dW+db gelu_tanh", bwd("gelu_tanh", (False, True, True, True, True))),
        ("dX δ stored", bwd("silu", (True, False, False, False, False), in_loads=False)),
        ("dW δ stored", bwd("silu", (False, True, True, False, False), in_loads=False)),
        ("dW+db δ stored", bwd("silu", (False, True, True, True, True), in_loads=False)),
    ]
    if quick:
        launches = [launch_ for launch_ in launches
                    if launch_[0] in ("fwd silu (A, Z)", "dX silu", "dW silu", "dX δ stored")]
    recorders = {role: report._Recorder(getattr(gated, name)) for role, name in gated._KERNELS.items()}
    launch_gate = gated._launch_gate  # the stored plan's elementwise δ pass: not a matmul, not reported
    gated._launch_gate = lambda z_gate, *rest: (torch.empty_like(z_gate), torch.empty_like(z_gate))
    out = {}
    try:
        for role, recorder in recorders.items():
            setattr(gated, gated._KERNELS[role], recorder)
        for label, call in launches:
            launch.PLANS.clear()  # every launch builds its plan: the kernel (a recorder) is called with its flags
            for recorder in recorders.values():
                recorder.calls.clear()
            call()
            for role, recorder in recorders.items():
                for _number, args, kwargs in recorder.calls:
                    kwargs = {k: v for k, v in kwargs.items() if k not in report.TILE_KEYS + report.LAUNCH_KEYS}
                    out[label] = (role, recorder.real, args, kwargs)
    finally:
        for role, recorder in recorders.items():
            setattr(gated, gated._KERNELS[role], recorder.real)
        gated._launch_gate = launch_gate
        launch.PLANS.clear()
    return out


def sweep_configs(dtype, role, tiles=None):
    """A wider list of tiles than the shipped ones, to choose them from (--sweep; or tiles, --tiles): not pruned by
    shared memory (the smem column says what each takes), the forward's at 1, 2 and 4 epilogue slices."""
    import triton

    if tiles:
        pass
    elif dtype == torch.float32:
        tiles = [(64, 64, 16, 4, 3), (64, 128, 16, 4, 3), (64, 128, 16, 8, 3), (128, 64, 16, 8, 3),
                 (128, 128, 16, 8, 3), (32, 64, 16, 4, 3), (64, 64, 16, 8, 3), (32, 128, 16, 4, 3)]
    else:
        tiles = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 2), (128, 128, 32, 8, 4), (64, 256, 64, 8, 3),
                 (128, 256, 64, 8, 2), (64, 128, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 4),
                 (64, 128, 32, 4, 4), (64, 64, 64, 4, 4), (128, 128, 128, 8, 2), (64, 256, 32, 8, 4)]
    splits = (1, 2, 4) if role == "gated_forward" else (None,)
    return [triton.Config(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8,
                               **({} if e is None else dict(EPILOGUE_SPLIT=e))), num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles for e in splits]


def configs_for(gated, dense, role, args, kwargs, arch, sweep, dtype):
    """The configs the autotuner could pick for this launch on the target (pruned as it prunes), or the sweep's
    (sweep: True, or a list of (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages))."""
    configs = (sweep_configs(dtype, role, sweep if isinstance(sweep, list) else None) if sweep
               else gated.matmul_configs(role, dtype.itemsize, kwargs.get("INPUT_PRECISION") == "tf32",
                                         kwargs.get("DELTAS_STORED", False)))
    budget = 1 << 30 if sweep else report.SHARED_MEMORY.get(arch, report.SHARED_MEMORY[80])
    saved = dense._shared_memory_bytes
    dense._shared_memory_bytes = lambda index: budget
    try:
        names = dict(zip(getattr(gated, gated._KERNELS[role]).arg_names, args))
        return gated._prune_configs(role, configs, names, **kwargs)
    finally:
        dense._shared_memory_bytes = saved


def run(arch, only, quick, sweep, M, K, N, dtype, progress=print, tf32=False):
    tri = report.internals()
    import platform

    import triton

    from manualbp.triton_kernels import dense, gated

    compiler = report.Compiler(tri, arch)
    header = dict(triton=triton.__version__, torch=torch.__version__, ptxas=report.ptxas_version(tri["ptxas"]),
                  python=platform.python_version(), target=f"sm_{arch}", problem=f"GatedMLP {K}->{N}, M={M}",
                  dtype=str(dtype).replace("torch.", ""), notes=list(tri["notes"]),
                  figures="compiler output (no GPU run); no timing")
    inline_ptx, precision = dense._inline_ptx, gated._precision
    dense._inline_ptx = lambda device: True  # compiled for an NVIDIA target
    if tf32:  # as on that GPU with TF32 allowed (meta tensors are not CUDA ones): the launchers' K-major copies
        gated._precision = lambda like: (True, True, arch // 10 == 9) if like.dtype is torch.float32 \
            else precision(like)
    try:
        launches = package_launches(gated, M, K, N, dtype, quick)
    finally:
        dense._inline_ptx, gated._precision = inline_ptx, precision
    rows = []
    for label, (role, kernel, args, kwargs) in launches.items():
        if only and not any(part in label for part in only.split(",")):
            continue
        if tf32:  # what a float32 launch compiles to where PyTorch's settings allow TF32 (dense.tf32_allowed)
            kwargs = dict(kwargs, INPUT_PRECISION="tf32")
        configs = configs_for(gated, dense, role, args, kwargs, arch, sweep, dtype)
        if quick:
            configs = configs[:1]
        for config in configs:
            row = dict(kernel=label, config=report.config_label(config))
            launch = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            start = time.perf_counter()
            try:
                row.update(report.analyse(*compiler.compile(kernel, args, launch)))
            except Exception as error:  # noqa: BLE001 - report it and go on with the next one
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
            row["compile_s"] = round(time.perf_counter() - start, 1)
            if "loop_instr" in row and row.get("loop_mma"):
                row["press"] = report.issue_pressure(row, config, 2, arch, tf32)
            rows.append(row)
            progress(report.format_row(row))
    return header, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", help="compute capability (default 90)")
    parser.add_argument("--only", default="", help="comma list of substrings of launch labels (fwd, dX, dW, silu)")
    parser.add_argument("--quick", action="store_true", help="silu's three kernels at their first config")
    parser.add_argument("--sweep", action="store_true", help="the wider tile list of sweep_configs, not the shipped")
    parser.add_argument("--tiles", default="", help="with --sweep: these tiles only, 'M,N,K,warps,stages;...'")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "tf32"],
                        help="tf32: float32 data with TF32 products (where PyTorch's settings allow them)")
    parser.add_argument("--shape", default="8192,4096,11008", help="M,K,N: rows, hidden, intermediate")
    parser.add_argument("--json", default="", help="write the header and rows as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--out-dir", default="", help="write compile_report_gated_sm<arch>_triton-<v>[_<dtype>]"
                                                      ".{txt,json} here")
    args = parser.parse_args(argv)
    M, K, N = (int(v) for v in args.shape.split(","))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[args.dtype]
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    arch = int(args.arch)
    try:
        sweep = [tuple(int(v) for v in tile.split(",")) for tile in args.tiles.split(";")] if args.tiles else args.sweep
        header, rows = run(arch, args.only, args.quick, sweep, M, K, N, dtype, progress=progress,
                           tf32=args.dtype == "tf32")
        header["dtype"] += " (TF32 products)" if args.dtype == "tf32" else ""
    except report.Unavailable as reason:
        print(f"compile_report_gated: unavailable: {reason}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(unavailable=str(reason)), f)
        return 0
    print(report.table(header, rows) + report.summary(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, rows=rows), f, indent=1, ensure_ascii=False)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        suffix = "" if args.dtype == "bf16" else f"_{args.dtype}"
        report.write(os.path.join(args.out_dir, f"compile_report_gated_sm{arch}_triton-{header['triton']}{suffix}"),
                     header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
