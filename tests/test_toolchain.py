"""triton_kernels/toolchain.py: the RS wgmma hazard of triton-lang/triton issue 9433 (docs/kernels.md, "The excluded
tile"), its rule on versions and devices, and what the layers launch where it holds: no matmul forming δ in its
operand loads, the same results as the plan that does (within PyTorch's own error against float64; ∂C/∂b with the
same bits where docs promise it)."""

import itertools

import pytest
import torch

import manualbp
from checks import assert_close_to_float64, torch_activation

FORCED = "forced for the test (triton-lang/triton issue 9433)"


def _modules():
    try:
        from manualbp.triton_kernels import dense, gated, launch, toolchain
    except Exception as error:  # noqa: BLE001 - no Triton here: say why
        pytest.skip(f"no triton kernels: {error}")
    return dense, gated, launch, toolchain


@pytest.mark.stacks
@pytest.mark.parametrize("triton_at, ptxas, affected", [
    ((3, 6), (12, 8), True), ((3, 6), (13, 4), True), ((3, 7), (13, 4), True), ((3, 8), (12, 9), True),
    ((3, 8), (13, 3), False), ((3, 8), (13, 4), False), ((3, 9), (13, 4), False), ((3, 9), (12, 8), True),
    ((3, 9), None, True), ((3, 3), None, True), ((4, 0), (13, 3), False)], ids=str)
def test_the_rule_on_versions(triton_at, ptxas, affected):
    """Triton before 3.8 whatever its ptxas; from 3.8 a ptxas for sm_90 before 13.3, or one whose version cannot be
    told: the toolchains whose compiled loops rewrite RS wgmma operands in flight (docs/kernels.md's table)."""
    _, _, _, toolchain = _modules()
    reason = toolchain.rs_toolchain_hazard(triton_at, ptxas)
    assert bool(reason) == affected, f"Triton {triton_at}, ptxas {ptxas}: {reason!r}"
    if reason:
        assert "9433" in reason and ".".join(map(str, triton_at)) in reason, f"the reason names issue and version: " \
                                                                             f"{reason!r}"


def test_the_rule_on_devices(monkeypatch):
    """rs_operand_hazard: only compiled launches on a CUDA device of capability 9.x (wgmma's), for data whose dot is
    a wgmma there (16-bit; float32 only with TF32 allowed), on an affected toolchain; asked once per device."""
    dense, _, _, toolchain = _modules()
    asked = []
    capability = {0: (9, 0), 1: (8, 0), 2: (10, 0), 3: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device: asked.append(device.index) or capability[device.index])
    monkeypatch.setattr(toolchain, "rs_hazard", lambda: "Triton 3.6.0 (< 3.8), triton-lang/triton issue 9433")
    monkeypatch.setattr(toolchain, "_interpreted", lambda: False)
    monkeypatch.setattr(dense, "tf32_allowed", lambda: False)
    toolchain._hazard_on.cache_clear()
    try:
        cuda = lambda index: torch.device("cuda", index)  # noqa: E731
        reason = toolchain.rs_operand_hazard(cuda(0), torch.bfloat16)
        assert reason and "sm_90" in reason and "3.6.0" in reason, f"sm_90, bf16, Triton 3.6: {reason!r}"
        assert toolchain.rs_operand_hazard(cuda(0), torch.float16) == reason, "sm_90, fp16: the same"
        assert toolchain.rs_operand_hazard(cuda(0), torch.float64) is None, "float64: no wgmma (DMMA)"
        assert toolchain.rs_operand_hazard(cuda(0), torch.float32) is None, "IEEE float32: no wgmma (FMA)"
        monkeypatch.setattr(dense, "tf32_allowed", lambda: True)
        assert toolchain.rs_operand_hazard(cuda(0), torch.float32) == reason, "float32 as TF32: wgmma"
        assert toolchain.rs_operand_hazard(cuda(1), torch.float16) is None, "sm_80: mma.sync, no wgmma"
        assert toolchain.rs_operand_hazard(cuda(2), torch.float16) is None, "sm_100: no wgmma"
        assert toolchain.rs_operand_hazard(torch.device("cpu"), torch.float16) is None, "the CPU"
        assert asked == [0, 1, 2], f"the capability asked once per device: {asked}"
        monkeypatch.setattr(toolchain, "_interpreted", lambda: True)
        toolchain._hazard_on.cache_clear()
        assert toolchain.rs_operand_hazard(cuda(3), torch.float16) is None, "Triton's interpreter runs no wgmma"
        monkeypatch.setattr(toolchain, "_interpreted", lambda: False)
        monkeypatch.setattr(torch.version, "hip", "6.2")
        toolchain._hazard_on.cache_clear()
        assert toolchain.rs_operand_hazard(cuda(3), torch.float16) is None, "ROCm (gfx9 reads as capability 9.x)"
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(toolchain, "rs_hazard", lambda: None)
        toolchain._hazard_on.cache_clear()
        assert toolchain.rs_operand_hazard(cuda(0), torch.float16) is None, "sm_90 on an unaffected toolchain"
    finally:
        toolchain._hazard_on.cache_clear()


