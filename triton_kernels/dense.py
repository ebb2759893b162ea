"""Triton kernels and launchers of the dense layer.

The equations are stated once, with shapes, in ``manualbp/reference.py``; the
kernels below compute exactly those, in denominator layout (a gradient has the
shape of its variable). With x [M, K], weight [N, K], bias [N], one kernel per role:

    forward     Z = X Wᵀ + b      [M, N] = [M, K] [K, N] + [N]   _forward_kernel, Wᵀ by strides only;
                A = f(Z)                                          bias and f (and Z or f'(Z)) in the epilogue
    backward    δ = G ⊙ f'(Z)     [M, N]                         formed as the ∂C/∂X matmul loads its left factor,
                                                                  which also stores it where ∂C/∂W is wanted too
                                                                  (STORE_DELTA)
                ∂C/∂X = δ W       [M, K] = [M, N] [N, K]         _grad_x_kernel (δ in the loads), or _matmul_kernel
                                                                  for a stored δ and for identity
                ∂C/∂W = δᵀ X      [N, K] = [N, M] [M, K]         _grad_weight_kernel, δᵀ by strides only; δ formed
                                                                  on load where no ∂C/∂X stored it
                ∂C/∂b = 1ᵀ δ      [N]                            row sums of the δᵀ tiles _grad_weight_kernel loads,
                                                                  summed in its loop: 16-bit data by the tensor cores
                                                                  (δᵀ times a tile of ones), else in registers, per
                                                                  chunk of SUM_CHUNK_K rows, the chunks in order
    split-K     ∂C/∂W, ∂C/∂b over S splits of the rows            _grad_weight_split_kernel (float32 partials), then
                                                                  _split_sum_kernel (their sum in a fixed order);
                                                                  where few output tiles would leave SMs idle
                                                                  (grad_weight_splits)
    MLP         δₗ₋₁ = (δₗ Wₗ) ⊙ fₗ₋₁'(Zₗ₋₁), ∂C/∂bₗ₋₁            _grad_below_kernel: f' and column sums in the epilogue
    plain       A B                                               _matmul_kernel (manualbp's matmul, δ W, δᵀ X)
    recompute   A = f(Z)          [M, N]                         _activation_kernel (manualbp.MLP, recompute=True)

The role kernels are composed from shared @triton.jit parts: _source (an operand's pointer or TMA descriptor),
_tile_walk (one output tile, or a persistent walk), _main_loop (the K loop, with the δ prologue _prologue_factor
and the ∂C/∂b row sums _row_sums_start/_add/_end as options), and the epilogues (_forward_epilogue, _slice_times_f_prime with
_store_column_sums, _store_tile, _store_in_slices). jvp.py's kernel uses the same parts for its epilogue.

What the backward reads for f' (the "saved kind", chosen in manualbp/function.py):
A where f' can be computed from it (relu, leaky_relu with slope >= 0, sigmoid,
tanh); for gelu, gelu_tanh and silu f'(Z) itself, which the forward epilogue writes
in place of Z (F_PRIME_AS_Z): then δ costs one multiply in the operand load, however
expensive f' is (erf, exp), because it was evaluated once, in the forward; Z for
leaky_relu with a negative slope (a select). Since a prologue is evaluated once per
output tile of each matmul, the same element many times, f' from Z is formed there
only where it is a select (relu, leaky_relu); otherwise (manualbp.MLP keeps Z, to
recompute A) δ takes one elementwise pass, _delta_kernel, which also writes
per-block column sums for ∂C/∂b (summed in a fixed order: deterministic, no atomics).

On Hopper (sm_90+) the autotuner also tries TMA configs of every matmul kernel (TMA=True):
operand tiles through device-side tensor descriptors and a persistent grid, at most one
program per SM walking the output tiles, as Triton's tutorial 09; same prologues and epilogues,
kept only where _tma_layout finds every operand describable (docs/kernels.md: why device-side).

Every launch goes through a cached launch plan per role (``launch.py``, whose docstring states the interface):
a warm call allocates its outputs, builds its arguments and calls the compiled kernel's launcher.

No operand is copied to make it contiguous: every kernel takes both strides of
every matrix, so transposes are free. Offsets are 64-bit. Accumulation is in
float32 (float64 for float64 data), and so are the activations.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import triton
import triton.language as tl

from .. import config
from . import activations as act
from . import launch, toolchain

# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _tile_dot(a, b, acc, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b for one tile: a [BLOCK_M, BLOCK_K], b [BLOCK_K, BLOCK_N]."""
    if USE_DOT:
        # out_dtype explicit: Triton 3.6 defaults it to float32 and then refuses a float64 acc.
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    else:
        # Fallback for float64 where this Triton cannot lower tl.dot: exact fp64 FMAs.
        acc += tl.sum(a[:, :, None].to(acc.dtype) * b[None, :, :].to(acc.dtype), axis=1)
    return acc


@triton.jit
def _elementwise_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] tile of an [M, N] elementwise grid: 64-bit row and column offsets, mask."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    return offs_m, offs_n, mask


# What a backward kernel reads to get f' (SAVED_KIND); launchers take the names in SAVED_KINDS.
SAVED_Z = tl.constexpr(0)  # Z: f' = f_grad(Z)
SAVED_A = tl.constexpr(1)  # A = f(Z): f' = f_grad_from_output(A)
SAVED_F_PRIME = tl.constexpr(2)  # f'(Z) itself, written by the forward epilogue

# ∂C/∂b in the ∂C/∂W matmul (ROW_SUMS) needs one BLOCK_K per way of summing: one K step for every tile choice keeps
# the order of the sum the same on all of them (_sum_block_k). 16-bit data: the tensor cores' ones-MMA per K step.
SUM_BLOCK_K = tl.constexpr(2 ** 6)
# float32 and float64: running sums per column of the step, then a fixed tree over them; a short step, as the
# FMA loop of float32's IEEE products wants (K steps of 64 spilled 2.5 KB per thread there; compile report). With
# TF32 products the loop takes K steps of 32 and 64 in steps of it (_sums_in_k_steps_of), the same sums.
WIDE_SUM_LEVELS = tl.constexpr(4)  # of the tree
WIDE_SUM_BLOCK_K = tl.constexpr(2 ** 4)
# The launchers pass EVEN_K (unmasked K steps) where K is a multiple of this, which every BLOCK_K of a pointer
# config divides.
EVEN_K_STEP = tl.constexpr(64)
SUM_COLUMN_LEVELS = tl.constexpr(4)
SUM_COLUMNS = tl.constexpr(2 ** 4)  # of the ones tile the tensor cores sum 16-bit δ with (wgmma n16)
# ∂C/∂b's order over the ∂C/∂W matmul's K (the batch rows): chunks of this many rows, each summed from zero in the
# steps above, the chunk sums then added in order, chunk 0 first. Split-K (_grad_weight_split_kernel) splits K at
# chunk boundaries and keeps each chunk's sums for the fixed-order reduction (_split_sum_kernel): the same bits split
# or not. A multiple of every BLOCK_K; a chunk ends inside the one K loop (_k_range), which never restarts.
SUM_CHUNK_K = tl.constexpr(1024)


@triton.jit
def _times_activation_grad(grad_a, saved_ptrs, mask, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
                           SAVED_KIND: tl.constexpr, ROUND_TO: tl.constexpr):
    """δ = G ⊙ f'(Z) for one tile, in grad_a's dtype: f' from what saved_ptrs point at (SAVED_KIND). ROUND_TO: the
    stored G's dtype, or grad_a's own for a G never stored (act.delta_from_output).

    relu and leaky_relu from Z or A are selects, as PyTorch's own backward kernels:
    threshold_backward (0 where saved <= 0, else G: a NaN saved lets G through) and
    leaky_relu_backward (G where saved > 0, else G s). relu's select is exact in any dtype;
    leaky_relu's G s rounds s to grad_a's dtype, so callers pass a float32 or float64 G.
    """
    if ACTIVATION == act.IDENTITY:
        return grad_a  # f' = 1: nothing to read
    saved = tl.load(saved_ptrs, mask=mask, other=0.0)
    return _times_f_prime(grad_a, saved, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, ROUND_TO)  # masked entries stay 0


@triton.jit
def _times_f_prime(grad_a, saved, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, SAVED_KIND: tl.constexpr,
                   ROUND_TO: tl.constexpr):
    """δ = G ⊙ f'(Z) for one tile of G and of what was saved (SAVED_KIND), in grad_a's dtype; ROUND_TO as
    _times_activation_grad's."""
    saved = saved.to(grad_a.dtype)
    if SAVED_KIND == SAVED_F_PRIME:
        delta = grad_a * saved
    elif SAVED_KIND == SAVED_A:
        delta = act.delta_from_output(grad_a, saved, ACTIVATION, NEGATIVE_SLOPE, ROUND_TO)
    else:
        delta = act.delta(grad_a, saved, ACTIVATION, NEGATIVE_SLOPE)
    return delta


@triton.jit
def _prologue_factor(grad_a, saved, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
                     SAVED_KIND: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PACKED_PAIRS: tl.constexpr):
    """The left factor δ = G ⊙ f'(saved) of a backward matmul, from a tile of G and of the saved tensor, rounded to
    G's dtype as a stored δ would be. Directly in G's dtype where that is exact: relu's select, and G f'(Z) with
    f'(Z) saved (the product of two numbers of G's dtype is exact in float32, so one rounding either way: the same
    bits). Everything else in the compute dtype, then rounded (tanh and sigmoid from A: after each operation, as
    PyTorch's CUDA kernels, act.delta_from_output). PACKED_PAIRS: on 16-bit data, relu's and leaky_relu's selects
    and tanh's and sigmoid's arithmetic from A two lanes per instruction (act.*_packed: the same bits; dX prologue
    128x256x64 relu 242 -> 194 loop instructions, leaky_relu 291 -> 270, sm_90 bf16, Triton 3.9)."""
    packed: tl.constexpr = PACKED_PAIRS and grad_a.dtype.primitive_bitwidth == 16
    if SAVED_KIND == SAVED_F_PRIME:
        return _times_f_prime(grad_a, saved, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, grad_a.dtype)
    if ACTIVATION == act.RELU:
        if packed:
            delta = act.relu_delta_packed(grad_a, saved.to(grad_a.dtype))
        else:
            delta = _times_f_prime(grad_a, saved, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, grad_a.dtype)
        return delta
    if ACTIVATION == act.LEAKY_RELU and packed:
        scaled = (_widen(grad_a, COMPUTE_DTYPE) * NEGATIVE_SLOPE).to(grad_a.dtype)
        return act.leaky_relu_delta_packed(grad_a, scaled, saved.to(grad_a.dtype))
    if SAVED_KIND == SAVED_A and (ACTIVATION == act.TANH or ACTIVATION == act.SIGMOID) and packed:
        return act.delta_from_output_packed(grad_a, saved.to(grad_a.dtype), ACTIVATION)
    if ACTIVATION != act.LEAKY_RELU:  # leaky_relu only compares saved: exact in its own dtype, and cheaper
        saved = _widen(saved, COMPUTE_DTYPE)
    delta = _times_f_prime(_widen(grad_a, COMPUTE_DTYPE), saved, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND,
                           grad_a.dtype)
    return delta.to(grad_a.dtype)


@triton.jit
def _widen(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), exact; bfloat16 to float32 as its bits shifted into the high half, which the compiler then
    takes from a packed pair with one instruction each (LOP3 / IMAD.U32) instead of a PRMT and a shift for the high
    one: dX prologue 128x256x64, tanh 346 -> 315 loop instructions, leaky_relu 315 -> 299 (sm_90, Triton 3.9)."""
    if x.dtype == tl.bfloat16 and DTYPE == tl.float32:
        y = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def _k_step_mask(offs_k, k, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """Which of the BLOCK_K columns offs_k of K step k lie inside K. With EVEN_K (K a multiple of BLOCK_K) all of
    them: a constant the compiler folds away, loads without predicates, no mask arithmetic in the loop."""
    if EVEN_K:
        mask = tl.full((BLOCK_K,), 1, tl.int1)
    else:
        mask = offs_k < K - k * BLOCK_K
    return mask


@triton.jit
def _materialised(x, INLINE_PTX: tl.constexpr):
    """x (float32 or float64) as computed, each element rounded, before it is summed: the compiler would otherwise
    fuse the multiply that formed δ into the sum's first add (an FMA, which skips the product's rounding), and
    ∂C/∂b would differ in the last bits from the sum of the same δ stored (H200, Triton 3.6, float32 gelu and
    leaky_relu, 2026-12-04). Compiled for NVIDIA: an opaque PTX move, which nothing fuses across; the interpreter
    rounds every operation anyway."""
    if INLINE_PTX:
        if x.dtype == tl.float64:
            x = tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [x], dtype=tl.float64, is_pure=True, pack=1)
        else:
            x = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    return x


@triton.jit
def _row_sums_in_pairs(x, LEVELS: tl.constexpr):
    """x [rows, 2**LEVELS] summed over its columns as a fixed binary tree, ((x0 + x1) + (x2 + x3)) + ...: the same
    bits whatever the tile and register layout (a tl.sum's order follows the layout)."""
    tl.static_assert(x.shape[1] == 2 ** LEVELS, "the tree's width")
    for _ in tl.static_range(LEVELS):
        even, odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))
        x = even + odd
    return tl.reshape(x, (x.shape[0],))


@triton.jit
def _sum_rows_in_pairs(x):
    """x [groups, rows, columns] (rows a power of two, at most 64) summed over its rows as a fixed binary tree,
    ((x0 + x1) + (x2 + x3)) + ...: each level adds pairs of rows, and a sum of two numbers has the same bits
    whichever comes first, so the result does not depend on the tile or the register layout (a tl.sum's order
    does: on a GPU it follows which threads hold which elements)."""
    for _ in tl.static_range(6):
        if x.shape[1] > 1:
            x = tl.sum(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2, x.shape[2])), axis=2)
    tl.static_assert(x.shape[1] == 1, "at most 64 rows, a power of two")
    return tl.reshape(x, (x.shape[0], x.shape[2]))


