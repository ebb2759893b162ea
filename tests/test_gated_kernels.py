"""The gated layer's kernels on their own: every autotune config of each matmul role, the pruning and the fixed
tiles, and the launch plans (a second call reuses them; the autotuned path tunes once per key).

On the CPU the kernels run in Triton's interpreter through the same launchers and plans as on a GPU; a config's
tile is forced on one role by the launchers' own fixed-tile rule (gated._fixed_tile), so each config runs the
kernel exactly as a launch the autotuner chose it for would.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import manualbp
from manualbp import backends

import fixed_order_dot
from checks import LaunchRecorder, assert_close_to_float64, skip_where_rs_operands_miscompiled, torch_activation

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_triton(dtype=torch.float32):
    reason = backends.triton_unavailable_reason(DEVICE, dtype)
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


def _modules():
    backends.kernels()  # Triton's import error, if any, raised as the dense layer raises it
    from manualbp.triton_kernels import dense, gated, launch

    return dense, gated, launch


ROLES = ("gated_forward", "gated_grad_x", "gated_grad_weight")


def _config_id(role, cfg):
    k = cfg.kwargs
    split = f"-e{k['EPILOGUE_SPLIT']}" if "EPILOGUE_SPLIT" in k else ""
    return f"{role}-{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}-s{cfg.num_stages}-w{cfg.num_warps}{split}"


def _every_config():
    try:
        _, gated, _ = _modules()
    except Exception as error:  # noqa: BLE001 - no Triton: one skipped case, saying why
        return [pytest.param(None, None, None, None, marks=pytest.mark.skip(reason=f"no triton kernels: {error}"))]
    # the backward roles in both plans for δ_g, δ_u: formed in their loads, and stored (gated.gated_backward), the
    # stored plan with its own tiles (gated._STORED_CONFIGS); each kind's tiles on its data (_kind_data), where in the
    # interpreter every kind runs float32 (IEEE), so a tile two kinds share runs once there
    kinds = {"16bit": (2, False), "32bit": (4, False), "tf32": (4, True)}
    configs = {}  # (role, tile id, plan[, kind on a GPU]) -> (config, kind)
    for role in ROLES:
        for plan in ((False,) if role == "gated_forward" else (False, True)):
            for kind, (size, tf32) in kinds.items():
                for cfg in gated.matmul_configs(role, size, tf32, stored=plan):
                    key = (role, _config_id(role, cfg), plan) + ((kind,) if DEVICE.type == "cuda" else ())
                    configs.setdefault(key, (cfg, kind))
    return [pytest.param(key[0], cfg, key[2], kind, id=f"{key[1]}-{kind}{'-stored' if key[2] else ''}")
            for key, (cfg, kind) in configs.items()]


def _kind_data(kind: str) -> tuple:
    """(dtype, float32 matmul precision) a kind of tiles runs on: on a GPU its own data, bfloat16 for the 16-bit
    tiles, float32 with IEEE products for float32's and with TF32 allowed for TF32's (a 16-bit tile's pipelined
    float32 operands may not fit in shared memory, and TF32's tiles are chosen for TF32 products); in the
    interpreter float32 (it has no bfloat16, and computes IEEE products whatever the setting), the precision as
    it is."""
    if DEVICE.type != "cuda":
        return torch.float32, torch.get_float32_matmul_precision()
    return {"16bit": (torch.bfloat16, "highest"), "32bit": (torch.float32, "highest"),
            "tf32": (torch.float32, "high")}[kind]


def require_autotuner(gated, role="gated_forward", element_size=4, tf32=False):
    """The role's autotuner (gated._autotuned), or a skip where this Triton builds none without a GPU driver (3.3's
    Autotuner asks the driver when it is made)."""
    import triton

    try:
        return gated._autotuned(role, element_size, tf32)
    except RuntimeError as error:
        if "driver" not in str(error):
            raise
        pytest.skip(f"Triton {triton.__version__} makes an autotuner only where a GPU driver is active ({error})")


def _inputs(M, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE, dtype)

    scale = max(K, 1) ** -0.5
    return (draw(M, K), draw(N, K, scale=scale), draw(N, K, scale=scale), draw(N), draw(N), draw(M, N))


def _eager(x, gate_weight, up_weight, gate_bias, up_bias, grad_a, activation):
    """(A, Z_g, Z_u, ∂C/∂X, ∂C/∂W_g, ∂C/∂W_u, ∂C/∂b_g, ∂C/∂b_u) by PyTorch's autograd in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate_weight, up_weight, gate_bias, up_bias)]
    z_gate = nn.functional.linear(leaves[0], leaves[1], leaves[3])
    z_up = nn.functional.linear(leaves[0], leaves[2], leaves[4])
    a = torch_activation(activation, z_gate) * z_up
    a.backward(grad_a)
    return [a.detach(), z_gate.detach(), z_up.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("role, config, stored, kind", _every_config())
def test_every_autotune_config_is_correct(role, config, stored, kind, monkeypatch):
    """Each config of each role on its own (not just the autotuner's winner), forced on that role's launches:
    the forward's A, Z_g, Z_u; ∂C/∂X; ∂C/∂W_g, ∂C/∂W_u and both bias sums, against float64, within twice PyTorch's
    own error in the same dtype and precision (_kind_data: on a GPU each kind of tiles on its own data); the
    backward's with δ_g, δ_u formed in the loads and stored (-stored). Sizes span several tiles and K steps of every
    config and divide none of them."""
    dtype, precision = _kind_data(kind)
    require_triton(dtype)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)  # TF32 for TF32's tiles on a GPU: the launches' and eager's
    try:
        _check_config(role, config, stored, dtype, monkeypatch)
    finally:
        torch.set_float32_matmul_precision(before)


