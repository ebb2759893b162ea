"""Split-K of the ∂C/∂W matmul (dense.grad_weight_splits, _grad_weight_split_kernel, _split_sum_kernel): the setting,
the plan's rule, every autotune config of the split kernel on its own, ∂C/∂b with the same bits split or not, ∂C/∂W
within the unsplit kernel's error against float64, and the edge cases (empty, ragged, fewer rows than chunks)
through the launcher and the layer; the same plan for every plain product (dense.matmul: the MLP's ∂C/∂Wₗ); none in
the gated layer's ∂C/∂W kernel."""

import pytest
import torch

import manualbp

from checks import assert_close_to_float64
from test_kernels import _config_id, _launch_with, _row_sum_configs, _runs_here, _saved, triton_cdiv

dense = manualbp.backends.kernels()
CHUNK = dense.SUM_CHUNK_K.value
# Rows of the tests that split: three chunks, the last one ragged (not a multiple of any K step).
ROWS = 2 * CHUNK + 52


def test_the_setting_is_checked():
    """grad_weight_split: "auto" or an int >= 1; anything else a clear error, before any kernel runs."""
    for good in ("auto", 1, 2, 7):
        with manualbp.config.override(grad_weight_split=good):
            assert manualbp.config.grad_weight_split() == good, f"{good!r} accepted"
    for bad in (0, -1, True, 2.0, "2", "on", None):
        with pytest.raises(ValueError, match="grad_weight_split .* must be 'auto' or an int >= 1"):
            manualbp.config.set(grad_weight_split=bad)


def test_a_bad_environment_value_is_reported_when_read(monkeypatch):
    monkeypatch.setenv("MANUALBP_GRAD_WEIGHT_SPLIT", "lots")
    settings = manualbp.config._from_environment()
    monkeypatch.setattr(manualbp.config, "_current", settings)
    with pytest.raises(ValueError, match="MANUALBP_GRAD_WEIGHT_SPLIT must be 'auto'"):
        manualbp.config.grad_weight_split()
    with pytest.raises(ValueError, match="MANUALBP_GRAD_WEIGHT_SPLIT must be 'auto'"):
        dense.grad_weight_splits(8 * CHUNK, 64, 64, torch.device("cpu"))  # the plan asks: before any launch
    monkeypatch.setenv("MANUALBP_GRAD_WEIGHT_SPLIT", "3")
    assert manualbp.config._from_environment().grad_weight_split == 3, "an int from the environment"


