"""Double backward (create_graph=True) through layers with a frozen weight, beside nn.Linear + the activation module.

A frozen weight keeps no x (as nn.Linear); where f' needs Z (gelu, gelu_tanh, silu, leaky_relu < 0) the layer keeps
Z, as the activation module keeps its input, and a double backward differentiates f'(Z) through it
(manualbp/function.py). Where f' comes from A, through A.
"""

import pytest
import torch
from torch import nn

import manualbp
from manualbp import functional as F

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)

BACKENDS = ["triton", "reference"]
# (name, options): every activation, and leaky_relu with a negative slope (its f' then needs Z).
CASES = [(name, {}) for name in manualbp.ACTIVATIONS] + [("leaky_relu", {"negative_slope": -0.5})]
IDS = [f"{name}{options.get('negative_slope', '')}" for name, options in CASES]
# (leading dimensions of the input, in_features, out_features): 2-D, 3-D, an empty batch.
SHAPES = [((7,), 5, 3), ((2, 3), 5, 4), ((0,), 5, 3)]


def _layers(name, options, k, n, backend, bias_grad=True):
    """(manualbp.Linear, nn.Sequential(nn.Linear, module)) with the same frozen weight, the bias as bias_grad says."""
    activation = manualbp.get_activation(name, **options)
    ours = manualbp.Linear(k, n, activation=activation, dtype=torch.float64, backend=backend)
    theirs = nn.Sequential(nn.Linear(k, n, dtype=torch.float64), manualbp.activations.torch_module(activation))
    theirs[0].load_state_dict(ours.state_dict())
    for linear in (ours, theirs[0]):
        linear.weight.requires_grad_(False)
        linear.bias.requires_grad_(bias_grad)
    return ours, theirs


def _second_order(model, bias, x, grad_out, change_x=False):
    """First gradients (create_graph=True), then the gradients of a function of them: ((dx, db), (ddx, ddb))."""
    leaf = x.clone().requires_grad_(True)
    h = leaf * 1.0  # a non-leaf, as in a network
    out = model(h)
    if change_x:
        with torch.no_grad():
            h.mul_(2.0)  # in place after the forward: nn.Linear with a frozen weight did not keep it
    wrt = [leaf] + ([bias] if bias.requires_grad else [])
    first = torch.autograd.grad(out, wrt, grad_out, create_graph=True)
    second_loss = sum((g * g.detach().sin()).sum() + (g ** 2).sum() for g in first)
    # identity: the first gradients do not depend on x or b (no graph at all); unused: zero
    second = torch.autograd.grad(second_loss, wrt, allow_unused=True) if second_loss.requires_grad else [None] * 2
    second = [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(second, wrt)]
    return [g.detach() for g in first], second


