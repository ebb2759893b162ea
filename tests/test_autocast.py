"""Mixed precision: torch.autocast with float32 parameters, against nn.Linear under the same autocast.

The layers must compute in the autocast dtype as nn.Linear does, and hand back
float32 gradients for float32 parameters. Accuracy is judged against float64
on the same rounded inputs, with PyTorch's own error as the yardstick.
(CPU float16 autocast runs the Triton kernels through the interpreter; CPU
bfloat16 runs the reference backend, the interpreter has no bfloat16.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manualbp

TORCH_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cpu", torch.float16, id="cpu-float16"),
    pytest.param("cuda", torch.float16, id="cuda-float16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16"),
]


def require(device: str, dtype: torch.dtype) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA autocast needs a GPU")
    if device == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    try:
        with torch.autocast(device, dtype=dtype):
            pass
    except Exception as error:  # an old PyTorch without CPU float16 autocast
        pytest.skip(f"torch.autocast({device!r}, dtype={dtype}) is not available: {error}")


def assert_as_accurate(ours, theirs, exact, dtype, label):
    """|ours - exact| within twice PyTorch's own |theirs - exact|, plus one rounding of the largest value."""
    error = (ours.double() - exact).abs().max().item()
    reference_error = (theirs.double() - exact).abs().max().item()
    bound = 2 * reference_error + torch.finfo(dtype).eps * exact.abs().max().item()
    assert error <= bound, (f"{label}: max error {error:.3g} vs float64, PyTorch's is {reference_error:.3g} "
                            f"(bound {bound:.3g})")


def rounded(t, dtype):
    return t.detach().to(dtype).double()


def check(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, device: str, dtype: torch.dtype, label: str):
    """Forward and backward of both models under autocast; dtypes equal, accuracy like PyTorch's."""
    grad_output = torch.randn(*x.shape[:-1], list(theirs.parameters())[-1].shape[0], device=device)
    results = []
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        x_ = x.detach().clone().requires_grad_(True)
        with torch.autocast(device, dtype=dtype):
            out = model(x_)
        (out.float() * grad_output).sum().backward()
        results.append((out, x_.grad, [p.grad for p in model.parameters()]))
    (out, dx, grads), (out_t, dx_t, grads_t) = results
    assert out.dtype == out_t.dtype == dtype, f"{label}: output dtype {out.dtype}, nn.Linear gives {out_t.dtype}"
    assert dx.dtype == dx_t.dtype == torch.float32, f"{label}: dx dtype {dx.dtype}, nn.Linear gives {dx_t.dtype}"
    for p, grad, grad_t in zip(ours.parameters(), grads, grads_t):
        assert p.dtype == torch.float32, f"{label}: the parameters stay float32"
        assert grad.dtype == grad_t.dtype == torch.float32, f"{label}: parameter gradient dtype {grad.dtype}"

    # float64 on the inputs as autocast rounds them: the same model in float64 by plain autograd.
    exact_model = _float64_copy(theirs, dtype)
    x64 = rounded(x, dtype).requires_grad_(True)
    exact = exact_model(x64)
    (exact * grad_output.double()).sum().backward()
    assert_as_accurate(out, out_t, exact.detach(), dtype, f"{label}: output")
    assert_as_accurate(dx, dx_t, x64.grad, dtype, f"{label}: dx")
    for (name, p), grad, grad_t in zip(exact_model.named_parameters(), grads, grads_t):
        kind = "dw" if name.endswith("weight") else "db"
        assert_as_accurate(grad, grad_t, p.grad, dtype, f"{label}: {kind} of {name}")


def _float64_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        for p, original in zip(exact.parameters(), model.parameters()):
            p.copy_(rounded(original, dtype))
    return exact


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("activation", list(TORCH_ACTIVATIONS))
def test_linear_under_autocast_matches_nn_linear(device, dtype, activation):
    require(device, dtype)
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Linear(24, 16), TORCH_ACTIVATIONS[activation]()).to(device)
    ours = manualbp.Linear(24, 16, activation=activation, device=device)
    ours.load_state_dict(theirs[0].state_dict())
    x = torch.randn(2, 5, 24, device=device)
    check(ours, theirs, x, device, dtype, f"{device} {dtype} {activation}")


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_mlp_under_autocast_matches_nn_sequential(device, dtype, recompute):
    require(device, dtype)
    torch.manual_seed(1)
    theirs = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)).to(device)
    ours = manualbp.MLP([16, 32, 32, 8], activation="gelu", recompute=recompute, device=device)
    ours.load_state_dict(theirs.state_dict())
    check(ours, theirs, torch.randn(12, 16, device=device), device, dtype, f"{device} {dtype} MLP")


def test_float64_is_left_alone_by_autocast_like_nn_linear():
    torch.manual_seed(2)
    theirs = nn.Linear(4, 3).double()
    ours = manualbp.Linear(4, 3, activation="relu").double()
    mlp = manualbp.MLP([4, 3, 2]).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert theirs(x).dtype == torch.float64, "PyTorch's own behaviour changed"
        assert ours(x).dtype == torch.float64, "float64 must stay float64 under autocast, as nn.Linear's does"
        assert mlp(x).dtype == torch.float64, "MLP: float64 must stay float64 under autocast"