def test_the_plan_picks_splits_by_shape_and_sm_count(monkeypatch):
    """"auto": as many splits as keep S x the output tiles (at dense._SPLIT_TILE) within the SMs, at most one per
    chunk of rows, made even (no empty split); never on a CPU or in the interpreter; a forced S is capped the same
    way; fewer than two chunks never split."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    with manualbp.config.override(grad_weight_split="auto"):
        assert dense.grad_weight_splits(8192, 1024, 1024, cpu) == 1, "auto: never off a GPU"
        monkeypatch.setattr(dense, "is_interpreted", lambda: False)
        monkeypatch.setattr(dense, "_num_sms", lambda device: 132)
        assert dense._SPLIT_TILE == (128, 256), "the largest tile of matmul_configs, the autotuner's first"
        # out_features x in_features: 8 x 4 = 32 tiles of 128x256 -> 4 per SM wave; 8 chunks of 1024 rows
        assert dense.grad_weight_splits(8192, 1024, 1024, gpu) == 4, "1024 -> 1024 at 8192 rows: 4 splits"
        assert dense.grad_weight_splits(8192, 4096, 1024, gpu) == 1, "128 tiles: no room for a second split"
        assert dense.grad_weight_splits(8192, 1024, 2048, gpu) == 2, "2048 -> 1024: 64 tiles, 2 splits"
        assert dense.grad_weight_splits(8192, 1024, 4096, gpu) == 1, "128 tiles the other way round"
        assert dense.grad_weight_splits(8192, 256, 256, gpu) == 8, "2 tiles: as many splits as chunks"
        assert dense.grad_weight_splits(3 * CHUNK, 256, 256, gpu) == 3, "3 chunks, 3 splits"
        assert dense.grad_weight_splits(CHUNK, 256, 256, gpu) == 1, "one chunk: no split"
        assert dense.grad_weight_splits(0, 256, 256, gpu) == 1, "no rows: no split"
    for forced, rows, expected in ((1, 8192, 1), (2, 8192, 2), (3, 8 * CHUNK, 3), (5, 8 * CHUNK, 4),
                                   (4, 2 * CHUNK + 1, 3), (4, CHUNK, 1), (4, 0, 1), (16, 8 * CHUNK, 8)):
        with manualbp.config.override(grad_weight_split=forced):
            assert dense.grad_weight_splits(rows, 4096, 4096, cpu) == expected, (
                f"forced {forced} at {rows} rows: {expected} (chunks {triton_cdiv(rows, CHUNK)}, none empty)")


def _split_launch(config, grad_t, x, partials, chunk_sums, splits, *, saved_t=None, row_sums=True, **flags):
    """One launch of _grad_weight_split_kernel at this config's tile (not the autotuner's pick), as
    test_kernels._launch_with launches the other role kernels: grad_t [out, rows] (G or a stored δ, transposed),
    x [rows, in]."""
    M, K = grad_t.shape
    N = x.shape[1]
    kw = dict(config.kwargs)
    if not _runs_here(config):
        pytest.skip(f"{_config_id(config)}: this Triton has no tensor descriptors (TMA configs are never offered)")
    split_rows = triton_cdiv(M, dense._SPLIT_ROWS) * dense._SPLIT_ROWS
    grid = (splits * split_rows // kw["BLOCK_M"] * triton_cdiv(N, kw["BLOCK_N"]),)
    prologue = flags.get("ACTIVATION", 0) != 0
    layout = dense._tma_layout(grad_t, x, saved_t if prologue else None, capable=kw.get("TMA", False))
    layout["WARP_SPECIALIZE_OK"] = bool(kw.get("WARP_SPECIALIZE", False))  # the config forced: allowed
    if kw.get("TMA", False):
        if not layout["TMA_OK"]:
            pytest.skip(f"a TMA config, operands TMA cannot describe ({layout})")
        grid = (min(grid[0], 3),)  # persistent: each program walks several tiles
        if grad_t.is_cuda:
            dense._ensure_allocator()
    saved_t = saved_t if prologue else grad_t
    args = (grad_t, x, saved_t, partials, chunk_sums, M, N, K, grad_t.stride(0), grad_t.stride(1), x.stride(0),
            x.stride(1), saved_t.stride(0), saved_t.stride(1), split_rows, splits, dense._tuning_bucket(M),
            dense._tuning_bucket(N), dense._tuning_bucket(K))
    constexprs = dict(ACTIVATION=0, NEGATIVE_SLOPE=0.0, SAVED_KIND=dense.SAVED_KINDS["z"], ROW_SUMS=row_sums,
                      USE_DOT=True, INPUT_PRECISION="ieee", ACC_FP64=False, EVEN_K=K % kw["BLOCK_K"] == 0,
                      INLINE_PTX=dense._inline_ptx(grad_t.device), **layout, num_warps=config.num_warps,
                      num_stages=config.num_stages, **dense.COMPILE_OPTIONS)
    constexprs.update(flags)
    dense._grad_weight_split_kernel[grid](*args, **constexprs | dense._tile_for("_grad_weight_split_kernel", kw))
    return split_rows


def _reduce(partials, chunk_sums, out, row_sums, split_rows, splits):
    M, N = out.shape
    grid = (triton_cdiv(M, 64), triton_cdiv(N, 64))
    dense._split_sum_kernel[grid](partials, out, chunk_sums, row_sums, M, N, split_rows, splits, chunk_sums.shape[0],
                                  out.stride(0), out.stride(1), ROW_SUMS=True, BLOCK_M=64, BLOCK_N=64)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_every_split_config_gives_the_unsplit_bias_bits(half, device):
    """Each config the autotuner may pick for the split kernel that forms ∂C/∂b (dense._sums_in_k_steps_of), on its
    own, forming δ in its loads (gelu from f'(Z)), at 2 and 3 splits of three chunks of rows (the last ragged), then
    the fixed-order reduction: ∂C/∂b the bits of the unsplit _grad_weight_kernel at every tile (and the same chunk
    sums at every tile), ∂C/∂W within the unsplit kernel's error against float64 (both judged by PyTorch's own, in
    the data's dtype); and the same config without ∂C/∂b (ROW_SUMS off) on a stored δ."""
    dtype = torch.float16 if half else torch.float32
    g = torch.Generator().manual_seed(27)
    rows, out_features, in_features = ROWS, 72, 40  # rows of 16-byte multiples (TMA describes them)
    act = manualbp.get_activation("gelu")
    grad_a = torch.randn(rows, out_features, generator=g).to(device, dtype)
    f_prime = act.f_grad(torch.randn(rows, out_features, generator=g)).to(device, dtype)
    x = torch.randn(rows, in_features, generator=g).to(device, dtype)
    delta = grad_a * f_prime  # the rounded δ the loads form (f'(Z) saved: one product, one rounding)
    exact = (grad_a.double() * f_prime.double()).t() @ x.double()
    theirs = (delta.t() @ x) if dtype == torch.float32 or device.type == "cuda" else (
        delta.float().t() @ x.float()).to(dtype)  # PyTorch's CPU half matmul: float32 then rounded
    flags = dict(ACTIVATION=act.kernel_id, SAVED_KIND=dense.SAVED_KINDS["f_prime"])
    bias_bits, chunk_bits = {}, {}
    for config in _row_sum_configs(grad_a):
        name = _config_id(config)
        unsplit_w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        unsplit_b = torch.full((out_features,), float("nan"), device=device)
        _launch_with(config, grad_a.t(), x, unsplit_w, saved=f_prime.t(), row_sums=unsplit_b, A_PROLOGUE=True,
                     **flags)
        bias_bits[f"{name} unsplit"] = unsplit_b
        for splits in (2, 3):
            split_rows = triton_cdiv(out_features, dense._SPLIT_ROWS) * dense._SPLIT_ROWS
            partials = torch.full((splits * split_rows, in_features), float("nan"), device=device)
            chunk_sums = torch.full((triton_cdiv(rows, CHUNK), out_features), float("nan"), device=device)
            _split_launch(config, grad_a.t(), x, partials, chunk_sums, splits, saved_t=f_prime.t(), **flags)
            grad_weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
            row_sums = torch.full((out_features,), float("nan"), device=device)
            _reduce(partials, chunk_sums, grad_weight, row_sums, split_rows, splits)
            bias_bits[f"{name} S={splits}"] = row_sums
            chunk_bits[f"{name} S={splits}"] = chunk_sums
            assert_close_to_float64(f"dW {name} S={splits}", grad_weight, theirs, exact)
            # the same launch without ∂C/∂b, on the stored δ: the product alone
            plain = torch.full_like(partials, float("nan"))
            _split_launch(config, delta.t(), x, plain, plain, splits, row_sums=False)
            _reduce(plain, chunk_sums, grad_weight, row_sums, split_rows, splits)
            assert_close_to_float64(f"dW of a stored δ {name} S={splits}", grad_weight, theirs, exact)
        assert_close_to_float64(f"dW {name} unsplit", unsplit_w, theirs, exact)
    assert len(bias_bits) >= 6, "several tiles and splits compared"
    (first_name, first), *others = bias_bits.items()
    for name, sums in others:
        assert torch.equal(sums, first), f"db with {name} bitwise == with {first_name}"
    (first_name, first), *others = chunk_bits.items()
    for name, sums in others:
        assert torch.equal(sums, first), f"chunk sums with {name} bitwise == with {first_name}"
    torch.testing.assert_close(first.double().sum(0), delta.double().sum(0), rtol=1e-5, atol=1e-5 * rows ** 0.5,
                               msg=lambda m: f"the chunk sums add up to 1ᵀ δ: {m}")


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_unsplit_bias_grad_is_its_chunks_added_in_order(half, device):
    """The unsplit kernel's one K loop over three chunks of rows (the last ragged: 52 rows, no multiple of a K step)
    gives ∂C/∂b bit for bit as the same kernel launched on each chunk's rows alone, their sums added in order from
    zero in float32: each chunk summed from zero, its sums added at its last K step. At the configs with the
    smallest and the largest BLOCK_K (the most and the fewest K steps a chunk)."""
    dtype = torch.float16 if half else torch.float32
    g = torch.Generator().manual_seed(31)
    rows, out_features, in_features = ROWS, 72, 40
    act = manualbp.get_activation("relu")
    grad_a = torch.randn(rows, out_features, generator=g).to(device, dtype)
    a = act.f(torch.randn(rows, out_features, generator=g)).to(device, dtype)
    x = torch.randn(rows, in_features, generator=g).to(device, dtype)
    flags = dict(A_PROLOGUE=True, ACTIVATION=act.kernel_id, SAVED_KIND=dense.SAVED_KINDS["a"])
    configs = sorted(_row_sum_configs(grad_a), key=lambda config: config.kwargs["BLOCK_K"])
    assert configs[0].kwargs["BLOCK_K"] < CHUNK // 8, f"a chunk is many K steps: {_config_id(configs[0])}"
    for config in (configs[0], configs[-1]):
        name = _config_id(config)
        whole = torch.full((out_features,), float("nan"), device=device)
        grad_weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        _launch_with(config, grad_a.t(), x, grad_weight, saved=a.t(), row_sums=whole, **flags)
        in_order = torch.zeros(out_features, device=device)
        for first in range(0, rows, CHUNK):
            chunk = slice(first, min(first + CHUNK, rows))
            sums = torch.full((out_features,), float("nan"), device=device)
            _launch_with(config, grad_a[chunk].t(), x[chunk], grad_weight, saved=a[chunk].t(), row_sums=sums,
                         **flags)
            in_order += sums
        assert torch.equal(whole, in_order), f"db with {name}: its chunks' sums added in order, bit for bit"


@pytest.mark.parametrize("config", dense.matmul_configs(), ids=_config_id)
def test_every_split_config_is_correct(config, device):
    """Every config of matmul_configs() on the split kernel on its own, without ∂C/∂b (every BLOCK_K may serve such
    launches), with δ formed in the loads (relu, a select on A) and on a stored δ: ∂C/∂W within the error of
    PyTorch's own product against float64, the partial rows past out_features never written."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(28)
    rows, out_features, in_features = ROWS, 72, 104  # 16-byte rows (TMA describes them), no tile divides them
    grad_a = torch.randn(rows, out_features, generator=g).to(device, dtype)
    a = torch.relu(torch.randn(rows, out_features, generator=g)).to(device, dtype)
    x = torch.randn(rows, in_features, generator=g).to(device, dtype)
    delta = torch.where(a > 0, grad_a, 0)
    exact = delta.double().t() @ x.double()
    theirs = delta.t() @ x
    relu = dict(ACTIVATION=manualbp.get_activation("relu").kernel_id, SAVED_KIND=dense.SAVED_KINDS["a"])
    if dense._tma_prologue_excluded(config):
        relu = {}  # not offered to the prologue's launches (dense._tma_prologue_excluded): the stored δ only
    for label, left, flags in (("prologue", grad_a, relu), ("stored δ", delta, {})):
        if label == "prologue" and not flags:
            continue
        split_rows = triton_cdiv(out_features, dense._SPLIT_ROWS) * dense._SPLIT_ROWS
        partials = torch.full((3 * split_rows, in_features), float("nan"), device=device)
        _split_launch(config, left.t(), x, partials, partials, 3, saved_t=a.t(), row_sums=False, **flags)
        padding = partials.view(3, split_rows, in_features)[:, out_features:]
        assert padding.isnan().all(), f"{label} {_config_id(config)}: nothing written past out_features"
        grad_weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
        row_sums = torch.empty(out_features, device=device)
        chunk_sums = torch.zeros(1, out_features, device=device)
        _reduce(partials, chunk_sums, grad_weight, row_sums, split_rows, 3)
        assert_close_to_float64(f"dW {label} {_config_id(config)}", grad_weight, theirs, exact)


def _layer_backward(act, kind, dtype, device, rows, wants, splits, seed=29):
    g = torch.Generator().manual_seed(seed)
    out_features, in_features = 33, 37
    z = torch.randn(rows, out_features, generator=g, dtype=torch.float64)
    grad_a = torch.randn(out_features, rows, generator=g, dtype=torch.float64).t()  # column-major G
    x = torch.randn(rows, in_features, generator=g, dtype=torch.float64)
    weight = torch.randn(out_features, in_features, generator=g, dtype=torch.float64) / out_features ** 0.5
    wide = torch.zeros(rows, 2 * out_features, dtype=dtype)
    wide[:, ::2] = _saved(act, z, kind).to(dtype)
    saved = wide[:, ::2].to(device)  # every other column: strides (2N, 2)
    with manualbp.config.override(grad_weight_split=splits):
        grads = dense.linear_backward(grad_a.to(device, dtype), x.to(device, dtype), weight.to(device, dtype), saved,
                                      act.kernel_id, act.kernel_slope, kind, *wants)
    return grads, (grad_a, x, z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", manualbp.ACTIVATIONS)
def test_linear_backward_split_or_not(activation, dtype, device):
    """dense.linear_backward split in 2 (two chunks, the second ragged) against unsplit, for the first layer (δ formed
    in the ∂C/∂W matmul's loads) and, for relu and gelu, a hidden one (δ stored by the ∂C/∂X matmul, read by the same
    split launch whatever the activation), strided G and saved tensors: ∂C/∂b
    bitwise the same, ∂C/∂W within the unsplit launch's error against float64 (PyTorch's own as the measure) and the
    same bits run after run, ∂C/∂X untouched. (Three splits: the tests above.)"""
    if dtype != torch.float32 and activation not in ("identity", "relu", "gelu", "tanh"):
        pytest.skip("the other activations' δ is the same code: float32 covers them (interpreter time)")
    act = manualbp.get_activation(activation)
    kind = "f_prime" if act.kernel_id and not act.saves_output else ("a" if act.saves_output else "z")
    rows = CHUNK + 52
    # the hidden layer's split kernel reads the stored δ, the same launch for every activation: two of them
    layers = [(False, True, True)] + ([(True, True, True)] if activation in ("relu", "gelu") else [])
    for wants in layers:
        label = f"[{activation}, {dtype}, {'hidden' if wants[0] else 'first'} layer]"
        unsplit, (grad_a, x, z) = _layer_backward(act, kind, dtype, device, rows, wants, 1)
        split, _ = _layer_backward(act, kind, dtype, device, rows, wants, 2)
        assert torch.equal(split[2], unsplit[2]), f"db {label}: the same bits split or not"
        if not wants[0]:
            again, _ = _layer_backward(act, kind, dtype, device, rows, wants, 2)
            assert torch.equal(split[1], again[1]), f"dW {label}: the same bits run after run"
        if wants[0]:
            assert torch.equal(split[0], unsplit[0]), f"dX {label}: not touched by the split"
        g16 = grad_a.to(dtype)
        f_prime = act.f_grad(z)
        delta = g16.double() * f_prime
        exact = delta.t() @ x
        # PyTorch's own product of the rounded δ in the data's dtype (half on the CPU: float32, then rounded)
        compute = dtype if dtype != torch.float16 or device.type == "cuda" else torch.float32
        theirs = ((g16.to(compute) * f_prime.to(compute)).to(dtype).to(compute).t() @ x.to(compute)).to(dtype)
        assert_close_to_float64(f"dW {label} unsplit", unsplit[1].cpu(), theirs.cpu(), exact)
        assert_close_to_float64(f"dW {label} split", split[1].cpu(), theirs.cpu(), exact)


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("rows", [0, 1, CHUNK, CHUNK + 1], ids=lambda r: f"rows{r}")
def test_edge_rows(rows, splits, device):
    """Empty, one row, exactly one chunk (never split: fewer rows than two chunks), one row into a second chunk
    (two splits at most, the second of one row): the float64 answers."""
    act = manualbp.get_activation("relu")
    (grad_x, grad_weight, grad_bias), (grad_a, x, z) = _layer_backward(act, "a", torch.float64, device, rows,
                                                                       (True, True, True), splits)
    delta = grad_a * act.f_grad(z)
    for name, ours, exact in (("dW", grad_weight, delta.t() @ x), ("db", grad_bias, delta.sum(0))):
        torch.testing.assert_close(ours.cpu(), exact, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"{name} at {rows} rows, {splits} splits: {m}")


def test_the_launches_split_where_asked(monkeypatch):
    """With a split: the split kernel and its reduction, each once per backward, and no unsplit ∂C/∂W launch."""
    roles = []
    real = dense.launch.run
    monkeypatch.setattr(dense.launch, "run", lambda role, *args: roles.append(role) or real(role, *args))
    for splits, expected in ((1, ["grad_x", "grad_weight"]), (2, ["grad_x", "grad_weight_split", "grad_weight_sum"])):
        roles.clear()
        _layer_backward(manualbp.get_activation("gelu"), "f_prime", torch.float32, torch.device("cpu"), ROWS,
                        (True, True, True), splits)
        assert roles == expected, f"{splits} splits: launches {roles}"


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_layer_splits_3d_and_non_contiguous_inputs(activation, device, monkeypatch):
    """manualbp.Linear through autograd, x 3-D and non-contiguous: ∂C/∂W and ∂C/∂b split in 3 against unsplit, ∂C/∂b
    the same bits, ∂C/∂W within float32 rounding of it."""
    g = torch.Generator().manual_seed(30)
    layer = manualbp.Linear(24, 40, activation=activation).to(device)
    x_full = torch.randn(2, 48, ROWS // 2, generator=g).to(device)
    x = x_full[:, ::2].transpose(1, 2)  # [2, ROWS / 2, 24], neither contiguous nor transposed-contiguous
    grad_out = torch.randn(2, ROWS // 2, 40, generator=g).to(device)
    results = {}
    roles = []
    real = dense.launch.run
    monkeypatch.setattr(dense.launch, "run", lambda role, *args: roles.append(role) or real(role, *args))
    for splits in (1, 3):
        layer.zero_grad()
        roles.clear()
        with manualbp.config.override(grad_weight_split=splits, backend="triton"):
            layer(x).backward(grad_out)
        results[splits] = (layer.weight.grad.clone(), layer.bias.grad.clone())
        assert ("grad_weight_split" in roles) == (splits > 1), f"{splits} splits: the launches {roles}"
    assert torch.equal(results[3][1], results[1][1]), f"db [{activation}]: the same bits split or not"
    torch.testing.assert_close(results[3][0], results[1][0], rtol=1e-5, atol=1e-5 * ROWS ** 0.5,
                               msg=lambda m: f"dW [{activation}] split against unsplit: {m}")


def test_chunks_and_split_rows_fit_every_tile():
    """A chunk of rows is whole K steps of every config and fixed tile (a split ends where a K step does), a split's
    workspace rows are whole row tiles of every one (no tile straddles two splits), and the split count is in the
    autotuner's key (a forced S tunes its own tile)."""
    tiles = [cfg.kwargs for cfg in dense.matmul_configs()] + [
        dense._INTERPRETER_CONFIG, dense._FP64_CONFIG, dense._FP64_FMA_CONFIG, dense._UNTUNED_CONFIG,
        dense._UNTUNED_ROW_SUMS_CONFIG]
    for tile in tiles:
        assert CHUNK % tile["BLOCK_K"] == 0, f"{tile}: SUM_CHUNK_K a multiple of BLOCK_K"
        assert dense._SPLIT_ROWS % tile["BLOCK_M"] == 0, f"{tile}: _SPLIT_ROWS a multiple of BLOCK_M"
    for step in (dense.SUM_BLOCK_K.value, dense.WIDE_SUM_BLOCK_K.value):
        assert CHUNK % step == 0, f"SUM_CHUNK_K a multiple of the sums' K step {step}"
    names = dense.kernel_arg_names(dense._grad_weight_split_kernel)
    assert "splits" in names and "splits" in dense._TUNING_KEY, "the autotuner keys on the split count"


