"""No argument silently misread, and in-place changes between forward and backward handled as nn.Linear does.

In-place matrix: {input, weight, bias} changed in place after the forward × {that tensor needs a gradient or
not} × activation kinds (saves A: relu; saves Z or f'(Z): gelu; saves nothing: identity) × backends. Where
nn.Linear + the torch activation gives gradients, manualbp gives the same ones; where PyTorch raises its
"modified by an inplace operation" error, manualbp raises it too.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manualbp
from manualbp import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require(backend: str) -> None:
    reason = backends.triton_unavailable_reason(DEVICE, torch.float64)
    if backend == "triton" and reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------


def test_activation_in_the_bias_slot_is_a_type_error():
    with pytest.raises(TypeError, match=r"pass activation='gelu'"):
        manualbp.Linear(4, 3, "gelu")


@pytest.mark.parametrize("call,match", [
    (lambda: manualbp.Linear(4, 3, bias="yes"), r"Linear\(bias=\) must be True or False"),
    (lambda: manualbp.Linear(4, 3, bias=None), r"Linear\(bias=\) must be True or False"),
    (lambda: manualbp.MLP([4, 3], bias="no"), r"MLP\(bias=\) must be True or False"),
    (lambda: manualbp.MLP([4, 3], recompute="yes"), r"MLP\(recompute=\) must be True or False"),
    (lambda: manualbp.convert(nn.Linear(2, 2), inplace="no"), r"convert\(inplace=\) must be True or False"),
    (lambda: manualbp.convert(nn.Linear(2, 2), fuse=1), r"convert\(fuse=\) must be True or False"),
    (lambda: manualbp.convert(nn.Linear(2, 2), return_report="y"), r"convert\(return_report=\) must be"),
    (lambda: manualbp.Linear(4, 3, activation="gelu", negative_slope=0.1), "takes no options"),
    (lambda: manualbp.Linear(4, 3, activation="leaky_relu", slope=0.1), "takes only"),
    (lambda: manualbp.functional.linear(torch.randn(2, 3), torch.randn(4, 3), None, "relu", alpha=1.0),
     "takes no options"),
    (lambda: manualbp.config.set(backend_name="reference"), "unknown manualbp setting"),
], ids=["Linear-bias-str", "Linear-bias-None", "MLP-bias", "MLP-recompute", "convert-inplace", "convert-fuse",
        "convert-report", "gelu-slope", "leaky-unknown-option", "functional-unknown-option", "config-unknown"])
def test_flags_and_options_are_type_checked(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), -float("inf"), True, "0.1"])
def test_bad_negative_slope_is_a_value_error(slope):
    with pytest.raises(ValueError, match="negative_slope must be a finite real number"):
        manualbp.Linear(4, 3, activation="leaky_relu", negative_slope=slope)


@pytest.mark.parametrize("call", [
    lambda: manualbp.set_backend("gpu"),
    lambda: manualbp.use_backend("cuda").__enter__(),
    lambda: manualbp.Linear(2, 2, backend="fast"),
    lambda: manualbp.MLP([2, 2], backend=True),
    lambda: manualbp.convert(nn.Linear(2, 2), backend="Triton"),
])
def test_backend_names_are_checked(call):
    with pytest.raises(ValueError, match="unknown backend"):
        call()


# --------------------------------------------------------------------------------------
# In-place changes between forward and backward
# --------------------------------------------------------------------------------------


def _run(model_kind: str, activation: str, backend: str, changed: str, needs_grad: bool):
    """Forward, change `changed` in place, backward: ('error', message) or ('grads', {name: grad})."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE)
    layer = nn.Linear(5, 3, dtype=torch.float64, device=DEVICE)
    if model_kind == "manualbp":
        model = manualbp.Linear(5, 3, activation=activation, dtype=torch.float64, device=DEVICE, backend=backend)
        model.load_state_dict(layer.state_dict())
        weight, bias = model.weight, model.bias
    else:
        model = nn.Sequential(layer, manualbp.activations.torch_module(activation))
        weight, bias = layer.weight, layer.bias
    tensors = {"input": x, "weight": weight, "bias": bias}
    # The changed tensor needs a gradient or not; the others always do (the input: so that W is used).
    for name, tensor in tensors.items():
        tensor.requires_grad_(needs_grad if name == changed else True)
    target = tensors[changed]
    out = model(x)
    with torch.no_grad():
        target.mul_(1.5)  # in place: bumps the version counter
    try:
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=DEVICE).view_as(out))
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error), f"an unexpected error: {error}"
        return "error", None
    return "grads", {name: t.grad for name, t in tensors.items() if t.grad is not None}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"], ids=["saves-A", "saves-Z", "saves-nothing"])
@pytest.mark.parametrize("needs_grad", [True, False], ids=["needs-grad", "no-grad"])
@pytest.mark.parametrize("changed", ["input", "weight", "bias"])
def test_in_place_change_after_forward_matches_nn_linear(changed, needs_grad, activation, backend):
    require(backend)
    theirs, theirs_grads = _run("torch", activation, backend, changed, needs_grad)
    ours, ours_grads = _run("manualbp", activation, backend, changed, needs_grad)
    cell = f"[{changed} changed, {'needs grad' if needs_grad else 'no grad'}, {activation}, {backend}]"
    assert ours == theirs, f"{cell}: nn.Linear gives {theirs}, manualbp gives {ours}"
    if ours == "grads":
        assert set(ours_grads) == set(theirs_grads), f"{cell}: gradients of {sorted(ours_grads)}, " \
                                                     f"nn.Linear {sorted(theirs_grads)}"
        for name in ours_grads:
            label = {"input": "dx", "weight": "dw", "bias": "db"}[name]
            torch.testing.assert_close(ours_grads[name], theirs_grads[name], rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{cell} {label}: {m}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_double_backward_after_an_in_place_bias_change_is_a_clear_error(backend):
    """A double backward recomputes Z from the bias the forward used: changed since, it says so."""
    require(backend)
    layer = manualbp.Linear(5, 3, activation="gelu", dtype=torch.float64, device=DEVICE, backend=backend)
    x = torch.randn(4, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = layer(x)
    with torch.no_grad():
        layer.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="bias was modified in place after the forward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
    out = layer(x)  # unchanged: double backward works
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert grad_x.requires_grad, "first-order gradient is differentiable"