def _check_config(role, config, stored, dtype, monkeypatch):
    """test_every_autotune_config_is_correct's launches and checks, for one config, plan and dtype."""
    if role != "gated_forward" and not stored:  # δ_g, δ_u in the loads (float32: an RS wgmma only as TF32)
        skip_where_rs_operands_miscompiled(DEVICE, dtype)
    dense, gated, launch = _modules()
    tile = dict(config.kwargs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    fixed = gated._fixed_tile
    monkeypatch.setattr(gated, "_fixed_tile", lambda r, dtype, use_dot, tf32=False, stored_=False: (
        dict(tile), dict(options)) if r == role else fixed(r, dtype, use_dot, tf32, stored_))
    M, K, N = 150, 140, 270  # rows, hidden (K), intermediate (N = I): over 2 steps of BLOCK_K = 64 each way
    activation = "gelu_tanh" if role == "gated_grad_x" else "silu"
    act = manualbp.get_activation(activation)
    inputs = _inputs(M, K, N, dtype)
    x, gate_weight, up_weight, gate_bias, up_bias, grad_a = inputs
    a, z_gate, z_up = gated.gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act.kernel_id, 0.0, True)
    grads = gated.gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, act.kernel_id,
                                 0.0, (True,) * 5, delta_in_loads=not stored)
    (plan,) = [plan for plan in launch.PLANS.values() if plan.role == role]
    assert {name: plan.constexprs[name] for name in tile} == tile, f"{role}: launched with {plan.constexprs}"
    if role != "gated_forward":
        assert plan.constexprs["DELTAS_STORED"] is stored, f"{role}: δ stored {stored}, launched {plan.constexprs}"
    theirs = _eager(*inputs, activation)
    exact = _eager(*(t.double() for t in inputs), activation)
    names = ("A", "Z_g", "Z_u", "dC/dX", "dC/dW_g", "dC/dW_u", "dC/db_g", "dC/db_u")
    for name, ours, their, exact_ in zip(names, (a, z_gate, z_up, *grads), theirs, exact):
        assert_close_to_float64(f"{_config_id(role, config)} {name}", ours, their, exact_)