@pytest.mark.parametrize("fma", [False, True], ids=["dot", "fp64-fma-fallback"])
def test_split_without_bias_and_on_the_fma_fallback(fma, monkeypatch, device):
    """Split in 2 without ∂C/∂b (no chunk sums: the plain split launch and its sum), float64, with tl.dot and with the
    exact FMA fallback where a Triton build cannot lower a float64 tl.dot: the float64 answers."""
    if fma:
        dense.fp64_dot_supported.cache_clear()
        monkeypatch.setattr(dense, "fp64_dot_supported", lambda device: False)
    act = manualbp.get_activation("gelu")
    for wants in ((False, True, False), (True, True, False)):
        (grad_x, grad_weight, grad_bias), (grad_a, x, z) = _layer_backward(act, "f_prime", torch.float64, device,
                                                                           CHUNK + 3, wants, 2)
        assert grad_bias is None, f"{wants}: no ∂C/∂b asked, none given"
        delta = grad_a * act.f_grad(z)
        torch.testing.assert_close(grad_weight.cpu(), delta.t() @ x, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"dW split in 2 without db, {wants}, fma={fma}: {m}")


def _roles_of(monkeypatch):
    """The roles of the launches that follow (launch.run's first argument), in order."""
    roles = []
    real = dense.launch.run
    monkeypatch.setattr(dense.launch, "run", lambda role, *args: roles.append(role) or real(role, *args))
    return roles