def _assert_same(mine, expected, label):
    """Both orders' gradients of _second_order equal, float64."""
    for order, (ours_grads, their_grads) in enumerate(zip(mine, expected), start=1):
        assert len(ours_grads) == len(their_grads), f"{label}: {len(ours_grads)} gradients, nn {len(their_grads)}"
        for name, o, t in zip(("x", "bias"), ours_grads, their_grads):
            torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"order {order} d{name} {label}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d", "empty"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_frozen_weight_second_derivatives_equal_nn_linear(name, options, backend, shape):
    """∂/∂(x, b) of a function of the first gradients: the same numbers as nn.Linear + the module, float64."""
    lead, k, n = shape
    ours, theirs = _layers(name, options, k, n, backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64)
    grad_out = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    mine = _second_order(ours, ours.bias, x, grad_out)
    expected = _second_order(theirs, theirs[0].bias, x, grad_out)
    _assert_same(mine, expected, f"[{name}, {backend}, {lead}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_frozen_weight_gradgradcheck(name, options, backend):
    """gradgradcheck over x and the bias (also forward-over-reverse), and over x alone with the bias frozen."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(5, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    trainable_bias = bias.clone().requires_grad_(True)

    def fn(x, b):
        return F.linear(x, weight, b, name, backend=backend, **options)

    assert torch.autograd.gradgradcheck(fn, (x, trainable_bias)), f"gradgradcheck (x, b) [{name}, {backend}]"
    assert torch.autograd.gradgradcheck(fn, (x, trainable_bias), check_fwd_over_rev=True), \
        f"gradgradcheck fwd-over-rev [{name}, {backend}]"
    assert torch.autograd.gradgradcheck(lambda x: fn(x, bias), (x,)), f"gradgradcheck (x), bias frozen [{name}]"
    no_bias = lambda x: F.linear(x, weight, None, name, backend=backend, **options)  # noqa: E731
    assert torch.autograd.gradgradcheck(no_bias, (x,)), f"gradgradcheck (x), no bias [{name}, {backend}]"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_frozen_weight_keeps_what_nn_linear_keeps(name, options, backend):
    """Bytes kept by a frozen layer: nn.Linear + module's (no x; Z where f' needs it: M·N·8 here), and x may change
    in place after the forward, as there, with the double backward still nn's."""
    ours, theirs = _layers(name, options, 6, 5, backend)
    x = torch.randn(8, 6, dtype=torch.float64)
    h = (x * 1.0).requires_grad_(True)  # a non-leaf input would cost memory if kept; counted here
    mine, expected = manualbp.saved_bytes(ours, h), manualbp.saved_bytes(theirs, h)
    assert mine == expected, f"saved bytes [{name}, {backend}]: {mine}, nn.Linear + module {expected}"
    activation = manualbp.get_activation(name, **options)
    needs_z = name != "identity" and not activation.saves_output
    if needs_z:
        assert mine == 8 * 5 * 8, f"[{name}, {backend}]: Z [8, 5] float64 kept, got {mine} bytes"
    grad_out = torch.randn(8, 5, dtype=torch.float64)
    mine = _second_order(ours, ours.bias, x, grad_out, change_x=True)
    expected = _second_order(theirs, theirs[0].bias, x, grad_out, change_x=True)
    _assert_same(mine, expected, f"[{name}, {backend}, x changed in place after the forward]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_trainable_weight_keeps_f_prime_on_triton(backend):
    """Only a frozen weight changes what is kept: a trainable one keeps x and, on triton, f'(Z) as before."""
    layer = manualbp.Linear(6, 5, activation="gelu", dtype=torch.float64, backend=backend)
    x = torch.randn(8, 6, dtype=torch.float64)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        layer(x * 1.0)
    big = [t for t in kept if t.shape == (8, 5)]
    assert len(big) == 1, f"[{backend}] one [M, N] tensor kept, got {len(big)}"
    z = torch.nn.functional.linear(x, layer.weight.detach(), layer.bias.detach())
    expected = manualbp.get_activation("gelu").f_grad(z) if backend == "triton" else z
    torch.testing.assert_close(big[0].detach(), expected, rtol=1e-12, atol=1e-13,
                               msg=lambda m: f"trainable weight keeps {'f_prime' if backend == 'triton' else 'Z'}")


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_with_frozen_weights_double_backward(backend, recompute):
    """manualbp.MLP, every weight frozen (the stack keeps its input X₀ and recomputes the Zₗ): gradgradcheck,
    and second derivatives equal to nn.Sequential's."""
    torch.manual_seed(5)
    mlp = manualbp.MLP([4, 6, 5, 3], activation="silu", last_activation="gelu", recompute=recompute,
                       dtype=torch.float64, backend=backend)
    sequential = mlp.to_sequential()
    for model in (mlp, sequential):
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(parameter_name.endswith("bias"))
    x = torch.randn(7, 4, dtype=torch.float64)
    grad_out = torch.randn(7, 3, dtype=torch.float64)
    first_bias = (mlp.layers[0].bias, sequential[0].bias)
    mine = _second_order(mlp, first_bias[0], x, grad_out)
    expected = _second_order(sequential, first_bias[1], x, grad_out)
    _assert_same(mine, expected, f"MLP [{backend}, recompute={recompute}]")
    weights = [layer.weight.detach() for layer in mlp.layers]
    activations = [layer.activation for layer in mlp.layers]

    def fn(x, b0, b1, b2):
        return manualbp.mlp.mlp(x, weights, [b0, b1, b2], activations, recompute=recompute, backend=backend)

    inputs = [x[:3].clone().requires_grad_(True)] + [layer.bias.detach().clone().requires_grad_(True)
                                                     for layer in mlp.layers]
    assert torch.autograd.gradgradcheck(fn, inputs), f"MLP gradgradcheck, frozen weights [{backend}, {recompute}]"
