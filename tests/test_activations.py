"""The activation pairs of manualbp/activations.py: f' against autograd of f, and the fused δ against G ⊙ f'."""

import pytest
import torch

import manualbp
from manualbp import functional as F

from checks import run_and_grad, torch_dense

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)

# (name, options): every activation, and leaky_relu with a negative slope (its f' then needs z).
CASES = [(name, {}) for name in manualbp.ACTIVATIONS] + [("leaky_relu", {"negative_slope": -0.5}),
                                                          ("leaky_relu", {"negative_slope": 0.0})]
IDS = [f"{name}{options.get('negative_slope', '')}" for name, options in CASES]


def _points(dtype=torch.float64):
    """z spread over where the activations bend and saturate, with exact zeros (f' at the kink)."""
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(997, generator=g, dtype=torch.float64) * 3,
                   torch.tensor([0.0, -0.0, 1e-8, -1e-8, 30.0, -30.0], dtype=torch.float64)])
    grad_a = torch.randn(z.shape, generator=g, dtype=torch.float64)
    return z.to(dtype), grad_a.to(dtype)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_f_grad_is_the_derivative_of_f(name, options):
    """The hand-written f' equals autograd's derivative of f, in float64 (the kink z = 0 aside)."""
    act = manualbp.get_activation(name, **options)
    z, _ = _points()
    z = z[z != 0]  # relu/leaky_relu: not differentiable at 0, where PyTorch and manualbp both take the left slope
    leaf = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(act.f(leaf).sum(), leaf)
    torch.testing.assert_close(act.f_grad(z), expected, rtol=1e-13, atol=1e-15, msg=lambda m: f"f' [{name}]: {m}")
    if act.saves_output:
        torch.testing.assert_close(act.f_grad_from_output(act.f(z)), expected, rtol=1e-13, atol=1e-15,
                                   msg=lambda m: f"f' from a [{name}]: {m}")


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_fused_delta_is_grad_times_f_grad(name, options):
    """Activation.delta (PyTorch's fused kernel) equals G ⊙ f'(z) by the formula, from z and from a."""
    act = manualbp.get_activation(name, **options)
    z, grad_a = _points()
    expected = grad_a * act.f_grad(z)
    torch.testing.assert_close(act.delta(grad_a, z, from_output=False), expected, rtol=1e-13, atol=1e-15,
                               msg=lambda m: f"delta from z [{name}]: {m}")
    if act.saves_output:
        torch.testing.assert_close(act.delta(grad_a, act.f(z), from_output=True), expected, rtol=1e-13, atol=1e-15,
                                   msg=lambda m: f"delta from a [{name}]: {m}")
    else:
        with pytest.raises(RuntimeError, match="cannot compute f' from its output"):
            act.delta(grad_a, act.f(z), from_output=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_reference_backward_is_bitwise_eager(name, options, dtype):
    """The reference backward runs the kernels eager autograd runs, in the same order: bitwise nn.Linear + f."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 19, generator=g).to(dtype)
    weight = (torch.randn(23, 19, generator=g) / 19 ** 0.5).to(dtype)
    bias = torch.randn(23, generator=g).to(dtype)
    grad_out = torch.randn(37, 23, generator=g).to(dtype)
    slope = options.get("negative_slope", 0.01)
    ours = run_and_grad(lambda *t: F.linear(*t, name, backend="reference", **options), x, weight, bias, grad_out)
    theirs = run_and_grad(lambda *t: torch_dense(*t, name, slope), x, weight, bias, grad_out)
    for label, mine, eager in zip(("out", "dx", "dw", "db"), ours, theirs):
        assert torch.equal(mine, eager), f"{label} [{name} {dtype}] bitwise eager"


def test_catalogue_names_the_pytorch_modules():
    """The catalogue's PyTorch module for each activation, written out here independently, and back."""
    from torch import nn

    expected = {
        "identity": nn.Identity(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.01),
        "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
    }
    assert set(expected) == set(manualbp.ACTIVATIONS), "every activation has its PyTorch module here"
    for name, module in expected.items():
        ours = manualbp.activations.torch_module(name)
        assert type(ours) is type(module) and repr(ours) == repr(module), f"{name}: {ours!r}, expected {module!r}"
        back = manualbp.activations.from_torch_module(module)
        assert (back is None) if name == "identity" else back.name == name, f"{name}: read back as {back}"
    slope = manualbp.activations.from_torch_module(nn.LeakyReLU(-0.25))
    assert slope.name == "leaky_relu" and slope.negative_slope == -0.25, "leaky_relu keeps its slope"
    assert manualbp.activations.from_torch_module(nn.Softplus()) is None, "not in the catalogue"
