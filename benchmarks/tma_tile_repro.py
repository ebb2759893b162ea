"""A minimal reproducer of the excluded TMA tile (docs/kernels.md, "The excluded tile"): its kernel is Triton alone.

    python benchmarks/tma_tile_repro.py            # GPU: every variant against torch in float64, right or wrong
    python benchmarks/tma_tile_repro.py --sm90     # CPU: every variant compiled for sm_90, its compiler features,
                                                   # and manualbp's ∂C/∂X kernel at the same tile beside them
    python benchmarks/tma_tile_repro.py --sm90 --every-config   # manualbp's prologue launches (dense ∂C/∂X and
                                                   # ∂C/∂W, the gated layer's backward) at every config

The kernel has the structure of manualbp's ∂C/∂X launch with δ formed in the loads (_grad_x_kernel with f'(Z)
saved), stripped to the product: a persistent grid (at most one program per SM walking the output tiles in
grouped order), device-side TMA descriptors made once per program (tl.make_tensor_descriptor, as dense._source
makes them), the left tile G loaded by TMA and multiplied elementwise by a second TMA-loaded tile S in registers
(the prologue: δ = G ⊙ S, in the data's dtype), tl.dot into a float32 accumulator, a masked pointer store.
Tile 128x256x64, 8 warps, 3 stages, GROUP_M 8: the config manualbp keeps from its prologue launches.

Variants (VARIANTS):
    tma-prologue       the suspect: TMA loads, the prologue (RS wgmma: δ from registers, B from shared memory)
    tma                control: the same without the multiply (SS wgmma: both operands from shared memory)
    pointer-prologue   control: the same prologue with pointer loads, one program per tile (RS wgmma)

On a GPU each variant runs at manualbp's failing layer shape (∂C/∂X of Linear 1024 -> 4096 at M = 8192: δ [8192,
4096] @ W [4096, 1024]) and at an odd one no tile divides, a few times each (a race need not show every time),
against the float64 product of the same rounded δ; "wrong" where the normwise error max|C - ref| / max|ref| exceeds
8x torch's own (torch.mm in the data's dtype against the same reference) or is not finite. It prints one line per
variant and shape and a verdict line (what follows from it: docs/kernels.md). Exit status 0 either way, 2 without
a CUDA GPU. On the CPU under TRITON_INTERPRET=1 `run_variant` runs in Triton's interpreter (tests/test_tma_repro.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch
import triton
import triton.language as tl


def _toolchain():
    """The package's toolchain rule (triton_kernels/toolchain.py: one fact, one place), loaded from its file
    without importing manualbp: the script stays Triton alone, and --sm90 sets the environment manualbp reads at
    import (compile_report) before anything imports it."""
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "triton_kernels",
                                         "toolchain.py"))
    spec = importlib.util.spec_from_file_location("manualbp_toolchain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOLCHAIN = _toolchain()
rs_hazard, sm90_ptxas_version = TOOLCHAIN.rs_hazard, TOOLCHAIN.sm90_ptxas_version

TILE = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8)
NUM_WARPS, NUM_STAGES = 8, 3
# name -> (PROLOGUE, TMA)
VARIANTS = {"tma-prologue": (True, True), "tma": (False, True), "pointer-prologue": (True, False)}
# (M, N, K) of C [M, N] = (G ⊙ S) [M, K] @ B [K, N]: manualbp's failing ∂C/∂X, and sizes no tile divides (rows of
# 1424 and 2576 bytes in 16-bit types: multiples of 16, which TMA can describe).
SHAPES = [(8192, 1024, 4096), (1000, 1288, 712)]
TOLERANCE_FACTOR = 8  # wrong: over 8x torch's own normwise error against the same float64 reference


@triton.jit
def repro_kernel(g_ptr, s_ptr, b_ptr, c_ptr, M, N, K, stride_gm, stride_sm, stride_bk, stride_cm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 PROLOGUE: tl.constexpr, TMA: tl.constexpr):
    """C = (G ⊙ S) B with PROLOGUE, else G B; G, S [M, K], B [K, N], C [M, N], all rows contiguous."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if TMA:  # descriptors once per program; the persistent walk: tiles program_id, + programs, ...
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, K], strides=[stride_gm, 1], block_shape=[BLOCK_M, BLOCK_K])
        s_desc = tl.make_tensor_descriptor(s_ptr, shape=[M, K], strides=[stride_sm, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_bk, 1], block_shape=[BLOCK_K, BLOCK_N])
        first, last, step = tl.program_id(0), num_pid_m * num_pid_n, tl.num_programs(0)
    else:
        first, last, step = tl.program_id(0), tl.program_id(0) + 1, 1
    for tile in tl.range(first, last, step):
        group = GROUP_M * num_pid_n  # grouped order (Triton's matmul tutorial)
        first_m = (tile // group) * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % group) % group_m
        pid_n = (tile % group) // group_m
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if TMA:  # past the edges TMA fills zeros
                a = g_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
                if PROLOGUE:
                    a = a * s_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
                b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
            else:  # rows and columns past the edge wrapped onto valid ones, never stored; K masked
                cols_k = k * BLOCK_K + offs_k
                rows = (offs_m % M)[:, None]
                mask_k = cols_k < K
                a = tl.load(g_ptr + rows * stride_gm + cols_k[None, :], mask=mask_k[None, :], other=0.0)
                if PROLOGUE:
                    a = a * tl.load(s_ptr + rows * stride_sm + cols_k[None, :], mask=mask_k[None, :], other=0.0)
                b = tl.load(b_ptr + cols_k[:, None] * stride_bk + (offs_n % N)[None, :], mask=mask_k[:, None],
                            other=0.0)
            acc = tl.dot(a, b, acc)
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    return type(repro_kernel).__name__ == "InterpretedFunction"


def _scratch(size: int, alignment: int, stream):
    """Device-side descriptors' scratch memory (triton.set_allocator), from PyTorch's allocator."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def run_variant(name, g, s, b, programs=None):
    """C [M, N] from the variant `name` (VARIANTS) of G, S [M, K] and B [K, N]; programs: the persistent grid's
    size for the TMA variants (default: the GPU's SMs, at most one per tile)."""
    prologue, tma = VARIANTS[name]
    (M, K), N = g.shape, b.shape[1]
    c = torch.empty(M, N, device=g.device, dtype=g.dtype)
    tiles = triton.cdiv(M, TILE["BLOCK_M"]) * triton.cdiv(N, TILE["BLOCK_N"])
    if tma:
        if programs is None:
            programs = torch.cuda.get_device_properties(g.device).multi_processor_count
        grid = (min(programs, tiles),)
        if g.is_cuda:
            triton.set_allocator(_scratch)
    else:
        grid = (tiles,)
    repro_kernel[grid](g, s, b, c, M, N, K, g.stride(0), s.stride(0), b.stride(0), c.stride(0), **TILE,
                       PROLOGUE=prologue, TMA=tma, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return c


def inputs(M, N, K, dtype, device, seed=0):
    """G, S [M, K] (S like a saved f'(Z): in [0, 1.1]) and B [K, N] (like a layer's weight), rows contiguous."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(M, K, generator=gen).to(device, dtype)
    s = (torch.rand(M, K, generator=gen) * 1.1).to(device, dtype)
    b = (torch.randn(K, N, generator=gen) / K ** 0.5).to(device, dtype)
    return g, s, b


def reference(name, g, s, b):
    """The float64 product of the variant's left factor as the kernel rounds it (G ⊙ S in the data's dtype)."""
    a = g * s if VARIANTS[name][0] else g
    return a.double() @ b.double(), a


def normwise_error(c, ref) -> float:
    return ((c.double() - ref).abs().max() / ref.abs().max()).item()


def check(name, g, s, b, repeats, programs=None):
    """(worst normwise error over `repeats` launches, torch.mm's own, right?); programs as run_variant's."""
    ref, a = reference(name, g, s, b)
    torch_error = normwise_error(torch.mm(a, b), ref)
    errors = [normwise_error(run_variant(name, g, s, b, programs), ref) for _ in range(repeats)]
    worst = max(errors, key=lambda e: float("inf") if e != e else e)  # a NaN counts as the worst
    right = worst == worst and worst <= TOLERANCE_FACTOR * max(torch_error, torch.finfo(g.dtype).eps)
    return worst, torch_error, right


def gpu_main(dtypes, repeats) -> int:
    if not torch.cuda.is_available():
        print("tma_tile_repro: no CUDA GPU here (run it on one, or --sm90 to compile for sm_90 on the CPU)")
        return 2
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    ptxas = sm90_ptxas_version()
    print(f"# tma_tile_repro: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), "
          f"triton {triton.__version__}, ptxas {'.'.join(map(str, ptxas)) if ptxas else '?'} for sm_90, torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}; tile {TILE['BLOCK_M']}x{TILE['BLOCK_N']}x{TILE['BLOCK_K']}"
          f" w{NUM_WARPS} s{NUM_STAGES}; {repeats} launches per row; wrong = normwise error > {TOLERANCE_FACTOR}x "
          f"torch.mm's")
    hazard = rs_hazard()
    said = f"yes, {hazard}" if hazard else f"no ({TOOLCHAIN.ISSUE})"
    print(f"# RS wgmma operand hazard on this toolchain: {said}")
    outcome = run_all(device, dtypes, SHAPES, repeats)
    print(f"verdict: {verdict(outcome, hazard)}")
    return 0


def run_all(device, dtypes, shapes, repeats, programs=None) -> dict:
    """Every variant at every dtype and (M, N, K) in shapes, one line each: {variant: [right?, ...]}."""
    outcome = {}
    for dtype in dtypes:
        for M, N, K in shapes:
            g, s, b = inputs(M, N, K, dtype, device)
            for name in VARIANTS:
                start = time.perf_counter()
                worst, torch_error, right = check(name, g, s, b, repeats, programs)
                outcome.setdefault(name, []).append(right)
                print(f"{name:17s} {str(dtype).replace('torch.', ''):8s} M={M:5d} N={N:5d} K={K:5d}  "
                      f"{'right' if right else 'WRONG':5s}  max error {worst:.3e}  (torch.mm {torch_error:.3e})  "
                      f"{time.perf_counter() - start:.1f} s", flush=True)
    return outcome


def verdict(outcome: dict, hazard: str | None) -> str:
    """What a GPU run's outcome (variant -> [right?] per row) says, by docs/kernels.md's rule; hazard: rs_hazard()."""
    wrong = sorted(name for name, rights in outcome.items() if not all(rights))
    if "tma" in wrong:
        return f"the SS control is wrong too ({', '.join(wrong)}): not the RS operand hazard, not this tile alone"
    if wrong and hazard:
        return (f"WRONG in the minimal kernel ({', '.join(wrong)}) on a toolchain with the RS operand hazard "
                f"({hazard}): Triton's (triton-lang/triton issue 9433); exclude on such toolchains only")
    if wrong:
        return (f"WRONG in the minimal kernel ({', '.join(wrong)}) on a toolchain without the known hazard: Triton's, "
                f"not a known issue: report it upstream with this script")
    if hazard:
        return (f"right this time on a toolchain with the RS operand hazard ({hazard}): the race was not lost; "
                f"no reason to lift the exclusion")
    return ("right in the minimal kernel, no known hazard: if manualbp's tile is wrong on this machine "
            "(MANUALBP_CHECK_EXCLUDED_TILE=1 tests), the fault is manualbp's")


# --------------------------------------------------------------------------------------
# Compiled for sm_90 on the CPU: the variants' compiler features, and manualbp's kernel beside them
# --------------------------------------------------------------------------------------


def _compile_report():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compile_report  # the repo's offline sm_90 compiler driver (imports no manualbp by itself)

    return compile_report


def ptx_features(ptx: str) -> dict:
    """Counts in the PTX that tell the synchronisation around the MMAs: wgmma waits, CTA barriers, TMA issues."""
    import re

    return dict(wgmma_wait=len(re.findall(r"wgmma\.wait_group", ptx)),
                bar_sync=len(re.findall(r"\b(?:bar|barrier)\.sync\b|\bbarrier\.cta\.sync\b", ptx)),
                mbarrier_wait=len(re.findall(r"mbarrier\.try_wait", ptx)))


# Instructions with no destination register (stores, barriers, branches, waits; an HGMMA's is its accumulator).
NO_DESTINATION = ("ST", "BAR", "BRA", "WARPGROUP", "HGMMA", "SYNCS", "UTMA", "MEMBAR", "FENCE", "DEPBAR", "LDGDEPBAR",
                  "NOP", "EXIT", "WARPSYNC", "ELECT", "RED", "ATOM", "CCTL", "ERRBAR", "UBLKCP")


def rs_operand_overwrites(loop: list) -> int:
    """Writes, in a main loop's SASS (compile_report.main_loop_body), to a register a register-sourced HGMMA (RS
    wgmma) may still be reading: the PTX ISA leaves it undefined to modify wgmma's A registers before a
    wgmma.wait_group covers that wgmma (triton-lang/triton issue 9433).

    The body is walked twice, the second time counting (the back edge: the next iteration's loads land in the
    registers of this one's last MMAs). An HGMMA joins the open group, which `gsb0` closes; WARPGROUP.DEPBAR.LE
    gsb0, N leaves the last N closed groups pending; an instruction whose destination registers (4 for a .4 or
    .128 load, 2 for .2 or .64, else 1) meet the A registers (4 from the named one) of a pending group counts once."""
    import re

    pending, open_group, hits = [], set(), 0
    for n, line in enumerate(loop + loop):
        op = line.split()[0]
        if op.startswith("HGMMA"):
            a = re.match(r"\S+\s+R\d+,\s+R(\d+),", line)  # A from registers (RS); SS names a descriptor
            if a:
                open_group |= {int(a.group(1)) + j for j in range(4)}
            if "gsb0" in line:
                pending.append(open_group)
                open_group = set()
        elif op.startswith("WARPGROUP.DEPBAR"):
            keep = int(re.search(r"0x([0-9a-f]+)", line).group(1), 16)
            pending = pending[max(0, len(pending) - keep):] if keep else []
        elif n >= len(loop) and not op.startswith(NO_DESTINATION):
            dest = re.match(r"\S+\s+R(\d+)", line)
            if dest:
                width = 4 if re.search(r"\.(4|128)\b", op) else 2 if re.search(r"\.(2|64)\b", op) else 1
                written = {int(dest.group(1)) + j for j in range(width)}
                hits += any(written & group for group in pending)
    return hits


def compile_variants(dtype=torch.bfloat16, M=8192, N=1024, K=4096, progress=print) -> list:
    """Each variant compiled for sm_90 by this Triton: rows of compile_report.analyse's columns plus ptx_features."""
    cr = _compile_report()
    tri = cr.internals()  # raises cr.Unavailable (no ptxas, Triton internals moved)
    compiler = cr.Compiler(tri, 90)
    meta = dict(device="meta", dtype=dtype)
    g, s, b, c = (torch.empty(M, K, **meta), torch.empty(M, K, **meta), torch.empty(K, N, **meta),
                  torch.empty(M, N, **meta))
    rows = []
    for name, (prologue, tma) in VARIANTS.items():
        args = (g, s, b, c, M, N, K, g.stride(0), s.stride(0), b.stride(0), c.stride(0))
        options = dict(TILE, PROLOGUE=prologue, TMA=tma, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                       enable_fp_fusion=True)
        rows.append(_compiled_row(cr, compiler, f"repro {name}", repro_kernel, args, options))
        progress(_format(rows[-1]))
    return rows


def _compiled_row(cr, compiler, label, fn, args, options) -> dict:
    start = time.perf_counter()
    row = dict(kernel=label)
    try:
        kernel, log = compiler.compile(fn, args, options)
        row.update(cr.analyse(kernel, log), **ptx_features(kernel.asm["ptx"]))
        row["rs_overwrites"] = rs_operand_overwrites(cr.main_loop_body(kernel.asm["sass"]))
    except Exception as error:  # noqa: BLE001 - reported in the row
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    row["compile_s"] = round(time.perf_counter() - start, 1)
    return row


def compile_ours(dtype=torch.bfloat16, M=8192, K=1024, N=4096, every_config=False, progress=print) -> list:
    """manualbp's ∂C/∂X launch with δ in the loads (gelu: δ = G ⊙ f'(Z), as the reproducer; relu: a select),
    captured from its launcher as compile_report does, compiled at the excluded tile, the exclusion lifted, and at
    the pointer tile of the same shape; with every_config, the gelu ∂C/∂X and the relu ∂C/∂W (δ in the loads, ∂C/∂b
    beside it) launches at every 16-bit config of matmul_configs() that the launch can take (∂C/∂W's: K steps of
    ∂C/∂b's), the exclusion and the shared-memory pruning lifted. Not part of the reproducer: the comparison only."""
    cr = _compile_report()
    tri = cr.internals()
    compiler = cr.Compiler(tri, 90)
    import manualbp
    from manualbp.triton_kernels import dense, jvp

    saved = dense._inline_ptx, dense._num_sms, torch.cuda.get_device_capability
    dense._inline_ptx = lambda device: True
    dense._num_sms = lambda device: 132
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    try:
        with manualbp.config.override(tma=True):
            launches = cr.package_launches(dense, jvp, M, K, N, dtype, quick=False)
    finally:
        dense._inline_ptx, dense._num_sms, torch.cuda.get_device_capability = saved
    configs = dense.matmul_configs()
    excluded = [cfg for cfg in configs if dense._tma_prologue_excluded(cfg)][:1]
    pointer = [cfg for cfg in configs if not cfg.kwargs.get("TMA", False) and cfg.num_warps == excluded[0].num_warps
               and all(cfg.kwargs[k] == excluded[0].kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))][:1]
    if every_config:
        # (not the warp-specialized configs: each partition has loops of its own, and main_loop_body picks one loop;
        # where this hazard is, rs_operand_hazard sends these launches to the δ pass, whatever the config)
        sixteen_bit = [cfg for cfg in configs if cfg.kwargs["BLOCK_K"] != dense.WIDE_SUM_BLOCK_K.value
                       and not cfg.kwargs.get("WARP_SPECIALIZE", False)]
        sums_block_k = dense._sum_block_k(dtype, True)  # ∂C/∂b's K step: the configs that can take it
        plan = {"dX prologue gelu": sixteen_bit,
                "dW prologue+db relu": [cfg for cfg in sixteen_bit if dense._sums_in_k_steps_of(cfg, sums_block_k)]}
    else:
        plan = {label: excluded + pointer for label in ("dX prologue gelu", "dX prologue relu")}
    rows = []
    for label, label_configs in plan.items():
        kernel, args, kwargs, _, _ = launches[label]
        for config in label_configs:
            options = dict(kwargs, **dense._tile_for(kernel.__name__, config.kwargs), num_warps=config.num_warps,
                           num_stages=config.num_stages)
            tag = cr.config_label(config) if every_config else (
                "tma" if config.kwargs.get("TMA", False) else "pointer")
            rows.append(_compiled_row(cr, compiler, f"manualbp {label} ({tag})", kernel, args, options))
            progress(_format(rows[-1]))
    return rows


GATED_BACKWARD = ("dX silu", "dW silu", "dW+db gelu_tanh")  # compile_report_gated's labels: δ_g, δ_u in the loads


def compile_gated(dtype=torch.bfloat16, M=8192, K=4096, N=11008, every_config=False, progress=print) -> list:
    """The gated layer's backward launches (δ_g, δ_u formed in both matmuls' operand loads: RS wgmma), captured as
    benchmarks/compile_report_gated.py captures them (GatedMLP 4096 -> 11008), compiled at the first config the
    autotuner keeps for each, or with every_config at every one. Not part of the reproducer: the comparison only."""
    cr = _compile_report()
    tri = cr.internals()
    compiler = cr.Compiler(tri, 90)
    import compile_report_gated as crg
    from manualbp.triton_kernels import dense, gated

    saved = dense._inline_ptx
    dense._inline_ptx = lambda device: True
    try:
        launches = crg.package_launches(gated, M, K, N, dtype, quick=False)
    finally:
        dense._inline_ptx = saved
    rows = []
    for label in GATED_BACKWARD:
        role, kernel, args, kwargs = launches[label]
        configs = crg.configs_for(gated, dense, role, args, kwargs, 90, False, dtype)
        for config in configs if every_config else configs[:1]:
            options = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            rows.append(_compiled_row(cr, compiler, f"manualbp gated {label} ({cr.config_label(config)})", kernel,
                                      args, options))
            progress(_format(rows[-1]))
    return rows


COLUMNS = ("mma", "A", "regs", "spill", "bufs", "tma", "cp_async", "loop_instr", "loop_mma", "loop_bar", "loop_tma",
           "wgmma_wait", "bar_sync", "mbarrier_wait", "rs_overwrites", "compile_s")


def _format(row) -> str:
    if "error" in row:
        return f"{row['kernel']:42s} ERROR {row['error']}"
    cells = []
    for key in COLUMNS:
        value = row.get(key, "-")
        if key == "bufs":
            value = "/".join(value) if value else "-"
        cells.append(f"{key}={value}")
    return f"{row['kernel']:42s} " + " ".join(cells)


def sm90_main(with_ours: bool, every_config: bool, json_path: str) -> int:
    import json

    cr = _compile_report()
    try:
        cr.internals()
    except cr.Unavailable as reason:
        print(f"tma_tile_repro --sm90: unavailable: {reason}")
        report = dict(unavailable=str(reason))
    else:
        ptxas = sm90_ptxas_version()
        print(f"# tma_tile_repro --sm90: triton {triton.__version__}, ptxas {'.'.join(map(str, ptxas or '?'))}, "
              f"compiled for sm_90 on the CPU (compiler output, no run); bf16; loop_* = the SASS main loop (compile_report.main_loop), the rest whole-kernel PTX "
              f"counts; rs_overwrites = rs_operand_overwrites", flush=True)
        rows = compile_variants() + (compile_ours(every_config=every_config) + compile_gated(
            every_config=every_config) if with_ours else [])
        report = dict(triton=triton.__version__, ptxas=ptxas, rows=rows)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sm90", action="store_true", help="compile the variants for sm_90 here (no GPU needed)")
    parser.add_argument("--no-ours", action="store_true", help="with --sm90: not manualbp's kernel beside them")
    parser.add_argument("--every-config", action="store_true",
                        help="with --sm90: manualbp's prologue launches at every config, not the excluded tile's")
    parser.add_argument("--json", default="", help="with --sm90: write the rows as JSON to this file")
    parser.add_argument("--dtypes", default="bf16,fp16", help="GPU run: comma list of bf16, fp16")
    parser.add_argument("--repeats", type=int, default=5, help="GPU run: launches per variant and shape")
    args = parser.parse_args(argv)
    if args.sm90:
        return sm90_main(not args.no_ours, args.every_config, args.json)
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16}[d] for d in args.dtypes.split(",")]
    return gpu_main(dtypes, args.repeats)


if __name__ == "__main__":
    sys.exit(main())