# dense.matmul's three ways of being given its left operand: (label, its [M, K] from a [K, M] tensor, a_transposed)
_MATMUL_FORMS = {
    "a_transposed": (lambda a_t: a_t, True),  # the MLP's ∂C/∂Wₗ = δₗᵀ Xₗ: δ given, read through swapped strides
    "view aᵀ": (lambda a_t: a_t.t(), False),  # the dispatched route: the matmul operator of the view δᵀ
    "a [M, K]": (lambda a_t: a_t.t().contiguous(), False),  # a row-major left operand
}


@pytest.mark.parametrize("form", list(_MATMUL_FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_plain_product_splits_where_asked(form, dtype, device, monkeypatch):
    """dense.matmul with S forced: a @ b reduced over three chunks of rows (the last ragged), odd M and N, split in 2
    and 3 (the split kernel without ∂C/∂b, then the fixed-order sum; no plain launch) and unsplit: each within
    PyTorch's own error against float64, the same bits run after run."""
    g = torch.Generator().manual_seed(31)
    rows, M, N = ROWS, 33, 37
    a_t = torch.randn(rows, M, generator=g).to(device, dtype)  # the left operand's transpose [K, M]: δ
    b = torch.randn(rows, N, generator=g).to(device, dtype)
    make, a_transposed = _MATMUL_FORMS[form]
    a = make(a_t)
    exact = a_t.double().t() @ b.double()
    theirs = (a_t.t() @ b) if dtype == torch.float32 or device.type == "cuda" else (
        a_t.float().t() @ b.float()).to(dtype)  # PyTorch's CPU half matmul: float32 then rounded
    roles = _roles_of(monkeypatch)
    for splits, launched in ((1, ["matmul"]), (2, ["grad_weight_split", "grad_weight_sum"]),
                             (3, ["grad_weight_split", "grad_weight_sum"])):
        label = f"a @ b [{form}, {dtype}, S={splits}]"
        with manualbp.config.override(grad_weight_split=splits):
            roles.clear()
            ours = dense.matmul(a, b, a_transposed=a_transposed)
            assert roles == launched, f"{label}: launches {roles}, expected {launched}"
            again = dense.matmul(a, b, a_transposed=a_transposed)
        assert ours.is_contiguous(), f"{label}: a new contiguous output"
        assert torch.equal(ours, again), f"{label}: the same bits run after run"
        assert_close_to_float64(label, ours, theirs, exact)


@pytest.mark.parametrize("rows, M, N", [(CHUNK, 9, 7), (CHUNK + 1, 0, 7), (CHUNK + 1, 9, 0), (0, 9, 7)],
                         ids=["one-chunk", "M0", "N0", "K0"])
@pytest.mark.parametrize("a_transposed", [False, True], ids=["a", "a_transposed"])
def test_the_plain_product_edges(rows, M, N, a_transposed, device, monkeypatch):
    """S = 4 forced: one chunk of rows (never split: a split is whole chunks), an empty output (no launch) and an
    empty reduction (zeros, unsplit): the float64 answers."""
    g = torch.Generator().manual_seed(32)
    a = torch.randn(*((rows, M) if a_transposed else (M, rows)), generator=g, dtype=torch.float64)
    b = torch.randn(rows, N, generator=g, dtype=torch.float64)
    dense.fp64_dot_supported(torch.device(device))  # probed once by a matmul launch of its own: not recorded
    roles = _roles_of(monkeypatch)
    with manualbp.config.override(grad_weight_split=4):
        ours = dense.matmul(a.to(device), b.to(device), a_transposed=a_transposed)
    expected_roles = ["matmul"] if M and N else []
    assert roles == expected_roles, f"rows {rows}, [{M}, {N}]: launches {roles}, expected {expected_roles}"
    torch.testing.assert_close(ours.cpu(), (a.t() if a_transposed else a) @ b, rtol=1e-12, atol=1e-12,
                               msg=lambda m: f"a @ b at {rows} rows, [{M}, {N}], S = 4: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("sizes", [[24, 40, 16], [24, 40, 16, 8]], ids=["2 layers", "3 layers"])
def test_the_mlp_backward_splits_its_weight_gradients(sizes, dtype, device, monkeypatch):
    """manualbp.MLP's fused backward (δₗ₋₁ in the epilogue of δₗ Wₗ, ∂C/∂Wₗ = δₗᵀ Xₗ by dense.matmul) with S forced
    to 2 over two chunks of rows (the second ragged): every ∂C/∂Wₗ by the split kernel and its sum, the rest
    unchanged; ∂C/∂X and ∂C/∂b the bits of S = 1, ∂C/∂W within PyTorch's own error against float64 split or not."""
    reason = manualbp.backends.triton_unavailable_reason(device, dtype)
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    torch.manual_seed(33)
    mlp = manualbp.MLP(sizes, activation="gelu", last_activation="tanh", dtype=dtype, device=device,
                       backend="triton")
    eager, eager64 = mlp.to_sequential(), mlp.to_sequential().double()  # the same (rounded) weights
    rows = CHUNK + 52
    x = torch.randn(rows, sizes[0], device=device).to(dtype)
    grad_out = torch.randn(rows, sizes[-1], device=device).to(dtype)

    def gradients(model, dtype):
        model.zero_grad()
        leaf = x.detach().to(dtype).requires_grad_(True)
        model(leaf).backward(grad_out.to(dtype))
        return {"x": leaf.grad, **{name: p.grad.clone() for name, p in model.named_parameters()}}

    roles = _roles_of(monkeypatch)
    results = {}
    for splits in (1, 2):
        roles.clear()
        with manualbp.config.override(grad_weight_split=splits, mlp_fusion=True):
            results[splits] = gradients(mlp, dtype)
        layers = len(sizes) - 1
        expected = {"grad_weight_split": layers if splits > 1 else 0, "grad_weight_sum": layers if splits > 1 else 0,
                    "matmul": 1 if splits > 1 else layers + 1, "grad_below": layers - 1}
        counted = {role: roles.count(role) for role in expected}
        assert counted == expected, f"{sizes} {dtype} S={splits}: launches {roles}"
    roles.clear()
    theirs = gradients(eager, dtype)
    exact = gradients(eager64, torch.float64)
    for name, split in results[2].items():
        label = f"{name} [{sizes}, {dtype}]"
        if not name.endswith("weight"):
            assert torch.equal(split, results[1][name]), f"{label}: the bits of S = 1"
            continue
        assert_close_to_float64(f"{label} unsplit", results[1][name], theirs[name], exact[name])
        assert_close_to_float64(f"{label} S = 2", split, theirs[name], exact[name])


@pytest.mark.parametrize("in_loads", [True, False], ids=["delta-in-loads", "delta-stored"])
def test_the_gated_weight_gradients_are_not_split(in_loads, device, monkeypatch):
    """The gated layer's ∂C/∂W kernel (both weight gradients and both bias sums in one launch) has no split-K: with
    S = 2 forced, in both plans for δ_g, δ_u, no split launch and the bits of S = 1."""
    from manualbp.triton_kernels import gated
    from test_toolchain import _gated_inputs

    act = manualbp.get_activation("silu")
    inputs = _gated_inputs(ROWS, 24, 40, torch.float32, device, seed=34)
    roles = _roles_of(monkeypatch)
    results = {}
    for splits in (1, 2):
        roles.clear()
        with manualbp.config.override(grad_weight_split=splits):
            results[splits] = gated.gated_backward(*inputs[-1:], *inputs[:-1], None, None, act.kernel_id,
                                                   act.kernel_slope, (True,) * 5, delta_in_loads=in_loads)
        assert "gated_grad_weight" in roles and "grad_weight_split" not in roles, f"S={splits}: launches {roles}"
    for name, split, unsplit in zip(("dx", "dW_g", "dW_u", "db_g", "db_u"), results[2], results[1]):
        assert torch.equal(split, unsplit), f"{name} [δ in the loads: {in_loads}]: the bits of S = 1"
