"""Triton kernels and launchers of the gated layer (SwiGLU, GEGLU, ...).

The equations are stated once, with shapes, in ``manualbp/gated_reference.py``. With
x [M, K], gate_weight and up_weight [I, K], biases [I]:

    forward     Z_g = X W_gᵀ + b_g, Z_u = X W_uᵀ + b_u    _gated_forward_kernel: both products in one K loop
                A = f(Z_g) ⊙ Z_u                           (two accumulators), biases and the gating in the
                                                           epilogue, which stores A and, for the backward,
                                                           Z_g and Z_u (WRITE_Z); recompute=True: not stored,
                                                           the backward launches this kernel for Z alone
    backward    δ_g = G ⊙ Z_u ⊙ f'(Z_g), δ_u = G ⊙ f(Z_g)  formed in the operand loads of both matmuls
                                                           (_deltas), never stored
                ∂C/∂X = δ_g W_g + δ_u W_u    [M, K]        _gated_grad_x_kernel: one accumulator, one loop over I
                ∂C/∂W_g = δ_gᵀ X, ∂C/∂W_u = δ_uᵀ X [I, K]  _gated_grad_weight_kernel: two accumulators, one
                ∂C/∂b_g = 1ᵀ δ_g, ∂C/∂b_u = 1ᵀ δ_u   [I]   loop over M; the first column of tiles also sums
                                                           the δᵀ rows it loads (∂C/∂b)
    jvp         dZ = dX Wᵀ + X dWᵀ + db (each)             the dense layer's jvp kernel with identity (jvp.py)
                dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u  _gated_tangent_kernel, elementwise
    the gating alone (projections run as modules: GatedMLP with hooks, adapters or quantized weights)
                A, or (δ_g, δ_u) from G                    _gate_kernel, elementwise, the same _gate / _deltas

Rounding follows eager ``act(gate(x)) * up(x)`` step by step (each intermediate rounded to
the data dtype where eager stores one: Z_g, Z_u, f(Z_g), G ⊙ Z_u, the δ's), computed in
float32 (float64 for float64 data); for float32 and float64 data the roundings are exact.
f and f' are the dense kernels' (``triton_kernels/activations.py``), the matmul step
``dense._tile_dot``, the tile order ``dense._tile_position``.

Tiles are fixed, not autotuned: the dense layer's interpreter and float64 tiles (its
``_fixed_config``), and on a GPU one untuned tile (_GPU_CONFIG), whose speed has not been measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import activations as act
from . import dense, jvp

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
                 ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, ACC_FP64: tl.constexpr):
    """(δ_g, δ_u) of the tile rows × cols, formed as G, Z_g, Z_u load (the backward matmuls' operand loads).

    rows, cols: offsets along the tile's two axes; each tensor's strides along them: (stride_m, stride_n) for a
    [M, N] tile, (stride_n, stride_m) for its transpose."""
    grad_a = tl.load(grad_a_ptr + rows[:, None] * stride_g_row + cols[None, :] * stride_g_col, mask=mask, other=0.0)
    z_gate = tl.load(z_gate_ptr + rows[:, None] * stride_zg_row + cols[None, :] * stride_zg_col, mask=mask,
                     other=0.0)
    z_up = tl.load(z_up_ptr + rows[:, None] * stride_zu_row + cols[None, :] * stride_zu_col, mask=mask, other=0.0)
    return _deltas(grad_a, z_gate, z_up, ACTIVATION, NEGATIVE_SLOPE, ACC_FP64)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _gated_forward_kernel(
    x_ptr,  # X [M, K]
    gate_weight_ptr, up_weight_ptr,  # W_g, W_u [N, K] (N = I), read as Wᵀ [K, N] through their strides
    gate_bias_ptr, up_bias_ptr,  # b_g, b_u [N]; read only with HAS_GATE_BIAS / HAS_UP_BIAS
    a_ptr,  # A [M, N]; written with WRITE_A
    z_gate_ptr, z_up_ptr,  # Z_g, Z_u [M, N]; written with WRITE_Z
    M, N, K,
    stride_xm, stride_xk, stride_gwn, stride_gwk, stride_uwn, stride_uwk, stride_gb, stride_ub,
    stride_am, stride_an, stride_zgm, stride_zgn, stride_zum, stride_zun,
    HAS_GATE_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # kernel id of f
    NEGATIVE_SLOPE: tl.constexpr,  # leaky_relu's slope (unused otherwise)
    WRITE_A: tl.constexpr,  # False: Z alone (the backward's recompute)
    WRITE_Z: tl.constexpr,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
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
    # Epilogue: Z = acc + b, rounded to the data dtype as stored (the backward reads the stored Z), A = f(Z_g) ⊙ Z_u.
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    mask = mask_m[:, None] & mask_n[None, :]
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
    grad_a_ptr, z_gate_ptr, z_up_ptr,  # G, Z_g, Z_u [M, N] (N = I, the contracted dimension here)
    gate_weight_ptr, up_weight_ptr,  # W_g, W_u [N, K]
    out_ptr,  # ∂C/∂X [M, K]
    M, N, K,
    stride_gm, stride_gn, stride_zgm, stride_zgn, stride_zum, stride_zun,
    stride_gwn, stride_gwk, stride_uwn, stride_uwk, stride_om, stride_ok,
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # ∂C/∂X = δ_g W_g + δ_u W_u: output tile [BLOCK_M, BLOCK_K], both products in one accumulator over N.
    pid_m, pid_k = dense._tile_position(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    mask_m, mask_k = offs_m < M, offs_k < K
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n in range(0, tl.cdiv(N, BLOCK_N)):
        cols = n * BLOCK_N + offs_n
        mask_rows = mask_m[:, None] & (cols < N)[None, :]
        delta_gate, delta_up = _load_deltas(grad_a_ptr, z_gate_ptr, z_up_ptr, offs_m, cols, stride_gm, stride_gn,
                                            stride_zgm, stride_zgn, stride_zum, stride_zun, mask_rows,
                                            ACTIVATION, NEGATIVE_SLOPE, ACC_FP64)
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
    grad_a_ptr, z_gate_ptr, z_up_ptr,  # G, Z_g, Z_u [M, N], read as their transposes [N, M]
    x_ptr,  # X [M, K]; read only with WANT_GATE_WEIGHT or WANT_UP_WEIGHT
    gate_out_ptr, up_out_ptr,  # ∂C/∂W_g, ∂C/∂W_u [N, K]
    gate_bias_out_ptr, up_bias_out_ptr,  # ∂C/∂b_g, ∂C/∂b_u [N] (compute dtype), by the first column of tiles
    M, N, K,
    stride_gm, stride_gn, stride_zgm, stride_zgn, stride_zum, stride_zun, stride_xm, stride_xk,
    stride_gon, stride_gok, stride_uon, stride_uok,
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
    WANT_GATE_WEIGHT: tl.constexpr, WANT_UP_WEIGHT: tl.constexpr,
    WANT_GATE_BIAS: tl.constexpr, WANT_UP_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Output tiles [BLOCK_N, BLOCK_K] of δ_gᵀ X and δ_uᵀ X, summed over M; δᵀ formed as the Gᵀ, Zᵀ tiles load.
    pid_n, pid_k = dense._tile_position(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    mask_n, mask_k = offs_n < N, offs_k < K
    if ACC_FP64:
        acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float64)
        sums_gate = tl.zeros((BLOCK_N,), dtype=tl.float64)
    else:
        acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        sums_gate = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_up = tl.zeros_like(acc_gate)
    sums_up = tl.zeros_like(sums_gate)
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        rows = m * BLOCK_M + offs_m
        mask_t = mask_n[:, None] & (rows < M)[None, :]
        delta_gate_t, delta_up_t = _load_deltas(grad_a_ptr, z_gate_ptr, z_up_ptr, offs_n, rows, stride_gn,
                                                stride_gm, stride_zgn, stride_zgm, stride_zun, stride_zum, mask_t,
                                                ACTIVATION, NEGATIVE_SLOPE, ACC_FP64)
        if WANT_GATE_WEIGHT or WANT_UP_WEIGHT:
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=(rows < M)[:, None] & mask_k[None, :], other=0.0)
            if WANT_GATE_WEIGHT:
                acc_gate = dense._tile_dot(delta_gate_t, x, acc_gate, USE_DOT, INPUT_PRECISION)  # δ_gᵀ X
            if WANT_UP_WEIGHT:
                acc_up = dense._tile_dot(delta_up_t, x, acc_up, USE_DOT, INPUT_PRECISION)  # δ_uᵀ X
        if pid_k == 0:  # 1ᵀ δ: every column tile loads the same δᵀ rows; the first one sums them
            if WANT_GATE_BIAS:
                sums_gate += tl.sum(delta_gate_t.to(sums_gate.dtype), axis=1)
            if WANT_UP_BIAS:
                sums_up += tl.sum(delta_up_t.to(sums_up.dtype), axis=1)
    mask = mask_n[:, None] & mask_k[None, :]
    if WANT_GATE_WEIGHT:
        tl.store(gate_out_ptr + offs_n[:, None] * stride_gon + offs_k[None, :] * stride_gok,
                 acc_gate.to(gate_out_ptr.dtype.element_ty), mask=mask)
    if WANT_UP_WEIGHT:
        tl.store(up_out_ptr + offs_n[:, None] * stride_uon + offs_k[None, :] * stride_uok,
                 acc_up.to(up_out_ptr.dtype.element_ty), mask=mask)
    if pid_k == 0:
        if WANT_GATE_BIAS:
            tl.store(gate_bias_out_ptr + offs_n, sums_gate, mask=mask_n)
        if WANT_UP_BIAS:
            tl.store(up_bias_out_ptr + offs_n, sums_up, mask=mask_n)


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

# One untuned GPU tile (two accumulators of [BLOCK_M, BLOCK_N]); not measured on a GPU.
_GPU_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}
_GPU_LAUNCH = {"num_warps": 4, "num_stages": 3}
_ELEMENTWISE_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 32}


def _tiles(dtype: torch.dtype, device: torch.device):
    """(use_dot, tile, launch options) for data of this dtype: the dense layer's fixed tiles where it has them."""
    fp64 = dtype == torch.float64
    use_dot = (not fp64) or dense.fp64_dot_supported(device)
    fixed = dense._fixed_config(fp64, use_dot)
    tile, launch = fixed if fixed is not None else (_GPU_CONFIG, _GPU_LAUNCH)
    return use_dot, {name: tile[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}, launch


def _precision(t: torch.Tensor, use_dot: bool) -> dict:
    return dict(USE_DOT=use_dot, INPUT_PRECISION=dense._input_precision(t.dtype, t.device),
                ACC_FP64=t.dtype == torch.float64, **dense.COMPILE_OPTIONS)


def _forward(x, gate_weight, up_weight, gate_bias, up_bias, act_id, negative_slope, write_a: bool, write_z: bool):
    """(a, z_gate, z_up) [M, I] by the forward kernel, each None where not written."""
    M, N, K = x.shape[0], gate_weight.shape[0], x.shape[1]
    a, z_gate, z_up = (torch.empty((M, N), dtype=x.dtype, device=x.device) if write else None
                       for write in (write_a, write_z, write_z))
    out = a if write_a else z_gate  # a valid pointer for what is not written
    if out.numel() == 0:
        return a, z_gate, z_up
    z_gate_or, z_up_or = (z if z is not None else out for z in (z_gate, z_up))
    use_dot, tile, launch = _tiles(x.dtype, x.device)
    grid = (triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(N, tile["BLOCK_N"]),)
    with dense._device_guard(x):
        _gated_forward_kernel[grid](
            x, gate_weight, up_weight, gate_bias if gate_bias is not None else out,
            up_bias if up_bias is not None else out, out, z_gate_or, z_up_or, M, N, K,
            x.stride(0), x.stride(1), gate_weight.stride(0), gate_weight.stride(1), up_weight.stride(0),
            up_weight.stride(1), gate_bias.stride(0) if gate_bias is not None else 0,
            up_bias.stride(0) if up_bias is not None else 0, out.stride(0), out.stride(1),
            z_gate_or.stride(0), z_gate_or.stride(1), z_up_or.stride(0), z_up_or.stride(1),
            HAS_GATE_BIAS=gate_bias is not None, HAS_UP_BIAS=up_bias is not None, ACTIVATION=act_id,
            NEGATIVE_SLOPE=negative_slope, WRITE_A=write_a, WRITE_Z=write_z, **_precision(x, use_dot), **tile,
            **launch)
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
                   negative_slope: float, needs):
    """(∂C/∂X [M, K], ∂C/∂W_g, ∂C/∂W_u [I, K], ∂C/∂b_g, ∂C/∂b_u [I]), None where needs (five bools) says no.

    z_gate, z_up None: recomputed from x, the weights and biases (the forward kernel, Z alone).
    """
    needs_x, needs_gate_weight, needs_up_weight, needs_gate_bias, needs_up_bias = needs
    if z_gate is None:
        z_gate, z_up = _recomputed(x, gate_weight, up_weight, gate_bias, up_bias, act_id, negative_slope)
    M, N = grad_a.shape
    K = gate_weight.shape[1]
    dtype, device = grad_a.dtype, grad_a.device
    use_dot, tile, launch = _tiles(dtype, device)
    common = dict(ACTIVATION=act_id, NEGATIVE_SLOPE=negative_slope, **_precision(grad_a, use_dot), **launch)
    grad_x = torch.empty((M, K), dtype=dtype, device=device) if needs_x else None
    if grad_x is not None and grad_x.numel() > 0:
        if N == 0:
            grad_x.zero_()
        else:
            grid = (triton.cdiv(M, tile["BLOCK_M"]) * triton.cdiv(K, tile["BLOCK_N"]),)
            with dense._device_guard(grad_a):
                _gated_grad_x_kernel[grid](
                    grad_a, z_gate, z_up, gate_weight, up_weight, grad_x, M, N, K,
                    grad_a.stride(0), grad_a.stride(1), z_gate.stride(0), z_gate.stride(1), z_up.stride(0),
                    z_up.stride(1), gate_weight.stride(0), gate_weight.stride(1), up_weight.stride(0),
                    up_weight.stride(1), grad_x.stride(0), grad_x.stride(1),
                    BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_K"], BLOCK_K=tile["BLOCK_N"], GROUP_M=tile["GROUP_M"],
                    **common)
    wants = (needs_gate_weight, needs_up_weight, needs_gate_bias, needs_up_bias)
    grads = [torch.zeros((N, K), dtype=dtype, device=device) if want else None for want in wants[:2]]
    sum_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    sums = [torch.zeros((N,), dtype=sum_dtype, device=device) if want else None for want in wants[2:]]
    if any(wants) and M > 0 and N > 0:
        want_weights = [want and K > 0 for want in wants[:2]]  # K = 0: the weight gradients are empty
        weight_grads = any(want_weights)
        columns = K if weight_grads else 1  # biases alone: one column of tiles, no product
        outs = [t if t is not None else grad_a for t in (*grads, *sums)]
        source = x if weight_grads else grad_a
        grid = (triton.cdiv(N, tile["BLOCK_M"]) * triton.cdiv(columns, tile["BLOCK_N"]),)
        with dense._device_guard(grad_a):
            _gated_grad_weight_kernel[grid](
                grad_a, z_gate, z_up, source, *outs, M, N, columns,
                grad_a.stride(0), grad_a.stride(1), z_gate.stride(0), z_gate.stride(1), z_up.stride(0),
                z_up.stride(1), source.stride(0), source.stride(1), outs[0].stride(0), outs[0].stride(-1),
                outs[1].stride(0), outs[1].stride(-1),
                WANT_GATE_WEIGHT=want_weights[0], WANT_UP_WEIGHT=want_weights[1], WANT_GATE_BIAS=needs_gate_bias,
                WANT_UP_BIAS=needs_up_bias, BLOCK_N=tile["BLOCK_M"], BLOCK_K=tile["BLOCK_N"],
                BLOCK_M=tile["BLOCK_K"], GROUP_M=tile["GROUP_M"], **common)
    grad_biases = [None if s is None else s.to(dtype) for s in sums]
    return grad_x, grads[0], grads[1], grad_biases[0], grad_biases[1]


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
    like = tangent_gate if tangent_gate is not None else tangent_up
    out = torch.empty((M, N), dtype=like.dtype, device=like.device)
    if out.numel() == 0:
        return out
    tg = tangent_gate if tangent_gate is not None else out
    tu = tangent_up if tangent_up is not None else out
    grid = (triton.cdiv(M, _ELEMENTWISE_BLOCK["BLOCK_M"]), triton.cdiv(N, _ELEMENTWISE_BLOCK["BLOCK_N"]))
    with dense._device_guard(out):
        _gated_tangent_kernel[grid](
            z_gate, z_up, tg, tu, out, M, N, z_gate.stride(0), z_gate.stride(1), z_up.stride(0), z_up.stride(1),
            tg.stride(0), tg.stride(1), tu.stride(0), tu.stride(1), out.stride(0), out.stride(1),
            HAS_TANGENT_GATE=tangent_gate is not None, HAS_TANGENT_UP=tangent_up is not None, ACTIVATION=act_id,
            NEGATIVE_SLOPE=negative_slope, ACC_FP64=out.dtype == torch.float64, **_ELEMENTWISE_BLOCK)
    return out


def _launch_gate(z_gate, z_up, grad_a, act_id: int, negative_slope: float):
    """The gating alone: A (grad_a None) or (δ_g, δ_u) [M, I], new contiguous tensors."""
    M, N = z_gate.shape
    outs = [torch.empty((M, N), dtype=z_gate.dtype, device=z_gate.device) for _ in range(1 if grad_a is None else 2)]
    if M * N > 0:
        g = grad_a if grad_a is not None else z_gate
        last = outs[-1]
        grid = (triton.cdiv(M, _ELEMENTWISE_BLOCK["BLOCK_M"]), triton.cdiv(N, _ELEMENTWISE_BLOCK["BLOCK_N"]))
        with dense._device_guard(z_gate):
            _gate_kernel[grid](
                z_gate, z_up, g, outs[0], last, M, N, z_gate.stride(0), z_gate.stride(1), z_up.stride(0),
                z_up.stride(1), g.stride(0), g.stride(1), outs[0].stride(0), outs[0].stride(1), last.stride(0),
                last.stride(1), BACKWARD=grad_a is not None, ACTIVATION=act_id, NEGATIVE_SLOPE=negative_slope,
                ACC_FP64=z_gate.dtype == torch.float64, **_ELEMENTWISE_BLOCK)
    return outs[0] if grad_a is None else tuple(outs)


def gate_forward(z_gate, z_up, act_id: int, negative_slope: float):
    """A = f(Z_g) ⊙ Z_u [M, I] from the projections' outputs."""
    return _launch_gate(z_gate, z_up, None, act_id, negative_slope)


def gate_backward(grad_a, z_gate, z_up, act_id: int, negative_slope: float):
    """(δ_g, δ_u) = (G ⊙ Z_u ⊙ f'(Z_g), G ⊙ f(Z_g)) [M, I]: the gradients of Z_g and Z_u."""
    return _launch_gate(z_gate, z_up, grad_a, act_id, negative_slope)