@pytest.mark.stacks
def test_the_installed_toolchain_is_judged_by_the_rule():
    """rs_hazard() is the rule applied to the installed Triton and its ptxas (whatever they are here)."""
    _, _, _, toolchain = _modules()
    said = toolchain.rs_hazard()
    assert said == toolchain.rs_toolchain_hazard(toolchain.triton_version(), toolchain.sm90_ptxas_version()), said


def _prologue_plans(launch) -> list:
    """The launch plans of matmuls that form δ in their operand loads (an activation in a backward matmul)."""
    return [(plan.role, plan.constexprs.get("ACTIVATION")) for plan in launch.PLANS.values()
            if (plan.role in ("grad_x", "grad_weight") and plan.constexprs.get("ACTIVATION", 0) != 0)
            or (plan.role in ("gated_grad_x", "gated_grad_weight") and not plan.constexprs["DELTAS_STORED"])]


@pytest.mark.parametrize("wants", [(True, True, True), (False, True, True), (True, False, True), (True, True, False)],
                         ids=["all", "first-layer", "no-dw", "no-db"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", manualbp.ACTIVATIONS)
def test_the_dense_backward_forms_no_delta_in_loads_on_an_affected_toolchain(activation, dtype, wants, monkeypatch,
                                                                            device):
    """With the hazard (forced), dense.linear_backward takes its δ-pass plan whatever delta_in_loads says (None or
    True): no prologue launch, a δ pass; its results are the pass plan's bits, and against the plan with δ in the
    loads (run without the hazard) ∂C/∂b has the same bits and ∂C/∂X, ∂C/∂W are within PyTorch's own error."""
    dense, _, launch, toolchain = _modules()
    from checks import skip_where_rs_operands_miscompiled

    skip_where_rs_operands_miscompiled(device, dtype)  # the plan compared with cannot run there
    act = manualbp.get_activation(activation)
    g = torch.Generator().manual_seed(27)
    M, N, K = 70, 33, 37
    want_x, want_weight, want_bias = wants
    z = torch.randn(M, N, generator=g, dtype=torch.float64)
    grad_a = torch.randn(M, N, generator=g, dtype=torch.float64)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    weight = torch.randn(N, K, generator=g, dtype=torch.float64) / N ** 0.5
    kind = "a" if act.saves_output else "f_prime"
    saved = {"a": act.f, "f_prime": act.f_grad}[kind](z)
    args = [t.to(device, dtype) for t in (grad_a, x, weight, saved)]

    def backward(in_loads):
        launch.PLANS.clear()
        grads = dense.linear_backward(*args, act.kernel_id, act.kernel_slope, kind, want_x=want_x,
                                      want_weight=want_weight, want_bias=want_bias, delta_in_loads=in_loads)
        return grads, _prologue_plans(launch), {plan.role for plan in launch.PLANS.values()}

    in_loads, loads_plans, _ = backward(True)
    by_pass, _, _ = backward(False)
    monkeypatch.setattr(toolchain, "rs_operand_hazard", lambda device, dtype: FORCED)
    label = f"[{activation}, {dtype}, {wants}]"
    if activation != "identity":
        assert loads_plans, f"{label} without the hazard: δ formed in the loads (the test's premise)"
    for choice in (None, True):
        forced, prologues, roles = backward(choice)
        assert prologues == [], f"{label} delta_in_loads={choice}: no prologue launch, got {prologues}"
        if activation != "identity" and (want_x or want_weight):
            assert "delta" in roles, f"{label} delta_in_loads={choice}: δ by the pass, roles {sorted(roles)}"
        for name, ours, passed in zip(("dx", "dw", "db"), forced, by_pass):
            assert (ours is None) == (passed is None), f"{name} {label}: wanted as asked"
            if ours is not None:
                assert torch.equal(ours, passed), f"{name} {label} delta_in_loads={choice}: the pass plan's bits"
    delta = grad_a.to(dtype).double() * act.f_grad(z)
    if want_bias:
        assert torch.equal(forced[2], in_loads[2]), f"db {label}: the bits of the plan with δ in the loads"
    tol = {torch.float32: 1e-5, torch.float16: 2e-2}[dtype]
    for name, ours, theirs, exact in (("dx", forced[0], in_loads[0], delta @ weight),
                                      ("dw", forced[1], in_loads[1], delta.t() @ x)):
        if ours is not None:
            torch.testing.assert_close(ours.double().cpu(), exact, rtol=tol, atol=tol,
                                       msg=lambda m: f"{name} {label} against float64: {m}")
            torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol,
                                       msg=lambda m: f"{name} {label} against δ in the loads: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_layer_trains_the_same_on_an_affected_toolchain(dtype, monkeypatch, device):
    """manualbp.Linear on the Triton backend with delta_prologue on (the default) and the hazard forced: no prologue
    launch; output and gradients within twice PyTorch's own error against float64 (checks.compare_with_pytorch's
    rule), as without the hazard."""
    _, _, launch, toolchain = _modules()
    from checks import compare_with_pytorch

    monkeypatch.setattr(toolchain, "rs_operand_hazard", lambda device, dtype: FORCED)
    g = torch.Generator().manual_seed(28)
    x = torch.randn(3, 11, 24, generator=g).to(device, dtype)
    weight = (torch.randn(20, 24, generator=g) / 5).to(device, dtype)
    bias = torch.randn(20, generator=g).to(device, dtype)
    grad = torch.randn(3, 11, 20, generator=g).to(device, dtype)
    for activation in ("relu", "gelu", "tanh"):
        launch.PLANS.clear()
        with manualbp.config.override(delta_prologue=True):
            compare_with_pytorch(x, weight, bias, activation, grad, "triton")
        assert _prologue_plans(launch) == [], f"{activation} {dtype}: no prologue launch, {_prologue_plans(launch)}"
        assert "delta" in {plan.role for plan in launch.PLANS.values()}, f"{activation} {dtype}: δ by the pass"


def _gated_inputs(M, K, N, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    return draw(M, K), draw(N, K, scale=K ** -0.5), draw(N, K, scale=K ** -0.5), draw(N), draw(N), draw(M, N)


def _gated_eager(x, gate_weight, up_weight, gate_bias, up_bias, grad_a, activation):
    """(∂C/∂X, ∂C/∂W_g, ∂C/∂W_u, ∂C/∂b_g, ∂C/∂b_u) by PyTorch's autograd in the inputs' dtype."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, gate_weight, up_weight, gate_bias, up_bias)]
    z_gate = torch.nn.functional.linear(leaves[0], leaves[1], leaves[3])
    z_up = torch.nn.functional.linear(leaves[0], leaves[2], leaves[4])
    (torch_activation(activation, z_gate) * z_up).backward(grad_a)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("needs", [(True,) * 5, (True, False, False, False, False), (False, True, True, True, True),
                                   (False, False, True, True, False)], ids=["all", "dx", "weights+biases", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu"])
def test_the_gated_backward_forms_no_delta_in_loads_on_an_affected_toolchain(activation, dtype, needs, monkeypatch,
                                                                             device):
    """With the hazard (forced), gated_backward stores δ_g, δ_u by the gating kernel and its matmuls read them
    (DELTAS_STORED), whatever delta_in_loads says: no launch forms δ in its loads; each gradient asked for the
    bits of the toolchain's own plan (δ formed in the loads where it has no hazard), and within twice PyTorch's
    own error against float64; Z recomputed (None) the same."""
    _, gated, launch, toolchain = _modules()
    act = manualbp.get_activation(activation)
    M, K, N = 70, 40, 90
    inputs = _gated_inputs(M, K, N, dtype, device, seed=29)
    x, gate_weight, up_weight, gate_bias, up_bias, grad_a = inputs
    _, z_gate, z_up = gated.gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act.kernel_id,
                                          act.kernel_slope, True)
    fused = gated.gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, act.kernel_id,
                                 act.kernel_slope, needs)
    monkeypatch.setattr(toolchain, "rs_operand_hazard", lambda device, dtype: FORCED)
    theirs = _gated_eager(*inputs, activation)
    exact = _gated_eager(*(t.double() for t in inputs), activation)
    label = f"[{activation}, {dtype}, needs {needs}]"
    for saved, in_loads in itertools.product(("kept", "recomputed"), (None, True)):
        launch.PLANS.clear()
        z = (z_gate, z_up) if saved == "kept" else (None, None)
        ours = gated.gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, *z, act.kernel_id,
                                    act.kernel_slope, needs, delta_in_loads=in_loads)
        case = f"{label} Z {saved}, delta_in_loads={in_loads}"
        roles = {plan.role for plan in launch.PLANS.values()}
        assert _prologue_plans(launch) == [], f"{case}: no prologue launch, {_prologue_plans(launch)}"
        assert "gated_gate" in roles, f"{case}: δ_g, δ_u by the gating kernel, roles {sorted(roles)}"
        names = ("dx", "dW_g", "dW_u", "db_g", "db_u")
        for name, need, mine, fused_one, their, exact_one in zip(names, needs, ours, fused, theirs, exact):
            if not need:
                assert mine is None, f"{name} {case}: not asked for, None"
                continue
            assert torch.equal(mine, fused_one), f"{name} {case}: the bits of the toolchain's own plan"
            assert_close_to_float64(f"{name} {case}", mine, their, exact_one)


def test_tests_forcing_the_prologue_skip_naming_the_reason(monkeypatch):
    """checks.skip_where_rs_operands_miscompiled: a skip naming the issue and the toolchain where the hazard holds
    for the device and dtype, nothing where it does not."""
    _, _, _, toolchain = _modules()
    from checks import skip_where_rs_operands_miscompiled

    asked = []
    monkeypatch.setattr(toolchain, "rs_operand_hazard", lambda device, dtype: asked.append((device, dtype)) or (
        "sm_90: Triton 3.6 (< 3.8: rewrites with every ptxas tried), triton-lang/triton issue 9433"
        if dtype == torch.float16 else None))
    with pytest.raises(pytest.skip.Exception, match=r"issue 9433.*Triton 3\.6|Triton 3\.6.*issue 9433"):
        skip_where_rs_operands_miscompiled("cuda", torch.float16)
    skip_where_rs_operands_miscompiled("cuda", torch.float32)  # no hazard: returns, the test goes on
    assert asked == [(torch.device("cuda"), torch.float16), (torch.device("cuda"), torch.float32)], asked