def test_a_second_call_reuses_the_plans(monkeypatch):
    """A GatedMLP step builds one plan per launch (the forward, ∂C/∂X, ∂C/∂W; the gating alone where a hook runs
    the projections as modules; the tangent kernel of forward AD); the same calls again build none (no tuning, no
    compiling: build() is where both happen), launch through the plans they found and give the same bits."""
    require_triton()
    _, _, launch = _modules()
    torch.manual_seed(0)
    fused = manualbp.GatedMLP(24, 40, "silu", bias=True, backend="triton").to(DEVICE)
    hooked = manualbp.GatedMLP(24, 40, "gelu", backend="triton").to(DEVICE)
    hooked.gate_proj.register_forward_hook(lambda module, args, out: out)  # the projections as modules
    x, grad = torch.randn(37, 24, device=DEVICE), torch.randn(37, 24, device=DEVICE)
    tangent = torch.randn(37, 24, device=DEVICE)

    def step():
        outs = []
        for model in (fused, hooked):
            model.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_(True)
            out = model(leaf)
            out.backward(grad)
            outs += [out.detach(), leaf.grad] + [p.grad for p in model.parameters()]
        with torch.autograd.forward_ad.dual_level():
            outs.append(torch.autograd.forward_ad.unpack_dual(fused(torch.autograd.forward_ad.make_dual(
                x, tangent))).tangent)
        return outs

    first = step()
    plans = dict(launch.PLANS)
    roles = {plan.role for plan in plans.values()}
    assert {"gated_forward", "gated_grad_x", "gated_grad_weight", "gated_gate", "gated_tangent"} <= roles, \
        f"roles {sorted(roles)}"
    launched = {key: plan.launches for key, plan in plans.items()}

    def no_build(*args, **kwargs):
        raise AssertionError(f"a warm call built a plan: {args[:2]}")

    monkeypatch.setattr(launch, "build", no_build)
    second = step()
    assert launch.PLANS == plans, "the warm calls found every plan they needed"
    assert all(plan.launches > launched[key] for key, plan in plans.items() if plan.role.startswith("gated")), \
        "every gated plan launched again, warm"
    for index, (a, b) in enumerate(zip(first, second)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"output/gradient {index}\n{m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_the_plan_for_the_deltas_follows_in_features(dtype, monkeypatch):
    """gated_backward's two plans for δ_g, δ_u, chosen as the dense layer's: formed in the matmuls' loads up to
    dense.PROLOGUE_MAX_K in_features (lowered here to keep the interpreter quick), stored once by the gating kernel
    above it, with delta_prologue off (the setting, through functional.gated_linear) and where the toolchain has the
    RS hazard; every plan gives the same bits, the layer's output and gradients included."""
    require_triton(dtype)
    dense, gated, launch = _modules()
    from manualbp.triton_kernels import toolchain

    hazard = toolchain.rs_operand_hazard(DEVICE, dtype)
    monkeypatch.setattr(dense, "PROLOGUE_MAX_K", 32)
    act = manualbp.get_activation("silu")

    def plan_of(K, **settings):
        leaves = [t.requires_grad_(True) for t in _inputs(29, K, 40, dtype, seed=K)[:5]]
        launch.PLANS.clear()
        with manualbp.config.override(**settings):
            out = manualbp.functional.gated_linear(*leaves, "silu", backend="triton")
            out.backward(torch.ones_like(out))
        stored = {plan.constexprs["DELTAS_STORED"] for plan in launch.PLANS.values()
                  if plan.role in ("gated_grad_x", "gated_grad_weight")}
        gate_pass = any(plan.role == "gated_gate" for plan in launch.PLANS.values())
        assert stored == {gate_pass}, \
            f"K={K} {settings}: one plan for both matmuls, the gating kernel with the stored one ({stored})"
        return stored.pop(), [out.detach()] + [t.grad for t in leaves]

    for K in (32, 33):
        stored, results = plan_of(K)
        assert stored is (K > 32 or bool(hazard)), f"K={K}: δ stored {stored} (hazard: {hazard})"
        stored_off, results_off = plan_of(K, delta_prologue=False)
        assert stored_off, f"K={K}, delta_prologue off: δ stored"
        for index, (ours, theirs) in enumerate(zip(results, results_off)):
            assert torch.equal(ours, theirs), f"K={K} output/gradient {index}: the same bits in both plans"
    # the launcher's own argument forces either plan below the crossing and above it (the hazard aside)
    inputs = _inputs(29, 33, 40, dtype, seed=5)
    x, gate_weight, up_weight, gate_bias, up_bias, grad_a = inputs
    _, z_gate, z_up = gated.gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act.kernel_id, 0.0, True)
    for in_loads in (True, False):
        launch.PLANS.clear()
        gated.gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, act.kernel_id, 0.0,
                             (True,) * 5, delta_in_loads=in_loads)
        stored = {plan.constexprs["DELTAS_STORED"] for plan in launch.PLANS.values() if plan.role == "gated_grad_x"}
        assert stored == {not in_loads or bool(hazard)}, f"delta_in_loads={in_loads} at K=33: δ stored {stored}"


@pytest.mark.parametrize("M, K, N", [(0, 5, 7), (6, 0, 7), (6, 5, 0), (9, 17, 13)], ids=["M=0", "K=0", "I=0", "ragged"])
def test_both_plans_for_the_deltas_agree_on_edge_cases(M, K, N):
    """The stored plan against δ in the loads where the launchers' edge cases are: empty M, K or I, G and x
    non-contiguous, Z recomputed (None), each need alone: the same shapes and bits."""
    require_triton()
    _, gated, _ = _modules()
    from manualbp.triton_kernels import toolchain

    if toolchain.rs_operand_hazard(DEVICE, torch.float32):
        pytest.skip("δ in the loads makes an RS wgmma, miscompiled by this toolchain: both plans are the stored one")
    act = manualbp.get_activation("gelu")
    x, gate_weight, up_weight, gate_bias, up_bias, _ = _inputs(M, K, N, torch.float32, seed=7)
    grad_a = _inputs(N, 1, M, torch.float32, seed=8)[-1].t()  # [M, N], column-major: non-contiguous
    x = torch.cat([x, x], dim=1)[:, ::2] if K else x  # [M, K] with a column stride of 2
    _, z_gate, z_up = gated.gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act.kernel_id, 0.0, True)
    for z in ((z_gate, z_up), (None, None)):
        for needs in [(True,) * 5] + [tuple(i == j for j in range(5)) for i in range(5)]:
            results = [gated.gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, *z,
                                            act.kernel_id, 0.0, needs, delta_in_loads=in_loads)
                       for in_loads in (True, False)]
            label = f"[{M}x{K}x{N}, needs {needs}, Z {'recomputed' if z[0] is None else 'kept'}]"
            for name, loads, stored in zip(("dx", "dW_g", "dW_u", "db_g", "db_u"), *results):
                assert (loads is None) == (stored is None), f"{name} {label}: asked for in both plans"
                if loads is not None:
                    assert loads.shape == stored.shape and torch.equal(loads, stored), f"{name} {label}: the bits"


