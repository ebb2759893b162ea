"""Bad input: a clear exception naming what was wrong and what was expected, before any kernel runs,
leaving the module's parameters and gradients untouched."""

import pytest
import torch

import manualbp
from manualbp import functional as F

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)


@pytest.fixture
def no_kernels(monkeypatch):
    """Make every kernel launcher and reference op fail loudly: bad input must be caught before them."""
    dense = manualbp.backends.kernels()

    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran although the input was bad")

    for name in ("linear_forward", "delta_and_bias_grad", "matmul"):
        monkeypatch.setattr(dense, name, boom)
    monkeypatch.setattr(manualbp.reference, "linear_forward", boom)


def _cases():
    x = torch.randn(4, 5)
    w = torch.randn(3, 5)
    b = torch.randn(3)
    return [
        ("shape mismatch", (torch.randn(4, 6), w, b), ValueError, "in_features = 5"),
        ("weight not 2-D", (x, torch.randn(15), b), ValueError, "weight must be 2-D"),
        ("bias shape", (x, w, torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
        ("0-d input", (torch.tensor(1.0), w, b), ValueError, "at least 1 dimension"),
        ("dtype mismatch", (x.double(), w, b), TypeError, "weight has dtype torch.float32 but input has dtype torch.float64"),
        ("bias dtype", (x, w, b.double()), TypeError, "bias has dtype torch.float64"),
        ("integer input", (x.long(), w.long(), b.long()), TypeError, "real floating dtype"),
        ("complex input", (x.to(torch.complex64), w, b), TypeError, "real floating dtype"),
        ("different devices", (x, w.to("meta"), b), ValueError, "weight is on meta but input is on cpu"),
        ("not a tensor", (x.tolist(), w, b), TypeError, "input must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_functional_rejects(case, backend, no_kernels):
    _, args, error, message = case
    with pytest.raises(error, match=message):
        F.linear(*args, "gelu", backend=backend)


def test_unknown_activation_in_functional(no_kernels):
    with pytest.raises(ValueError, match="expected one of: identity, relu, leaky_relu, gelu, gelu_tanh, silu"):
        F.linear(torch.randn(2, 3), torch.randn(4, 3), None, "swish")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_module_untouched_by_bad_input(backend, no_kernels):
    layer = manualbp.Linear(5, 3, activation="relu", backend=backend)
    layer.weight.grad = torch.full_like(layer.weight, 7.0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad in (torch.randn(2, 4), torch.randn(2, 5).double(), torch.randint(0, 3, (2, 5))):
        with pytest.raises((ValueError, TypeError)):
            layer(bad)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} unchanged"
    assert torch.equal(layer.weight.grad, torch.full_like(layer.weight, 7.0)), "weight.grad unchanged"
    assert layer.bias.grad is None, "bias.grad unchanged"


def test_unknown_backend_names():
    with pytest.raises(ValueError, match="expected one of: auto, triton, reference"):
        F.linear(torch.randn(2, 3), torch.randn(4, 3), backend="cuda")
    with pytest.raises(ValueError, match="expected one of"):
        manualbp.set_backend("fast")
