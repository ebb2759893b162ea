"""Triton kernel of the dense layer's forward mode (the tangent of A, for jvp).

The equation is stated in ``manualbp/reference.py`` (``linear_jvp``), with x [M, K],
weight [N, K], bias [N] and tangents of the same shapes:

    dA = f'(Z) ⊙ (dX Wᵀ + X dWᵀ + db)    [M, N] = [M, K] [K, N] + [M, K] [K, N] + [N]

One matmul kernel: both products accumulate in one K loop (dX against Wᵀ, X
against dWᵀ, each transpose read through swapped strides), then the epilogue adds
db and multiplies by f'(Z), from what the forward saved (A, Z or f'(Z): the same
``_times_activation_grad`` as the backward's δ = G ⊙ f'(Z)). A tangent that is
absent is a compile-time flag, so no zero tensor is read or multiplied.

Forward mode is not a training hot path (jvp, jacfwd, Hessian-vector products):
one fixed tile, no autotuning, a plain 2-D grid of output tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dense


@triton.jit
def _jvp_kernel(
    tangent_x_ptr,  # dX [M, K]; read only with HAS_TANGENT_X
    weight_ptr,  # W [N, K], read as Wᵀ [K, N]
    x_ptr,  # X [M, K]
    tangent_weight_ptr,  # dW [N, K], read as dWᵀ [K, N]; read only with HAS_TANGENT_WEIGHT
    tangent_bias_ptr,  # db [N]; read only with HAS_TANGENT_BIAS
    saved_ptr,  # A, Z or f'(Z) [M, N] as SAVED_KIND says; not read for identity
    out_ptr,  # dA [M, N], written
    M, N, K,
    stride_txm, stride_txk,  # dX's strides
    stride_wn, stride_wk,  # W's strides
    stride_xm, stride_xk,  # X's strides
    stride_twn, stride_twk,  # dW's strides
    stride_tb,  # db's stride
    stride_sm, stride_sn,  # the saved tensor's strides
    stride_om, stride_on,  # dA's strides
    HAS_TANGENT_X: tl.constexpr,
    HAS_TANGENT_WEIGHT: tl.constexpr,
    HAS_TANGENT_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # kernel id of f
    NEGATIVE_SLOPE: tl.constexpr,  # leaky_relu's slope (unused otherwise)
    SAVED_KIND: tl.constexpr,  # dense.SAVED_Z, SAVED_A or SAVED_F_PRIME
    USE_DOT: tl.constexpr,  # tl.dot, or the fp64 FMA fallback
    INPUT_PRECISION: tl.constexpr,  # "ieee", or "tf32" only when PyTorch allows TF32
    ACC_FP64: tl.constexpr,  # accumulate in float64 (float64 data)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_now = k * BLOCK_K + offs_k
        mask_rows = mask_m[:, None] & (k_now[None, :] < K)  # [BLOCK_M, BLOCK_K] tiles of dX and X
        mask_cols = (k_now[:, None] < K) & mask_n[None, :]  # [BLOCK_K, BLOCK_N] tiles of Wᵀ and dWᵀ
        if HAS_TANGENT_X:  # dX Wᵀ
            tangent_x = tl.load(tangent_x_ptr + offs_m[:, None] * stride_txm + k_now[None, :] * stride_txk,
                                mask=mask_rows, other=0.0)
            weight_t = tl.load(weight_ptr + k_now[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                               mask=mask_cols, other=0.0)
            acc = dense._tile_dot(tangent_x, weight_t, acc, USE_DOT, INPUT_PRECISION)
        if HAS_TANGENT_WEIGHT:  # X dWᵀ
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_now[None, :] * stride_xk, mask=mask_rows, other=0.0)
            tangent_weight_t = tl.load(
                tangent_weight_ptr + k_now[:, None] * stride_twk + offs_n[None, :] * stride_twn,
                mask=mask_cols, other=0.0)
            acc = dense._tile_dot(x, tangent_weight_t, acc, USE_DOT, INPUT_PRECISION)
    if HAS_TANGENT_BIAS:  # + db, on every row
        tangent_bias = tl.load(tangent_bias_ptr + offs_n * stride_tb, mask=mask_n, other=0.0)
        acc = acc + tangent_bias[None, :].to(acc.dtype)
    mask = mask_m[:, None] & mask_n[None, :]
    saved_ptrs = saved_ptr + offs_m[:, None] * stride_sm + offs_n[None, :] * stride_sn
    tangent_a = dense._times_activation_grad(acc, saved_ptrs, mask, ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             tangent_a.to(out_ptr.dtype.element_ty), mask=mask)


_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}  # one GPU tile (4 warps, 3 stages): not a hot path
_LAUNCH = {"num_warps": 4, "num_stages": 3}


def linear_jvp(x, weight, saved, tangent_x, tangent_weight, tangent_bias, act_id: int, negative_slope: float,
               saved_kind: str, rows: int, columns: int) -> torch.Tensor:
    """dA = f'(Z) ⊙ (dX Wᵀ + X dWᵀ + db) -> a new contiguous [M, N].

    x [M, K], weight [N, K]; tangent_x [M, K], tangent_weight [N, K], tangent_bias [N],
    each None for a zero tangent; saved [M, N] (A, Z or f'(Z) as saved_kind says: "a",
    "z", "f_prime"; None for identity); rows = M, columns = N.
    """
    like = next(t for t in (tangent_x, tangent_weight, tangent_bias) if t is not None)
    out = torch.empty((rows, columns), dtype=like.dtype, device=like.device)
    if out.numel() == 0:
        return out
    K = x.shape[1]
    fp64 = like.dtype == torch.float64
    use_dot = (not fp64) or dense.fp64_dot_supported(like.device)
    if not use_dot:
        tile, launch = dense._FP64_FMA_CONFIG, {}
    elif dense.is_interpreted():
        tile, launch = dense._INTERPRETER_CONFIG, {}
    else:
        tile, launch = _TILE, _LAUNCH
    saved = saved if saved is not None else out  # identity reads nothing
    tx = tangent_x if tangent_x is not None else x  # absent tangents: flags off, a valid pointer
    tw = tangent_weight if tangent_weight is not None else weight
    tb = tangent_bias if tangent_bias is not None else out
    grid = (triton.cdiv(rows, tile["BLOCK_M"]), triton.cdiv(columns, tile["BLOCK_N"]))
    with dense._device_guard(like):
        _jvp_kernel[grid](
            tx, weight, x, tw, tb, saved, out, rows, columns, K,
            tx.stride(0), tx.stride(1), weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
            tw.stride(0), tw.stride(1), tb.stride(0), saved.stride(0), saved.stride(1), out.stride(0), out.stride(1),
            HAS_TANGENT_X=tangent_x is not None,
            HAS_TANGENT_WEIGHT=tangent_weight is not None,
            HAS_TANGENT_BIAS=tangent_bias is not None,
            ACTIVATION=act_id,
            NEGATIVE_SLOPE=negative_slope,
            SAVED_KIND=dense._saved_kind_id(saved_kind),
            USE_DOT=use_dot,
            INPUT_PRECISION=dense._input_precision(like.dtype, like.device),
            ACC_FP64=fp64,
            BLOCK_M=tile["BLOCK_M"], BLOCK_N=tile["BLOCK_N"], BLOCK_K=tile["BLOCK_K"],
            **launch,
        )
    return out
