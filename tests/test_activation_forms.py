"""Activations given as PyTorch modules (instances or classes) or as names in any letter case, beside nn.Linear."""

import re

import pytest
import torch
from torch import nn

import manualbp
from manualbp import functional as F

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)

BACKENDS = ["triton", "reference"]

# (what the user writes, the PyTorch module it stands for, the catalogue name, leaky_relu's slope), written out here.
FORMS = [
    (nn.GELU(), nn.GELU(), "gelu", None),
    (nn.GELU(approximate="tanh"), nn.GELU(approximate="tanh"), "gelu_tanh", None),
    (nn.LeakyReLU(0.2), nn.LeakyReLU(0.2), "leaky_relu", 0.2),
    (nn.LeakyReLU(-0.5), nn.LeakyReLU(-0.5), "leaky_relu", -0.5),
    (nn.LeakyReLU, nn.LeakyReLU(0.01), "leaky_relu", 0.01),
    (nn.ReLU(inplace=True), nn.ReLU(), "relu", None),
    (nn.SiLU, nn.SiLU(), "silu", None),
    (nn.ReLU, nn.ReLU(), "relu", None),
    (nn.Sigmoid, nn.Sigmoid(), "sigmoid", None),
    (nn.Tanh(), nn.Tanh(), "tanh", None),
    (nn.GELU, nn.GELU(), "gelu", None),
    (nn.Identity, nn.Identity(), "identity", None),
    (nn.Identity(), nn.Identity(), "identity", None),
    ("GELU", nn.GELU(), "gelu", None),
    ("Relu", nn.ReLU(), "relu", None),
    ("LEAKY_RELU", nn.LeakyReLU(0.01), "leaky_relu", 0.01),
    ("LeakyReLU", nn.LeakyReLU(0.01), "leaky_relu", 0.01),
    ("Gelu_Tanh", nn.GELU(approximate="tanh"), "gelu_tanh", None),
    ("SiLU", nn.SiLU(), "silu", None),
    ("Identity", nn.Identity(), "identity", None),
]
IDS = [f"{given!r}" if isinstance(given, (str, nn.Module)) else given.__name__ for given, *_ in FORMS]


class _MyGELU(nn.GELU):
    """A subclass: its forward may compute something else, so it is not taken for nn.GELU."""


def _hooked():
    module = nn.SiLU()
    module.register_forward_hook(lambda *args: None)
    return module


# (what the user writes, the error's type, a fragment of its message)
REJECTED = [
    (nn.ReLU6(), ValueError, r"module ReLU6\(\).*not one manualbp computes exactly"),
    (nn.Softplus, ValueError, r"class torch\.nn\.modules\.activation\.Softplus is not one manualbp computes"),
    (_MyGELU(), ValueError, r"_MyGELU\).*not one manualbp computes exactly"),
    (_MyGELU, ValueError, r"class .*_MyGELU is not one manualbp computes exactly"),
    (nn.GELU(approximate="sigmoid"), ValueError, r"GELU\(approximate='sigmoid'\).*not one manualbp computes"),
    (nn.Linear, ValueError, r"class torch\.nn\.modules\.linear\.Linear is not one"),
    (_hooked(), ValueError, "has hooks, which a manualbp layer would never call"),
    ("swish", ValueError, "unknown activation 'swish'"),
    ("leakyrelu6", ValueError, "unknown activation"),
    (3, ValueError, "unknown activation 3"),
]


@pytest.mark.parametrize("given,module,name,slope", FORMS, ids=IDS)
def test_get_activation_maps_each_form(given, module, name, slope):
    """Each form binds the catalogue's activation, options read off the instance; convert reads modules alike."""
    bound = manualbp.get_activation(given)
    assert bound.name == name, f"{given!r}: bound to {bound.name!r}, expected {name!r}"
    if slope is not None:
        assert bound.negative_slope == slope, f"{given!r}: slope {bound.negative_slope}, expected {slope}"
    if isinstance(given, nn.Module):
        convert_reads = manualbp.activations.from_torch_module(given)
        expected = None if name == "identity" else bound  # convert fuses no nn.Identity
        assert convert_reads == expected, f"{given!r}: convert's table reads {convert_reads}, expected {expected}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("given,module,name,slope", FORMS, ids=IDS)