# Per role: the strides each operand of its products is read with along the contracted dimension (the kernel's
# argument names): the forward's X and Wᵀ along K, ∂C/∂X's δ (G or a stored δ_g, δ_u) and W along I, ∂C/∂W's δᵀ
# and X along M. The first of each pair is the left operand (A), which δ formed in the loads holds in registers.
_CONTRACTED_STRIDES = {
    "gated_forward": (("stride_xk",), ("stride_gwk", "stride_uwk")),
    "gated_grad_x": (("stride_gn", "stride_zgn"), ("stride_gwn", "stride_uwn")),
    "gated_grad_weight": (("stride_gm", "stride_zgm"), ("stride_xm",)),
}


@pytest.mark.parametrize("in_loads", [True, False], ids=["delta in the loads", "delta stored"])
def test_tf32_launches_read_both_operands_k_major(in_loads, monkeypatch):
    """Where TF32 wgmmas need both operands K-major (TF32 allowed, dense._tf32_reads_k_major: sm_90; forced here on
    any device with the products kept IEEE float32, so that the bits compare; the copies' logic the same), the
    gated launchers copy an operand read along M or N K-major first: every product reads A and B with stride 1
    along its contracted dimension, but δ formed in the loads (a register operand, as it is); x given with a column
    stride of 2 is copied for the forward too. The results are the bits of the same calls without the copies."""
    require_triton()
    dense, gated, launch = _modules()
    if in_loads:
        skip_where_rs_operands_miscompiled(DEVICE, torch.float32)
    act = manualbp.get_activation("silu")
    x, gate_weight, up_weight, gate_bias, up_bias, grad_a = _inputs(37, 24, 40, torch.float32, seed=11)
    x = torch.cat([x, x], dim=1)[:, ::2]  # [M, K] read along K with stride 2

    def layer():
        a, z_gate, z_up = gated.gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act.kernel_id, 0.0, True)
        return (a, z_gate, z_up, *gated.gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate,
                                                        z_up, act.kernel_id, 0.0, (True,) * 5,
                                                        delta_in_loads=in_loads))

    plain = layer()
    # TF32 read K-major, as a float32 launch's on sm_90 with TF32 allowed (_precision's answer there)
    monkeypatch.setattr(gated, "_precision", lambda like: (True, True, True))
    monkeypatch.setattr(dense, "_input_precision", lambda dtype, device: "ieee")  # the bits comparable anywhere
    launched = []
    run = launch.run
    monkeypatch.setattr(launch, "run", lambda role, options, args, *rest: launched.append(
        (role, options, args, run(role, options, args, *rest))))
    copied = layer()
    matmuls = [entry for entry in launched if entry[0] in _CONTRACTED_STRIDES]
    assert {entry[0] for entry in matmuls} == set(_CONTRACTED_STRIDES), f"the three matmul roles: {launched}"
    for role, options, args, plan in matmuls:
        assert options[-1] is True, f"{role}: the TF32 flag in the plan options ({options})"
        strides = dict(zip(getattr(gated, gated._KERNELS[role]).arg_names, args))
        left, right = _CONTRACTED_STRIDES[role]
        in_registers = role != "gated_forward" and not plan.constexprs["DELTAS_STORED"]  # δ formed as it loads
        for name in right + (() if in_registers else left):
            assert strides[name] == 1, f"{role}: {name} = {strides[name]}, not 1"
    names = ("A", "Z_g", "Z_u", "dC/dX", "dC/dW_g", "dC/dW_u", "dC/db_g", "dC/db_u")
    for name, ours, theirs in zip(names, copied, plain):
        assert torch.equal(ours, theirs), f"{name}: the bits of the launches without copies"


