"""manualbp under what PyTorch users compose nn.Linear with: torch.func, forward-mode AD, fake and meta
tensors, FLOP counting. Each next to nn.Linear + the torch activation, on both backends (Triton through the
interpreter on the CPU), in float64 and float32.

Tolerances: the two sides evaluate the same equations in a different order (and f' by a different formula
on the Triton backend), so they agree to a few ulps of the results' scale: 1e-10 in float64 and 1e-5 in
float32 for values of order 1, as issue 10 asks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, stack_module_state, vmap

import manualbp
from checks import operator_calls
from manualbp import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["reference", "triton"]
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def require(backend: str, dtype: torch.dtype) -> None:
    reason = backends.triton_unavailable_reason(DEVICE, dtype)
    if backend == "triton" and reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


def pair(activation: str, dtype: torch.dtype, backend: str, seed: int = 0, sizes=(5, 3)):
    """(manualbp.Linear, nn.Sequential(nn.Linear, torch activation)) with the same weights."""
    torch.manual_seed(seed)
    ours = manualbp.Linear(*sizes, activation=activation, dtype=dtype, device=DEVICE, backend=backend)
    theirs = nn.Sequential(nn.Linear(*sizes, dtype=dtype, device=DEVICE))
    theirs[0].load_state_dict(ours.state_dict())
    if activation != "identity":
        theirs.append(manualbp.conversion.module_for_activation(activation))
    return ours, theirs


def close(label: str, ours, theirs, dtype) -> None:
    if isinstance(ours, dict):
        assert set(ours) == set(theirs), f"{label}: keys {sorted(ours)} vs {sorted(theirs)}"
        for key in ours:
            close(f"{label}[{key}]", ours[key], theirs[key], dtype)
        return
    assert ours.shape == theirs.shape, f"{label}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    torch.testing.assert_close(ours, theirs, rtol=TOL[dtype], atol=TOL[dtype], msg=lambda m: f"{label}: {m}")


def theirs_keys(params: dict) -> dict:
    return {f"0.{name}": value for name, value in params.items()}


# A smooth activation (gelu: f' from Z or f'(Z)), one read off A (tanh), one with a kink (relu), identity.
FUNC_ACTIVATIONS = ["gelu", "tanh", "relu", "identity"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("activation", FUNC_ACTIVATIONS)
def test_torch_func_transforms_match_nn_linear(activation, dtype, backend):
    """functional_call, grad, vmap (and under no_grad), per-sample gradients, ensembling, jacrev, jacfwd, jvp,
    hessian: the same numbers as nn.Linear + the activation."""
    require(backend, dtype)
    ours, theirs = pair(activation, dtype, backend)
    x = torch.randn(4, 5, dtype=dtype, device=DEVICE)
    params = {name: p.detach() for name, p in ours.named_parameters()}

    def loss(model, p, x):
        return functional_call(model, p, (x,)).square().sum()

    close("functional_call", functional_call(ours, params, (x,)), functional_call(theirs, theirs_keys(params), (x,)),
          dtype)
    close("grad", grad(loss, argnums=1)(ours, params, x),
          theirs_keys_inverse(grad(loss, argnums=1)(theirs, theirs_keys(params), x)), dtype)
    rows = x.unsqueeze(1)  # [4, 1, 5]: a batch of one-row inputs
    close("vmap", vmap(ours)(rows), vmap(theirs)(rows), dtype)
    with torch.no_grad():
        close("vmap under no_grad", vmap(ours)(rows), vmap(theirs)(rows), dtype)
    per_sample = vmap(grad(loss, argnums=1), in_dims=(None, None, 0))
    close("per-sample grads", per_sample(ours, params, rows),
          theirs_keys_inverse(per_sample(theirs, theirs_keys(params), rows)), dtype)
    close("jacrev", jacrev(ours)(x), jacrev(theirs)(x), dtype)
    close("jacfwd", jacfwd(ours)(x), jacfwd(theirs)(x), dtype)
    tangent = torch.randn_like(x)
    ours_out, ours_tangent = jvp(ours, (x,), (tangent,))
    theirs_out, theirs_tangent = jvp(theirs, (x,), (tangent,))
    close("jvp primal", ours_out, theirs_out, dtype)
    close("jvp tangent", ours_tangent, theirs_tangent, dtype)
    close("hessian", hessian(lambda x: ours(x).square().sum())(x), hessian(lambda x: theirs(x).square().sum())(x),
          dtype)

    # Model ensembling: three models' parameters stacked, vmap over them (a batched weight and bias).
    models = [pair(activation, dtype, backend, seed=seed) for seed in (1, 2, 3)]
    ours_stacked, _ = stack_module_state([m for m, _ in models])
    theirs_stacked, _ = stack_module_state([t for _, t in models])
    ours_base, theirs_base = copy.deepcopy(models[0][0]).to("meta"), copy.deepcopy(models[0][1]).to("meta")
    close("ensemble", vmap(lambda p, x: functional_call(ours_base, p, (x,)), in_dims=(0, None))(ours_stacked, x),
          vmap(lambda p, x: functional_call(theirs_base, p, (x,)), in_dims=(0, None))(theirs_stacked, x), dtype)


def theirs_keys_inverse(params: dict) -> dict:
    return {name[2:]: value for name, value in params.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", manualbp.ACTIVATIONS)
def test_gradcheck_forward_mode_and_batched(activation, backend):
    """gradcheck with forward AD and batched (vmap) checks; gradgradcheck forward-over-reverse; both layers."""
    require(backend, torch.float64)
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(2, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    opts = {"negative_slope": -0.2} if activation == "leaky_relu" else {}

    def layer(x, weight, bias):
        return manualbp.functional.linear(x, weight, bias, activation, backend=backend, **opts)

    assert torch.autograd.gradcheck(layer, (x, weight, bias), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True), f"gradcheck [{activation}, {backend}]"
    assert torch.autograd.gradgradcheck(layer, (x, weight, bias), check_fwd_over_rev=True,
                                        check_batched_grad=True), f"gradgradcheck [{activation}, {backend}]"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_mlp_gradcheck_forward_mode(recompute, backend):
    require(backend, torch.float64)
    torch.manual_seed(1)
    x = torch.randn(2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w0, b0 = torch.randn(3, 3, dtype=torch.float64, device=DEVICE), torch.randn(3, dtype=torch.float64, device=DEVICE)
    w1 = torch.randn(2, 3, dtype=torch.float64, device=DEVICE)
    for t in (w0, b0, w1):
        t.requires_grad_(True)

    def stack(x, w0, b0, w1):
        return manualbp.mlp.mlp(x, [w0, w1], [b0, None], ["gelu", "tanh"], recompute=recompute, backend=backend)

    assert torch.autograd.gradcheck(stack, (x, w0, b0, w1), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True), f"MLP gradcheck [{backend}]"
    assert torch.autograd.gradgradcheck(stack, (x, w0, b0, w1), check_fwd_over_rev=True, fast_mode=True), \
        "MLP gradgradcheck"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("kind", ["Linear", "MLP", "MLP-recompute"])
def test_dual_tensors_never_drop_the_tangent(kind, frozen, backend):
    """torch.autograd.forward_ad: the output's tangent equals nn's, with trainable and with frozen parameters."""
    require(backend, torch.float64)
    torch.manual_seed(2)
    if kind == "Linear":
        ours = manualbp.Linear(4, 3, activation="gelu", dtype=torch.float64, device=DEVICE, backend=backend)
        theirs = nn.Sequential(nn.Linear(4, 3, dtype=torch.float64, device=DEVICE), nn.GELU())
        theirs[0].load_state_dict(ours.state_dict())
    else:
        ours = manualbp.MLP([4, 6, 3], activation="silu", last_activation="relu", recompute=kind.endswith("recompute"),
                            dtype=torch.float64, device=DEVICE, backend=backend)
        theirs = ours.to_sequential()
    for model in (ours, theirs):
        model.requires_grad_(not frozen)
    x, tangent = torch.randn(5, 4, dtype=torch.float64, device=DEVICE), torch.randn(5, 4, dtype=torch.float64,
                                                                                    device=DEVICE)
    import torch.autograd.forward_ad as fwAD

    results = []
    for model in (ours, theirs):
        with fwAD.dual_level():
            out = fwAD.unpack_dual(model(fwAD.make_dual(x, tangent)))
        assert out.tangent is not None, f"{kind}, {'frozen' if frozen else 'trainable'}: tangent dropped"
        results.append(out)
    close("primal", results[0].primal, results[1].primal, torch.float64)
    close("tangent", results[0].tangent, results[1].tangent, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["Linear", "MLP"])
def test_dual_tangent_of_an_infinite_input_as_nn(kind, backend):
    """A tangent on x alone, with an infinite x: nn.Linear's tangent takes the parameters' missing tangents as
    zeros, so X dWᵀ = inf * 0 makes it NaN; manualbp's must be the same (NaN and finite in the same places)."""
    require(backend, torch.float64)
    torch.manual_seed(3)
    if kind == "Linear":
        ours = manualbp.Linear(4, 3, activation="identity", dtype=torch.float64, device=DEVICE, backend=backend)
        theirs = nn.Sequential(nn.Linear(4, 3, dtype=torch.float64, device=DEVICE))
        theirs[0].load_state_dict(ours.state_dict())
    else:
        ours = manualbp.MLP([4, 6, 3], activation="tanh", dtype=torch.float64, device=DEVICE, backend=backend)
        theirs = ours.to_sequential()
    x = torch.randn(5, 4, dtype=torch.float64, device=DEVICE)
    x[1, 2] = float("inf")
    tangent = torch.randn(5, 4, dtype=torch.float64, device=DEVICE)
    import torch.autograd.forward_ad as fwAD

    tangents = []
    for model in (ours, theirs):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(model(fwAD.make_dual(x, tangent))).tangent)
    assert torch.equal(tangents[0].isnan(), tangents[1].isnan()), f"{kind}: NaN where nn has NaN"
    finite = tangents[1].isfinite()
    close("tangent (finite entries)", tangents[0][finite], tangents[1][finite], torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectorized_jacobian_and_batched_grads(backend):
    require(backend, torch.float64)
    ours, theirs = pair("silu", torch.float64, backend)
    x = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    jacobian = torch.autograd.functional.jacobian
    close("jacobian(vectorize=True)", jacobian(ours, x, vectorize=True), jacobian(theirs, x, vectorize=False),
          torch.float64)
    grad_outputs = torch.randn(4, 3, 3, dtype=torch.float64, device=DEVICE)  # 4 cotangents at once
    ours_grads = torch.autograd.grad(ours(x), x, grad_outputs, is_grads_batched=True)[0]
    theirs_grads = torch.autograd.grad(theirs(x), x, grad_outputs, is_grads_batched=True)[0]
    close("grad(is_grads_batched=True)", ours_grads, theirs_grads, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_and_meta_tensors_run_no_kernel(backend, monkeypatch):
    """FakeTensorMode and device="meta": construction and forward give shapes; no kernel and no reference op runs."""
    dense = backends.kernels() if backends.triton_unavailable_reason(DEVICE, torch.float32) is None else None
    if dense is not None:
        for name in ("linear_forward", "linear_backward", "matmul", "delta_and_bias_grad"):
            monkeypatch.setattr(dense, name, lambda *a, _name=name, **k: pytest.fail(f"kernel {_name} ran"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # fake tensors of the device the kernels run on here (CUDA, or the CPU's interpreter)
        layer = manualbp.Linear(6, 4, activation="gelu", backend=None if backend == "reference" else backend,
                                device=DEVICE)
        mlp = manualbp.MLP([6, 8, 4], backend=None if backend == "reference" else backend, device=DEVICE)
        x = torch.randn(2, 3, 6, requires_grad=True, device=DEVICE)
        out = layer(x)
        out.sum().backward()
        assert out.shape == (2, 3, 4) and layer.weight.grad.shape == (4, 6), "fake: shapes"
        assert mlp(x).shape == (2, 3, 4), "fake MLP"
    layer = manualbp.Linear(6, 4, activation="gelu", device="meta", backend=backend)
    mlp = manualbp.MLP([6, 8, 4], device="meta", backend=backend)
    x = torch.empty(2, 3, 6, device="meta", requires_grad=True)
    out = layer(x)
    assert out.device.type == "meta" and out.shape == (2, 3, 4), "meta: forward"
    out.sum().backward()
    assert x.grad.shape == x.shape and layer.weight.grad.shape == (4, 6), "meta: backward"
    assert mlp(x).shape == (2, 3, 4), "meta MLP"


@pytest.mark.parametrize("backend", BACKENDS)
def test_flop_counter_counts_what_it_counts_for_nn_linear(backend):
    require(backend, torch.float32)
    from torch.utils.flop_counter import FlopCounterMode

    ours, theirs = pair("gelu", torch.float32, backend, sizes=(32, 48))
    x = torch.randn(16, 32, device=DEVICE, requires_grad=True)
    counts = []
    for model in (ours, theirs):
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            forward = counter.get_total_flops()
            out.sum().backward()
        counts.append((forward, counter.get_total_flops() - forward))
    M, K, N = 16, 32, 48
    assert counts[1] == (2 * M * N * K, 4 * M * N * K), f"nn.Linear's own counts: {counts[1]}"
    assert counts[0] == counts[1], f"manualbp (forward, backward) FLOPs {counts[0]}, nn.Linear {counts[1]}"


def test_jvp_runs_one_tangent_kernel_per_layer():
    """On the Triton backend a layer's tangent is one kernel: both products and f' in one matmul."""
    require("triton", torch.float64)
    ours, _ = pair("gelu", torch.float64, "triton")
    x, tangent = torch.randn(3, 5, dtype=torch.float64, device=DEVICE), torch.randn(3, 5, dtype=torch.float64,
                                                                                    device=DEVICE)
    with operator_calls() as calls:
        jvp(ours, (x,), (tangent,))
    names = [name for name, _ in calls]
    assert names == ["linear_forward", "linear_jvp"], f"operators: {names}"
