"""Triton kernel of the dense layer's forward mode (the tangent of A, for jvp).

The equation is stated in ``manualbp/reference.py`` (``linear_jvp``), with x [M, K],
weight [N, K], bias [N] and tangents of the same shapes:

    dA = f'(Z) ⊙ (dX Wᵀ + X dWᵀ + db)    [M, N] = [M, K] [K, N] + [M, K] [K, N] + [N]

One matmul kernel: both products accumulate in one K loop (dX against Wᵀ, X
against dWᵀ, each transpose read through swapped strides), then the epilogue adds
db and multiplies by f'(Z), from what the forward saved (A, Z or f'(Z): the same
``_times_activation_grad`` as the backward's δ = G ⊙ f'(Z)). A tangent that is
absent is a compile-time flag, so no zero tensor is read or multiplied.

Tiles and autotuning as the dense matmuls: the configs of ``dense.matmul_configs()``
(pruned for two products per K step), the same bucketed key, grouped tile order and
epilogue in column slices (f' of a whole large tile at once would spill).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import dense, launch


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
    tune_m, tune_n, tune_k,  # M, N, K rounded up to the autotuner's buckets (dense._tuning_bucket): its key, not read
    HAS_TANGENT_X: tl.constexpr,
    HAS_TANGENT_WEIGHT: tl.constexpr,
    HAS_TANGENT_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # kernel id of f
    NEGATIVE_SLOPE: tl.constexpr,  # leaky_relu's slope (unused otherwise)
    SAVED_KIND: tl.constexpr,  # dense.SAVED_Z, SAVED_A or SAVED_F_PRIME
    USE_DOT: tl.constexpr,  # tl.dot, or the fp64 FMA fallback
    INPUT_PRECISION: tl.constexpr,  # "ieee", or "tf32" only when PyTorch allows TF32
    ACC_FP64: tl.constexpr,  # accumulate in float64 (float64 data)
    EPILOGUE_SPLIT: tl.constexpr,  # the epilogue works on this many column slices of the tile (1, 2, 4 or 8)
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no partial K step, the loop's loads need no mask
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # rows of tiles visited together, for L2 reuse
):
    pid_m, pid_n = dense._tile_position(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    tl.static_assert(not EVEN_K or dense.EVEN_K_STEP % BLOCK_K == 0, "EVEN_K launches need a BLOCK_K dividing EVEN_K_STEP")
    # Rows and columns past the edge are wrapped onto valid ones (as dense._main_loop): the loop masks only K
    # (not at all with EVEN_K).
    rows = offs_m % M
    cols = offs_n % N
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_now = k * BLOCK_K + offs_k
        mask_k = dense._k_step_mask(offs_k, k, K, BLOCK_K, EVEN_K)
        mask_rows = mask_k[None, :]  # [BLOCK_M, BLOCK_K] tiles of dX and X
        mask_cols = mask_k[:, None]  # [BLOCK_K, BLOCK_N] tiles of Wᵀ and dWᵀ
        if HAS_TANGENT_X:  # dX Wᵀ
            tangent_x = tl.load(tangent_x_ptr + rows[:, None] * stride_txm + k_now[None, :] * stride_txk,
                                mask=mask_rows, other=0.0)
            weight_t = tl.load(weight_ptr + k_now[:, None] * stride_wk + cols[None, :] * stride_wn,
                               mask=mask_cols, other=0.0)
            acc = dense._tile_dot(tangent_x, weight_t, acc, USE_DOT, INPUT_PRECISION)
        if HAS_TANGENT_WEIGHT:  # X dWᵀ
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k_now[None, :] * stride_xk, mask=mask_rows, other=0.0)
            tangent_weight_t = tl.load(
                tangent_weight_ptr + k_now[:, None] * stride_twk + cols[None, :] * stride_twn,
                mask=mask_cols, other=0.0)
            acc = dense._tile_dot(x, tangent_weight_t, acc, USE_DOT, INPUT_PRECISION)
    # The epilogue in EPILOGUE_SPLIT column slices, one after the other (as dense._forward_kernel's).
    slice_n: tl.constexpr = BLOCK_N // EPILOGUE_SPLIT
    parts = dense._column_slices(acc, EPILOGUE_SPLIT)
    for i in tl.static_range(EPILOGUE_SPLIT):
        part_n = pid_n.to(tl.int64) * BLOCK_N + i * slice_n + tl.arange(0, slice_n)
        part = parts[i]
        if HAS_TANGENT_BIAS:  # + db, on every row
            tangent_bias = tl.load(tangent_bias_ptr + part_n * stride_tb, mask=part_n < N, other=0.0)
            part = part + tangent_bias[None, :].to(acc.dtype)
        tangent_a, _ = dense._slice_times_f_prime(part, offs_m, part_n, M, N, saved_ptr, stride_sm, stride_sn,
                                                  ACTIVATION, NEGATIVE_SLOPE, SAVED_KIND)  # the compute dtype
        dense._store_tile(tangent_a, offs_m, part_n, M, N, out_ptr, stride_om, stride_on)


def _prune_configs(configs, named_args, **kwargs):
    """dense's configs for the data's dtype, the pointer kernels' only (no TMA path here), fitted to shared memory:
    with both tangents a K step holds two products (tiles of dX and Wᵀ, of X and dWᵀ), twice a stage of the plain
    matmul, so a config that would not fit loses pipeline stages (down to 2) instead of being dropped: the large
    tiles stay."""
    a = named_args["x_ptr"]
    budget = dense._shared_memory_bytes(a.device.index or 0)
    products = max(1, sum(bool(kwargs.get(name, named_args.get(name, False)))
                          for name in ("HAS_TANGENT_X", "HAS_TANGENT_WEIGHT")))
    kept, seen = [], set()
    for cfg in dense._for_element_size(configs, a.element_size()):
        if cfg.kwargs.get("TMA", False):
            continue
        stages = cfg.num_stages
        fits = lambda n: dense._pipelined_bytes(triton.Config(cfg.kwargs, num_stages=n), a.element_size(),  # noqa: E731
                                                products, products) <= budget
        while stages > 2 and not fits(stages):
            stages -= 1
        key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, stages)
        if fits(stages) and key not in seen:
            seen.add(key)
            kept.append(cfg if stages == cfg.num_stages else
                        triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=stages))
    return kept or [cfg for cfg in configs if not cfg.kwargs.get("TMA", False)][-1:]


# Sizes by bucket, and every flag that changes the kernel's work or shared memory; Triton adds the tensors' dtypes.
_TUNING_KEY = ["tune_m", "tune_n", "tune_k", "HAS_TANGENT_X", "HAS_TANGENT_WEIGHT", "HAS_TANGENT_BIAS", "ACTIVATION",
               "SAVED_KIND", "INPUT_PRECISION"]


@functools.lru_cache(maxsize=None)
def _autotuned_jvp():
    # Built on first use, as dense's autotuner (some Triton releases query the driver when one is created).
    return triton.autotune(configs=dense.matmul_configs(), key=_TUNING_KEY,
                           prune_configs_by={"early_config_prune": _prune_configs},
                           **dense.autotune_options())(_jvp_kernel)


def linear_jvp(x, weight, saved, tangent_x, tangent_weight, tangent_bias, act_id: int, negative_slope: float,
               saved_kind: str, rows: int, columns: int) -> torch.Tensor:
    """dA = f'(Z) ⊙ (dX Wᵀ + X dWᵀ + db) -> a new contiguous [M, N].

    x [M, K], weight [N, K]; tangent_x [M, K], tangent_weight [N, K], tangent_bias [N],
    each None for a zero tangent; saved [M, N] (A, Z or f'(Z) as saved_kind says: "a",
    "z", "f_prime"; None for identity); rows = M, columns = N.
    """
    like = next(t for t in (tangent_x, tangent_weight, tangent_bias) if t is not None)
    out = like.new_empty(rows, columns)  # sizes as ints: dense.py's allocations say why
    if not (rows and columns):
        return out
    K = x.shape[1]
    fp64 = like.dtype == torch.float64
    use_dot = (not fp64) or dense.fp64_dot_supported(like.device)
    saved = saved if saved is not None else out  # identity reads nothing
    tx = tangent_x if tangent_x is not None else x  # absent tangents: flags off, a valid pointer
    tw = tangent_weight if tangent_weight is not None else weight
    tb = tangent_bias if tangent_bias is not None else out
    buckets = dense.tuning_buckets(rows, columns, K)
    args = (
        tx, weight, x, tw, tb, saved, out, rows, columns, K,
        *tx.stride(), *weight.stride(), *x.stride(), *tw.stride(), tb.stride()[0], *saved.stride(), *out.stride(),
        *buckets,  # each tensor's strides asked once: a stride() tuple costs less than two stride(i) calls
    )
    options = (tangent_x is not None, tangent_weight is not None, tangent_bias is not None, act_id, negative_slope,
               saved_kind, use_dot, K % dense.EVEN_K_STEP.value == 0, buckets, dense.autotune_enabled(),
               like.dtype is torch.float32 and like.is_cuda and dense.tf32_allowed())

    def make():
        flags = dict(
            HAS_TANGENT_X=tangent_x is not None,
            HAS_TANGENT_WEIGHT=tangent_weight is not None,
            HAS_TANGENT_BIAS=tangent_bias is not None,
            ACTIVATION=act_id,
            NEGATIVE_SLOPE=negative_slope,
            SAVED_KIND=dense._saved_kind_id(saved_kind),
            USE_DOT=use_dot,
            INPUT_PRECISION=dense._input_precision(like.dtype, like.device),
            ACC_FP64=fp64,
            EVEN_K=dense._even_k(K),
            **dense.COMPILE_OPTIONS,
        )
        common = dict(interpreted=dense.is_interpreted(), compiled_ok=dense._inline_ptx(like.device),
                      device_index=like.device.index)
        fixed = dense._fixed_config(fp64, use_dot)
        if fixed is None:  # the GPU autotuner picks the tile, once per bucket of (M, N, K) and flags
            tuner = _autotuned_jvp()
            grid = lambda meta: (dense._cdiv(rows, meta["BLOCK_M"]) * dense._cdiv(columns, meta["BLOCK_N"]),)  # noqa: E731
            return dict(fn=tuner.fn, tuner=tuner, constexprs=flags, grid=grid, **common)
        tile, launch_options = fixed
        grid = (dense._cdiv(rows, tile["BLOCK_M"]) * dense._cdiv(columns, tile["BLOCK_N"]),)
        return dict(fn=_jvp_kernel, constexprs={**flags, **tile, **launch_options}, grid=grid, **common)

    launch.run("jvp", options, args, rows, columns, make)  # on the tensors' GPU (launch.py switches to it)
    return out