def test_autotuned_launches_tune_once_per_key(monkeypatch):
    """With the GPU's rule (autotune on, not interpreted; the kernels still run in the interpreter here, the
    autotuner's timings stubbed), the first launch of a key has the role's autotuner time its pruned configs and
    launches the winner; a second launch of the same key, or of another size in the same M/N/K buckets, times
    nothing and runs the same tile; results match float64 either way."""
    require_triton()
    dense, gated, launch = _modules()
    if not dense.is_interpreted():
        pytest.skip("stubs the autotuner's timings around interpreted kernels; a GPU tunes for real")
    timed = []

    def bench(self, *args, config, **meta):
        timed.append(config)
        return [float(config.kwargs["BLOCK_N"] != 128)] * 3  # a deterministic winner: the first 128-wide tile

    gated._autotuned.cache_clear()  # autotuners of their own: no winner cached by another test
    monkeypatch.setattr(type(require_autotuner(gated)), "_bench", bench)
    monkeypatch.setattr(dense, "is_interpreted", lambda: False)  # the plan's rule: autotune (the launch still is)
    monkeypatch.setattr(dense, "_shared_memory_bytes", lambda index: 232448)  # an H100's, for the pruning
    manualbp.config.set(autotune=True)
    act = manualbp.get_activation("silu")
    for M in (70, 90):  # one bucket (128)
        inputs = _inputs(M, 48, 80, torch.float32, seed=M)
        x, gate_weight, up_weight, gate_bias, up_bias, grad_a = inputs
        a, z_gate, z_up = gated.gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act.kernel_id, 0.0,
                                              True)
        grads = gated.gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up,
                                     act.kernel_id, 0.0, (True,) * 5)
        if M == 70:
            tuned = len(timed)
            float32 = [cfg for role in ROLES for cfg in gated.matmul_configs(role, 4)]
            assert tuned == len(float32), f"each role timed its float32 configs once: {tuned}, {len(float32)}"
        exact = _eager(*(t.double() for t in inputs), "silu")
        theirs = _eager(*inputs, "silu")
        for name, ours, their, exact_ in zip(("A", "dC/dX", "dC/dW_g", "dC/db_u"), (a, grads[0], grads[1], grads[4]),
                                             (theirs[0], theirs[3], theirs[4], theirs[7]),
                                             (exact[0], exact[3], exact[4], exact[7])):
            assert_close_to_float64(f"autotuned M={M} {name}", ours, their, exact_)
    assert len(timed) == tuned, "the second size of the bucket timed nothing"
    roles = {plan.role: plan for plan in launch.PLANS.values()}
    for role in ROLES:
        assert roles[role].constexprs["BLOCK_N"] == 128 and roles[role].constexprs["BLOCK_K"] == 16, \
            f"{role}: the winner's tile, {roles[role].constexprs}"
    gated._autotuned.cache_clear()


def test_pruning_keeps_the_tiles_that_fit():
    """A config whose pipelined operand tiles exceed the GPU's shared memory is dropped (an H100's 227 KiB, an
    A100's 163 KiB: something fits both), and where none fits the last is kept rather than none."""
    dense, gated, _ = _modules()
    saved = dense._shared_memory_bytes
    try:
        for role in ROLES:
            for (dtype, tf32), stored in itertools.product(
                    ((torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.float16, False)),
                    (False, True) if role != "gated_forward" else (False,)):
                configs = gated.matmul_configs(role, dtype.itemsize, tf32, stored)
                x = torch.empty(8, 8, dtype=dtype, device="meta")
                left, right = gated._OPERAND_TILES[role]
                left -= stored  # δ_g, δ_u read where G, Z_g, Z_u would be
                for budget in (232448, 166912):
                    dense._shared_memory_bytes = lambda index, budget=budget: budget
                    kept = gated._prune_configs(role, configs, {"x_ptr": x}, DELTAS_STORED=stored)
                    need = {_config_id(role, cfg): dense._pipelined_bytes(cfg, dtype.itemsize, left, right)
                            for cfg in configs}
                    label = f"{role} {dtype} (δ stored {stored}) {budget // 1024} KiB"
                    assert kept, f"{label}: something kept"
                    assert {_config_id(role, cfg) for cfg in kept} == {name for name, n in need.items()
                                                                        if n <= budget}, f"{label}: {need}"
                dense._shared_memory_bytes = lambda index: 1024
                kept = gated._prune_configs(role, configs, {"x_ptr": x}, DELTAS_STORED=stored)
                assert [_config_id(role, cfg) for cfg in kept] == [_config_id(role, configs[-1])], \
                    f"{role} {dtype} (δ stored {stored}): nothing fits, the last kept"
    finally:
        dense._shared_memory_bytes = saved


def test_bias_launches_take_k_steps_of_the_sum_step():
    """A ∂C/∂W launch that sums ∂C/∂b autotunes among the configs whose K step is gated.SUM_STEP (longer ones give
    the same bits but spilled, compile report), at least two of each element size, and with TF32 products among
    its tiles whose K step is a multiple of it (taken in steps of it: no spill there); one without ∂C/∂b among
    all."""
    dense, gated, _ = _modules()
    role = "gated_grad_weight"
    saved = dense._shared_memory_bytes
    dense._shared_memory_bytes = lambda index: 232448  # an H100's
    try:
        for dtype, stored in itertools.product((torch.float16, torch.float32), (False, True)):
            configs = gated.matmul_configs(role, dtype.itemsize, stored=stored)
            x = torch.empty(8, 8, dtype=dtype, device="meta")
            for flags in (dict(WANT_GATE_BIAS=True, WANT_UP_BIAS=False), dict(WANT_GATE_BIAS=False, WANT_UP_BIAS=True)):
                kept = gated._prune_configs(role, configs, {"x_ptr": x}, DELTAS_STORED=stored, **flags)
                steps = {cfg.kwargs["BLOCK_K"] for cfg in kept}
                assert steps == {gated.SUM_STEP.value} and len(kept) >= 2, \
                    f"{dtype} (δ stored {stored}) {flags}: {steps}, {len(kept)}"
            plain = gated._prune_configs(role, configs, {"x_ptr": x}, DELTAS_STORED=stored, WANT_GATE_BIAS=False,
                                         WANT_UP_BIAS=False)
            assert len(plain) == len(configs), f"{dtype} (δ stored {stored}) without ∂C/∂b: every config kept"
        configs = gated.matmul_configs(role, 4, tf32=True)
        x = torch.empty(8, 8, dtype=torch.float32, device="meta")
        kept = gated._prune_configs(role, configs, {"x_ptr": x}, WANT_GATE_BIAS=True, WANT_UP_BIAS=True,
                                    INPUT_PRECISION="tf32")
        steps = {cfg.kwargs["BLOCK_K"] for cfg in kept}
        assert len(kept) == len(configs) and all(k % gated.SUM_STEP.value == 0 for k in steps) and \
            max(steps) > gated.SUM_STEP.value, f"TF32 with ∂C/∂b: every TF32 tile, K steps {steps}"
    finally:
        dense._shared_memory_bytes = saved