@triton.jit
def _store_column_sums(delta, partial_ptr, tile_row, offs_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       PARTIAL_ROWS: tl.constexpr):
    """Column sums of δ over each PARTIAL_ROWS-row group of this [BLOCK_M, BLOCK_N] tile, one partial row each.

    Neither the groups nor the order of each group's sum depend on the tile: whatever BLOCK_M, BLOCK_N and warps
    a launch uses, the partial rows (and their fixed-order sum, ∂C/∂b) are the same, and every row is rewritten.
    (A tl.sum over the group's rows follows the register layout: on an H200, Triton 3.6, the 256x128 and 128x256
    tiles gave different bits, 2026-12-04. The tree costs spills under Triton 3.6: compile report.)
    """
    sums = _sum_rows_in_pairs(tl.reshape(delta, (BLOCK_M // PARTIAL_ROWS, PARTIAL_ROWS, BLOCK_N)))
    rows = tile_row.to(tl.int64) * (BLOCK_M // PARTIAL_ROWS) + tl.arange(0, BLOCK_M // PARTIAL_ROWS)
    mask = (rows[:, None] < tl.cdiv(M, PARTIAL_ROWS)) & (offs_n[None, :] < N)
    tl.store(partial_ptr + rows[:, None] * N + offs_n[None, :], sums, mask=mask)


# The role kernels below share one skeleton: operand sources (pointers, or with TMA device-side descriptors made
# once per program), the output tiles this program owns (one, or with TMA a persistent walk: _tile_walk), and per
# tile the shared main loop (_main_loop) and the role's epilogue. Their parameters follow the product they compute,
# out [M, N] = A [M, K] B [K, N]: for ∂C/∂X = δ W, M rows, N = in_features, K = out_features. Each takes only what
# its role reads; the optional outputs and inputs of a role (bias, Z, δ, ∂C/∂b sums) are flagged, their pointers
# then not read. tune_m, tune_n, tune_k: M, N, K rounded up to the autotuner's buckets (_tuning_bucket), not read:
# Triton's autotuner keys on named arguments only.


@triton.jit
def _matmul_kernel(
    a_ptr,  # A [M, K]
    b_ptr,  # B [K, N]
    out_ptr,  # A B [M, N], written
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_om, stride_on,
    tune_m, tune_n, tune_k,
    USE_DOT: tl.constexpr,  # tl.dot, or the fp64 FMA fallback
    INPUT_PRECISION: tl.constexpr,  # "ieee", or "tf32" only when PyTorch allows TF32
    ACC_FP64: tl.constexpr,  # accumulate in float64 (float64 data) instead of float32
    EPILOGUE_SPLIT: tl.constexpr,  # the store in this many column slices (1, 2, 4 or 8)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # rows of tiles visited together, for L2 reuse
    A_TRANSPOSED: tl.constexpr = False,  # A stored as its transpose (stride 1 along M): how TMA must describe it
    B_TRANSPOSED: tl.constexpr = False,  # B stored as its transpose (stride 1 along K)
    TMA_OK: tl.constexpr = False,  # the launcher found TMA usable (the pruning reads it; in the key)
    WARP_SPECIALIZE_OK: tl.constexpr = False,  # the settings allow the warp-specialized configs (likewise)
    TMA: tl.constexpr = False,  # the config: operand tiles by TMA descriptors, a persistent grid
    EVEN_K: tl.constexpr = False,  # K a multiple of BLOCK_K: the pointer loads need no mask
    WARP_SPECIALIZE: tl.constexpr = False,  # the config, with TMA: the K loop warp-specialized (_k_range)
):
    """out = A B: the plain product (dense.matmul: the MLP's δᵀ X and δ₀ W₀; δ W, δᵀ X of a stored δ)."""
    a_src, b_src = _sources(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, BLOCK_M, BLOCK_N,
                            BLOCK_K, BLOCK_K, A_TRANSPOSED, B_TRANSPOSED, TMA, TMA_OK)
    first, last, step = _tile_walk(M, N, BLOCK_M, BLOCK_N, TMA, WARP_SPECIALIZE, WARP_SPECIALIZE_OK)
    for tile in tl.range(first, last, step):
        pid_m, pid_n = _tile_position(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _product(pid_m, pid_n, a_src, b_src, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, USE_DOT,
                       INPUT_PRECISION, ACC_FP64, BLOCK_M, BLOCK_N, BLOCK_K, A_TRANSPOSED, B_TRANSPOSED, TMA,
                       EVEN_K, WARP_SPECIALIZE)
        _store_in_slices(acc, pid_m, pid_n, M, N, out_ptr, stride_om, stride_on, BLOCK_M, BLOCK_N, EPILOGUE_SPLIT)


@triton.jit
def _forward_kernel(
    x_ptr,  # X [M, K]
    weight_ptr,  # W [N, K], read as Wᵀ [K, N] through swapped strides
    bias_ptr,  # b [N]; read only with HAS_BIAS
    a_ptr,  # A = f(Z) [M, N], written
    z_ptr,  # Z = X Wᵀ + b [M, N], or f'(Z) with F_PRIME_AS_Z; written only with WRITE_Z
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_am, stride_an, stride_zm, stride_zn,
    stride_bias,  # b's stride (a sliced bias is not contiguous)
    tune_m, tune_n, tune_k,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # kernel id of f (0 = identity)
    NEGATIVE_SLOPE: tl.constexpr,  # leaky_relu's slope (unused otherwise)
    WRITE_Z: tl.constexpr,  # also store Z (the backward's f' needs it)
    F_PRIME_AS_Z: tl.constexpr,  # with WRITE_Z: store f'(Z) instead of Z
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,  # as _matmul_kernel's
    EPILOGUE_SPLIT: tl.constexpr,  # bias, f and f' in this many column slices: a whole large tile at once spills
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_TRANSPOSED: tl.constexpr = False, B_TRANSPOSED: tl.constexpr = False, TMA_OK: tl.constexpr = False,
    WARP_SPECIALIZE_OK: tl.constexpr = False,
    TMA: tl.constexpr = False, EVEN_K: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
):
    """Z = X Wᵀ + b, A = f(Z) (manualbp/reference.py's linear_forward): the main loop, then bias, f and Z (or f'(Z))
    in the epilogue."""
    x_src, w_src = _sources(x_ptr, weight_ptr, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, BLOCK_M, BLOCK_N,
                            BLOCK_K, BLOCK_K, A_TRANSPOSED, B_TRANSPOSED, TMA, TMA_OK)
    first, last, step = _tile_walk(M, N, BLOCK_M, BLOCK_N, TMA, WARP_SPECIALIZE, WARP_SPECIALIZE_OK)
    for tile in tl.range(first, last, step):
        pid_m, pid_n = _tile_position(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _product(pid_m, pid_n, x_src, w_src, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn, USE_DOT,
                       INPUT_PRECISION, ACC_FP64, BLOCK_M, BLOCK_N, BLOCK_K, A_TRANSPOSED, B_TRANSPOSED, TMA,
                       EVEN_K, WARP_SPECIALIZE)
        # The epilogue in EPILOGUE_SPLIT column slices, one after the other, as Triton's tutorial 09 splits its own.
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        parts = _column_slices(acc, EPILOGUE_SPLIT)
        for i in tl.static_range(EPILOGUE_SPLIT):
            part_n = _slice_columns(pid_n, i, BLOCK_N, EPILOGUE_SPLIT)
            _forward_epilogue(parts[i], offs_m, part_n, M, N, bias_ptr, stride_bias, z_ptr, stride_zm, stride_zn,
                              a_ptr, stride_am, stride_an, HAS_BIAS, ACTIVATION, NEGATIVE_SLOPE, WRITE_Z, F_PRIME_AS_Z)


@triton.jit
def _grad_x_kernel(
    g_ptr,  # G = ∂C/∂A [M, K] (K = out_features): the left factor is δ = G ⊙ f'(saved), formed as it is loaded
    weight_ptr,  # W [K, N]
    saved_ptr,  # what f' comes from [M, K] (SAVED_KIND)
    out_ptr,  # ∂C/∂X = δ W [M, N], written
    delta_ptr,  # δ [M, K]; written only with STORE_DELTA
    M, N, K,
    stride_gm, stride_gk, stride_wk, stride_wn, stride_sm, stride_sk, stride_om, stride_on, stride_dm, stride_dk,
    tune_m, tune_n, tune_k,
    ACTIVATION: tl.constexpr,  # kernel id of f, not identity (whose ∂C/∂X is _matmul_kernel's plain G W)
    NEGATIVE_SLOPE: tl.constexpr,
    SAVED_KIND: tl.constexpr,  # saved is Z, A or f'(Z) (SAVED_*)
    STORE_DELTA: tl.constexpr,  # also store δ, a share of its columns per output tile (_store_delta_share), for a
                                # plain ∂C/∂W matmul after this one
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_TRANSPOSED: tl.constexpr = False, B_TRANSPOSED: tl.constexpr = False, TMA_OK: tl.constexpr = False,
    WARP_SPECIALIZE_OK: tl.constexpr = False,
    TMA: tl.constexpr = False, EVEN_K: tl.constexpr = False,
    PACKED_PAIRS: tl.constexpr = False,  # a compiled NVIDIA GPU with packed 16-bit instructions (_packed_pairs)
    WARP_SPECIALIZE: tl.constexpr = False,
):
    """∂C/∂X = δ W with δ = G ⊙ f'(Z) formed in the loads (the prologue, _prologue_factor): nothing left for the
    epilogue but the store."""
    g_src, w_src = _sources(g_ptr, weight_ptr, M, N, K, stride_gm, stride_gk, stride_wk, stride_wn, BLOCK_M, BLOCK_N,
                            BLOCK_K, BLOCK_K, A_TRANSPOSED, B_TRANSPOSED, TMA, TMA_OK)
    s_src = _source(saved_ptr, M, K, stride_sm, stride_sk, BLOCK_M, BLOCK_K, A_TRANSPOSED, TMA, TMA_OK)
    compute_dtype: tl.constexpr = tl.float64 if ACC_FP64 else tl.float32  # the accumulator's
    first, last, step = _tile_walk(M, N, BLOCK_M, BLOCK_N, TMA, WARP_SPECIALIZE, WARP_SPECIALIZE_OK)
    for tile in tl.range(first, last, step):
        pid_m, pid_n = _tile_position(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        if STORE_DELTA:
            _store_delta_share(g_ptr, saved_ptr, delta_ptr, offs_m, offs_m < M, pid_n, N, K, stride_gm, stride_gk,
                               stride_sm, stride_sk, stride_dm, stride_dk, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND,
                               compute_dtype, PACKED_PAIRS, BLOCK_N, BLOCK_K)
        acc, _ = _main_loop(pid_m, pid_n, g_src, w_src, s_src, M, N, K, stride_gm, stride_gk, stride_wk, stride_wn,
                            stride_sm, stride_sk, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, False,
                            out_ptr.dtype.element_ty, USE_DOT, INPUT_PRECISION, ACC_FP64, BLOCK_M, BLOCK_N, BLOCK_K,
                            BLOCK_K, A_TRANSPOSED, B_TRANSPOSED, TMA, EVEN_K, PACKED_PAIRS, False, WARP_SPECIALIZE)
        _store_tile(acc, offs_m, pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N), M, N, out_ptr, stride_om,
                    stride_on)


@triton.jit
def _grad_weight_kernel(
    g_ptr,  # Gᵀ [M, K] (M = out_features, K = rows), read through swapped strides; the left factor is δᵀ, formed
            # on load where ACTIVATION is not identity, else Gᵀ is δᵀ itself (stored by ∂C/∂X or a δ pass)
    x_ptr,  # X [K, N]
    saved_ptr,  # what f' comes from, transposed like Gᵀ [M, K]; read only where ACTIVATION is not identity
    out_ptr,  # ∂C/∂W = δᵀ X [M, N], written
    row_sum_ptr,  # ∂C/∂b = 1ᵀ δ [M], the row sums of δᵀ (accumulator dtype); written only with ROW_SUMS
    M, N, K,
    stride_gm, stride_gk, stride_xk, stride_xn, stride_sm, stride_sk, stride_om, stride_on,
    tune_m, tune_n, tune_k,
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, SAVED_KIND: tl.constexpr,
    ROW_SUMS: tl.constexpr,  # form ∂C/∂b, summed in the loop in K steps of _sum_block_k(...) (STEP_K) whatever
                             # BLOCK_K (a multiple of it, _sums_in_k_steps_of): the same bits on every tile
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_TRANSPOSED: tl.constexpr = False, B_TRANSPOSED: tl.constexpr = False, TMA_OK: tl.constexpr = False,
    WARP_SPECIALIZE_OK: tl.constexpr = False,
    TMA: tl.constexpr = False, EVEN_K: tl.constexpr = False, PACKED_PAIRS: tl.constexpr = False,
    INLINE_PTX: tl.constexpr = False,  # compiled for an NVIDIA GPU (_inline_ptx): δ kept out of FMA contraction
                                       # before its sums (_materialised)
    WARP_SPECIALIZE: tl.constexpr = False,
):
    """∂C/∂W = δᵀ X, with δ formed in the loads where it is not stored, and ∂C/∂b = 1ᵀ δ as the row sums of the δᵀ
    tiles the loop loads (16-bit data: by the tensor cores against a tile of ones; else in registers)."""
    # The loop's K step: BLOCK_K, or with ROW_SUMS the sums' own step, taken BLOCK_K // STEP_K times per
    # iteration: ∂C/∂b is then summed in the same order at every BLOCK_K, and a K step of 128 still pays the
    # loop's per-iteration costs (barriers, waits, TMA issue) once per 128.
    SUMS_BY_MMA: tl.constexpr = USE_DOT and out_ptr.dtype.element_ty.primitive_bitwidth == 16
    STEP_K: tl.constexpr = (SUM_BLOCK_K.value if SUMS_BY_MMA else WIDE_SUM_BLOCK_K.value) if ROW_SUMS else BLOCK_K
    g_src, x_src = _sources(g_ptr, x_ptr, M, N, K, stride_gm, stride_gk, stride_xk, stride_xn, BLOCK_M, BLOCK_N,
                            BLOCK_K, STEP_K, A_TRANSPOSED, B_TRANSPOSED, TMA, TMA_OK)
    s_src = _source(saved_ptr, M, K, stride_sm, stride_sk, BLOCK_M, STEP_K, A_TRANSPOSED,
                    TMA and ACTIVATION != act.IDENTITY, TMA_OK)
    first, last, step = _tile_walk(M, N, BLOCK_M, BLOCK_N, TMA, WARP_SPECIALIZE, WARP_SPECIALIZE_OK)
    for tile in tl.range(first, last, step):
        pid_m, pid_n = _tile_position(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc, row_sums = _main_loop(pid_m, pid_n, g_src, x_src, s_src, M, N, K, stride_gm, stride_gk, stride_xk,
                                   stride_xn, stride_sm, stride_sk, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, ROW_SUMS,
                                   out_ptr.dtype.element_ty, USE_DOT, INPUT_PRECISION, ACC_FP64, BLOCK_M, BLOCK_N,
                                   BLOCK_K, STEP_K, A_TRANSPOSED, B_TRANSPOSED, TMA, EVEN_K, PACKED_PAIRS, INLINE_PTX,
                                   WARP_SPECIALIZE)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        if ROW_SUMS:
            if pid_n == 0:  # every column tile has the same row sums; the first one stores them
                tl.store(row_sum_ptr + offs_m, row_sums, mask=offs_m < M)
        _store_tile(acc, offs_m, pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N), M, N, out_ptr, stride_om,
                    stride_on)


@triton.jit
def _grad_weight_split_kernel(
    g_ptr,  # Gᵀ or a stored δᵀ [M, K], as _grad_weight_kernel's (K = rows, split here)
    x_ptr,  # X [K, N]
    saved_ptr,  # what f' comes from, transposed like Gᵀ [M, K]; read only where ACTIVATION is not identity
    partial_ptr,  # [splits, split_rows, N], accumulator dtype: each split's δᵀ X over its chunks of K, written
    chunk_sum_ptr,  # [cdiv(K, SUM_CHUNK_K), M], accumulator dtype: each chunk's row sums; written with ROW_SUMS
    M, N, K,
    stride_gm, stride_gk, stride_xk, stride_xn, stride_sm, stride_sk,
    split_rows,  # rows of one split's partial product: M rounded up to a multiple of every BLOCK_M
    splits,  # the splits of K: each takes cdiv(chunks, splits) whole chunks of SUM_CHUNK_K, the last the rest
    tune_m, tune_n, tune_k,
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, SAVED_KIND: tl.constexpr,
    ROW_SUMS: tl.constexpr,  # also each chunk's row sums, for ∂C/∂b
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,  # the partials' store in this many column slices
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_TRANSPOSED: tl.constexpr = False, B_TRANSPOSED: tl.constexpr = False, TMA_OK: tl.constexpr = False,
    WARP_SPECIALIZE_OK: tl.constexpr = False,
    TMA: tl.constexpr = False, EVEN_K: tl.constexpr = False, PACKED_PAIRS: tl.constexpr = False,
    INLINE_PTX: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,
):
    """Split-K ∂C/∂W: _grad_weight_kernel's product (and ∂C/∂b's chunk sums) over one split of K per program,
    written in the accumulator's dtype for _split_sum_kernel to add up in a fixed order. The output tiles of all
    splits are one stacked [splits * split_rows, N] grid; a split's tiles past M (its padding) compute nothing."""
    SUMS_BY_MMA: tl.constexpr = USE_DOT and g_ptr.dtype.element_ty.primitive_bitwidth == 16  # the data's dtype
    STEP_K: tl.constexpr = (SUM_BLOCK_K.value if SUMS_BY_MMA else WIDE_SUM_BLOCK_K.value) if ROW_SUMS else BLOCK_K
    tl.static_assert(SUM_CHUNK_K % BLOCK_K == 0, "a split is whole K steps")
    g_src, x_src = _sources(g_ptr, x_ptr, M, N, K, stride_gm, stride_gk, stride_xk, stride_xn, BLOCK_M, BLOCK_N,
                            BLOCK_K, STEP_K, A_TRANSPOSED, B_TRANSPOSED, TMA, TMA_OK)
    s_src = _source(saved_ptr, M, K, stride_sm, stride_sk, BLOCK_M, STEP_K, A_TRANSPOSED,
                    TMA and ACTIVATION != act.IDENTITY, TMA_OK)
    chunks = tl.cdiv(K, SUM_CHUNK_K)
    per_split = tl.cdiv(chunks, splits)
    tiles_per_split = split_rows // BLOCK_M
    first, last, step = _tile_walk(splits * split_rows, N, BLOCK_M, BLOCK_N, TMA, WARP_SPECIALIZE,
                                   WARP_SPECIALIZE_OK)
    for tile in tl.range(first, last, step):
        stacked_m, pid_n = _tile_position(tile, splits * split_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
        split = stacked_m // tiles_per_split
        pid_m = stacked_m - split * tiles_per_split
        if pid_m * BLOCK_M < M:
            chunk_first = split * per_split
            chunk_last = tl.minimum(chunk_first + per_split, chunks)
            if ACC_FP64:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            steps: tl.constexpr = SUM_CHUNK_K // BLOCK_K
            acc, _ = _k_range(acc, chunk_first * steps, tl.minimum(chunk_last * steps, tl.cdiv(K, BLOCK_K)), pid_m,
                              pid_n, g_src, x_src, s_src, chunk_sum_ptr, M, N, K, stride_gm, stride_gk, stride_xk,
                              stride_xn, stride_sm, stride_sk, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, ROW_SUMS, True,
                              g_ptr.dtype.element_ty, USE_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STEP_K,
                              A_TRANSPOSED, B_TRANSPOSED, TMA, EVEN_K, PACKED_PAIRS, INLINE_PTX, WARP_SPECIALIZE)
            # float32 partials in column slices: the whole tile's 64-bit addresses at once spilled (compile report)
            _store_in_slices(acc, stacked_m, pid_n, split.to(tl.int64) * split_rows + M, N, partial_ptr, N, 1,
                             BLOCK_M, BLOCK_N, EPILOGUE_SPLIT)


@triton.jit
def _split_sum_kernel(
    partial_ptr,  # [splits, split_rows, N] partial products of _grad_weight_split_kernel
    out_ptr,  # ∂C/∂W [M, N] in the data's dtype, written
    chunk_sum_ptr,  # [chunks, M] row sums per chunk of K; read only with ROW_SUMS
    row_sum_ptr,  # ∂C/∂b [M] in the accumulator's dtype; written only with ROW_SUMS
    M, N, split_rows, splits, chunks, stride_om, stride_on,
    ROW_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """∂C/∂W = the splits' partial products added in order, split 0 first (no atomics: the same bits run after
    run), and ∂C/∂b = the chunks' row sums added in order, chunk 0 first: _main_loop's own order, so the bits of
    the unsplit kernel."""
    offs_m, offs_n, mask = _elementwise_tile(M, N, BLOCK_M, BLOCK_N)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=partial_ptr.dtype.element_ty)
    for s in range(0, splits):
        rows = s * split_rows + offs_m
        total += tl.load(partial_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, total.to(out_ptr.dtype.element_ty),
             mask=mask)
    if ROW_SUMS:
        if tl.program_id(1) == 0:
            sums = tl.zeros((BLOCK_M,), dtype=row_sum_ptr.dtype.element_ty)
            for c in range(0, chunks):
                sums += tl.load(chunk_sum_ptr + c * M + offs_m, mask=offs_m < M, other=0.0)
            tl.store(row_sum_ptr + offs_m, sums, mask=offs_m < M)


@triton.jit
def _grad_below_kernel(
    delta_ptr,  # δₗ [M, K] of a layer of manualbp.MLP (K = its out_features)
    weight_ptr,  # Wₗ [K, N]
    saved_ptr,  # what fₗ₋₁' comes from [M, N] (SAVED_KIND): Zₗ₋₁, Aₗ₋₁ or fₗ₋₁'(Zₗ₋₁); not read for identity
    out_ptr,  # δₗ₋₁ = (δₗ Wₗ) ⊙ fₗ₋₁'(Zₗ₋₁) [M, N], written
    partial_ptr,  # [cdiv(M, PARTIAL_ROWS), N] column sums of δₗ₋₁ (its ∂C/∂b); written only with WRITE_PARTIALS
    M, N, K,
    stride_dm, stride_dk, stride_wk, stride_wn, stride_sm, stride_sn, stride_om, stride_on,
    tune_m, tune_n, tune_k,
    ACTIVATION: tl.constexpr,  # kernel id of fₗ₋₁
    NEGATIVE_SLOPE: tl.constexpr, SAVED_KIND: tl.constexpr,
    WRITE_PARTIALS: tl.constexpr,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,  # f' and the column sums in this many column slices (their tree spills at once)
    PARTIAL_ROWS: tl.constexpr,  # rows per column-sum group; divides BLOCK_M
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    A_TRANSPOSED: tl.constexpr = False, B_TRANSPOSED: tl.constexpr = False, TMA_OK: tl.constexpr = False,
    WARP_SPECIALIZE_OK: tl.constexpr = False,
    TMA: tl.constexpr = False, EVEN_K: tl.constexpr = False, INLINE_PTX: tl.constexpr = False,
    WARP_SPECIALIZE: tl.constexpr = False,
):
    """The backward of a stack: acc = δₗ Wₗ = ∂C/∂Aₗ₋₁ (G of the layer below), so this tile of δₗ₋₁ = G ⊙ f'(Zₗ₋₁)
    is formed in the epilogue instead of in a separate pass, with its column sums."""
    d_src, w_src = _sources(delta_ptr, weight_ptr, M, N, K, stride_dm, stride_dk, stride_wk, stride_wn, BLOCK_M,
                            BLOCK_N, BLOCK_K, BLOCK_K, A_TRANSPOSED, B_TRANSPOSED, TMA, TMA_OK)
    first, last, step = _tile_walk(M, N, BLOCK_M, BLOCK_N, TMA, WARP_SPECIALIZE, WARP_SPECIALIZE_OK)
    for tile in tl.range(first, last, step):
        pid_m, pid_n = _tile_position(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = _product(pid_m, pid_n, d_src, w_src, M, N, K, stride_dm, stride_dk, stride_wk, stride_wn, USE_DOT,
                       INPUT_PRECISION, ACC_FP64, BLOCK_M, BLOCK_N, BLOCK_K, A_TRANSPOSED, B_TRANSPOSED, TMA,
                       EVEN_K, WARP_SPECIALIZE)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        parts = _column_slices(acc, EPILOGUE_SPLIT)
        for i in tl.static_range(EPILOGUE_SPLIT):
            part_n = _slice_columns(pid_n, i, BLOCK_N, EPILOGUE_SPLIT)
            # G unrounded (the accumulator's) times f'
            out, mask = _slice_times_f_prime(parts[i], offs_m, part_n, M, N, saved_ptr, stride_sm, stride_sn,
                                             ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND)
            if WRITE_PARTIALS:
                out = tl.where(mask, out, 0.0)  # the wrapped rows and columns must not reach the sums
                out = _materialised(out, INLINE_PTX)
                _store_column_sums(out, partial_ptr, pid_m, part_n, M, N, BLOCK_M, BLOCK_N // EPILOGUE_SPLIT,
                                   PARTIAL_ROWS)
            _store_tile(out, offs_m, part_n, M, N, out_ptr, stride_om, stride_on)


@triton.jit
def _tile_walk(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
               WARP_SPECIALIZE_OK: tl.constexpr):
    """(first, stop, step) of the output tiles this program computes: its own one, or with TMA (a persistent grid
    of at most one program per SM, launch.Plan.grid) tiles program_id, + programs, ... as Triton's tutorial 09."""
    tl.static_assert(WARP_SPECIALIZE_OK or not WARP_SPECIALIZE, "warp-specialized configs only where the settings allow")
    if TMA:
        walk = (tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), tl.num_programs(0))
    else:
        walk = (tl.program_id(0), tl.program_id(0) + 1, 1)
    return walk


@triton.jit
def _sources(a_ptr, b_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STEP_K: tl.constexpr, A_TRANSPOSED: tl.constexpr,
             B_TRANSPOSED: tl.constexpr, TMA: tl.constexpr, TMA_OK: tl.constexpr):
    """_source of both factors, A [M, K] in [BLOCK_M, STEP_K] tiles and B [K, N] in [STEP_K, BLOCK_N] tiles."""
    a_src = _source(a_ptr, M, K, stride_am, stride_ak, BLOCK_M, STEP_K, A_TRANSPOSED, TMA, TMA_OK)
    b_src = _source(b_ptr, K, N, stride_bk, stride_bn, STEP_K, BLOCK_N, B_TRANSPOSED, TMA, TMA_OK)
    return a_src, b_src


@triton.jit
def _source(ptr, rows, cols, stride_rows, stride_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
            TRANSPOSED: tl.constexpr, TMA: tl.constexpr, TMA_OK: tl.constexpr):
    """Where the main loop reads a [rows, cols] operand: its pointer, or with TMA a _descriptor for
    [BLOCK_ROWS, BLOCK_COLS] tiles, made once per program."""
    if TMA:
        tl.static_assert(TMA_OK, "TMA configs only where the launcher found TMA usable")
        src = _descriptor(ptr, rows, cols, stride_rows, stride_cols, BLOCK_ROWS, BLOCK_COLS, TRANSPOSED)
    else:
        src = ptr
    return src


@triton.jit
def _descriptor(ptr, rows, cols, stride_rows, stride_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                TRANSPOSED: tl.constexpr):
    """A TMA descriptor of a [rows, cols] matrix for [BLOCK_ROWS, BLOCK_COLS] tiles; TRANSPOSED: stored as its
    transpose (stride_rows == 1), described as that, [cols, rows] (a descriptor's last stride must be 1)."""
    if TRANSPOSED:
        desc = tl.make_tensor_descriptor(ptr, shape=[cols, rows], strides=[stride_cols, 1],
                                         block_shape=[BLOCK_COLS, BLOCK_ROWS])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[rows, cols], strides=[stride_rows, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_COLS])
    return desc


@triton.jit
def _descriptor_tile(desc, row, col, TRANSPOSED: tl.constexpr):
    """The tile at (row, col) through a _descriptor; past the edges TMA fills zeros."""
    if TRANSPOSED:
        tile = tl.trans(desc.load([col, row]))
    else:
        tile = desc.load([row, col])
    return tile


@triton.jit
def _main_loop(
    pid_m, pid_n,  # which output tile
    a_src, b_src, s_src,  # A, B and the prologue's saved tensor (_source: pointers, or with TMA descriptors)
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_s0, stride_s1,
    ACTIVATION: tl.constexpr,  # the prologue's f: identity (no prologue), or δ = A ⊙ f'(saved) as A is loaded
    NEGATIVE_SLOPE: tl.constexpr, SAVED_KIND: tl.constexpr,
    ROW_SUMS: tl.constexpr,  # also sum the left factor's rows over K (∂C/∂b in the ∂C/∂W matmul)
    SUM_DTYPE: tl.constexpr,  # the data's dtype: 16-bit row sums by the tensor cores (SUMS_BY_MMA)
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STEP_K: tl.constexpr,  # the loop's K step: BLOCK_K, or the row sums' (_grad_weight_kernel); divides BLOCK_K
    A_TRANSPOSED: tl.constexpr, B_TRANSPOSED: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr,
    PACKED_PAIRS: tl.constexpr, INLINE_PTX: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """The K loop of one [BLOCK_M, BLOCK_N] output tile: (acc = A B in the accumulator's dtype, the row sums of the
    left factor [BLOCK_M] with ROW_SUMS, else zeros, unused). With ROW_SUMS the sums run chunk by chunk
    of SUM_CHUNK_K, the chunks' sums added in order (_k_range): the order split-K keeps (_grad_weight_split_kernel,
    _split_sum_kernel)."""
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc, row_sums = _k_range(acc, 0, tl.cdiv(K, BLOCK_K), pid_m, pid_n, a_src, b_src, s_src, a_src, M, N, K, stride_am,
                             stride_ak, stride_bk, stride_bn, stride_s0, stride_s1, ACTIVATION, NEGATIVE_SLOPE,
                             SAVED_KIND, ROW_SUMS, False, SUM_DTYPE, USE_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_N,
                             BLOCK_K, STEP_K, A_TRANSPOSED, B_TRANSPOSED, TMA, EVEN_K, PACKED_PAIRS, INLINE_PTX,
                             WARP_SPECIALIZE)
    return acc, row_sums


@triton.jit
def _k_range(
    acc,  # the accumulator, carried in
    k_first, k_last,  # the BLOCK_K steps of K this call takes: k_first, ..., k_last - 1; with ROW_SUMS k_first
                      # starts a chunk of SUM_CHUNK_K
    pid_m, pid_n, a_src, b_src, s_src,
    chunk_sum_ptr,  # with STORE_CHUNK_SUMS: [cdiv(K, SUM_CHUNK_K), M], each chunk's row sums, written
    M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_s0, stride_s1,
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, SAVED_KIND: tl.constexpr,
    ROW_SUMS: tl.constexpr,  # also the row sums of the left factor, per chunk of SUM_CHUNK_K
    STORE_CHUNK_SUMS: tl.constexpr,  # with ROW_SUMS: store each chunk's sums instead of adding them up
    SUM_DTYPE: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STEP_K: tl.constexpr, A_TRANSPOSED: tl.constexpr,
    B_TRANSPOSED: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr, PACKED_PAIRS: tl.constexpr,
    INLINE_PTX: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,  # with TMA: Triton's warp specialization of the loop (WARP_SPECIALIZE_AVAILABLE)
):
    """The loop over K steps k_first .. k_last - 1 (of BLOCK_K, each taken in BLOCK_K // STEP_K steps of STEP_K) of
    _main_loop's tile: (acc after them, the row sums [BLOCK_M] with ROW_SUMS and not STORE_CHUNK_SUMS).

    With ROW_SUMS each chunk of SUM_CHUNK_K is summed from zero in STEP_K steps and, at its last K step, its sums are
    added to the row sums (chunk k_first's first) or stored: neither the tile, BLOCK_K nor a split-K changes which
    steps a chunk sums, or in which order. One flat loop, its chunk ends a branch inside: a loop per chunk would
    restart the software pipeline (its prologue and drain) every chunk (docs/kernels.md).

    WARP_SPECIALIZE: the loop as ``tl.range(..., warp_specialize=True)``: Triton (3.6 and newer on Hopper) splits it
    into a producer warpgroup issuing the TMA loads and consumer warpgroups running the MMAs, with registers moved
    to the consumers (setmaxnreg). The same K steps in the same order: the same bits. Its own loop header, in a
    branch the compiler never reads where the flag is off (Triton 3.3's tl.range has no such argument)."""
    tl.static_assert(TMA or not WARP_SPECIALIZE, "warp specialization partitions TMA loads")
    SUMS_BY_MMA: tl.constexpr = USE_DOT and SUM_DTYPE.primitive_bitwidth == 16
    tl.static_assert(not ROW_SUMS or SUM_CHUNK_K % BLOCK_K == 0, "a chunk of K is whole K steps")
    # 64-bit offsets: M*stride may exceed 2**31.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, STEP_K).to(tl.int64)
    # (TMA loads need no mask: EVEN_K is read by the pointer loads only)
    tl.static_assert(TMA or not EVEN_K or EVEN_K_STEP % BLOCK_K == 0, "EVEN_K pointer loads need BLOCK_K | EVEN_K_STEP")
    tl.static_assert(BLOCK_K % STEP_K == 0, "BLOCK_K is a multiple of the loop's K step")
    # Rows and columns past the edge are wrapped onto valid ones (Triton's matmul tutorial): the main
    # loop then masks only K (not at all with EVEN_K), and what they compute is never stored.
    rows = offs_m % M
    cols = offs_n % N
    if TMA:  # the descriptors take the tiles' places; nothing walks
        a_at, b_at, s_at = a_src, b_src, s_src
        a_step = 0  # unused: the steps' tiles are the descriptors' to find
        b_step = 0
        s_step = 0
    else:
        start = tl.cast(k_first, tl.int64) * BLOCK_K  # the first column of K this range reads
        a_at = a_src + rows[:, None] * stride_am + (start + offs_k)[None, :] * stride_ak
        b_at = b_src + (start + offs_k)[:, None] * stride_bk + cols[None, :] * stride_bn
        # One step of STEP_K; the loop advances by BLOCK_K, its steps of STEP_K offset from there (_k_step).
        a_step = tl.cast(stride_ak, tl.int64) * STEP_K
        b_step = tl.cast(stride_bk, tl.int64) * STEP_K
        # The prologue's saved tensor walks along with A (used only with a prologue).
        s_at = s_src + rows[:, None] * stride_s0 + (start + offs_k)[None, :] * stride_s1
        s_step = tl.cast(stride_s1, tl.int64) * STEP_K
    row_sums = tl.zeros((BLOCK_M,), dtype=acc.dtype)
    if ROW_SUMS:
        running = _row_sums_start(BLOCK_M, STEP_K, SUMS_BY_MMA, acc.dtype)  # the current chunk's
    else:
        running = row_sums  # unused: carried through unchanged

    if WARP_SPECIALIZE:
        for k in tl.range(k_first, k_last, warp_specialize=True):
            acc, running, row_sums = _k_step(
                k, k_last, acc, running, row_sums, a_at, b_at, s_at, a_step, b_step, s_step, offs_k, offs_m, pid_m,
                pid_n, chunk_sum_ptr, M, K, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, ROW_SUMS, STORE_CHUNK_SUMS,
                SUMS_BY_MMA, USE_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STEP_K, A_TRANSPOSED, B_TRANSPOSED,
                TMA, EVEN_K, PACKED_PAIRS, INLINE_PTX)
    else:
        for k in range(k_first, k_last):
            acc, running, row_sums = _k_step(
                k, k_last, acc, running, row_sums, a_at, b_at, s_at, a_step, b_step, s_step, offs_k, offs_m, pid_m,
                pid_n, chunk_sum_ptr, M, K, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, ROW_SUMS, STORE_CHUNK_SUMS,
                SUMS_BY_MMA, USE_DOT, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, STEP_K, A_TRANSPOSED, B_TRANSPOSED,
                TMA, EVEN_K, PACKED_PAIRS, INLINE_PTX)
            if not TMA:  # the pointers past this K step
                a_at += a_step * (BLOCK_K // STEP_K)
                b_at += b_step * (BLOCK_K // STEP_K)
                if ACTIVATION != act.IDENTITY:
                    s_at += s_step * (BLOCK_K // STEP_K)
    return acc, row_sums


@triton.jit
def _k_step(
    k, k_last,  # this BLOCK_K step, and the range's end (a chunk's sums end at it)
    acc, running, row_sums,  # the accumulator, the current chunk's running sums, the row sums: carried
    a_at, b_at, s_at,  # where this step's tiles of A, B and the saved tensor are: pointers, or with TMA descriptors
    a_step, b_step, s_step,  # the pointers' distance along K between steps of STEP_K (unused with TMA)
    offs_k, offs_m, pid_m, pid_n, chunk_sum_ptr, M, K,
    ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, SAVED_KIND: tl.constexpr, ROW_SUMS: tl.constexpr,
    STORE_CHUNK_SUMS: tl.constexpr, SUMS_BY_MMA: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STEP_K: tl.constexpr,
    A_TRANSPOSED: tl.constexpr, B_TRANSPOSED: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr,
    PACKED_PAIRS: tl.constexpr, INLINE_PTX: tl.constexpr,
):
    """One BLOCK_K step of _k_range's loop (its docstring): (acc, running, row_sums) after it, in BLOCK_K // STEP_K
    steps of STEP_K (with pointers, each step's loads offset from the BLOCK_K step's: _k_range advances them)."""
    steps: tl.constexpr = SUM_CHUNK_K.value // BLOCK_K  # K steps per chunk (an int: the interpreter's k is one)
    if ROW_SUMS:
        # A chunk's first K step starts its sums from zero, a select just before its add (the ones-MMA). Zeroed
        # at a chunk's end instead, the accumulator's registers were written while wgmmas ran, and ptxas 12.8
        # (Triton 3.6) serialized every wgmma of the kernel (compile report: wgmma_serialized).
        if k % steps == 0:
            running = _row_sums_start(BLOCK_M, STEP_K, SUMS_BY_MMA, acc.dtype)
    for step in tl.static_range(BLOCK_K // STEP_K):
        k_step = k * (BLOCK_K // STEP_K) + step  # in units of STEP_K
        if TMA:
            a = _descriptor_tile(a_at, pid_m * BLOCK_M, k_step * STEP_K, A_TRANSPOSED)
        else:
            mask_k = _k_step_mask(offs_k, k_step, K, STEP_K, EVEN_K)
            a = tl.load(a_at + step * a_step, mask=mask_k[None, :], other=0.0)
        if ACTIVATION != act.IDENTITY:
            if TMA:
                saved = _descriptor_tile(s_at, pid_m * BLOCK_M, k_step * STEP_K, A_TRANSPOSED)
            else:
                saved = tl.load(s_at + step * s_step, mask=mask_k[None, :], other=0.0)
            # δ = G ⊙ f'(saved) for this tile, rounded to the data dtype as a stored δ would be.
            a = _prologue_factor(a, saved, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, acc.dtype, PACKED_PAIRS)
        if ROW_SUMS:  # δ as rounded for the product: eager sums a stored δ (fewer instructions than unrounded)
            running = _row_sums_add(running, a, SUMS_BY_MMA, INLINE_PTX)
        if TMA:
            b = _descriptor_tile(b_at, k_step * STEP_K, pid_n * BLOCK_N, B_TRANSPOSED)
        else:
            b = tl.load(b_at + step * b_step, mask=mask_k[:, None], other=0.0)
        acc = _tile_dot(a, b, acc, USE_DOT, INPUT_PRECISION)
    if ROW_SUMS:
        # the chunk's last K step: its sums are finished (`or`, not `|`: in Triton 3.3's interpreter k is a Python
        # int, and a bool | tensor fails there)
        if k % steps == steps - 1 or k == k_last - 1:
            sums = _row_sums_end(running, SUMS_BY_MMA)
            if STORE_CHUNK_SUMS:
                if pid_n == 0:  # every column tile has the same sums; the first one stores them
                    tl.store(chunk_sum_ptr + tl.cast(k // steps, tl.int64) * M + offs_m, sums, mask=offs_m < M)
            else:
                row_sums += sums
    return acc, running, row_sums


# The row sums of the left factor over K (1ᵀ δ: ∂C/∂b in the ∂C/∂W matmul), in three parts in _k_range's loop per chunk:
# summed without a reduction or data movement, in an order no tile choice changes. 16-bit data (SUMS_BY_MMA): the
# tensor cores add δ's rows up, δ [BLOCK_M, STEP_K] times a [STEP_K, SUM_COLUMNS] tile of ones (exact products, a
# float32 sum over K in the MMA's fixed order: the same on every tile); 2.5x fewer loop instructions than adding the
# tile up in registers. Otherwise (float32, float64) a running sum in registers: per row, over K in WIDE_SUM_BLOCK_K
# steps, then a fixed pairwise tree at the chunk's end. Either way STEP_K is the sums' step (_sum_block_k), whatever
# BLOCK_K.


@triton.jit
def _row_sums_start(BLOCK_M: tl.constexpr, STEP_K: tl.constexpr, SUMS_BY_MMA: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """The running sums before a chunk's first K step: [BLOCK_M, SUM_COLUMNS] MMA accumulators, or [BLOCK_M, STEP_K]."""
    if SUMS_BY_MMA:
        running = tl.zeros((BLOCK_M, SUM_COLUMNS), dtype=ACC_DTYPE)
    else:
        running = tl.zeros((BLOCK_M, STEP_K), dtype=ACC_DTYPE)
    return running


@triton.jit
def _row_sums_add(running, a, SUMS_BY_MMA: tl.constexpr, INLINE_PTX: tl.constexpr):
    """running plus the rows of one K step's left factor a [BLOCK_M, STEP_K]."""
    if SUMS_BY_MMA:
        ones = tl.full((a.shape[1], SUM_COLUMNS), 1.0, a.dtype)
        running = tl.dot(a, ones, running, out_dtype=running.dtype)
    else:
        running += _materialised(a.to(running.dtype), INLINE_PTX)
    return running


@triton.jit
def _row_sums_end(running, SUMS_BY_MMA: tl.constexpr):
    """The row sums [BLOCK_M] after a chunk's last K step."""
    if SUMS_BY_MMA:  # its SUM_COLUMNS columns are the same sums: the first one
        for _ in tl.static_range(SUM_COLUMN_LEVELS):
            running, _right = _column_halves(running)
        sums = tl.reshape(running, (running.shape[0],))
    else:
        sums = _row_sums_in_pairs(running, WIDE_SUM_LEVELS)
    return sums


@triton.jit
def _slice_times_f_prime(part, offs_m, part_n, M, N, saved_ptr, stride_s0, stride_s1, ACTIVATION: tl.constexpr,
                         NEGATIVE_SLOPE: tl.constexpr, SAVED_KIND: tl.constexpr):
    """(part ⊙ f'(saved), its mask) for the rows offs_m and columns part_n of an [M, N] output, part in the
    compute dtype (an accumulator's slice: no stored G to round to), f' from saved (SAVED_KIND) at the same place."""
    mask = (offs_m < M)[:, None] & (part_n < N)[None, :]
    saved_ptrs = saved_ptr + offs_m[:, None] * stride_s0 + part_n[None, :] * stride_s1
    return _times_activation_grad(part, saved_ptrs, mask, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, part.dtype), mask


@triton.jit
def _product(pid_m, pid_n, a_src, b_src, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, USE_DOT: tl.constexpr,
             INPUT_PRECISION: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, A_TRANSPOSED: tl.constexpr, B_TRANSPOSED: tl.constexpr, TMA: tl.constexpr,
             EVEN_K: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """A B for one output tile: _main_loop without a prologue or row sums."""
    acc, _ = _main_loop(pid_m, pid_n, a_src, b_src, a_src, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, 0, 0,
                        act.IDENTITY, 0.0, SAVED_Z, False, tl.float32, USE_DOT, INPUT_PRECISION, ACC_FP64, BLOCK_M,
                        BLOCK_N, BLOCK_K, BLOCK_K, A_TRANSPOSED, B_TRANSPOSED, TMA, EVEN_K, False, False,
                        WARP_SPECIALIZE)
    return acc


@triton.jit
def _store_tile(acc, offs_m, offs_n, M, N, out_ptr, stride_om, stride_on):
    """acc stored as it is, at rows offs_m and columns offs_n of out [M, N], in out's dtype."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _store_in_slices(acc, pid_m, pid_n, M, N, out_ptr, stride_om, stride_on, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, SLICES: tl.constexpr):
    """Output tile (pid_m, pid_n) of out stored in SLICES column slices, one after the other."""
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    parts = _column_slices(acc, SLICES)
    for i in tl.static_range(SLICES):
        _store_tile(parts[i], offs_m, _slice_columns(pid_n, i, BLOCK_N, SLICES), M, N, out_ptr, stride_om, stride_on)


@triton.jit
def _slice_columns(pid_n, i, BLOCK_N: tl.constexpr, SLICES: tl.constexpr):
    """The 64-bit column offsets of slice i of SLICES (_column_slices) of output column tile pid_n."""
    width: tl.constexpr = BLOCK_N // SLICES
    return pid_n.to(tl.int64) * BLOCK_N + i * width + tl.arange(0, width)


@triton.jit
def _store_delta_share(g_ptr, saved_ptr, delta_ptr, offs_m, mask_m, pid_n, N, K, stride_gm, stride_gk, stride_s0,
                       stride_s1, stride_dm, stride_dk, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr,
                       SAVED_KIND: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PACKED_PAIRS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """δ = G ⊙ f'(saved) [M, K] stored for this tile's rows offs_m, at the BLOCK_K-column blocks pid_n, pid_n +
    (output column tiles), ...: the tiles of one row block store all of δ between them, each block once.

    Its own elementwise loop (coalesced loads and stores, before the main loop; the G and saved tiles it reads are
    read again by the main loops of this row block): δ stored from inside the main loop made Triton form δ a second
    time there in the store's register layout (dX 128x256x64 leaky_relu: 336 -> 540 loop instructions).
    The same _prologue_factor as the main loop's: the same bits.
    """
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)  # 64-bit offsets, as the main loop's
    for j in range(pid_n, tl.cdiv(K, BLOCK_K), tl.cdiv(N, BLOCK_N)):
        cols = j * BLOCK_K + offs_k
        mask = mask_m[:, None] & (cols < K)[None, :]
        grad_a = tl.load(g_ptr + offs_m[:, None] * stride_gm + cols[None, :] * stride_gk, mask=mask, other=0.0)
        saved = grad_a  # identity reads nothing (STORE_DELTA is not asked for it)
        if ACTIVATION != act.IDENTITY:
            saved = tl.load(saved_ptr + offs_m[:, None] * stride_s0 + cols[None, :] * stride_s1, mask=mask,
                            other=0.0)
        delta = _prologue_factor(grad_a, saved, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND, COMPUTE_DTYPE, PACKED_PAIRS)
        tl.store(delta_ptr + offs_m[:, None] * stride_dm + cols[None, :] * stride_dk,
                 delta.to(delta_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _column_halves(x):
    """The left and right column halves of a [rows, columns] tile."""
    halves = tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1))
    return tl.split(halves)


@triton.jit
def _column_slices(x, SLICES: tl.constexpr):
    """x [rows, columns] as a tuple of SLICES (1, 2, 4 or 8) column slices, left to right."""
    # One return at the end: Triton compiles a return inside a (static) if only where it ends the function.
    if SLICES == 1:
        parts = (x,)
    else:
        left, right = _column_halves(x)
        if SLICES == 2:
            parts = (left, right)
        else:
            q0, q1 = _column_halves(left)
            q2, q3 = _column_halves(right)
            if SLICES == 4:
                parts = (q0, q1, q2, q3)
            else:
                e0, e1 = _column_halves(q0)
                e2, e3 = _column_halves(q1)
                e4, e5 = _column_halves(q2)
                e6, e7 = _column_halves(q3)
                parts = (e0, e1, e2, e3, e4, e5, e6, e7)
    return parts


@triton.jit
def _tile_position(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row, column) of output tile number pid, in the grouped order of Triton's matmul tutorial: GROUP_M rows of
    tiles visited together, for L2 reuse."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _forward_epilogue(acc, offs_m, offs_n, M, N, bias_ptr, stride_bias, z_ptr, stride_zm, stride_zn, out_ptr,
                      stride_om, stride_on, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                      NEGATIVE_SLOPE: tl.constexpr, WRITE_Z: tl.constexpr, F_PRIME_AS_Z: tl.constexpr):
    """Forward, on acc = X Wᵀ for rows offs_m, columns offs_n: Z = acc + b, A = f(Z) (in acc's precision), stored."""
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    z = acc
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0)
        z = z + bias[None, :].to(acc.dtype)
    if WRITE_Z:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
        if F_PRIME_AS_Z:
            # f'(Z) from the unrounded Z: the backward then multiplies, whatever f' costs.
            tl.store(z_ptrs, act.f_grad(z, ACTIVATION, NEGATIVE_SLOPE).to(z_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(z_ptrs, z.to(z_ptr.dtype.element_ty), mask=mask)
    out = act.f(z, ACTIVATION, NEGATIVE_SLOPE)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _delta_kernel(
    grad_a_ptr,  # G = dC/dA [M, N] (any strides, stride 0 included)
    saved_ptr,  # what f' comes from [M, N] (SAVED_KIND): Z, A or f'(Z)
    delta_ptr,  # δ [M, N]; written only when WRITE_DELTA
    partial_ptr,  # [cdiv(M, BLOCK_M), N] column sums of δ per row block; written when WRITE_PARTIALS
    M,
    N,
    stride_gm, stride_gn,  # G's strides
    stride_sm, stride_sn,  # saved tensor's strides
    stride_dm, stride_dn,  # δ's strides
    ACTIVATION: tl.constexpr,  # kernel id of f; identity reads no saved tensor
    NEGATIVE_SLOPE: tl.constexpr,
    SAVED_KIND: tl.constexpr,  # SAVED_Z, SAVED_A or SAVED_F_PRIME
    WRITE_DELTA: tl.constexpr,  # store δ (not needed when only the bias needs a gradient)
    WRITE_PARTIALS: tl.constexpr,  # store the column sums for dC/db
    COMPUTE_FP64: tl.constexpr,  # float64 data computes in float64, everything else in float32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m, offs_n, mask = _elementwise_tile(M, N, BLOCK_M, BLOCK_N)
    if COMPUTE_FP64:
        compute_dtype = tl.float64
    else:
        compute_dtype = tl.float32
    grad_a = tl.load(grad_a_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
    saved_ptrs = saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn
    delta = _times_activation_grad(grad_a.to(compute_dtype), saved_ptrs, mask, ACTIVATION, NEGATIVE_SLOPE,
                                   SAVED_KIND, grad_a.dtype)  # δ = G ⊙ f'(Z)

    if WRITE_DELTA:
        delta_ptrs = delta_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
        tl.store(delta_ptrs, delta.to(delta_ptr.dtype.element_ty), mask=mask)
    if WRITE_PARTIALS:
        # Summed from the unrounded δ, in the compute dtype.
        _store_column_sums(delta, partial_ptr, tl.program_id(0), offs_n, M, N, BLOCK_M, BLOCK_N, BLOCK_M)


@triton.jit
def _activation_kernel(
    z_ptr,  # Z [M, N] (any strides)
    a_ptr,  # A = f(Z) [M, N], written
    M,
    N,
    stride_zm, stride_zn,  # Z's strides
    stride_am, stride_an,  # A's strides
    ACTIVATION: tl.constexpr,  # kernel id of f
    NEGATIVE_SLOPE: tl.constexpr,
    COMPUTE_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # A = f(Z) alone: manualbp.MLP(recompute=True) rebuilds each hidden A from the kept Z
    # in the backward, with the same f (and the same compute dtype) as the forward epilogue.
    offs_m, offs_n, mask = _elementwise_tile(M, N, BLOCK_M, BLOCK_N)
    z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, mask=mask, other=0.0)
    if COMPUTE_FP64:
        z = z.to(tl.float64)
    else:
        z = z.to(tl.float32)
    a = act.f(z, ACTIVATION, NEGATIVE_SLOPE)
    tl.store(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an, a.to(a_ptr.dtype.element_ty),
             mask=mask)


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


def is_interpreted() -> bool:
    """True when the kernels were created by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_matmul_kernel).__name__ == "InterpretedFunction"


def _warp_specialize_available() -> bool:
    """Whether this Triton warp-specializes a Hopper K loop: tl.range takes warp_specialize (Triton 3.4+) and the
    NVIDIA backend has the Hopper partitioning pass (without it the flag changes nothing on sm_90, and a config meant
    for three warpgroups would compile as one); from Triton 3.6, the oldest whose pass compiled these kernels here."""
    if toolchain.triton_version() < (3, 6):
        return False
    if "warp_specialize" not in inspect.signature(tl.range.__init__).parameters:
        return False
    try:
        from triton._C.libtriton import nvidia
    except ImportError:  # a Triton without the NVIDIA backend
        return False
    return hasattr(getattr(nvidia.passes, "hopper", None), "add_hopper_warpspec")


WARP_SPECIALIZE_AVAILABLE = _warp_specialize_available()


def _warp_specialized_configs() -> list:
    """The TMA configs whose K loop Triton warp-specializes (WARP_SPECIALIZE_AVAILABLE): a producer warpgroup issuing
    the loads and two consumer warpgroups of 64 rows each (12 warps from num_warps=4, registers moved to the consumers
    by setmaxnreg) running the MMAs, δ's prologue and the epilogue. Not offered to launches that sum ∂C/∂b
    (_warp_specialize_excluded). The epilogue's column slices decide where the pass compiles (compile report, sm_90,
    bf16, 2026-12-07): Triton 3.8 and 3.9 partition the sliced epilogues of the two TMA tiles with no spill, where the
    128x128 tile unsliced spills 40-860 bytes (tanh, gelu_tanh); Triton 3.6's pass fails on a sliced epilogue
    ("PassManager::run failed": an error the autotuner would not catch) and partitions the 128x128 tile unsliced
    with no spill (128x256 unsliced spills 1824-1964 bytes)."""
    if not WARP_SPECIALIZE_AVAILABLE:
        return []
    tile = {"BLOCK_M": 128, "BLOCK_K": 64, "GROUP_M": 8, "TMA": True, "WARP_SPECIALIZE": True}
    if toolchain.triton_version() >= (3, 8):
        return [triton.Config({**tile, "BLOCK_N": 256, "EPILOGUE_SPLIT": 8}, num_stages=3, num_warps=4),
                triton.Config({**tile, "BLOCK_N": 128, "EPILOGUE_SPLIT": 4}, num_stages=4, num_warps=4)]
    return [triton.Config({**tile, "BLOCK_N": 128, "EPILOGUE_SPLIT": 1}, num_stages=4, num_warps=4)]


def matmul_configs() -> list:
    """The tile shapes the GPU autotuner tries for every matmul (forward, ∂C/∂X, ∂C/∂W).

    Few on purpose: each costs one compile and one benchmark on first use. Ordered and
    pruned by benchmarks/compile_report.py (sm_90, bf16; compiler figures, not timings):
    BLOCK_N = 256 first; 64x64x32 replaced by 64x128x64 in two stages (its loop was
    issue-bound, pressure ~1.0, the tutorial's too). EPILOGUE_SPLIT: column slices of the forward epilogue, the fewest
    with no spill at any activation (f and f' of a whole large tile spilled 850-900 bytes), and of the MLP backward
    epilogue (8 at 128x128x32 and 4 at TMA 128x128x64: its fixed tree of ∂C/∂b partial sums spilled 8-128 bytes
    with fewer under Triton 3.6).
    Pruned by shared memory, for ∂C/∂b by BLOCK_K and BLOCK_N, and to the prologue's launches for K steps
    over 64, in :func:`_prune_configs`.
    """
    c = triton.Config
    return [
        # Large tiles: big bf16/fp16 problems on Hopper/Ampere.
        c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_SPLIT": 8}, num_stages=3, num_warps=8),
        c({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_SPLIT": 8}, num_stages=3, num_warps=8),
        # Square, deep pipeline: the all-round choice.
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_SPLIT": 2}, num_stages=4, num_warps=8),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "EPILOGUE_SPLIT": 8}, num_stages=4, num_warps=4),
        # Rectangular: skinny outputs (few rows or few columns).
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_SPLIT": 2}, num_stages=4, num_warps=4),
        c({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_SPLIT": 2}, num_stages=4, num_warps=4),
        # Hopper (sm_90+, kept only where _tma_layout finds TMA usable): operand tiles by TMA descriptors and a
        # persistent grid, one program per SM walking the output tiles (Triton's tutorial 09), at the two tiles
        # the pointer kernels do best at.
        c({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_SPLIT": 8, "TMA": True},
          num_stages=3, num_warps=8),
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_SPLIT": 4, "TMA": True},
          num_stages=4, num_warps=8),
        # Hopper, launches with δ formed in the loads (A_PROLOGUE) but no ∂C/∂b: K steps of 128 pay the prologue's
        # per-step costs (the barriers around each TMA issue, the waits, the loads of G and the saved tensor into
        # registers) half as often; one warpgroup: two would split the 256 columns and each form the whole δ tile
        # (8 warps: leaky_relu 0.77 issue pressure against 0.38).
        # Lowest issue pressure for leaky_relu and tanh (whose δ takes float32 arithmetic per element); whether
        # its two stages and single warpgroup hide latency as well is the GPU autotuner's call.
        c({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "EPILOGUE_SPLIT": 4, "TMA": True},
          num_stages=2, num_warps=4),
        # Hopper, warp-specialized where Triton partitions the loop (_warp_specialized_configs).
        *_warp_specialized_configs(),
        # float32 only (_prune_configs): short K steps for the FMA loop of IEEE products (no tensor cores), the only
        # tiles of that loop with no spill in any kernel (compile report --dtype fp32: 128x128x32 w4 spilled 280-408
        # bytes, 64x128x64 224 with the prologue); and the K step of float32's ∂C/∂b (WIDE_SUM_BLOCK_K).
        c({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8, "EPILOGUE_SPLIT": 4}, num_stages=3, num_warps=8),
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16, "GROUP_M": 8, "EPILOGUE_SPLIT": 2}, num_stages=3, num_warps=4),
        # Small problems, and what fits everywhere: float32 with the prologue and ∂C/∂b in 160 KiB. Last: the one
        # kept when nothing fits.
        c({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_SPLIT": 2}, num_stages=2, num_warps=4),
    ]


# Fixed tiles where no autotuning happens: the CPU interpreter (speed is meaningless
# there, small tiles keep the numpy work small) and float64 (for gradcheck, not speed).
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "EPILOGUE_SPLIT": 2}
_FP64_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4, "EPILOGUE_SPLIT": 1}
_FP64_FMA_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4,
                    "EPILOGUE_SPLIT": 1}  # [16, 16, 16] fp64 products in registers
_DELTA_BLOCK = {"BLOCK_M": 64, "BLOCK_N": 64}
# Rows per column-sum group of ∂C/∂b in an autotuned (or untuned GPU) launch: divides every
# BLOCK_M of matmul_configs(), so the partial sums do not depend on the tile the tuner picks.
_PARTIAL_ROWS = 64

@functools.lru_cache(maxsize=None)
def _shared_memory_bytes(device_index: int) -> int:
    """Shared memory one block may use on this GPU (227 KiB on H100, 163 KiB on A100)."""
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _pipelined_bytes(config, element_size: int, a_tiles: int = 1, b_tiles: int = 1) -> int:
    """Shared memory of a config's pipelined operand tiles per stage: a_tiles [BLOCK_M, BLOCK_K] tiles (A; with the
    prologue also the saved tensor's) and b_tiles [BLOCK_K, BLOCK_N] tiles (B)."""
    k = config.kwargs
    rows = k["BLOCK_M"] * a_tiles + k["BLOCK_N"] * b_tiles
    return rows * k["BLOCK_K"] * element_size * config.num_stages


def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles whose pipelined operand tiles would not fit in shared memory (they would fail to compile), the
    float32 tiles (K steps of WIDE_SUM_BLOCK_K) for other data, for ∂C/∂b in the ∂C/∂W matmul (ROW_SUMS) every
    BLOCK_K _sums_in_k_steps_of refuses (the sums' order would change) and the narrow tiles, K steps over 64 where no
    prologue forms δ, the two exclusions of the TMA 128x256 tile (_tma_prologue_excluded,
    _tma_partials_excluded), and the warp-specialized configs unless the settings allow them (WARP_SPECIALIZE_OK),
    and where _warp_specialize_excluded says."""
    a = named_args["a_ptr"]
    budget = _shared_memory_bytes(a.device.index or 0)  # a CUDA tensor's device always has its index
    flag = lambda name: bool(kwargs.get(name, named_args.get(name, False)))  # noqa: E731
    if not flag("TMA_OK"):
        configs = [cfg for cfg in configs if not cfg.kwargs.get("TMA", False)]
    configs = _for_element_size(configs, a.element_size())
    if flag("ROW_SUMS"):
        # BLOCK_N < 128 repeats δ and its sums for few output columns: spills and 2.5x the loop's issue pressure.
        block_k = _sum_block_k(named_args.get("out_ptr", a).dtype, flag("USE_DOT") or "USE_DOT" not in kwargs)
        tf32 = kwargs.get("INPUT_PRECISION") == "tf32"
        configs = [cfg for cfg in configs if _sums_in_k_steps_of(cfg, block_k, tf32) and cfg.kwargs["BLOCK_N"] >= 128]
    if not flag("A_PROLOGUE"):  # K steps over 64 are for the prologue's launches (matmul_configs)
        configs = [cfg for cfg in configs if cfg.kwargs["BLOCK_K"] <= 64]
    else:
        configs = [cfg for cfg in configs if not _tma_prologue_excluded(cfg)]
    if flag("WRITE_PARTIALS"):  # the MLP epilogue's ∂C/∂b partial sums
        configs = [cfg for cfg in configs if not _tma_partials_excluded(cfg)]
    if not flag("WARP_SPECIALIZE_OK") or flag("ROW_SUMS") or flag("WRITE_PARTIALS"):
        configs = [cfg for cfg in configs if not _warp_specialize_excluded(cfg)]
    a_tiles = 2 if flag("A_PROLOGUE") else 1
    kept = [cfg for cfg in configs if _pipelined_bytes(cfg, a.element_size(), a_tiles) <= budget]
    return kept or configs[-1:]


def _for_element_size(configs, element_size: int) -> list:
    """configs without the float32 tiles (K steps of WIDE_SUM_BLOCK_K, matmul_configs) unless the data is float32."""
    return configs if element_size == 4 else [cfg for cfg in configs
                                               if cfg.kwargs["BLOCK_K"] != WIDE_SUM_BLOCK_K.value]


def _sums_in_k_steps_of(config, block_k: int, tf32: bool = False) -> bool:
    """Whether a launch forming ∂C/∂b (ROW_SUMS) in K steps of block_k (_sum_block_k) may take this config: its
    BLOCK_K, or a multiple of it that the loop takes in steps of block_k (_grad_weight_kernel's STEP_K, _k_step: the
    same sums in the same order) where that was compiled and kept the loop lean: a TMA config where the tensor cores
    sum (block_k == SUM_BLOCK_K; TMA's zero fill needs no mask for a step past K), and with tf32 (TF32 products,
    float32's sums in registers) any config. Not IEEE float32's FMA loop: K steps over 16 spilled there."""
    k = config.kwargs
    wider = k["BLOCK_K"] % block_k == 0 and (
        (block_k == SUM_BLOCK_K.value and bool(k.get("TMA", False))) or (tf32 and block_k == WIDE_SUM_BLOCK_K.value))
    return k["BLOCK_K"] == block_k or wider


def _sum_block_k(out_dtype: torch.dtype, use_dot: bool) -> int:
    """The K step of a launch that forms ∂C/∂b (ROW_SUMS) into an out_dtype ∂C/∂W: SUM_BLOCK_K where the tensor
    cores sum (16-bit data), WIDE_SUM_BLOCK_K where registers do (float32, float64, the FMA fallback); the kernel
    derives the same step itself (_grad_weight_kernel's STEP_K)."""
    return SUM_BLOCK_K.value if use_dot and out_dtype.itemsize == 2 else WIDE_SUM_BLOCK_K.value


def _tma_prologue_excluded(config) -> bool:
    """A config not offered to launches that form δ in their loads (A_PROLOGUE): TMA at 128x256x64 with 8 warps
    gave wrong products there on an H200 (Triton 3.6, 2026-12-04: test_every_autotune_config_is_correct, and
    relative errors of 0.5-0.8 in bench_dense's TMA run), where the other TMA configs and the same tile without
    the prologue were right. Not understood yet; TMA stays opt-in (manualbp.config)."""
    return _tma_wide_tile(config)


def _tma_partials_excluded(config) -> bool:
    """A config not offered to the MLP epilogue's launches (WRITE_PARTIALS): at TMA 128x256x64 its fixed tree of
    ∂C/∂b partial sums spilled 20 bytes under Triton 3.6 (compile report, gelu; none under 3.9), where the pointer
    tile of the same shape has none. Right on an H200 (test_kernels); dropped for the spill alone."""
    return _tma_wide_tile(config)


def _warp_specialize_excluded(config) -> bool:
    """A warp-specialized config, not offered to launches that sum ∂C/∂b (compile report, sm_90, bf16, 2026-12-07):
    the ∂C/∂W launches (ROW_SUMS: the loop that adds each chunk's sums is left whole by Triton 3.8's and 3.9's pass,
    one 4-warp warpgroup that spills 2204-2260 bytes at 128x256x64; the split-K one that stores them fails in 3.6's)
    and the MLP epilogue's partial sums (WRITE_PARTIALS: partitioned, but its epilogue spills 16-9856 bytes)."""
    return bool(config.kwargs.get("WARP_SPECIALIZE", False))


def _tma_wide_tile(config) -> bool:
    k = config.kwargs
    return bool(k.get("TMA", False)) and k["BLOCK_N"] == 256 and config.num_warps == 8


# The autotuner's key rounds M, N and K up to a power of two, at least this: a training run whose batch x
# sequence length varies tunes once per bucket, not once per size (sequence lengths 1..4096: 7 buckets).
_TUNING_FLOOR = 64


@functools.lru_cache(maxsize=4096)  # three per matmul launch: a C-level lookup costs a quarter of the arithmetic
def _tuning_bucket(size: int) -> int:
    """size rounded up to its autotuning bucket: the next power of two, at least _TUNING_FLOOR."""
    return max(_TUNING_FLOOR, 1 << max(size - 1, 0).bit_length())


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b), for the launchers' grids and buffers. Not triton.cdiv: that is a constexpr_function (Triton
    3.6 and 3.9 at least), whose wrapper costs a host call several times the division (H200 host profile,
    2026-12-04, Triton 3.6: triton.cdiv and next_power_of_2 took ~7% of the launcher's time)."""
    return -(-a // b)


# With MANUALBP_AUTOTUNE=0 every GPU matmul uses this one tile instead of tuning: for
# test suites on a GPU, where tuning each of hundreds of small shapes would dominate.
_UNTUNED_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "EPILOGUE_SPLIT": 4}
_UNTUNED_LAUNCH = {"num_stages": 4, "num_warps": 4}
# ... and for the ∂C/∂W matmul that forms ∂C/∂b: a tile that fits every GPU (fp32 too), BLOCK_K = _sum_block_k's.
_UNTUNED_ROW_SUMS_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "EPILOGUE_SPLIT": 2}
_UNTUNED_ROW_SUMS_LAUNCH = {"num_stages": 2, "num_warps": 4}


def autotune_enabled() -> bool:
    """manualbp.config's autotune setting (MANUALBP_AUTOTUNE=0 at import, or config.set(autotune=False))."""
    return config.get().autotune


# Sizes by bucket, and every flag that changes a kernel's work or shared memory; Triton adds the tensors' dtypes.
# Not EVEN_K (it only drops the loads' masks: sizes of one bucket share their tuned tile) nor PACKED_PAIRS (fixed
# by the GPU and the dtype). Each role kernel's autotuner keys on those of them it takes (_autotuned_matmul).
_TUNING_KEY = ["tune_m", "tune_n", "tune_k", "HAS_BIAS", "ACTIVATION", "WRITE_Z", "F_PRIME_AS_Z", "INPUT_PRECISION",
               "WRITE_PARTIALS", "SAVED_KIND", "ROW_SUMS", "A_TRANSPOSED", "B_TRANSPOSED", "TMA_OK", "WARP_SPECIALIZE_OK",
               "STORE_DELTA", "splits"]

# The matmul kernels (by role, _role_kernel) and the names of their left factor and output, for _prune_role.
MATMUL_KERNELS = {"_matmul_kernel": ("a_ptr", "out_ptr"), "_forward_kernel": ("x_ptr", "a_ptr"),
                  "_grad_x_kernel": ("g_ptr", "out_ptr"), "_grad_weight_kernel": ("g_ptr", "out_ptr"),
                  "_grad_below_kernel": ("delta_ptr", "out_ptr"),
                  # its output is float32 partials: the data's dtype (∂C/∂b's K step) is its left factor's
                  "_grad_weight_split_kernel": ("g_ptr", "g_ptr")}


def kernel_arg_names(fn) -> list:
    """The parameter names of a @triton.jit kernel (compiled or interpreted), in order."""
    return list(inspect.signature(getattr(fn, "fn", fn)).parameters)


def role_configs(kernel: str) -> list:
    """matmul_configs() as kernel takes them (_tile_for: no EPILOGUE_SPLIT where it has no sliced epilogue)."""
    return [triton.Config(_tile_for(kernel, cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            for cfg in matmul_configs()]


def _prune_role(kernel: str, configs, named_args, **kwargs):
    """_prune_configs for one role kernel's launch: its left factor and output by their names, A_PROLOGUE where the
    kernel forms δ in its loads."""
    left, out = MATMUL_KERNELS[kernel]
    prologue = kernel == "_grad_x_kernel" or (kernel in _GRAD_WEIGHT_KERNELS and kwargs.get("ACTIVATION", 0) != 0)
    flags = {name: kwargs[name] for name in ("TMA_OK", "WARP_SPECIALIZE_OK", "USE_DOT", "INPUT_PRECISION", "ROW_SUMS",
                                             "WRITE_PARTIALS") if name in kwargs}
    return _prune_configs(configs, {"a_ptr": named_args[left], "out_ptr": named_args[out]}, A_PROLOGUE=prologue,
                          **flags)


@functools.lru_cache(maxsize=None)
def _autotuned_matmul(kernel: str):
    """The autotuner of one role kernel (a name of MATMUL_KERNELS). Built on first use, never at import: some
    Triton releases query the GPU driver when an autotuner is created, which fails on machines without one."""
    return make_autotuner(kernel, globals()[kernel])


def autotune_options(**options) -> dict:
    """options for triton.autotune, with cache_results (the winners kept on disk across processes) on unless given,
    where this Triton has the option; without it (Triton 3.3) nothing is cached on disk, so none is passed."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        options.setdefault("cache_results", True)
    else:  # a test's cache_results=False holds already
        options.pop("cache_results", None)
    return options


def make_autotuner(kernel: str, fn, **options):
    """triton.autotune over fn for the role kernel named kernel: its configs (role_configs), its key (the names of
    _TUNING_KEY it takes), its pruning (_prune_role); options go to triton.autotune (a test's do_bench)."""
    names = kernel_arg_names(globals()[kernel])
    return triton.autotune(
        configs=role_configs(kernel),
        key=[name for name in _TUNING_KEY if name in names],
        prune_configs_by={"early_config_prune": lambda configs, named_args, **kwargs: _prune_role(
            kernel, configs, named_args, **kwargs)},
        **autotune_options(**options),
    )(fn)


def tf32_allowed() -> bool:
    """Whether PyTorch's own settings allow TF32 for float32 matmuls on CUDA."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch >= 2.9
    if precision is not None:
        if precision == "none":  # not set for matmuls: inherit the global setting
            precision = getattr(torch.backends, "fp32_precision", "none")
        if precision != "none":
            return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


# Compile options every launch states instead of inheriting Triton's default: FMA contraction on (the default
# through Triton 3.9, which warns that 3.10 turns it off), so that a Triton upgrade does not change the kernels'
# arithmetic, and their bits, unannounced. Triton's interpreter ignores it.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def _input_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and device.type == "cuda" and not is_interpreted() and tf32_allowed():
        return "tf32"
    return "ieee"  # set explicitly: the default of tl.dot changed between Triton releases


@functools.lru_cache(maxsize=None)
def fp64_dot_supported(device: torch.device) -> bool:
    """Whether tl.dot compiles and is exact for float64 on this device (probed once).

    Probed in the interpreter too: Triton 3.3's interpreter refuses a float64 tl.dot.
    """
    a = torch.randn(16, 16, dtype=torch.float64, device=device)
    b = torch.randn(16, 16, dtype=torch.float64, device=device)
    out = torch.empty(16, 16, dtype=torch.float64, device=device)
    try:
        _launch_matmul(a, b, out, use_dot=True)
    except Exception:  # any compile/lowering failure means: not supported, use the FMA fallback
        return False
    return bool(torch.allclose(out, a @ b, rtol=1e-12, atol=1e-12))


def _device_guard(t: torch.Tensor):
    # The tensor's GPU as the current device (cuda:1 ...), also from autograd's backward thread. Elsewhere one shared
    # no-op context (reusable: it holds nothing), not a new one a call. launch.run switches to the tensors' GPU itself
    # (launch._on_device): the launchers here need no guard of their own.
    return torch.cuda.device(t.device) if t.is_cuda else _NO_GUARD


_NO_GUARD = contextlib.nullcontext()
# Allocations below pass sizes as separate ints: x.new_empty(M, N) parses in about 2/3 of the instructions of
# x.new_empty((M, N)) (callgrind, torch 2.13).


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


SAVED_KINDS = {"z": 0, "a": 1, "f_prime": 2}  # a launcher's saved_kind -> SAVED_Z, SAVED_A, SAVED_F_PRIME


def _saved_kind_id(saved_kind: str) -> int:
    if saved_kind not in SAVED_KINDS:
        raise ValueError(f"saved_kind must be one of {sorted(SAVED_KINDS)}, got {saved_kind!r}")
    return SAVED_KINDS[saved_kind]


def _launch_matmul(a, b, out, *, role="matmul", bias=None, z=None, f_prime_as_z=False, act_id=0, negative_slope=0.0,
                   grad_saved=None, prologue_saved=None, saved_kind="z", want_partials=False, row_sums=None,
                   delta_out=None, use_dot=None, a_transposed=False, b_transposed=False):
    """One matmul launch: a [M, K] @ b [K, N] into out [M, N], with a prologue or one of two epilogues, by the
    kernel of its role (_role_kernel). a_transposed: a is given as its transpose, [K, M] (∂C/∂W's G or δ), and so
    is prologue_saved; b_transposed: b as its transpose, [N, K] (a weight). Each is read through swapped strides:
    no view made on a warm call (a view costs about as much as the launch's other Python, callgrind).

    Plain product (role "matmul"): out = a @ b; by split-K where grad_weight_splits(K, M, N) > 1 (so is ∂C/∂W,
    role "grad_weight").
    Forward (role "forward"): out = f(a @ b + bias), and z = a @ b + bias when z is given
    (f'(a @ b + bias) instead with f_prime_as_z).
    Backward of a stack (role "grad_below", grad_saved [M, N], what the layer below kept, of saved_kind):
    out = (a @ b) ⊙ f'(...); with want_partials, returns the column sums of out per
    _PARTIAL_ROWS-row group, [cdiv(M, rows), N] in the accumulator's dtype.
    Backward of a layer (roles "grad_x", "grad_weight"; prologue_saved [M, K] of saved_kind, a = G): out =
    (a ⊙ f'(...)) @ b; row_sums [M] (accumulator dtype), when given, receives the row sums of a ⊙ f'(...) (without
    prologue, of a); delta_out [M, K], when given with a prologue, receives a ⊙ f'(...) in a's dtype.
    out, z and delta_out are new contiguous tensors (every launcher allocates them so; tests/test_launch.py checks):
    their strides are not asked (a stride() call and its tuple cost ~1-2k instructions a tensor, callgrind).
    What the flags, the dtype and the settings decide is computed once (_MatmulSetup); the plan once per key
    (_matmul_plan, launch.py): a warm call reads sizes and strides, allocates, builds the arguments and launches.
    """
    if a_transposed:
        K, M = a.shape
        a_strides = a.stride()[::-1]
    else:
        M, K = a.shape
        a_strides = a.stride()
    if b_transposed:
        N = b.shape[0]
        b_strides = b.stride()[::-1]
    else:
        N = b.shape[1]
        b_strides = b.stride()
    dtype = a.dtype
    if use_dot is None:
        use_dot = dtype is not torch.float64 or fp64_dot_supported(a.device)
    flags = (role, act_id, negative_slope, f_prime_as_z, bias is not None, z is not None, grad_saved is not None,
             prologue_saved is not None, saved_kind, want_partials, row_sums is not None, delta_out is not None,
             use_dot, dtype, a.is_cuda)
    settings = config.get()
    setup = _MATMUL_SETUPS.get(flags)
    if setup is None or setup.settings is not settings:  # a config.set() since: every choice made again
        setup = _MATMUL_SETUPS[flags] = _MatmulSetup(flags, settings)
    tf32 = setup.tf32 and tf32_allowed()  # INPUT_PRECISION: a setting PyTorch may change
    if tf32 and K > 1 and _tf32_reads_k_major(a.device):
        # TF32 wgmma reads both operands K-major (stride 1 along K): an operand read along M or N is copied so
        # first (_tf32_reads_k_major). A formed in the loads by a prologue is a register operand: left as it is.
        if a_strides[1] != 1 and not setup.prologue:
            a = (a.t() if a_transposed else a).contiguous()  # [M, K], strides (K, 1)
            a_transposed, a_strides = False, (K, 1)
        if b_strides[0] != 1:
            b = (b if b_transposed else b.t()).contiguous()  # bᵀ [N, K], strides (K, 1): b read along K
            b_transposed, b_strides = True, (1, K)
    if setup.may_split:  # ∂C/∂W or a plain product, on a GPU or S forced: split-K where its output tiles are too few
        splits = grad_weight_splits(K, M, N, a.device)
        if splits > 1:  # the split launch takes a as [K, M]: a view only here (a plain product's)
            _launch_grad_weight_split(a if a_transposed else a.t(), b.t() if b_transposed else b, out, row_sums,
                                      splits, act_id, negative_slope, prologue_saved, saved_kind, use_dot)
            return None
    kernel = setup.kernel
    partials = None
    if want_partials:
        partials = a.new_empty(-(-M // setup.partial_rows), N, dtype=setup.acc_dtype)
    sizes = (M, N, K)
    buckets = _BUCKETS.get(sizes) or tuning_buckets(M, N, K)  # the autotuner's sizes (a call only on a miss)
    prologue = prologue_saved if setup.prologue else None
    saved_strides = None
    if prologue_saved is not None:
        saved_strides = prologue_saved.stride()[::-1] if a_transposed else prologue_saved.stride()
    tma_ok = False
    if setup.tma and _tma_capable(a.device):  # TMA's describability is finer than the key's
        tma_ok = _tma_layout(*_views(a, b, prologue, a_transposed, b_transposed), True)["TMA_OK"]
    # Each tensor's strides asked once (one stride() tuple costs less than two stride(i) calls).
    ab_strides = (*a_strides, *b_strides)
    out_strides = (N, 1)  # out: a new contiguous [M, N] (the docstring)
    if kernel == "_matmul_kernel":
        args = (a, b, out, *sizes, *ab_strides, *out_strides, *buckets)
    elif kernel == "_forward_kernel":
        args = (a, b, bias if bias is not None else out, out, z if z is not None else out, *sizes, *ab_strides,
                *out_strides, *(out_strides if z is not None else (0, 0)), bias.stride()[0] if bias is not None else 0,
                *buckets)
    elif kernel == "_grad_x_kernel":
        delta = delta_out if delta_out is not None else out
        args = (a, b, prologue_saved, out, delta, *sizes, *ab_strides, *saved_strides, *out_strides,
                *((K, 1) if delta_out is not None else (0, 0)), *buckets)  # delta_out: a new contiguous [M, K]
    elif kernel == "_grad_weight_kernel":
        # a stored δᵀ reads nothing more: a in saved's slot
        saved, strides = (prologue, saved_strides) if prologue is not None else (a, a_strides)
        args = (a, b, saved, out, row_sums if row_sums is not None else out, *sizes, *ab_strides, *strides,
                *out_strides, *buckets)
    else:  # _grad_below_kernel
        args = (a, b, grad_saved, out, partials if partials is not None else out, *sizes, *ab_strides,
                *grad_saved.stride(), *out_strides, *buckets)
    # The setup's options, and the call's choices that the arguments' specialisation does not already hold.
    options = (setup.options_id, buckets, K % _EVEN_K_STEP == 0, tma_ok, tf32)
    if tma_ok:
        _ensure_allocator()  # device-side descriptors need a scratch buffer (in this thread's context)
    # _matmul_launch_plan on a call not seen before only (a closure made on every call cost ~6k instructions)
    launch.run(role, options, args, M, N, _matmul_launch_plan, kernel, a, b, out, bias, z, f_prime_as_z, act_id,
               negative_slope, saved_kind, want_partials, row_sums, delta_out, use_dot, tma_ok, prologue, a_transposed,
               b_transposed)
    return partials


def _matmul_launch_plan(kernel, a, b, out, bias, z, f_prime_as_z, act_id, negative_slope, saved_kind, want_partials,
                        row_sums, delta_out, use_dot, tma_ok, prologue, a_transposed, b_transposed) -> dict:
    """_launch_matmul's make (launch.run): the plan of a call not seen before, from views of its operands."""
    a_view, b_view, prologue_view = _views(a, b, prologue, a_transposed, b_transposed)
    return _matmul_plan(kernel, a_view, b_view, out, bias, z, f_prime_as_z, act_id, negative_slope, saved_kind,
                        want_partials, row_sums, delta_out, use_dot, tma_ok, prologue_view)


def _views(a, b, prologue, a_transposed: bool, b_transposed: bool) -> tuple:
    """_launch_matmul's a [M, K], b [K, N] and prologue [M, K] (or None) as views, from what it was given."""
    if a_transposed:
        a, prologue = a.t(), (prologue.t() if prologue is not None else None)
    return a, (b.t() if b_transposed else b), prologue


_EVEN_K_STEP = EVEN_K_STEP.value
def tuning_buckets(M: int, N: int, K: int) -> tuple:
    """(M, N, K)'s tuning buckets (_tuning_bucket): a launch's tune_m, tune_n, tune_k, remembered per sizes."""
    buckets = _BUCKETS.get((M, N, K))
    if buckets is None:
        if len(_BUCKETS) >= _MAX_BUCKETS:  # sizes that vary call after call (a sequence length) start afresh
            _BUCKETS.clear()
        buckets = _BUCKETS[M, N, K] = (_tuning_bucket(M), _tuning_bucket(N), _tuning_bucket(K))
    return buckets


_BUCKETS: dict = {}  # (M, N, K) -> their tuning buckets; sizes a program uses are few
_MAX_BUCKETS = 4096  # ... bounded all the same, as launch.py's table of warm calls


class _MatmulSetup:
    """What a matmul launch's flags decide with its dtype, kind of device and the settings (_launch_matmul's key
    ``flags``): its kernel, the head of its plan options, its partial sums' buffer, whether it asks about TMA and
    TF32. Made again when config.set() has replaced the settings."""

    __slots__ = ("settings", "kernel", "prologue", "options_id", "acc_dtype", "partial_rows", "tma", "tf32",
                 "may_split")

    def __init__(self, flags: tuple, settings):
        (role, act_id, negative_slope, f_prime_as_z, has_bias, has_z, has_grad_saved, has_prologue, saved_kind,
         want_partials, has_row_sums, has_delta_out, use_dot, dtype, is_cuda) = flags
        fp64 = dtype == torch.float64
        self.settings = settings
        self.kernel = _role_kernel(role, act_id if has_prologue else 0, has_row_sums)
        self.prologue = self.kernel in ("_grad_x_kernel", "_grad_weight_kernel") and act_id != 0
        # Every input of the flags that the arguments' specialisation does not already hold (dtypes, strides of 1),
        # as a small int (one per distinct tuple: a launch's options are hashed on every call).
        options = (act_id, negative_slope, f_prime_as_z, has_bias, has_z, has_grad_saved, has_prologue, saved_kind,
                   want_partials, has_row_sums, has_delta_out, use_dot, settings.autotune, settings.warp_specialize)
        self.options_id = _OPTIONS_IDS.setdefault(options, len(_OPTIONS_IDS))
        self.acc_dtype = torch.float64 if fp64 else torch.float32
        fixed = _fixed_config(fp64, use_dot)
        self.partial_rows = _PARTIAL_ROWS if fixed is None else min(_PARTIAL_ROWS, fixed[0]["BLOCK_M"])
        self.tma = settings.tma and not fp64
        self.tf32 = dtype is torch.float32 and is_cuda
        # ∂C/∂W and the plain product ask grad_weight_splits where it may answer S > 1 ("auto" splits on a GPU
        # only): the CPU's answer here, not a call a launch
        self.may_split = role in ("grad_weight", "matmul") and (is_cuda or settings.grad_weight_split != "auto")


_MATMUL_SETUPS: dict = {}
_OPTIONS_IDS: dict = {}  # a setup's options -> its options_id


_GRAD_WEIGHT_KERNELS = ("_grad_weight_kernel", "_grad_weight_split_kernel")


def _role_kernel(role: str, prologue_act: int, row_sums: bool) -> str:
    """The name of the kernel serving a matmul launch: its role's, or the plain product where the role has nothing
    to add (∂C/∂X of identity or of a stored δ; ∂C/∂W of a stored δ without ∂C/∂b). Split-K ∂C/∂W has one kernel
    for every case (grad_weight_splits picks the role)."""
    if role == "forward" or role == "grad_below" or role == "grad_weight_split":
        return f"_{role}_kernel"
    if role == "grad_x" and prologue_act != 0:
        return "_grad_x_kernel"
    if role == "grad_weight" and (prologue_act != 0 or row_sums):
        return "_grad_weight_kernel"
    return "_matmul_kernel"


def _matmul_plan(kernel: str, a, b, out, bias, z, f_prime_as_z, act_id, negative_slope, saved_kind, want_partials,
                 row_sums, delta_out, use_dot, tma_ok, prologue, grid_rows=None) -> dict:
    """What launch.build needs for a matmul plan: the kernel's flags (only those it takes), and the tile (fixed, or
    the autotuner's). grid_rows: the rows of output tiles the grid covers, where not a's (split-K's stacked
    splits)."""
    M, K = a.shape
    N = b.shape[1]
    fp64 = a.dtype == torch.float64
    fixed = _fixed_config(fp64, use_dot)
    layout = _tma_layout(a, b, prologue, False)
    layout["TMA_OK"] = tma_ok
    # the settings are in the plan's key (the setup's options, the split launch's): read once per plan
    layout["WARP_SPECIALIZE_OK"] = tma_ok and WARP_SPECIALIZE_AVAILABLE and config.get().warp_specialize
    flags = dict(**layout, USE_DOT=use_dot, INPUT_PRECISION=_input_precision(a.dtype, a.device), ACC_FP64=fp64,
                 EVEN_K=_even_k(K), **COMPILE_OPTIONS)
    backward = dict(ACTIVATION=act_id, NEGATIVE_SLOPE=negative_slope, SAVED_KIND=_saved_kind_id(saved_kind))
    if kernel == "_forward_kernel":
        flags.update(HAS_BIAS=bias is not None, ACTIVATION=act_id, NEGATIVE_SLOPE=negative_slope, WRITE_Z=z is not None,
                     F_PRIME_AS_Z=f_prime_as_z)
    elif kernel == "_grad_x_kernel":
        flags.update(backward, STORE_DELTA=delta_out is not None, PACKED_PAIRS=_packed_pairs(a.dtype, a.device))
    elif kernel in _GRAD_WEIGHT_KERNELS:
        if prologue is None:  # a stored δᵀ: its row sums only
            backward.update(ACTIVATION=0, SAVED_KIND=SAVED_Z.value)
        flags.update(backward, ROW_SUMS=row_sums is not None, PACKED_PAIRS=_packed_pairs(a.dtype, a.device),
                     INLINE_PTX=_inline_ptx(a.device))
    elif kernel == "_grad_below_kernel":
        flags.update(backward, WRITE_PARTIALS=want_partials, INLINE_PTX=_inline_ptx(a.device),
                     PARTIAL_ROWS=_PARTIAL_ROWS if fixed is None else min(_PARTIAL_ROWS, fixed[0]["BLOCK_M"]))
    programs = _num_sms(a.device) if tma_ok else 0
    common = dict(interpreted=is_interpreted(), compiled_ok=_inline_ptx(a.device), programs=programs,
                  device_index=a.device.index)
    rows = M if grid_rows is None else grid_rows
    if fixed is None:  # the GPU autotuner picks the tile, once per bucket of (M, N, K) and flags
        def grid(meta):
            tiles = _cdiv(rows, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"])
            return (min(programs, tiles) if meta.get("TMA", False) else tiles,)  # TMA: persistent, one per SM

        tuner = _autotuned_matmul(kernel)
        return dict(fn=tuner.fn, tuner=tuner, constexprs=flags, grid=grid, **common)
    tile, options = fixed
    if row_sums is not None and tile is _UNTUNED_CONFIG:
        tile, options = _UNTUNED_ROW_SUMS_CONFIG, _UNTUNED_ROW_SUMS_LAUNCH
    if row_sums is not None:
        tile = dict(tile, BLOCK_K=_sum_block_k(out.dtype, use_dot))  # the row sums' fixed K step
    tile = _tile_for(kernel, tile)
    grid = (_cdiv(rows, tile["BLOCK_M"]) * _cdiv(N, tile["BLOCK_N"]),)
    return dict(fn=globals()[kernel], constexprs={**flags, **tile, **options}, grid=grid, **common)


# The kernels whose every store is one whole tile (their epilogue is a store): their tiles have no EPILOGUE_SPLIT.
_UNSPLIT_KERNELS = ("_grad_x_kernel", "_grad_weight_kernel")


def _tile_for(kernel: str, tile: dict) -> dict:
    """A tile's constexprs as kernel takes them: without EPILOGUE_SPLIT where it has no sliced epilogue."""
    return {k: v for k, v in tile.items() if k != "EPILOGUE_SPLIT"} if kernel in _UNSPLIT_KERNELS else tile


def _even_k(K: int) -> bool:
    """A launch's EVEN_K: K a multiple of EVEN_K_STEP, so of every pointer config's BLOCK_K (no partial K step)."""
    return K % EVEN_K_STEP.value == 0


def _inline_ptx(device: torch.device) -> bool:
    """Whether a launch compiles for an NVIDIA GPU (not the interpreter, not ROCm): inline PTX may run."""
    return device.type == "cuda" and torch.version.hip is None and not is_interpreted()


def _packed_pairs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a launch may form 16-bit δ lanes in pairs by inline PTX (act.*_packed): compiled for an NVIDIA GPU
    (not the interpreter, not ROCm), float16 from sm_53 (set.*.u32.f16x2, mul/sub.rn.f16x2), bfloat16 from sm_90
    (set.*.u32.bf16x2, mul/sub.rn.bf16x2)."""
    if not _inline_ptx(device) or dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(device) >= ((9, 0) if dtype == torch.bfloat16 else (5, 3))


def _tf32_reads_k_major(device: torch.device) -> bool:
    """Whether TF32 products of a launch here (where PyTorch's settings allow them: the caller asks) are wgmmas that
    read both operands K-major from shared memory: a compiled launch on an NVIDIA sm_90 (PTX transposes only 16-bit
    operands in shared memory). Compiled for sm_90 (compile report --dtype tf32), an operand read along M or N
    leaves Triton one 4-byte copy per element into shared memory: ∂C/∂X's weight and ∂C/∂W's δᵀ and X spilled up to
    500 bytes and issued 1.3-2.5x the K-major loop's instructions, and the plain product measured 0.21-0.23x cuBLAS
    at 4096^3 on the H200 (docs/performance.md). A K-major copy costs one pass over the operand."""
    return _inline_ptx(device) and torch.cuda.get_device_capability(device)[0] == 9


def _tma_capable(device: torch.device) -> bool:
    """Whether TMA configs may run here: a compiled (not interpreted) CUDA launch on sm_90 or newer, with this
    Triton's device-side tensor descriptors (tl.make_tensor_descriptor, Triton >= 3.4) and triton.set_allocator,
    where manualbp.config's tma setting is on (MANUALBP_TMA=1; off by default, see manualbp/config.py).
    TMA is NVIDIA's, so compiled for an NVIDIA GPU (_inline_ptx's test): ROCm reports its gfx version as the
    capability (MI300: (9, 4)), which must not read as sm_90."""
    if not _inline_ptx(device) or not config.get().tma:
        return False
    if not (hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _tma_layout(a, b, saved, capable: bool) -> dict:
    """The kernel's TMA flags for one launch: which operands are stored transposed, and TMA_OK where a TMA
    descriptor can describe A, B and the prologue's saved tensor (None: none read). A descriptor needs one
    stride of 1 (saved like A), the other a multiple of 16 bytes, and a 16-byte aligned base."""
    def transposed(t):  # False: rows contiguous, True: columns contiguous (stored as its transpose), None: neither
        return False if t.stride(1) == 1 else (True if t.stride(0) == 1 else None)

    def describable(t, is_transposed):
        leading = t.stride(1 if is_transposed else 0)
        return (leading * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0

    a_t, b_t = transposed(a), transposed(b)
    ok = (capable and a_t is not None and b_t is not None and describable(a, a_t) and describable(b, b_t)
          and (saved is None or (transposed(saved) == a_t and describable(saved, a_t))))
    return dict(A_TRANSPOSED=bool(a_t), B_TRANSPOSED=bool(b_t), TMA_OK=ok)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a GPU: the programs of a persistent launch."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _ensure_allocator() -> None:
    """Give Triton a scratch allocator for device-side TMA descriptors, unless one is set already (the user's):
    PyTorch's caching allocator on the current device. The setting is per thread (a ContextVar): autograd's
    backward thread gets its own."""
    allocation = getattr(triton.runtime, "_allocation", None)
    current = getattr(allocation, "_allocator", None)
    if current is not None and not isinstance(current.get(), getattr(allocation, "NullAllocator", ())):
        return
    triton.set_allocator(_scratch)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _fixed_config(fp64: bool, use_dot: bool):
    """(tile, launch options) where no autotuning happens, or None where it does."""
    if not use_dot:
        return _FP64_FMA_CONFIG, {}
    if is_interpreted():
        return _INTERPRETER_CONFIG, {}
    if fp64:
        return _FP64_CONFIG, {}
    if not autotune_enabled():
        return _UNTUNED_CONFIG, _UNTUNED_LAUNCH
    return None


def matmul(a: torch.Tensor, b: torch.Tensor, a_transposed: bool = False) -> torch.Tensor:
    """a @ b for a [M, K], b [K, N] of any strides -> a new contiguous [M, N]. a_transposed: a is given as its
    transpose [K, M] (the product is aᵀ b, read through swapped strides: no view made).

    Where its output tiles are too few for the GPU (grad_weight_splits over the reduction length K: the MLP's
    ∂C/∂Wₗ = δₗᵀ Xₗ, a δ pass's δᵀ X), split-K (_launch_matmul's role "matmul")."""
    M, N = a.shape[1 if a_transposed else 0], b.shape[1]
    out = a.new_empty(M, N)
    if not (M and N):  # nothing to write (sizes compared: numel() is a torch call)
        return out
    _launch_matmul(a, b, out, a_transposed=a_transposed)
    return out


def linear_forward(x, weight, bias, act_id: int, negative_slope: float, write_z: bool, f_prime_as_z: bool = False):
    """A = f(X Wᵀ + b), and Z = X Wᵀ + b when write_z (f'(Z) instead, with f_prime_as_z).

    x [M, K], weight [N, K], bias [N] or None -> (a [M, N], z or f'(z) [M, N] or None).
    """
    M, N = x.shape[0], weight.shape[0]
    a = x.new_empty(M, N)
    z = x.new_empty(M, N) if write_z else None
    if not (M and N):
        return a, z
    # B = Wᵀ [K, N] is W read through swapped strides: no copy, no view.
    _launch_matmul(x, weight, a, role="forward", bias=bias, z=z, f_prime_as_z=f_prime_as_z, act_id=act_id,
                   negative_slope=negative_slope, b_transposed=True)
    return a, z


def delta_and_bias_grad(grad_a, saved, act_id: int, negative_slope: float, saved_kind: str,
                        want_delta: bool, want_bias: bool):
    """δ = G ⊙ f'(Z) and ∂C/∂b = 1ᵀ δ, in one elementwise pass.

    grad_a [M, N] (any strides), saved [M, N] (Z, A or f'(Z), as saved_kind says: "z",
    "a", "f_prime"; unused for identity) -> (delta [M, N] or None, grad_bias [N] or None).
    For identity with want_delta, δ is G itself and no copy is made.
    """
    M, N = grad_a.shape
    identity = act_id == 0
    write_delta = want_delta and not identity
    delta = grad_a if (want_delta and identity) else None
    if write_delta:
        delta = grad_a.new_empty(M, N)
    if not (write_delta or want_bias):
        return delta, None

    fp64 = grad_a.dtype == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    blocks_m = _cdiv(M, _DELTA_BLOCK["BLOCK_M"])
    partials = grad_a.new_empty(blocks_m, N, dtype=acc_dtype) if want_bias else None
    if M > 0 and N > 0:
        saved_t = saved if saved is not None else grad_a
        args = (grad_a, saved_t, delta if write_delta else grad_a, partials if want_bias else grad_a, M, N,
                *grad_a.stride(), *saved_t.stride(), *(delta.stride() if write_delta else (0, 0)))
        launch.run("delta", (act_id, negative_slope, saved_kind, write_delta, want_bias), args, M, N, _delta_plan,
                   grad_a, act_id, negative_slope, saved_kind, write_delta, want_bias, M, N)
    grad_bias = None
    if want_bias:
        # Rows of partial sums added in a fixed order: bitwise reproducible.
        grad_bias = partials.sum(0)
        if grad_bias.dtype is not grad_a.dtype:  # 16-bit data: summed in float32 (a .to() costs ~8k where a no-op)
            grad_bias = grad_bias.to(grad_a.dtype)
    return delta, grad_bias


def activation_forward(z: torch.Tensor, act_id: int, negative_slope: float) -> torch.Tensor:
    """A = f(Z), elementwise: z [M, N] (any strides) -> a new contiguous [M, N]."""
    M, N = z.shape
    a = z.new_empty(M, N)
    if not (M and N):
        return a
    args = (z, a, M, N, *z.stride(), *a.stride())
    launch.run("activation", (act_id, negative_slope), args, M, N, _activation_plan, z, act_id, negative_slope, M, N)
    return a


def _delta_plan(grad_a, act_id: int, negative_slope: float, saved_kind: str, write_delta: bool, want_bias: bool,
                M: int, N: int) -> dict:
    """delta_and_bias_grad's make (launch.run): the δ pass's plan."""
    constexprs = dict(ACTIVATION=act_id, NEGATIVE_SLOPE=negative_slope, SAVED_KIND=_saved_kind_id(saved_kind),
                      WRITE_DELTA=write_delta, WRITE_PARTIALS=want_bias, COMPUTE_FP64=grad_a.dtype == torch.float64,
                      **_DELTA_BLOCK, **COMPILE_OPTIONS)
    return _elementwise_plan(_delta_kernel, constexprs, M, N, grad_a.device)


def _activation_plan(z, act_id: int, negative_slope: float, M: int, N: int) -> dict:
    """activation_forward's make (launch.run): the activation pass's plan."""
    constexprs = dict(ACTIVATION=act_id, NEGATIVE_SLOPE=negative_slope, COMPUTE_FP64=z.dtype == torch.float64,
                      **_DELTA_BLOCK, **COMPILE_OPTIONS)
    return _elementwise_plan(_activation_kernel, constexprs, M, N, z.device)


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), without the call where t has that dtype already (.to would return t itself, for ~8k
    instructions: a float32 layer's ∂C/∂b)."""
    return t if t.dtype is dtype else t.to(dtype)


def _elementwise_plan(kernel, constexprs: dict, M: int, N: int, device: torch.device) -> dict:
    """What launch.build needs for an elementwise pass (_delta_kernel, _activation_kernel): one fixed block."""
    grid = (_cdiv(M, constexprs["BLOCK_M"]), _cdiv(N, constexprs["BLOCK_N"]))
    return dict(fn=kernel, constexprs=constexprs, grid=grid, flat=False, interpreted=is_interpreted(),
                compiled_ok=_inline_ptx(device), device_index=device.index)


def matmul_times_activation_grad(delta, weight, saved, act_id: int, negative_slope: float, saved_kind: str,
                                 want_bias: bool):
    """The δ of the layer below and its ∂C/∂b, from this layer's δ, in one matmul kernel.

    delta [M, N] = δₗ, weight [N, K] = Wₗ, saved [M, K] = Zₗ₋₁, Aₗ₋₁ or fₗ₋₁'(Zₗ₋₁) as saved_kind
    says (unused for identity) -> (δₗ₋₁ = (δₗ Wₗ) ⊙ f'(Zₗ₋₁) [M, K], ∂C/∂bₗ₋₁ = 1ᵀ δₗ₋₁ [K] or None).
    """
    M, K = delta.shape[0], weight.shape[1]
    out = delta.new_empty(M, K)
    if not (M and K):
        return out, (torch.zeros(K, dtype=delta.dtype, device=delta.device) if want_bias else None)
    partials = _launch_matmul(delta, weight, out, role="grad_below", act_id=act_id, negative_slope=negative_slope,
                              grad_saved=saved if act_id != 0 else out, saved_kind=saved_kind, want_partials=want_bias)
    if not want_bias:
        return out, None
    grad_bias = partials.sum(0)  # rows of partial sums added in a fixed order: bitwise reproducible
    return out, (grad_bias if grad_bias.dtype is delta.dtype else grad_bias.to(delta.dtype))


# δ formed in a backward matmul's operand loads is formed again for every column tile of that matmul's output
# (cdiv(K, BLOCK_N) of them, K = in_features); a δ pass forms it once but writes and reads [M, N] more. Measured on
# an H200 (benchmarks/bench_backward.py, bf16, M = 8192, relu/gelu/leaky_relu/tanh, kernels only, 2026-12-04):
# at K = 1024 the loads won for a first layer (its backward 1.20-1.38x eager's kernels, 1.08-1.19x with the pass)
# and lost 0-4% for a hidden one (kept there: the pass is one launch more, and these steps are bound by the host's
# launches, docs/performance.md); at K = 4096 the pass won (first layer by 4-10%; hidden by 5-10% with the pass
# also summing ∂C/∂b: the pass without sums, ∂C/∂b by the ∂C/∂W matmul as here, was measured on first layers
# only, where it beat the summing pass by ~4%). Where between 1024 and 4096 the crossing lies is unmeasured: the
# loads up to the K measured in their favour.
PROLOGUE_MAX_K = 1024


def linear_backward(grad_a, x, weight, saved, act_id: int, negative_slope: float, saved_kind: str,
                    want_x: bool, want_weight: bool, want_bias: bool, delta_in_loads=None):
    """∂C/∂X = δ W, ∂C/∂W = δᵀ X, ∂C/∂b = 1ᵀ δ, with δ = G ⊙ f'(Z) (manualbp/reference.py).

    grad_a [M, N] = G (any strides), x [M, K] (used only for ∂C/∂W), weight [N, K],
    saved [M, N] (Z, A or f'(Z) as saved_kind says; unused for identity) ->
    (grad_x [M, K], grad_weight [N, K], grad_bias [N]), each None when not wanted.

    Two plans for δ; delta_in_loads picks one (None: the loads where K <= PROLOGUE_MAX_K, measured there), except
    where toolchain.rs_operand_hazard names a reason: the pass then, whatever delta_in_loads says.
    In the loads: the ∂C/∂X matmul multiplies its G tiles by f' on load (relu: a select); where
    ∂C/∂W is wanted too, that launch also stores δ, each element once, in the data dtype (the
    output tiles of a row block share its column blocks: _store_delta_share), and the ∂C/∂W
    matmul is a plain δᵀ X; without ∂C/∂X the ∂C/∂W matmul forms δ on load. By a pass: _delta_kernel
    stores δ, then both matmuls are plain. ∂C/∂b is the row sums of the δᵀ tiles of the ∂C/∂W
    matmul either way, δ rounded to the data dtype as eager's stored δ, summed over M in
    _sum_block_k steps in an order no tile changes (16-bit data: by the tensor cores against a tile
    of ones; float32/64: in registers, then a fixed tree), so the same bits on every tile the
    autotuner may pick and in both plans. Without that matmul (weight frozen, or K = 0) it takes a
    reading pass of _delta_kernel.
    """
    M, N = grad_a.shape
    K = weight.shape[1]
    saved = saved if act_id != 0 else grad_a  # identity reads nothing; any tensor of the right shape
    dtype = grad_a.dtype
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    grad_x = grad_weight = grad_bias = None
    forms_delta = act_id != 0 and (want_x or want_weight) and M * N * K > 0
    by_pass = forms_delta and not (K <= PROLOGUE_MAX_K if delta_in_loads is None else delta_in_loads)
    if forms_delta and not by_pass and toolchain.rs_operand_hazard(grad_a.device, grad_a.dtype):
        by_pass = True  # δ in the loads makes an RS wgmma, miscompiled by this toolchain (toolchain.py)
    with _device_guard(grad_a):
        delta = None  # δ [M, N] in memory, read plainly by the matmuls
        if by_pass:
            delta, _ = delta_and_bias_grad(grad_a, saved, act_id, negative_slope, saved_kind,
                                           want_delta=True, want_bias=False)
        elif forms_delta and want_x and want_weight:
            # stored by the ∂C/∂X matmul for the ∂C/∂W matmul: one write for two reads fewer (G and saved)
            delta = grad_a.new_empty(M, N)
        if want_x:
            grad_x = grad_a.new_empty(M, K)
            if by_pass:
                _launch_matmul(delta, weight, grad_x, role="grad_x")  # ∂C/∂X = δ W   [M, N] [N, K]
            elif M and K:
                _launch_matmul(grad_a, weight, grad_x, role="grad_x", act_id=act_id, negative_slope=negative_slope,
                               prologue_saved=saved, saved_kind=saved_kind,
                               delta_out=delta)  # ∂C/∂X = δ W   [M, N] [N, K]
        bias_from_matmul = want_bias and want_weight and K > 0 and N > 0
        if want_weight:
            grad_weight = grad_a.new_empty(N, K)
            row_sums = grad_a.new_empty(N, dtype=acc_dtype) if bias_from_matmul else None
            # (split-K over the rows where _launch_matmul's grad_weight_splits says so: δ stored, or formed on load)
            if delta is not None:  # ∂C/∂W = δᵀ X  [N, M] [M, K]: δᵀ read through swapped strides
                _launch_matmul(delta, x, grad_weight, role="grad_weight", row_sums=row_sums, a_transposed=True)
            elif N and K:
                # ∂C/∂W = δᵀ X  [N, M] [M, K]: δᵀ and its saved factor read through swapped strides.
                _launch_matmul(grad_a, x, grad_weight, role="grad_weight", act_id=act_id,
                               negative_slope=negative_slope, prologue_saved=saved, saved_kind=saved_kind,
                               row_sums=row_sums, a_transposed=True)
            if bias_from_matmul:
                grad_bias = _in_dtype(row_sums, dtype)  # ∂C/∂b = 1ᵀ δ  [N]
    if want_bias and not bias_from_matmul:
        _, grad_bias = delta_and_bias_grad(grad_a, saved, act_id, negative_slope, saved_kind,
                                           want_delta=False, want_bias=True)
    return grad_x, grad_weight, grad_bias


# Split-K of ∂C/∂W = δᵀ X [N, K] = [N, M] [M, K] (reduced over the M rows): where its output tiles are too few to
# fill the GPU, each of S programs per tile takes whole chunks of SUM_CHUNK_K rows and writes float32 (float64)
# partials to a workspace [S, N, K] from PyTorch's allocator, and _split_sum_kernel adds them in order s = 0, 1, ...
# (no atomics, no host sync: deterministic and CUDA-graph safe). ∂C/∂b's chunk sums go the same way: its bits do
# not change with S. The same plan serves every plain product a @ b (dense.matmul: the MLP's δₗᵀ Xₗ, a δ pass's
# δᵀ X), reduced over its K, without ∂C/∂b. "auto" counts the output tiles at the largest tile of matmul_configs
# (the autotuner's first):
_SPLIT_TILE = (128, 256)
_SPLIT_ROWS = 256  # a split's rows in the workspace: M rounded up to this, a multiple of every BLOCK_M


def grad_weight_splits(rows: int, out_features: int, in_features: int, device: torch.device) -> int:
    """S, the splits of the ∂C/∂W matmul's rows (of any plain product's reduction length: rows, then its output's
    [out_features, in_features]): manualbp.config's grad_weight_split, "auto" the most that keep S x its output
    tiles (at _SPLIT_TILE) within one program per SM (a compiled CUDA launch; elsewhere 1). Never more than the
    rows' chunks of SUM_CHUNK_K (a split is whole chunks); made even: S = cdiv(chunks, cdiv(chunks, S)), so that no
    split is empty. 1: no split."""
    wanted = config.get().grad_weight_split
    if wanted == "auto":  # every backward asks: the CPU's answer first
        on_gpu = _ON_GPU.get(device)
        if on_gpu is None:
            on_gpu = _ON_GPU[device] = device.type == "cuda"
        if not on_gpu or is_interpreted():
            return 1
        wanted = _num_sms(device) // (_cdiv(out_features, _SPLIT_TILE[0]) * _cdiv(in_features, _SPLIT_TILE[1]))
    else:
        wanted = config.grad_weight_split()  # checked (a bad MANUALBP_GRAD_WEIGHT_SPLIT raises here)
    chunks = _cdiv(rows, SUM_CHUNK_K.value)
    splits = min(wanted, chunks)
    return 1 if splits < 2 else _cdiv(chunks, _cdiv(chunks, splits))


_ON_GPU: dict = {}  # device -> device.type == "cuda" (device.type builds a new string: ~4x a dict lookup)


def _launch_grad_weight_split(a, b, out, row_sums, splits: int, act_id: int, negative_slope: float, prologue_saved,
                              saved_kind: str, use_dot=None) -> None:
    """∂C/∂W = δᵀ X into out [M, N] by split-K, and ∂C/∂b into row_sums [M] (accumulator dtype) when given: a = G
    (δ formed on load from prologue_saved, as _launch_matmul's "grad_weight") or a stored δ (act_id 0), both given
    as [K, M] (read as their transposes); b = X [K, N]. Two launches: _grad_weight_split_kernel, then
    _split_sum_kernel. use_dot: as _launch_matmul's (None: tl.dot where it is exact)."""
    K, M = a.shape
    N = b.shape[1]
    fp64 = a.dtype == torch.float64
    acc_dtype = torch.float64 if fp64 else torch.float32
    if use_dot is None:
        use_dot = not fp64 or fp64_dot_supported(a.device)
    chunks = _cdiv(K, SUM_CHUNK_K.value)
    split_rows = _cdiv(M, _SPLIT_ROWS) * _SPLIT_ROWS
    partials = a.new_empty(splits * split_rows, N, dtype=acc_dtype)
    chunk_sums = a.new_empty(chunks, M, dtype=acc_dtype) if row_sums is not None else partials
    prologue = prologue_saved if act_id != 0 else None
    a_strides = a.stride()[::-1]
    saved, saved_strides = (prologue, prologue.stride()[::-1]) if prologue is not None else (a, a_strides)
    buckets = tuning_buckets(M, N, K)
    settings = config.get()
    sums = row_sums is not None
    tma_ok = (settings.tma and not fp64 and _tma_capable(a.device)
              and _tma_layout(*_views(a, b, prologue, True, False), True)["TMA_OK"])
    args = (a, b, saved, partials, chunk_sums, M, N, K, *a_strides, *b.stride(), *saved_strides, split_rows, splits,
            *buckets)
    options = (act_id, negative_slope, saved_kind, sums, use_dot, settings.autotune, settings.warp_specialize,
               _even_k(K), buckets, tma_ok, a.dtype is torch.float32 and a.is_cuda and tf32_allowed())
    if tma_ok:
        _ensure_allocator()

    def make():
        a_view, b_view, prologue_view = _views(a, b, prologue, True, False)
        return _matmul_plan(_role_kernel("grad_weight_split", act_id, sums), a_view, b_view, out, None, None, False,
                            act_id, negative_slope, saved_kind, False, row_sums, None, use_dot, tma_ok, prologue_view,
                            grid_rows=splits * split_rows)

    launch.run("grad_weight_split", options, args, splits * split_rows, N, make)
    args = (partials, out, chunk_sums, row_sums if sums else out, M, N, split_rows, splits, chunks, *out.stride())

    def make_sum():
        constexprs = dict(ROW_SUMS=sums, **_DELTA_BLOCK, **COMPILE_OPTIONS)
        return _elementwise_plan(_split_sum_kernel, constexprs, M, N, a.device)

    launch.run("grad_weight_sum", (sums,), args, M, N, make_sum)