def test_linear_with_each_form_trains_as_nn_linear(given, module, name, slope, backend):
    """manualbp.Linear(activation=<form>) beside nn.Linear + the module: outputs and gradients, float64."""
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Linear(7, 5, dtype=torch.float64), module)
    ours = manualbp.Linear(7, 5, activation=given, dtype=torch.float64, backend=backend)
    ours.load_state_dict(theirs[0].state_dict())
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    grad = torch.randn(3, 2, 5, dtype=torch.float64)
    results = []
    for model in (ours, theirs):
        leaf = x.clone().requires_grad_(True)
        out = model(leaf)
        out.backward(grad)
        layer = model if model is ours else model[0]
        results.append((out.detach(), leaf.grad, layer.weight.grad, layer.bias.grad))
    for label, mine, expected in zip(("out", "dx", "dw", "db"), *results):
        torch.testing.assert_close(mine, expected, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"{label} [{given!r}, {backend}]: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_and_mlp_take_modules_and_names(backend):
    """functional.linear and MLP accept the same forms; each equals the same layer given the catalogue name."""
    torch.manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64)
    weight = torch.randn(3, 6, dtype=torch.float64)
    bias = torch.randn(3, dtype=torch.float64)
    for given, module, name, slope in FORMS:
        options = {"negative_slope": slope} if slope is not None else {}
        expected = F.linear(x, weight, bias, name, backend=backend, **options)
        torch.testing.assert_close(F.linear(x, weight, bias, given, backend=backend), expected, rtol=0, atol=0,
                                   msg=lambda m: f"functional.linear [{given!r}, {backend}]: {m}")
    mlp = manualbp.MLP([6, 5, 2], activation=nn.GELU(approximate="tanh"), last_activation="Sigmoid",
                       dtype=torch.float64, backend=backend)
    names = [layer.activation.name for layer in mlp.layers]
    assert names == ["gelu_tanh", "sigmoid"], f"MLP's activations: {names}"
    sequential = mlp.to_sequential()
    torch.testing.assert_close(mlp(x), sequential(x), rtol=1e-12, atol=1e-12,
                               msg=lambda m: f"MLP(nn.GELU(approximate='tanh'), 'Sigmoid') [{backend}]: {m}")


def test_module_class_takes_options_as_a_name_does():
    """A class is its default instance; options given beside a class bind as beside the name."""
    bound = manualbp.get_activation(nn.LeakyReLU, negative_slope=0.3)
    assert (bound.name, bound.negative_slope) == ("leaky_relu", 0.3), f"nn.LeakyReLU with 0.3: {bound}"
    assert manualbp.get_activation(nn.LeakyReLU) == manualbp.get_activation(nn.LeakyReLU()), \
        "the class means PyTorch's default slope"
    with pytest.raises(TypeError, match="takes no options"):
        manualbp.get_activation(nn.GELU, negative_slope=0.3)


def test_module_instance_with_options_is_an_error():
    """An instance carries its options: a second, different source of them is refused, not silently chosen."""
    with pytest.raises(ValueError, match="cannot be given with a module instance"):
        manualbp.get_activation(nn.LeakyReLU(0.2), negative_slope=0.1)
    with pytest.raises(ValueError, match="cannot be given with a module instance"):
        manualbp.Linear(3, 2, activation=nn.LeakyReLU(0.2), negative_slope=0.2)


@pytest.mark.parametrize("given,error,message", REJECTED, ids=[repr(r[0]) for r in REJECTED])
def test_what_the_catalogue_does_not_compute_is_refused(given, error, message):
    """Everywhere an activation is accepted, the same clear error, naming what is accepted, before any layer exists."""
    accepted = r"nn\.GELU \(approximate='none' or 'tanh'\)"
    for label, call in (("get_activation", lambda: manualbp.get_activation(given)),
                        ("Linear", lambda: manualbp.Linear(3, 2, activation=given)),
                        ("MLP", lambda: manualbp.MLP([3, 2], activation=given)),
                        ("MLP last", lambda: manualbp.MLP([3, 2], last_activation=given)),
                        ("functional", lambda: F.linear(torch.randn(2, 3), torch.randn(2, 3), None, given))):
        with pytest.raises(error, match=message) as caught:
            call()
        if "hooks" not in message:
            assert re.search(accepted, str(caught.value)), f"{label}: names what is accepted"


def test_linear_activation_module_as_third_argument_is_pointed_at():
    """nn.Linear's third argument is bias: an activation module there gets the hint that a string gets."""
    with pytest.raises(TypeError, match="the third argument is bias"):
        manualbp.Linear(3, 2, nn.GELU())
    with pytest.raises(TypeError, match="the third argument is bias"):
        manualbp.Linear(3, 2, nn.GELU)