def test_fixed_tiles(monkeypatch):
    """The interpreter and float64 launches take the dense layer's fixed tiles; a GPU launch autotunes (None), or
    with autotune off takes its role's first config for the dtype (spill-free, unlike the dense untuned tile)."""
    dense, gated, _ = _modules()
    monkeypatch.setattr(dense, "is_interpreted", lambda: True)
    assert gated._fixed_tile("gated_forward", torch.float32, True)[0]["BLOCK_M"] == \
        dense._INTERPRETER_CONFIG["BLOCK_M"], "interpreter: the dense layer's tile"
    monkeypatch.setattr(dense, "is_interpreted", lambda: False)
    assert gated._fixed_tile("gated_forward", torch.float64, True)[0]["BLOCK_K"] == dense._FP64_CONFIG["BLOCK_K"], \
        "float64: the dense layer's tile"
    assert gated._fixed_tile("gated_grad_x", torch.float64, False)[0]["BLOCK_M"] == \
        dense._FP64_FMA_CONFIG["BLOCK_M"], "float64 without tl.dot: the FMA tile"
    manualbp.config.set(autotune=True)
    assert gated._fixed_tile("gated_grad_weight", torch.bfloat16, True) is None, "GPU: autotuned"
    manualbp.config.set(autotune=False)
    for role in ROLES:
        for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
            for stored in (False, True):
                tile, options = gated._fixed_tile(role, dtype, True, tf32, stored)
                first = gated.matmul_configs(role, dtype.itemsize, tf32, stored)[0]
                assert tile == first.kwargs and \
                    options == dict(num_warps=first.num_warps, num_stages=first.num_stages), \
                    f"{role} {dtype} (TF32 {tf32}, δ stored {stored}), autotune off: the first config"


def test_tf32_launches_autotune_among_the_tf32_tiles(monkeypatch):
    """A float32 launch with TF32 products (INPUT_PRECISION "tf32", where PyTorch's settings allow TF32 on a GPU)
    autotunes among its role's TF32 tiles, an IEEE one among float32's, 16-bit data among theirs: one autotuner each
    (the plan's make, gated._matmul_plan, asked on a GPU's rule; nothing launched)."""
    dense, gated, _ = _modules()
    require_autotuner(gated, tf32=True)
    monkeypatch.setattr(dense, "is_interpreted", lambda: False)  # the GPU's rule: autotune
    manualbp.config.set(autotune=True)
    flags = {"gated_forward": (False, False, 5, 0.0, True, True), "gated_grad_x": (5, 0.0, True),
             "gated_grad_weight": (5, 0.0, True, True, True, False, False)}
    for role in ROLES:
        for dtype, precision, tf32 in ((torch.float32, "tf32", True), (torch.float32, "ieee", False),
                                       (torch.bfloat16, "ieee", False)):
            monkeypatch.setattr(dense, "_input_precision", lambda dtype_, device, p=precision: p)
            like = torch.empty(4, 4, dtype=dtype, device="meta")
            plan = gated._matmul_plan(role, dict(zip(gated._FLAG_NAMES[role], flags[role])), like, True, 4, 4)
            stored = role != "gated_forward"  # the flags above store δ_g, δ_u
            expected = [_config_id(role, cfg) for cfg in gated.matmul_configs(role, dtype.itemsize, tf32, stored)]
            assert plan["constexprs"]["INPUT_PRECISION"] == precision, f"{role} {dtype} {precision}: its precision"
            assert [_config_id(role, cfg) for cfg in plan["tuner"].configs] == expected, \
                f"{role} {dtype} {precision}: the autotuner of its tiles"
    assert gated.matmul_configs("gated_forward", 4, True) != gated.matmul_configs("gated_forward", 4), \
        "TF32 has tiles of its own"


