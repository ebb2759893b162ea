"""Triton kernels and launchers of the gated layer (SwiGLU, GEGLU, ...).

The equations are stated once, with shapes, in ``manualbp/gated_reference.py``. With
x [M, K], gate_weight and up_weight [I, K], biases [I]:

    forward     Z_g = X W_gᵀ + b_g, Z_u = X W_uᵀ + b_u    _gated_forward_kernel: both products in one K loop
                A = f(Z_g) ⊙ Z_u                           (two accumulators), biases and the gating in the
                                                           epilogue, which stores A and, for the backward,
                                                           Z_g and Z_u (WRITE_Z); recompute=True: not stored,
                                                           the backward launches this kernel for Z alone
    backward    δ_g = G ⊙ Z_u ⊙ f'(Z_g), δ_u = G ⊙ f(Z_g)  up to dense.PROLOGUE_MAX_K in_features: formed in the
                                                           operand loads of both matmuls (_deltas), never stored;
                                                           above it, or where toolchain.rs_operand_hazard says
                                                           so (RS wgmma miscompiled): stored once by _gate_kernel
                                                           and read by the same matmuls (DELTAS_STORED)
                ∂C/∂X = δ_g W_g + δ_u W_u    [M, K]        _gated_grad_x_kernel: one accumulator, one loop over I
                ∂C/∂W_g = δ_gᵀ X, ∂C/∂W_u = δ_uᵀ X [I, K]  _gated_grad_weight_kernel: two accumulators, one
                ∂C/∂b_g = 1ᵀ δ_g, ∂C/∂b_u = 1ᵀ δ_u   [I]   loop over M; it also sums the δᵀ rows it loads
                                                           (∂C/∂b) in fixed steps of SUM_STEP, the dense layer's
                                                           row sums: the same bits on every tile, in both plans
    jvp         dZ = dX Wᵀ + X dWᵀ + db (each)             the dense layer's jvp kernel with identity (jvp.py)
                dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u  _gated_tangent_kernel, elementwise
    the gating alone (projections run as modules: GatedMLP with hooks, adapters or quantized weights)
                A, or (δ_g, δ_u) from G                    _gate_kernel, elementwise, the same _gate / _deltas

Rounding follows eager ``act(gate(x)) * up(x)`` step by step (each intermediate rounded to
the data dtype where eager stores one: Z_g, Z_u, f(Z_g), G ⊙ Z_u, the δ's), computed in
float32 (float64 for float64 data); for float32 and float64 data the roundings are exact.
f and f' are the dense kernels' (``triton_kernels/activations.py``), the matmul step
``dense._tile_dot``, the tile order ``dense._tile_position``.

Every launch goes through a launch plan (``launch.run``; roles "gated_forward", "gated_grad_x",
"gated_grad_weight", "gated_gate", "gated_tangent") as the dense layer's do: what a launch's flags decide with its
use of tl.dot and the settings is cached (``_Setup``, made again after a ``config.set()``), the plan's make
is a module-level function passed with its arguments (no closure a call), no device guard (``launch.run`` switches
to the tensors' GPU itself), outputs are new contiguous tensors whose strides are not asked: a warm call is the
arguments, one setup lookup and launch.run's lookup and launch. The matmul kernels
name their tiles as a matmul's (output [BLOCK_M, BLOCK_N], K step BLOCK_K along the contracted dimension,
whichever that is), so one config means one tile in every role. On a GPU they autotune per M/N/K bucket among
:func:`matmul_configs`, spill-free tiles chosen from the offline sm_90 compile report
(benchmarks/compile_report_gated.py), pruned by shared memory; the interpreter and float64 keep the dense
layer's fixed tiles (``dense._fixed_config``). Speed on a GPU: not measured yet.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import config
from . import activations as act
from . import dense, jvp, launch, toolchain

# --------------------------------------------------------------------------------------
# Shared parts
# --------------------------------------------------------------------------------------


@triton.jit
def _compute(x, ACC_FP64: tl.constexpr):
    """x in the compute dtype: float64 for float64 data, float32 otherwise."""
    if ACC_FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _rounded(x, DTYPE: tl.constexpr, ACC_FP64: tl.constexpr):
    """x rounded to the data dtype and back: what a stored intermediate holds (exact for float32/float64)."""
    return _compute(x.to(DTYPE), ACC_FP64)


@triton.jit
def _gate(z_gate, z_up, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, DTYPE: tl.constexpr,
          ACC_FP64: tl.constexpr):
    """A = f(Z_g) ⊙ Z_u for one tile (compute dtype in, DTYPE out), f(Z_g) rounded as eager stores it."""
    activated = _rounded(act.f(z_gate, ACTIVATION, NEGATIVE_SLOPE), DTYPE, ACC_FP64)
    return (activated * z_up).to(DTYPE)


@triton.jit
def _deltas(grad_a, z_gate, z_up, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, ACC_FP64: tl.constexpr):
    """(δ_g, δ_u) = (G ⊙ Z_u ⊙ f'(Z_g), G ⊙ f(Z_g)) for one tile of G, Z_g, Z_u (any layout: elementwise), in G's
    dtype: G' = G ⊙ Z_u, f(Z_g) and both δ rounded to it as eager rounds each (reference: gated_reference.deltas)."""
    dtype: tl.constexpr = grad_a.dtype
    g = _compute(grad_a, ACC_FP64)
    z_gate = _compute(z_gate, ACC_FP64)
    gate_grad = _rounded(g * _compute(z_up, ACC_FP64), dtype, ACC_FP64)  # G' = G ⊙ Z_u, the G of f
    delta_gate = act.delta(gate_grad, z_gate, ACTIVATION, NEGATIVE_SLOPE)  # G' ⊙ f'(Z_g)
    delta_up = g * _rounded(act.f(z_gate, ACTIVATION, NEGATIVE_SLOPE), dtype, ACC_FP64)  # G ⊙ f(Z_g)
    return delta_gate.to(dtype), delta_up.to(dtype)


@triton.jit
def _load_deltas(grad_a_ptr, z_gate_ptr, z_up_ptr, rows, cols, stride_g_row, stride_g_col, stride_zg_row,
                 stride_zg_col, stride_zu_row, stride_zu_col, mask,
                 ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, ACC_FP64: tl.constexpr,
                 DELTAS_STORED: tl.constexpr):
    """(δ_g, δ_u) of the tile rows × cols (the backward matmuls' operand loads): formed as G, Z_g, Z_u load, or,
    with DELTAS_STORED, δ_g and δ_u themselves, stored by _gate_kernel, in the first two slots (the third not read).
    The same values either way: _gate_kernel forms them by the same _deltas, rounded to G's dtype as here.

    rows, cols: offsets along the tile's two axes; each tensor's strides along them: (stride_m, stride_n) for a
    [M, N] tile, (stride_n, stride_m) for its transpose."""
    first = tl.load(grad_a_ptr + rows[:, None] * stride_g_row + cols[None, :] * stride_g_col, mask=mask, other=0.0)
    second = tl.load(z_gate_ptr + rows[:, None] * stride_zg_row + cols[None, :] * stride_zg_col, mask=mask,
                     other=0.0)
    if DELTAS_STORED:
        delta_gate, delta_up = first, second
    else:
        z_up = tl.load(z_up_ptr + rows[:, None] * stride_zu_row + cols[None, :] * stride_zu_col, mask=mask,
                       other=0.0)
        delta_gate, delta_up = _deltas(first, second, z_up, ACTIVATION, NEGATIVE_SLOPE, ACC_FP64)
    return delta_gate, delta_up


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


# ∂C/∂b's step along M in the ∂C/∂W kernel, whatever its BLOCK_K: float32 and float64 data sum in registers, one
# running sum per column of the step, then the dense layer's fixed tree over them (its width, dense.WIDE_SUM_LEVELS);
# 16-bit data by the tensor cores, δ [BLOCK_M, SUM_STEP] times a tile of ones per step. It divides every gated
# BLOCK_K (16 and 32, the fixed tiles' too), so no tile changes the order of the sums. (The dense layer's 16-bit
# step, dense.SUM_BLOCK_K = 64, would need K steps of 64 here: those spilled, compile report.)
SUM_STEP = dense.WIDE_SUM_BLOCK_K


@triton.jit
def _gated_forward_kernel(
    x_ptr,  # X [M, K]
    gate_weight_ptr, up_weight_ptr,  # W_g, W_u [N, K] (N = I), read as Wᵀ [K, N] through their strides
    gate_bias_ptr, up_bias_ptr,  # b_g, b_u [N]; read only with HAS_GATE_BIAS / HAS_UP_BIAS
    a_ptr,  # A [M, N]; written with WRITE_A
    z_gate_ptr, z_up_ptr,  # Z_g, Z_u [M, N]; written with WRITE_Z
    M, N, K,
    tune_m, tune_n, tune_k,  # M, N, K rounded up to the autotuner's buckets (dense._tuning_bucket): its key, not read
    stride_xm, stride_xk, stride_gwn, stride_gwk, stride_uwn, stride_uwk, stride_gb, stride_ub,
    stride_am, stride_an, stride_zgm, stride_zgn, stride_zum, stride_zun,
    HAS_GATE_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # kernel id of f
    NEGATIVE_SLOPE: tl.constexpr,  # leaky_relu's slope (unused otherwise)
    WRITE_A: tl.constexpr,  # False: Z alone (the backward's recompute)
    WRITE_Z: tl.constexpr,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,  # the epilogue works on this many column slices of the tile (1, 2, 4 or 8)
):
    pid_m, pid_n = dense._tile_position(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m, mask_n = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    gate_ptrs = gate_weight_ptr + offs_k[:, None] * stride_gwk + offs_n[None, :] * stride_gwn
    up_ptrs = up_weight_ptr + offs_k[:, None] * stride_uwk + offs_n[None, :] * stride_uwn
    if ACC_FP64:
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros_like(acc_gate)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        mask_k = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        gate_w = tl.load(gate_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        up_w = tl.load(up_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc_gate = dense._tile_dot(x, gate_w, acc_gate, USE_DOT, INPUT_PRECISION)  # X W_gᵀ
        acc_up = dense._tile_dot(x, up_w, acc_up, USE_DOT, INPUT_PRECISION)  # X W_uᵀ, the same X tile
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_gwk
        up_ptrs += BLOCK_K * stride_uwk
    # The epilogue in EPILOGUE_SPLIT column slices, one after the other (as the dense forward's): the gating of
    # two whole large tiles at once, beside both accumulators, would spill registers.
    slice_n: tl.constexpr = BLOCK_N // EPILOGUE_SPLIT
    gate_parts = dense._column_slices(acc_gate, EPILOGUE_SPLIT)
    up_parts = dense._column_slices(acc_up, EPILOGUE_SPLIT)
    for i in tl.static_range(EPILOGUE_SPLIT):
        part_n = pid_n.to(tl.int64) * BLOCK_N + i * slice_n + tl.arange(0, slice_n)
        _gated_epilogue(gate_parts[i], up_parts[i], offs_m, part_n, M, N, gate_bias_ptr, up_bias_ptr, stride_gb,
                        stride_ub, a_ptr, stride_am, stride_an, z_gate_ptr, stride_zgm, stride_zgn, z_up_ptr,
                        stride_zum, stride_zun, HAS_GATE_BIAS, HAS_UP_BIAS, ACTIVATION, NEGATIVE_SLOPE, WRITE_A,
                        WRITE_Z, ACC_FP64)


@triton.jit
def _gated_epilogue(acc_gate, acc_up, offs_m, offs_n, M, N, gate_bias_ptr, up_bias_ptr, stride_gb, stride_ub,
                    a_ptr, stride_am, stride_an, z_gate_ptr, stride_zgm, stride_zgn, z_up_ptr, stride_zum,
                    stride_zun, HAS_GATE_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                    NEGATIVE_SLOPE: tl.constexpr, WRITE_A: tl.constexpr, WRITE_Z: tl.constexpr,
                    ACC_FP64: tl.constexpr):
    """The forward on acc_gate = X W_gᵀ, acc_up = X W_uᵀ for rows offs_m, columns offs_n: Z = acc + b, rounded to
    the data dtype as stored (the backward reads the stored Z), A = f(Z_g) ⊙ Z_u."""
    dtype: tl.constexpr = a_ptr.dtype.element_ty
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if HAS_GATE_BIAS:
        acc_gate += tl.load(gate_bias_ptr + offs_n * stride_gb, mask=mask_n, other=0.0)[None, :].to(acc_gate.dtype)
    if HAS_UP_BIAS:
        acc_up += tl.load(up_bias_ptr + offs_n * stride_ub, mask=mask_n, other=0.0)[None, :].to(acc_up.dtype)
    z_gate = acc_gate.to(dtype)
    z_up = acc_up.to(dtype)
    if WRITE_Z:
        tl.store(z_gate_ptr + offs_m[:, None] * stride_zgm + offs_n[None, :] * stride_zgn, z_gate, mask=mask)
        tl.store(z_up_ptr + offs_m[:, None] * stride_zum + offs_n[None, :] * stride_zun, z_up, mask=mask)
    if WRITE_A:
        a = _gate(_compute(z_gate, ACC_FP64), _compute(z_up, ACC_FP64), ACTIVATION, NEGATIVE_SLOPE, dtype, ACC_FP64)
        tl.store(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an, a, mask=mask)


@triton.jit
def _gated_grad_x_kernel(
    grad_a_ptr, z_gate_ptr, z_up_ptr,  # G, Z_g, Z_u [M, N] (N = I, the contracted dimension here); with
                                       # DELTAS_STORED δ_g, δ_u in the first two, the third not read (_load_deltas)
    gate_weight_ptr, up_weight_ptr,  # W_g, W_u [N, K]
    out_ptr,  # ∂C/∂X [M, K]
    M, N, K,
    tune_m, tune_n, tune_k,  # the autotuner's key (_gated_forward_kernel), not read
    stride_gm, stride_gn, stride_zgm, stride_zgn, stride_zum, stride_zun,
    stride_gwn, stride_gwk, stride_uwn, stride_uwk, stride_om, stride_ok,
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
    DELTAS_STORED: tl.constexpr,  # δ_g, δ_u read as stored (ACTIVATION then not read), not formed on load
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ∂C/∂X = δ_g W_g + δ_u W_u, both products in one accumulator over N. Tiles named as a matmul's (the launch
    # plan's and the autotune configs' names): the output tile [BLOCK_M, BLOCK_N] spans M x K, the loop steps
    # BLOCK_K along the contracted N.
    pid_m, pid_k = dense._tile_position(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m, mask_k = offs_m < M, offs_k < K
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_K)):
        cols = n * BLOCK_K + offs_n
        mask_rows = mask_m[:, None] & (cols < N)[None, :]
        delta_gate, delta_up = _load_deltas(grad_a_ptr, z_gate_ptr, z_up_ptr, offs_m, cols, stride_gm, stride_gn,
                                            stride_zgm, stride_zgn, stride_zum, stride_zun, mask_rows,
                                            ACTIVATION, NEGATIVE_SLOPE, ACC_FP64, DELTAS_STORED)
        mask_w = (cols < N)[:, None] & mask_k[None, :]
        gate_w = tl.load(gate_weight_ptr + cols[:, None] * stride_gwn + offs_k[None, :] * stride_gwk, mask=mask_w,
                         other=0.0)
        up_w = tl.load(up_weight_ptr + cols[:, None] * stride_uwn + offs_k[None, :] * stride_uwk, mask=mask_w,
                       other=0.0)
        acc = dense._tile_dot(delta_gate, gate_w, acc, USE_DOT, INPUT_PRECISION)  # δ_g W_g
        acc = dense._tile_dot(delta_up, up_w, acc, USE_DOT, INPUT_PRECISION)  # + δ_u W_u
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _gated_grad_weight_kernel(
    grad_a_ptr, z_gate_ptr, z_up_ptr,  # G, Z_g, Z_u [M, N], read as their transposes [N, M]; with DELTAS_STORED
                                       # δ_g, δ_u in the first two, the third not read (_load_deltas)
    x_ptr,  # X [M, K]; read only with WANT_GATE_WEIGHT or WANT_UP_WEIGHT
    gate_out_ptr, up_out_ptr,  # ∂C/∂W_g, ∂C/∂W_u [N, K]
    gate_bias_out_ptr, up_bias_out_ptr,  # ∂C/∂b_g, ∂C/∂b_u [N] (compute dtype), stored by the first column of tiles
    M, N, K,
    tune_m, tune_n, tune_k,  # the autotuner's key (_gated_forward_kernel), not read
    stride_gm, stride_gn, stride_zgm, stride_zgn, stride_zum, stride_zun, stride_xm, stride_xk,
    stride_gon, stride_gok, stride_uon, stride_uok,
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
    DELTAS_STORED: tl.constexpr,  # δ_g, δ_u read as stored (ACTIVATION then not read), not formed on load
    WANT_GATE_WEIGHT: tl.constexpr, WANT_UP_WEIGHT: tl.constexpr,
    WANT_GATE_BIAS: tl.constexpr, WANT_UP_BIAS: tl.constexpr,  # summed in M steps of SUM_STEP whatever BLOCK_K
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INLINE_PTX: tl.constexpr = False,  # compiled for an NVIDIA GPU (dense._inline_ptx): δ kept out of FMA
                                       # contraction before its sums (dense._materialised)
):
    # Output tiles of δ_gᵀ X and δ_uᵀ X, summed over M; δᵀ formed as the Gᵀ, Zᵀ tiles load. Tiles named as a
    # matmul's (_gated_grad_x_kernel): the output tile [BLOCK_M, BLOCK_N] spans N x K, the loop steps BLOCK_K
    # along the contracted M. With ∂C/∂b each BLOCK_K is taken in BLOCK_K // SUM_STEP steps of SUM_STEP (as
    # dense._main_loop takes its STEP_K; one step at the configs such launches autotune among, _prune_configs), and
    # the sums are the dense layer's row sums (dense._row_sums_start/_add/_end) in that fixed step: the same bits on
    # every tile. Every column tile forms them (no branch in the loop); the first one stores them.
    SUMS: tl.constexpr = WANT_GATE_BIAS or WANT_UP_BIAS
    SUMS_BY_MMA: tl.constexpr = USE_DOT and grad_a_ptr.dtype.element_ty.primitive_bitwidth == 16
    STEP_K: tl.constexpr = SUM_STEP.value if SUMS else BLOCK_K
    tl.static_assert(BLOCK_K % STEP_K == 0, "∂C/∂b's step divides BLOCK_K")
    pid_n, pid_k = dense._tile_position(tl.program_id(0), N, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, STEP_K).to(tl.int64)
    mask_n, mask_k = offs_n < N, offs_k < K
    if ACC_FP64:
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros_like(acc_gate)
    if SUMS:
        sums_gate = dense._row_sums_start(BLOCK_M, STEP_K, SUMS_BY_MMA, acc_gate.dtype)
        sums_up = tl.zeros_like(sums_gate)
    for m in range(0, tl.cdiv(M, BLOCK_K)):
        for step in tl.static_range(BLOCK_K // STEP_K):
            rows = (m * (BLOCK_K // STEP_K) + step) * STEP_K + offs_m
            mask_t = mask_n[:, None] & (rows < M)[None, :]
            delta_gate_t, delta_up_t = _load_deltas(grad_a_ptr, z_gate_ptr, z_up_ptr, offs_n, rows, stride_gn,
                                                    stride_gm, stride_zgn, stride_zgm, stride_zun, stride_zum, mask_t,
                                                    ACTIVATION, NEGATIVE_SLOPE, ACC_FP64, DELTAS_STORED)
            if WANT_GATE_WEIGHT or WANT_UP_WEIGHT:
                x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=(rows < M)[:, None] & mask_k[None, :], other=0.0)
                if WANT_GATE_WEIGHT:
                    acc_gate = dense._tile_dot(delta_gate_t, x, acc_gate, USE_DOT, INPUT_PRECISION)  # δ_gᵀ X
                if WANT_UP_WEIGHT:
                    acc_up = dense._tile_dot(delta_up_t, x, acc_up, USE_DOT, INPUT_PRECISION)  # δ_uᵀ X
            if WANT_GATE_BIAS:  # 1ᵀ δ_g: the rows of δ_gᵀ
                sums_gate = dense._row_sums_add(sums_gate, delta_gate_t, SUMS_BY_MMA, INLINE_PTX)
            if WANT_UP_BIAS:
                sums_up = dense._row_sums_add(sums_up, delta_up_t, SUMS_BY_MMA, INLINE_PTX)
    mask = mask_n[:, None] & mask_k[None, :]
    if WANT_GATE_WEIGHT:
        tl.store(gate_out_ptr + offs_n[:, None] * stride_gon + offs_k[None, :] * stride_gok,
                 acc_gate.to(gate_out_ptr.dtype.element_ty), mask=mask)
    if WANT_UP_WEIGHT:
        tl.store(up_out_ptr + offs_n[:, None] * stride_uon + offs_k[None, :] * stride_uok,
                 acc_up.to(up_out_ptr.dtype.element_ty), mask=mask)
    if pid_k == 0:  # every column tile has the same sums; the first one stores them
        if WANT_GATE_BIAS:
            tl.store(gate_bias_out_ptr + offs_n, dense._row_sums_end(sums_gate, SUMS_BY_MMA), mask=mask_n)
        if WANT_UP_BIAS:
            tl.store(up_bias_out_ptr + offs_n, dense._row_sums_end(sums_up, SUMS_BY_MMA), mask=mask_n)


@triton.jit
def _gate_kernel(
    z_gate_ptr, z_up_ptr,  # Z_g, Z_u [M, N]
    grad_a_ptr,  # G [M, N]; read only with BACKWARD
    out_ptr, out_up_ptr,  # forward: A [M, N] (out_ptr); BACKWARD: δ_g, δ_u [M, N]
    M, N,
    stride_zgm, stride_zgn, stride_zum, stride_zun, stride_gm, stride_gn, stride_om, stride_on, stride_oum, stride_oun,
    BACKWARD: tl.constexpr,  # False: A = f(Z_g) ⊙ Z_u; True: (δ_g, δ_u) from G
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The gating alone, where the projections ran as modules (GatedMLP with hooks or adapters): _gate and _deltas,
    # the same tile functions as the fused kernels' epilogue and operand loads.
    offs_m, offs_n, mask = dense._elementwise_tile(M, N, BLOCK_M, BLOCK_N)
    z_gate = tl.load(z_gate_ptr + offs_m[:, None] * stride_zgm + offs_n[None, :] * stride_zgn, mask=mask, other=0.0)
    z_up = tl.load(z_up_ptr + offs_m[:, None] * stride_zum + offs_n[None, :] * stride_zun, mask=mask, other=0.0)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if BACKWARD:
        grad_a = tl.load(grad_a_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask,
                         other=0.0)
        delta_gate, delta_up = _deltas(grad_a, z_gate, z_up, ACTIVATION, NEGATIVE_SLOPE, ACC_FP64)
        tl.store(out_ptrs, delta_gate, mask=mask)
        tl.store(out_up_ptr + offs_m[:, None] * stride_oum + offs_n[None, :] * stride_oun, delta_up, mask=mask)
    else:
        a = _gate(_compute(z_gate, ACC_FP64), _compute(z_up, ACC_FP64), ACTIVATION, NEGATIVE_SLOPE,
                  z_gate.dtype, ACC_FP64)
        tl.store(out_ptrs, a, mask=mask)


@triton.jit
def _gated_tangent_kernel(
    z_gate_ptr, z_up_ptr,  # Z_g, Z_u [M, N]
    tangent_gate_ptr, tangent_up_ptr,  # dZ_g, dZ_u [M, N]; read only with HAS_TANGENT_GATE / HAS_TANGENT_UP
    out_ptr,  # dA [M, N]
    M, N,
    stride_zgm, stride_zgn, stride_zum, stride_zun, stride_tgm, stride_tgn, stride_tum, stride_tun,
    stride_om, stride_on,
    HAS_TANGENT_GATE: tl.constexpr, HAS_TANGENT_UP: tl.constexpr,
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u, elementwise.
    offs_m, offs_n, mask = dense._elementwise_tile(M, N, BLOCK_M, BLOCK_N)
    z_gate = _compute(tl.load(z_gate_ptr + offs_m[:, None] * stride_zgm + offs_n[None, :] * stride_zgn, mask=mask,
                              other=0.0), ACC_FP64)
    if ACC_FP64:
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_TANGENT_GATE:
        z_up = tl.load(z_up_ptr + offs_m[:, None] * stride_zum + offs_n[None, :] * stride_zun, mask=mask, other=0.0)
        tangent_gate = tl.load(tangent_gate_ptr + offs_m[:, None] * stride_tgm + offs_n[None, :] * stride_tgn,
                               mask=mask, other=0.0)
        # f'(Z_g) ⊙ dZ_g is δ = G ⊙ f'(Z) with G = dZ_g
        out += act.delta(_compute(tangent_gate, ACC_FP64), z_gate, ACTIVATION, NEGATIVE_SLOPE) * _compute(z_up,
                                                                                                          ACC_FP64)
    if HAS_TANGENT_UP:
        tangent_up = tl.load(tangent_up_ptr + offs_m[:, None] * stride_tum + offs_n[None, :] * stride_tun,
                             mask=mask, other=0.0)
        out += act.f(z_gate, ACTIVATION, NEGATIVE_SLOPE) * _compute(tangent_up, ACC_FP64)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

_ELEMENTWISE_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 32}


def matmul_configs(role: str, element_size: int, tf32: bool = False, stored: bool = False) -> list:
    """The tiles the GPU autotuner tries for one gated matmul kernel (role: "gated_forward", "gated_grad_x",
    "gated_grad_weight") on data of this element size (2: float16, bfloat16; 4: float32, with IEEE products, or
    with tf32 TF32 products), for the backward's roles with δ_g, δ_u formed in the loads or stored (DELTAS_STORED:
    16-bit data has tiles of its own there, _STORED_CONFIGS), in the matmul's names: output tile [BLOCK_M, BLOCK_N],
    K step BLOCK_K; the forward's EPILOGUE_SPLIT column slices of its epilogue.

    Chosen with benchmarks/compile_report_gated.py (sm_90, Triton 3.9; compiler figures, not timings;
    docs/compile-report.md): 16-bit data's and TF32's have wgmma in their main loops, and none spills at any
    activation but two noted at _CONFIGS. The first is the tile of an untuned GPU launch (autotune off).
    """
    c = triton.Config
    split = role == "gated_forward"  # EPILOGUE_SPLIT: the forward's column slices of the gating epilogue
    kind = "tf32" if tf32 else element_size
    tiles = (stored and _STORED_CONFIGS.get(role, {}).get(kind)) or _CONFIGS[role][kind]
    return [c(dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, **(dict(EPILOGUE_SPLIT=e) if split else {})),
              num_warps=w, num_stages=st) for m, n, k, w, st, e in tiles]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, EPILOGUE_SPLIT or None) per role and element size: matmul_configs.
# From the sweep of benchmarks/compile_report_gated.py (sm_90, bf16, silu / gelu / gelu_tanh with biases):
# - forward: two [BLOCK_M, BLOCK_N] float32 accumulators; the gating of a whole 128x128 tile spilled 56-104 bytes
#   (gelu, gelu_tanh), in 2-4 column slices none; 256x128 and 128x256 tiles spill over a kilobyte at any split.
#   K steps of 128 at 128x128 in 2 stages: issue pressure 0.24-0.27 against 128x128x64's 0.32-0.35 (3.6.0: 0.22
#   against 0.31), no spill in 4 slices (added 2026-12-08).
# - ∂C/∂X: one accumulator, δ_g and δ_u formed from three loaded tiles as wgmma's register operands: K steps of 32
#   (64 spilled 12-420 bytes at 128x128, 64x128 and 128x64 tiles).
# - ∂C/∂W: two accumulators and the δᵀ tiles, plus both bias sums: 128x128x32 spilled 4 bytes (gelu_tanh with
#   ∂C/∂b), 64-wide K steps at 128x64 and 64x128 36-40; 64-row tiles in 8 warps and 128x128x16 none. With ∂C/∂b
#   summed in fixed steps of SUM_STEP (its launches prune to K steps of 16, _prune_configs) K steps of 32 spilled
#   84-1020 bytes: 64x256x16 and 64x64x16 give those launches wide and small tiles (none spills, with or without).
# float32 (IEEE: FMA loops, K steps of 16; --dtype fp32): the forward's 64x64 and 64x128 tiles in 4 warps spilled
# 16-968 bytes, 128x128 in 8 warps 8-1288; ∂C/∂W's 64x64 in 8 warps 12, 128x128 16 (with ∂C/∂b). ∂C/∂X of a
# stored δ spills 4 bytes at 64x64x16 w4 (ptxas keeps it at 96 registers).
# TF32 (--dtype tf32, the operands K-major: _k_major): tiles of its own, where IEEE's K steps of 16 paid the loop's
# per-step costs for two TF32 MMAs a step (issue pressure up to 0.80 in the stored plan, 0.65 forward): the forward at
# 128x128x64 (2 stages), 128x128x32 and 64x128x32 in 4 epilogue slices (whole tiles spilled 1.1-1.3 KB with gelu_tanh
# and both biases, 2 slices 108-200); ∂C/∂X and ∂C/∂W at 128x128 with K steps of 32 and 16 (64 spilled 100-300 bytes
# with δ in the loads, 64x256x32 16-300); ∂C/∂W + ∂C/∂b takes them all, K steps of 32 in two of SUM_STEP (no spill at
# 128x128x32, which 16-bit data's sums spilled at; issue pressure 0.43 stored against 0.48 at 128x128x16), and at
# 128x128x16 spills 4 bytes with δ in the loads (gelu_tanh; none stored). Rows of 64 at least: 32-row tiles compile to
# mma.sync, not wgmma (the forward's spilled 4).
_CONFIGS = {
    "gated_forward": {
        2: [(128, 128, 64, 8, 3, 4), (128, 128, 128, 8, 2, 4), (64, 256, 64, 8, 3, 4), (128, 128, 32, 8, 4, 2),
            (64, 128, 64, 4, 4, 4), (64, 64, 64, 4, 4, 1)],
        4: [(64, 128, 16, 8, 3, 1), (128, 64, 16, 8, 3, 1), (64, 64, 16, 8, 3, 1)],
        "tf32": [(128, 128, 32, 8, 3, 4), (128, 128, 64, 8, 2, 4), (64, 128, 32, 4, 4, 4), (64, 128, 16, 8, 3, 1)],
    },
    "gated_grad_x": {
        2: [(128, 128, 32, 8, 4, None), (128, 256, 32, 8, 3, None), (64, 128, 32, 4, 4, None),
            (128, 64, 32, 4, 4, None), (64, 64, 64, 4, 4, None)],
        4: [(128, 128, 16, 8, 3, None), (64, 128, 16, 8, 3, None), (128, 64, 16, 8, 3, None),
            (64, 64, 16, 4, 3, None)],
        "tf32": [(128, 128, 32, 8, 3, None), (128, 128, 16, 8, 3, None), (64, 128, 32, 4, 4, None),
                 (64, 64, 16, 4, 3, None)],
    },
    "gated_grad_weight": {
        2: [(128, 128, 16, 8, 4, None), (64, 256, 32, 8, 4, None), (64, 256, 16, 8, 4, None),
            (64, 128, 32, 8, 4, None), (64, 64, 32, 4, 4, None), (64, 64, 16, 4, 4, None)],
        4: [(64, 128, 16, 8, 3, None), (128, 64, 16, 8, 3, None), (64, 64, 16, 4, 3, None)],
        "tf32": [(128, 128, 32, 8, 3, None), (128, 128, 16, 8, 3, None), (64, 128, 16, 8, 3, None),
                 (64, 64, 16, 4, 3, None)],
    },
}
# The backward's 16-bit tiles where δ_g, δ_u are stored (DELTAS_STORED: the plan above dense.PROLOGUE_MAX_K, and the
# only one on toolchains with the RS hazard, toolchain.py): the fused plan's tiles and two with longer K steps, which
# its loops (two operand tiles fewer to load, nothing to form) take where the loads' δ spilled. From a sweep
# (compile_report_gated.py --sweep --only "δ stored", bf16, sm_90, Triton 3.9.0 and 3.6.0): best issue pressure
# 0.31 -> 0.24 / 0.21 for ∂C/∂X at 128x256x64 in 2 stages, 0.47 -> 0.28 / 0.26 for ∂C/∂W at 128x128x128, no spill
# (128x256 spilled 1.7 KB in ∂C/∂W, its two accumulators; 64x256 took 65 bar.sync an iteration in ∂C/∂X). A superset
# of the fused plan's: the autotuner's pick is as fast or faster, for two more compiles per key. ∂C/∂W + ∂C/∂b keeps
# the K steps of SUM_STEP (_prune_configs; its ones-products in steps of 16 inside longer K steps compiled to 6-30
# bar.sync an iteration).
_STORED_CONFIGS = {
    "gated_grad_x": {
        2: [(128, 128, 32, 8, 4, None), (128, 256, 64, 8, 2, None), (128, 256, 32, 8, 3, None),
            (128, 128, 64, 8, 2, None), (64, 128, 32, 4, 4, None), (128, 64, 32, 4, 4, None),
            (64, 64, 64, 4, 4, None)],
    },
    "gated_grad_weight": {
        2: [(128, 128, 16, 8, 4, None), (128, 128, 128, 8, 2, None), (128, 128, 64, 8, 3, None),
            (64, 256, 32, 8, 4, None), (64, 256, 16, 8, 4, None), (64, 128, 32, 8, 4, None),
            (64, 64, 32, 4, 4, None), (64, 64, 16, 4, 4, None)],
    },
}
# Operand tiles each role pipelines per K step: [BLOCK_M, BLOCK_K] ones (X; G, Z_g, Z_u) and [BLOCK_K, BLOCK_N]
# ones (the weights; X), for the shared-memory budget of _prune_configs; with DELTAS_STORED one fewer of the first
# (δ_g, δ_u for G, Z_g, Z_u).
_OPERAND_TILES = {"gated_forward": (1, 2), "gated_grad_x": (3, 2), "gated_grad_weight": (3, 1)}


def _prune_configs(role: str, configs, named_args, **kwargs):
    """A role's configs whose pipelined operand tiles fit in the GPU's shared memory, for a ∂C/∂W launch that sums
    ∂C/∂b those whose K step is SUM_STEP (with TF32 products a multiple of it); the last where none fits."""
    x = next(a for a in named_args.values() if isinstance(a, torch.Tensor))  # the first operand: the data's dtype
    budget = dense._shared_memory_bytes(x.device.index or 0)
    if any(kwargs.get(name, named_args.get(name, False)) for name in ("WANT_GATE_BIAS", "WANT_UP_BIAS")):
        # any multiple of SUM_STEP gives the same sums; longer K steps, taken in steps of it, spilled but with TF32
        # products (_CONFIGS): the dense layer's rule for its register sums' step, which SUM_STEP is
        tf32 = kwargs.get("INPUT_PRECISION", named_args.get("INPUT_PRECISION")) == "tf32"
        configs = [cfg for cfg in configs if dense._sums_in_k_steps_of(cfg, SUM_STEP.value, tf32)] or configs
    left, right = _OPERAND_TILES[role]
    left -= bool(kwargs.get("DELTAS_STORED", named_args.get("DELTAS_STORED", False)))
    kept = [cfg for cfg in configs if dense._pipelined_bytes(cfg, x.element_size(), left, right) <= budget]
    return kept or configs[-1:]


_KERNELS = {"gated_forward": "_gated_forward_kernel", "gated_grad_x": "_gated_grad_x_kernel",
            "gated_grad_weight": "_gated_grad_weight_kernel"}
# The autotuners' keys: the sizes by bucket and every flag that changes a kernel's work; Triton adds the dtypes.
_TUNING_KEYS = {
    "gated_forward": ["tune_m", "tune_n", "tune_k", "HAS_GATE_BIAS", "HAS_UP_BIAS", "ACTIVATION", "WRITE_A",
                      "WRITE_Z", "INPUT_PRECISION"],
    "gated_grad_x": ["tune_m", "tune_n", "tune_k", "ACTIVATION", "DELTAS_STORED", "INPUT_PRECISION"],
    "gated_grad_weight": ["tune_m", "tune_n", "tune_k", "ACTIVATION", "DELTAS_STORED", "WANT_GATE_WEIGHT",
                          "WANT_UP_WEIGHT", "WANT_GATE_BIAS", "WANT_UP_BIAS", "INPUT_PRECISION"],
}


@functools.lru_cache(maxsize=None)
def _autotuned(role: str, element_size: int, tf32: bool = False, stored: bool = False):
    # Built on first use, never at import (dense._autotuned_matmul: some Triton releases query the driver here).
    return triton.autotune(configs=matmul_configs(role, element_size, tf32, stored), key=_TUNING_KEYS[role],
                           prune_configs_by={"early_config_prune": functools.partial(_prune_configs, role)},
                           **dense.autotune_options())(globals()[_KERNELS[role]])


def _fixed_tile(role: str, dtype: torch.dtype, use_dot: bool, tf32: bool = False, stored: bool = False):
    """(tile, launch options) where no autotuning happens, or None where the GPU autotuner picks: the dense
    layer's interpreter and float64 tiles; on a GPU with autotune off, the role's first config for the dtype (TF32
    products or not, δ_g, δ_u stored or not)."""
    fp64 = dtype == torch.float64
    if fp64 or not use_dot or dense.is_interpreted():
        dense_tile, launch_options = dense._fixed_config(fp64, use_dot)
        tile = {name: dense_tile[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        if role == "gated_forward":
            tile["EPILOGUE_SPLIT"] = dense_tile.get("EPILOGUE_SPLIT", 1)
        return tile, launch_options
    if dense.autotune_enabled():
        return None
    config = matmul_configs(role, dtype.itemsize, tf32, stored)[0]
    return dict(config.kwargs), dict(num_warps=config.num_warps, num_stages=config.num_stages)


# Each role's flags: the kernel's constexprs but the tile and what the dtype, device and settings decide, in the order
# its launcher passes their values (a tuple: a dict is built once a setup, _Setup.flags).
_FLAG_NAMES = {
    "gated_forward": ("HAS_GATE_BIAS", "HAS_UP_BIAS", "ACTIVATION", "NEGATIVE_SLOPE", "WRITE_A", "WRITE_Z"),
    "gated_grad_x": ("ACTIVATION", "NEGATIVE_SLOPE", "DELTAS_STORED"),
    "gated_grad_weight": ("ACTIVATION", "NEGATIVE_SLOPE", "DELTAS_STORED", "WANT_GATE_WEIGHT", "WANT_UP_WEIGHT",
                          "WANT_GATE_BIAS", "WANT_UP_BIAS"),
    "gated_gate": ("BACKWARD", "ACTIVATION", "NEGATIVE_SLOPE"),
    "gated_tangent": ("HAS_TANGENT_GATE", "HAS_TANGENT_UP", "ACTIVATION", "NEGATIVE_SLOPE"),
}
_ELEMENTWISE_KERNELS = {"gated_gate": "_gate_kernel", "gated_tangent": "_gated_tangent_kernel"}


class _Setup:
    """What a gated matmul launch's flags decide with its use of tl.dot and the settings (_launch_matmul's key): the
    head of its plan options, its constexpr flags. Made again when config.set() has replaced the settings
    (dense._MatmulSetup, for the dense layer's matmuls)."""

    __slots__ = ("settings", "options_id", "flags")

    def __init__(self, key: tuple, settings):
        role, flags, use_dot = key
        self.settings = settings
        # Every input of the plan that the arguments' specialisation does not already hold, as a small int (a launch's
        # options are hashed on every call).
        self.options_id = _OPTIONS_IDS.setdefault((role, flags, use_dot, settings.autotune), len(_OPTIONS_IDS))
        self.flags = dict(zip(_FLAG_NAMES[role], flags))


_SETUPS: dict = {}  # (role, flags, use_dot) -> _Setup
_OPTIONS_IDS: dict = {}


def _precision(like: torch.Tensor) -> tuple:
    """(use_dot, tf32, k_major) for the products of like's data: tl.dot (float64: where it compiles and is exact,
    dense.fp64_dot_supported); TF32 products (float32 on CUDA where PyTorch's settings allow them,
    dense.tf32_allowed, which INPUT_PRECISION follows); and whether those read both operands K-major
    (dense._tf32_reads_k_major: the launchers copy them so, _k_major). Asked once per launcher call."""
    dtype = like.dtype
    if dtype is torch.float32:
        tf32 = like.is_cuda and dense.tf32_allowed()
        return True, tf32, tf32 and dense._tf32_reads_k_major(like.device)
    return dtype is not torch.float64 or dense.fp64_dot_supported(like.device), False, False


def _k_major(t: torch.Tensor, contracted: int) -> torch.Tensor:
    """t [R, C] with stride 1 along its axis `contracted` (the one a product sums over): t itself, or a copy laid out
    so, seen as [R, C] (one pass over t). Where TF32 products read both operands K-major (dense._tf32_reads_k_major),
    an operand read along M or N is copied so first, as the dense layer's launches do; values and bits unchanged."""
    if t.stride(contracted) == 1:
        return t
    return t.contiguous() if contracted == 1 else t.t().contiguous().t()


def _launch_matmul(role: str, flags: tuple, args: tuple, rows: int, columns: int, buckets: tuple,
                   like: torch.Tensor, precision: tuple) -> None:
    """One launch of a gated matmul kernel through its plan (launch.run): output [rows, columns] in tiles of
    [BLOCK_M, BLOCK_N]; flags, the values of the role's _FLAG_NAMES; buckets, the sizes' tuning buckets
    (dense.tuning_buckets); like, the tensor whose dtype and device the kernel computes in; precision, _precision(like)
    as the launcher asked it. A warm call: the setup and the plan looked up, the launch (no closure, no device guard:
    launch.run switches to the tensors' GPU itself)."""
    use_dot, tf32, _ = precision
    key = (role, flags, use_dot)
    settings = config.get()
    setup = _SETUPS.get(key)
    if setup is None or setup.settings is not settings:  # a config.set() since: every choice made again
        setup = _SETUPS[key] = _Setup(key, settings)
    options = (setup.options_id, buckets, tf32)  # TF32: a setting PyTorch may change, so in every call's options
    launch.run(role, options, args, rows, columns, _matmul_plan, role, setup.flags, like, use_dot, rows, columns)


def _matmul_plan(role: str, flags: dict, like: torch.Tensor, use_dot: bool, rows: int, columns: int) -> dict:
    """_launch_matmul's make (launch.run), called on a call not seen before only: what launch.build needs, the tile
    fixed (_fixed_tile) or the autotuner's."""
    constexprs = dict(flags, USE_DOT=use_dot, INPUT_PRECISION=dense._input_precision(like.dtype, like.device),
                      ACC_FP64=like.dtype == torch.float64, **dense.COMPILE_OPTIONS)
    if role == "gated_grad_weight":
        constexprs["INLINE_PTX"] = dense._inline_ptx(like.device)
    common = dict(interpreted=dense.is_interpreted(), compiled_ok=dense._inline_ptx(like.device),
                  device_index=like.device.index)
    tf32 = constexprs["INPUT_PRECISION"] == "tf32"  # TF32 tiles: K-major operands (_k_major), wider K steps
    stored = flags.get("DELTAS_STORED", False)  # the backward's plan: its tiles (_STORED_CONFIGS)
    fixed = _fixed_tile(role, like.dtype, use_dot, tf32, stored)
    if fixed is None:
        def grid(meta):
            return (dense._cdiv(rows, meta["BLOCK_M"]) * dense._cdiv(columns, meta["BLOCK_N"]),)

        tuner = _autotuned(role, like.element_size(), tf32, stored)
        return dict(fn=tuner.fn, tuner=tuner, constexprs=constexprs, grid=grid, **common)
    tile, launch_options = fixed
    grid = (dense._cdiv(rows, tile["BLOCK_M"]) * dense._cdiv(columns, tile["BLOCK_N"]),)
    return dict(fn=globals()[_KERNELS[role]], constexprs={**constexprs, **tile, **launch_options}, grid=grid, **common)


def _forward(x, gate_weight, up_weight, gate_bias, up_bias, act_id, negative_slope, write_a: bool, write_z: bool):
    """(a, z_gate, z_up) [M, I] by the forward kernel, each None where not written."""
    M, K = x.shape
    N = gate_weight.shape[0]
    a = x.new_empty(M, N) if write_a else None
    z_gate, z_up = (x.new_empty(M, N), x.new_empty(M, N)) if write_z else (None, None)
    if not (M and N):
        return a, z_gate, z_up
    out = a if write_a else z_gate  # a valid pointer for what is not written
    z_gate_or, z_up_or = (z_gate, z_up) if write_z else (out, out)
    has_gate_bias, has_up_bias = gate_bias is not None, up_bias is not None
    precision = _precision(x)
    if precision[2]:  # TF32 reading K-major: X and Wᵀ read along K, where they are not yet
        x, gate_weight, up_weight = _k_major(x, 1), _k_major(gate_weight, 1), _k_major(up_weight, 1)
    buckets = dense.tuning_buckets(M, N, K)
    # a, z_gate, z_up: new contiguous [M, N], strides (N, 1) not asked (dense._launch_matmul's outputs)
    args = (x, gate_weight, up_weight, gate_bias if has_gate_bias else out, up_bias if has_up_bias else out, out,
            z_gate_or, z_up_or, M, N, K, *buckets, *x.stride(), *gate_weight.stride(), *up_weight.stride(),
            gate_bias.stride()[0] if has_gate_bias else 0, up_bias.stride()[0] if has_up_bias else 0, N, 1, N, 1, N, 1)
    _launch_matmul("gated_forward", (has_gate_bias, has_up_bias, act_id, negative_slope, write_a, write_z), args, M,
                   N, buckets, x, precision)
    return a, z_gate, z_up


def _recomputed(x, gate_weight, up_weight, gate_bias, up_bias, act_id, negative_slope):
    """(Z_g, Z_u) rebuilt from what recompute=True kept: the forward kernel, Z alone."""
    return _forward(x, gate_weight, up_weight, gate_bias, up_bias, act_id, negative_slope, False, True)[1:]


def gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act_id: int, negative_slope: float, save: bool):
    """(A = f(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u) [M, I], Z_g, Z_u [M, I] or None unless save).

    x [M, K], weights [I, K], biases [I] or None; any strides.
    """
    return _forward(x, gate_weight, up_weight, gate_bias, up_bias, act_id, negative_slope, True, save)


def gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, act_id: int,
                   negative_slope: float, needs, delta_in_loads=None):
    """(∂C/∂X [M, K], ∂C/∂W_g, ∂C/∂W_u [I, K], ∂C/∂b_g, ∂C/∂b_u [I]), None where needs (five bools) says no.

    z_gate, z_up None: recomputed from x, the weights and biases (the forward kernel, Z alone).
    Two plans for δ_g, δ_u, as the dense layer's (dense.linear_backward), delta_in_loads picks one (None: the loads
    where K <= dense.PROLOGUE_MAX_K): formed in the operand loads of both matmuls, again for each of their column
    tiles (K / BLOCK_N of ∂C/∂X's), or stored once by _gate_kernel and read by the same two kernels
    (DELTAS_STORED), [M, I] written twice and read for each product. The stored plan wherever
    toolchain.rs_operand_hazard names a reason (δ formed in registers makes an RS wgmma, miscompiled there).
    Both plans give the same bits: the same δ values (_deltas, rounded to G's dtype), the same products in the
    same order. Where TF32 products read both operands K-major (dense._tf32_reads_k_major), the operands read along
    the contracted dimension's other axis are copied K-major first: the weights for ∂C/∂X, X for ∂C/∂W, and in the
    stored plan δ_g, δ_u for ∂C/∂W too (their copies as δᵀ: two more passes over [M, I]); δ formed in the loads is
    a register operand and needs none. The copies change no value, so no bit.
    """
    needs_x = needs[0]
    if z_gate is None:
        z_gate, z_up = _recomputed(x, gate_weight, up_weight, gate_bias, up_bias, act_id, negative_slope)
    M, N = grad_a.shape
    K = gate_weight.shape[1]
    in_loads = K <= dense.PROLOGUE_MAX_K if delta_in_loads is None else delta_in_loads
    precision = _precision(grad_a)
    if in_loads and toolchain.rs_operand_hazard(grad_a.device, grad_a.dtype):
        in_loads = False
    if in_loads:  # G, Z_g, Z_u: their strides asked once for both launches
        operands = (grad_a, z_gate, z_up)
        operand_strides = (*grad_a.stride(), *z_gate.stride(), *z_up.stride())
        flags = (act_id, negative_slope, False)
    else:  # δ_g, δ_u: new contiguous [M, N] (strides not asked), in the slots of G and Z_g (δ_u in Z_u's unread)
        delta_gate, delta_up = _launch_gate(z_gate, z_up, grad_a, act_id, negative_slope)
        operands = (delta_gate, delta_up, delta_up)
        operand_strides = (N, 1) * 3
        flags = (0, 0.0, True)  # f no longer read: one compiled kernel for every activation
    grad_x = grad_a.new_empty(M, K) if needs_x else None
    if needs_x and M and K:
        if N == 0:
            grad_x.zero_()
        else:
            buckets = dense.tuning_buckets(M, K, N)  # rows, columns, contracted
            gate_w, up_w = gate_weight, up_weight
            if precision[2]:  # W [N, K] read along the contracted N (δ: stored contiguous, or formed in registers)
                gate_w, up_w = _k_major(gate_weight, 0), _k_major(up_weight, 0)
            args = (*operands, gate_w, up_w, grad_x, M, N, K, *buckets, *operand_strides, *gate_w.stride(),
                    *up_w.stride(), K, 1)  # grad_x: a new contiguous [M, K]
            _launch_matmul("gated_grad_x", flags, args, M, K, buckets, grad_a, precision)
    grad_gate_weight, grad_up_weight, gate_sum, up_sum = _grad_weights(operands, flags, x, K, needs[1:],
                                                                       precision, operand_strides)
    dtype = grad_a.dtype
    return (grad_x, grad_gate_weight, grad_up_weight, None if gate_sum is None else dense._in_dtype(gate_sum, dtype),
            None if up_sum is None else dense._in_dtype(up_sum, dtype))


def _grad_weights(operands, flags: tuple, x, K: int, wants, precision=None, operand_strides=None):
    """(∂C/∂W_g, ∂C/∂W_u [I, K] in G's dtype, ∂C/∂b_g, ∂C/∂b_u [I] in the compute dtype, as summed: the same bits on
    every tile), None where wants (four bools) says no: one launch of the ∂C/∂W kernel. operands: G, Z_g, Z_u
    [M, I], or δ_g, δ_u, δ_u where flags (ACTIVATION, NEGATIVE_SLOPE, DELTAS_STORED) say stored; operand_strides:
    their strides (six ints), or None; x [M, K], read only for the weight gradients. precision: _precision(G) as
    gated_backward asked it (None: asked here)."""
    first = operands[0]
    if precision is None:
        precision = _precision(first)
    M, N = first.shape
    want_gate_weight, want_up_weight, want_gate_bias, want_up_bias = wants
    # The kernel writes every element of what it is asked for where M and N are not 0: zeros only where it is not run
    written = M > 0 and N > 0
    new = first.new_empty if written else first.new_zeros
    grad_gate_weight = new(N, K) if want_gate_weight else None
    grad_up_weight = new(N, K) if want_up_weight else None
    sum_dtype = torch.float64 if first.dtype is torch.float64 else torch.float32
    gate_sum = new(N, dtype=sum_dtype) if want_gate_bias else None
    up_sum = new(N, dtype=sum_dtype) if want_up_bias else None
    if written and (want_gate_weight or want_up_weight or want_gate_bias or want_up_bias):
        want_weights = (want_gate_weight and K > 0, want_up_weight and K > 0)  # K = 0: the weight gradients are empty
        weight_grads = want_weights[0] or want_weights[1]
        columns = K if weight_grads else 1  # biases alone: one column of tiles, no product
        source = x if weight_grads else first
        if precision[2] and weight_grads:  # X and a stored δᵀ read along the contracted M (δ formed in registers: as is)
            source = _k_major(x, 0)
            if flags[2]:  # DELTAS_STORED
                delta_gate, delta_up = _k_major(operands[0], 0), _k_major(operands[1], 0)
                operands, operand_strides = (delta_gate, delta_up, delta_up), None
        if operand_strides is None:
            operand_strides = tuple(stride for t in operands for stride in t.stride())
        # each weight gradient's slot: the new contiguous [N, K] (strides not asked: PyTorch's (max(K, 1), 1)), else G
        weight_strides = (max(K, 1), 1)
        gate_strides = operand_strides[:2] if grad_gate_weight is None else weight_strides
        up_strides = operand_strides[:2] if grad_up_weight is None else weight_strides
        buckets = dense.tuning_buckets(N, columns, M)
        args = (*operands, source,
                *(t if t is not None else first for t in (grad_gate_weight, grad_up_weight, gate_sum, up_sum)),
                M, N, columns, *buckets, *operand_strides, *source.stride(), *gate_strides, *up_strides)
        _launch_matmul("gated_grad_weight", (*flags, *want_weights, want_gate_bias, want_up_bias), args, N, columns,
                       buckets, first, precision)
    return grad_gate_weight, grad_up_weight, gate_sum, up_sum


def gated_jvp(x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, tangent_x, tangent_gate_weight,
              tangent_up_weight, tangent_gate_bias, tangent_up_bias, act_id: int, negative_slope: float):
    """dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u [M, I]; None tangents are zero; Z's None: recomputed."""
    if z_gate is None:
        z_gate, z_up = _recomputed(x, gate_weight, up_weight, gate_bias, up_bias, act_id, negative_slope)
    M, N = z_gate.shape

    def tangent_z(weight, tangent_weight, tangent_bias):  # dZ = dX Wᵀ + X dWᵀ + db: the dense jvp, identity
        if tangent_x is None and tangent_weight is None and tangent_bias is None:
            return None
        return jvp.linear_jvp(x, weight, None, tangent_x, tangent_weight, tangent_bias, 0, 0.0, "z", M, N)

    return gate_jvp(z_gate, z_up, tangent_z(gate_weight, tangent_gate_weight, tangent_gate_bias),
                    tangent_z(up_weight, tangent_up_weight, tangent_up_bias), act_id, negative_slope)


def gate_jvp(z_gate, z_up, tangent_gate, tangent_up, act_id: int, negative_slope: float):
    """dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u [M, I] from the tangents of Z_g, Z_u (None: zero, not both)."""
    M, N = z_gate.shape
    has_gate, has_up = tangent_gate is not None, tangent_up is not None
    out = (tangent_gate if has_gate else tangent_up).new_empty(M, N)
    if not (M and N):
        return out
    # out: a new contiguous [M, N], strides (N, 1) not asked; it fills the slot of a tangent not given
    args = (z_gate, z_up, tangent_gate if has_gate else out, tangent_up if has_up else out, out, M, N,
            *z_gate.stride(), *z_up.stride(), *(tangent_gate.stride() if has_gate else (N, 1)),
            *(tangent_up.stride() if has_up else (N, 1)), N, 1)
    _launch_elementwise("gated_tangent", (has_gate, has_up, act_id, negative_slope), args, out)
    return out


def _launch_elementwise(role: str, flags: tuple, args: tuple, out: torch.Tensor) -> None:
    """One launch of an elementwise gated kernel over out [M, N] through its plan (launch.run): one fixed block;
    flags, the values of the role's _FLAG_NAMES. No closure, no device guard (_launch_matmul)."""
    M, N = out.shape
    launch.run(role, flags, args, M, N, _elementwise_plan, role, flags, out, M, N)


def _elementwise_plan(role: str, flags: tuple, out: torch.Tensor, M: int, N: int) -> dict:
    """_launch_elementwise's make (launch.run), on a call not seen before only."""
    constexprs = dict(zip(_FLAG_NAMES[role], flags), ACC_FP64=out.dtype == torch.float64, **_ELEMENTWISE_BLOCK,
                      **dense.COMPILE_OPTIONS)
    return dense._elementwise_plan(globals()[_ELEMENTWISE_KERNELS[role]], constexprs, M, N, out.device)


def _launch_gate(z_gate, z_up, grad_a, act_id: int, negative_slope: float):
    """The gating alone: A (grad_a None) or (δ_g, δ_u) [M, I], new contiguous tensors."""
    M, N = z_gate.shape
    backward = grad_a is not None
    out = z_gate.new_empty(M, N)
    out_up = z_gate.new_empty(M, N) if backward else out
    if M and N:
        g = grad_a if backward else z_gate
        # the outputs: new contiguous [M, N], strides (N, 1) not asked
        args = (z_gate, z_up, g, out, out_up, M, N, *z_gate.stride(), *z_up.stride(), *g.stride(), N, 1, N, 1)
        _launch_elementwise("gated_gate", (backward, act_id, negative_slope), args, out)
    return (out, out_up) if backward else out


def gate_forward(z_gate, z_up, act_id: int, negative_slope: float):
    """A = f(Z_g) ⊙ Z_u [M, I] from the projections' outputs."""
    return _launch_gate(z_gate, z_up, None, act_id, negative_slope)


def gate_backward(grad_a, z_gate, z_up, act_id: int, negative_slope: float):
    """(δ_g, δ_u) = (G ⊙ Z_u ⊙ f'(Z_g), G ⊙ f(Z_g)) [M, I]: the gradients of Z_g and Z_u."""
    return _launch_gate(z_gate, z_up, grad_a, act_id, negative_slope)
