"""manualbp.Linear keeps nn.Linear's contract: parameters, init, factory kwargs, state_dict, repr."""

import pytest
import torch
from torch import nn

import manualbp

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)


def test_is_an_nn_linear_with_the_same_parameters():
    layer = manualbp.Linear(6, 4, activation="silu")
    assert isinstance(layer, nn.Linear), "subclass of nn.Linear"
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"], "parameter names"
    assert layer.weight.shape == (4, 6) and layer.bias.shape == (4,), "parameter shapes"
    assert (layer.in_features, layer.out_features) == (6, 4), "features"
    assert manualbp.Linear(6, 4, bias=False).bias is None, "bias=False"


def test_same_default_initialisation_as_nn_linear():
    torch.manual_seed(123)
    ours = manualbp.Linear(17, 9, activation="relu")
    torch.manual_seed(123)
    ref = nn.Linear(17, 9)
    assert torch.equal(ours.weight, ref.weight), "weight init (kaiming uniform, a=sqrt(5))"
    assert torch.equal(ours.bias, ref.bias), "bias init"


def test_factory_kwargs():
    layer = manualbp.Linear(3, 2, activation="tanh", dtype=torch.float64, device="cpu")
    assert layer.weight.dtype == torch.float64 and layer.bias.dtype == torch.float64, "dtype"
    assert layer.weight.device.type == "cpu", "device"
    meta = manualbp.Linear(3, 2, device="meta")
    assert meta.weight.is_meta, "meta device"


def test_state_dict_loads_both_ways():
    ours = manualbp.Linear(5, 3, activation="gelu")
    ref = nn.Linear(5, 3)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"], "state_dict keys"
    ref.load_state_dict(ours.state_dict())  # ours -> nn.Linear
    assert torch.equal(ref.weight, ours.weight) and torch.equal(ref.bias, ours.bias), "ours -> nn.Linear"
    fresh = nn.Linear(5, 3)
    ours.load_state_dict(fresh.state_dict())  # nn.Linear -> ours
    assert torch.equal(ours.weight, fresh.weight) and torch.equal(ours.bias, fresh.bias), "nn.Linear -> ours"
    # Through a containing model as well.
    model_ours = nn.Sequential(manualbp.Linear(5, 3, activation="relu"), manualbp.Linear(3, 2))
    model_ref = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    model_ref.load_state_dict(model_ours.state_dict())
    model_ours.load_state_dict(model_ref.state_dict())
    x = torch.randn(4, 5)
    torch.testing.assert_close(model_ours[1](model_ref[0](x)), model_ref(x), msg=lambda m: f"identity layer: {m}")


def test_extra_repr_shows_the_activation():
    assert repr(manualbp.Linear(4, 2, activation="gelu_tanh")) == (
        "Linear(in_features=4, out_features=2, bias=True, activation='gelu_tanh')"
    ), "repr"
    text = repr(manualbp.Linear(4, 2, bias=False, activation="leaky_relu", negative_slope=0.2))
    assert "negative_slope=0.2" in text and "bias=False" in text, f"repr with options: {text}"


def test_forward_equals_nn_linear_with_activation(device):
    torch.manual_seed(0)
    layer = manualbp.Linear(8, 5, activation="sigmoid", device=device, dtype=torch.float64)
    x = torch.randn(2, 3, 8, device=device, dtype=torch.float64)
    expected = torch.sigmoid(nn.functional.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"out: {m}")
    assert layer(x[0, 0]).shape == (5,), "1-D input gives 1-D output"


@pytest.mark.parametrize("bad", ["softmax", "RELU6", "", None, 3])
def test_unknown_activation_lists_valid_names(bad):
    with pytest.raises(ValueError) as info:
        manualbp.Linear(3, 2, activation=bad)
    for name in manualbp.ACTIVATIONS:
        assert name in str(info.value), f"error message lists {name!r}"


def test_activation_options_are_checked():
    with pytest.raises(TypeError, match="takes no options"):  # an unexpected keyword, as Python reports it
        manualbp.Linear(3, 2, activation="relu", negative_slope=0.1)
    with pytest.raises(ValueError, match="finite"):
        manualbp.Linear(3, 2, activation="leaky_relu", negative_slope=float("nan"))
    with pytest.raises(TypeError, match="takes only"):
        manualbp.Linear(3, 2, activation="leaky_relu", slope=0.1)
    with pytest.raises(ValueError, match="unknown backend"):
        manualbp.Linear(3, 2, backend="cuda")


def test_saved_tensor_choice_per_activation():
    """f' from the output where it can be computed from it; from Z otherwise."""
    from_output = {name: manualbp.get_activation(name).saves_output for name in manualbp.ACTIVATIONS}
    assert from_output == {
        "identity": True, "relu": True, "leaky_relu": True, "gelu": False,
        "gelu_tanh": False, "silu": False, "sigmoid": True, "tanh": True,
    }, "saves A vs Z"
    assert not manualbp.get_activation("leaky_relu", negative_slope=-0.5).saves_output, "negative slope saves Z"