def test_stored_plan_launches_autotune_among_their_tiles(monkeypatch):
    """The backward's 16-bit launches autotune among the tiles of their plan for δ_g, δ_u: stored (DELTAS_STORED,
    gated._STORED_CONFIGS: longer K steps) or formed in the loads, one autotuner each; float32's share theirs (the
    plan's make, gated._matmul_plan, asked on a GPU's rule; nothing launched)."""
    dense, gated, _ = _modules()
    require_autotuner(gated, "gated_grad_x", 2)
    monkeypatch.setattr(dense, "is_interpreted", lambda: False)  # the GPU's rule: autotune
    manualbp.config.set(autotune=True)
    flags = {"gated_grad_x": lambda stored: (5, 0.0, stored),
             "gated_grad_weight": lambda stored: (5, 0.0, stored, True, True, False, False)}
    for role, flags_of in flags.items():
        tuned = {}
        for dtype, stored in itertools.product((torch.bfloat16, torch.float32), (False, True)):
            like = torch.empty(4, 4, dtype=dtype, device="meta")
            plan = gated._matmul_plan(role, dict(zip(gated._FLAG_NAMES[role], flags_of(stored))), like, True, 4, 4)
            tuned[dtype, stored] = [_config_id(role, cfg) for cfg in plan["tuner"].configs]
            expected = [_config_id(role, cfg) for cfg in gated.matmul_configs(role, dtype.itemsize, False, stored)]
            assert tuned[dtype, stored] == expected, f"{role} {dtype} δ stored {stored}: the autotuner of its tiles"
        assert tuned[torch.bfloat16, True] != tuned[torch.bfloat16, False], f"{role}: 16-bit stored tiles of its own"
        assert any(_config_id(role, cfg).split("-")[1].endswith(("x64", "x128"))
                   for cfg in gated.matmul_configs(role, 2, stored=True)), f"{role}: stored, longer K steps"
        assert tuned[torch.float32, True] == tuned[torch.float32, False], f"{role}: float32's tiles in both plans"


def test_every_launch_states_its_compile_options(monkeypatch):
    """Every gated launch passes dense.COMPILE_OPTIONS (FMA contraction on) instead of inheriting Triton's default,
    which Triton 3.10 changes: the three matmuls, the gating alone (both ways) and the tangent kernel."""
    dense, gated, _ = _modules()
    launched = []

    monkeypatch.setattr(dense, "is_interpreted", lambda: True)  # the fixed tile, launched directly
    names = ("_gated_forward_kernel", "_gated_grad_x_kernel", "_gated_grad_weight_kernel", "_gate_kernel",
             "_gated_tangent_kernel")
    for name in names:
        monkeypatch.setattr(gated, name, LaunchRecorder(name, launched))
    x, w, g = torch.randn(64, 32), torch.randn(16, 32), torch.randn(64, 16)
    gated.gated_forward(x, w, w, None, None, 5, 0.0, True)
    gated.gated_backward(g, x, w, w, None, None, g, g, 5, 0.0, (True,) * 5)
    gated.gate_forward(g, g, 5, 0.0)
    gated.gate_backward(g, g, g, 5, 0.0)
    gated.gate_jvp(g, g, g, None, 5, 0.0)
    assert {name for name, _ in launched} == set(names), f"launches recorded: {[name for name, _ in launched]}"
    for name, kwargs in launched:
        assert kwargs.get("enable_fp_fusion") is True, f"{name}: enable_fp_fusion stated"


def _bias_sum_tiles(dtype):
    """Every tile a ∂C/∂W launch of this dtype may take: the role's configs in both plans (on a GPU the dtype's own,
    float32's TF32 tiles too, pruned by shared memory as the autotuner prunes; in the interpreter every kind's and the
    fixed tiles too)."""
    dense, gated, _ = _modules()
    role = "gated_grad_weight"
    sizes = (dtype.itemsize,) if DEVICE.type == "cuda" and dtype != torch.float64 else (2, 4)
    configs = [cfg for size in sizes for tf32 in ((False, True) if size == 4 else (False,))
               for stored in (False, True) for cfg in gated.matmul_configs(role, size, tf32, stored)]
    if dense.is_interpreted():
        configs += [_fixed_tile_config(dict(tile, GROUP_M=4)) for tile in (
            dense._INTERPRETER_CONFIG, dense._FP64_CONFIG, dense._FP64_FMA_CONFIG)]
    if DEVICE.type == "cuda":
        configs = gated._prune_configs(role, configs, {"x_ptr": torch.empty(1, dtype=dtype, device=DEVICE)})
    return list({_config_id(role, cfg): cfg for cfg in configs}.values())


def _fixed_tile_config(tile):
    import triton

    return triton.Config({name: tile[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}, num_warps=4,
                         num_stages=2)


def _sums_in_registers(delta, step):
    """1ᵀ δ [I] of δ [M, I] as the register sums add it up: lane j of each step of rows adds row step·s + j, in
    order s = 0, 1, ...; then the lanes in a fixed pairwise tree, (l0 + l1) + (l2 + l3) + ...; in the compute dtype."""
    rows = -(-delta.shape[0] // step) * step
    padded = torch.zeros(rows, delta.shape[1], dtype=delta.dtype)
    padded[:delta.shape[0]] = delta
    lanes = torch.zeros(step, delta.shape[1], dtype=delta.dtype)
    for start in range(0, rows, step):
        lanes = lanes + padded[start:start + step]
    while lanes.shape[0] > 1:
        lanes = lanes[0::2] + lanes[1::2]
    return lanes[0]


def _sums_by_ones_products(delta, step):
    """1ᵀ δ [I] as the interpreter's tensor-core sums add it up (tests/fixed_order_dot.py): per step of rows, the
    product δ_stepᵀ 1 summed in row order from 0, then added to the running sum; in float32."""
    running = torch.zeros(delta.shape[1], dtype=delta.dtype)
    for start in range(0, delta.shape[0], step):
        product = torch.zeros(delta.shape[1], dtype=delta.dtype)
        for row in delta[start:start + step]:
            product = product + row
        running = product + running
    return running


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_bias_grads_are_bitwise_equal_on_every_tile(activation, dtype, monkeypatch):
    """∂C/∂b_g and ∂C/∂b_u from the ∂C/∂W kernel's sums: the same bits (as summed, before the rounding to the data
    dtype) with every tile forced on the ∂W launch, with the weight gradients and without (one column of tiles),
    with δ_g, δ_u formed in its loads and stored, and through the launcher's own tile; in the fixed order of
    gated.SUM_STEP steps of the stored δ (float32, float64: in registers and a fixed tree; 16-bit: by products with
    ones, that order where the interpreter's dot sums in a fixed one), and within rounding of its float64 sum.
    Sizes no tile divides."""
    require_triton(dtype)
    if dtype == torch.float16 and DEVICE.type == "cpu" and not fixed_order_dot.installed():
        pytest.skip("the interpreter's tl.dot sums in the host BLAS's order (tests/fixed_order_dot.py not installed)")
    dense, gated, launch = _modules()
    from manualbp.triton_kernels import toolchain

    role = "gated_grad_weight"
    act = manualbp.get_activation(activation)
    M, K, N = 150, 40, 70  # rows (the sums run over them: ragged last steps of 16 and 32), hidden, intermediate
    x, gate_weight, up_weight, gate_bias, up_bias, grad_a = _inputs(M, K, N, dtype, seed=3)
    _, z_gate, z_up = gated.gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act.kernel_id, 0.0, True)
    delta_gate, delta_up = gated.gate_backward(grad_a, z_gate, z_up, act.kernel_id, 0.0)
    plans = {"stored δ": ((delta_gate, delta_up, delta_up), (0, 0.0, True))}
    if not toolchain.rs_operand_hazard(DEVICE, dtype):  # δ formed in the loads: an RS wgmma, miscompiled there
        plans["δ in the loads"] = ((grad_a, z_gate, z_up), (act.kernel_id, 0.0, False))
    fixed = gated._fixed_tile
    results = {}
    for config in _bias_sum_tiles(dtype):
        tile = dict(config.kwargs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        monkeypatch.setattr(gated, "_fixed_tile", lambda r, dtype_, use_dot, tf32=False, stored=False: (
            dict(tile), dict(options)) if r == role else fixed(r, dtype_, use_dot, tf32, stored))
        for (plan_name, (operands, flags)), (wants, label) in itertools.product(
                plans.items(), (((True,) * 4, "with ∂W"), ((False, False, True, True), "alone"))):
            launch.PLANS.clear()  # the tile is not in the plan's key: a new plan for each
            results[f"{_config_id(role, config)} {label}, {plan_name}"] = gated._grad_weights(
                operands, flags, x, K, wants)[2:]
            (plan,) = [plan for plan in launch.PLANS.values() if plan.role == role]
            assert {name: plan.constexprs[name] for name in tile} == tile, f"{role}: launched {plan.constexprs}"
    monkeypatch.setattr(gated, "_fixed_tile", fixed)
    launch.PLANS.clear()
    for plan_name, (operands, flags) in plans.items():
        results[f"launcher's tile, {plan_name}"] = gated._grad_weights(operands, flags, x, K, (True,) * 4)[2:]
    assert len(results) >= 8, f"several tiles compared: {list(results)}"
    (first_name, first), *_ = results.items()
    for name, sums in results.items():
        for which, ours, theirs in zip(("db_g", "db_u"), sums, first):
            assert torch.equal(ours, theirs), f"{which} [{activation} {dtype}] with {name} bitwise == {first_name}"
    deltas = [d.to(first[0].dtype).cpu() for d in (delta_gate, delta_up)]
    by_mma = dtype.itemsize == 2
    for which, ours, delta in zip(("db_g", "db_u"), first, deltas):
        label = f"{which} [{activation} {dtype}]"
        if not by_mma or dense.is_interpreted():
            fixed_order = (_sums_by_ones_products if by_mma else _sums_in_registers)(delta, gated.SUM_STEP.value)
            assert torch.equal(ours.cpu(), fixed_order), f"{label}: the stored δ summed in the fixed order"
        # as close to the float64 sum of the stored δ as PyTorch's own sum of it in the compute dtype
        assert_close_to_float64(f"{label} against float64", ours.cpu(), delta.sum(0), delta.double().sum(0))
