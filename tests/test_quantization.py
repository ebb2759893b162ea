"""Quantizing a model with manualbp layers quantizes them or raises; it never returns them unquantized silently."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import manualbp
from manualbp.quantization import QuantizationError
from checks import optional_import

# torch.ao.quantization warns that it is deprecated (in favour of torchao) at every call.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def plain_model() -> nn.Sequential:
    torch.manual_seed(20)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_quantize_dynamic_raises_and_points_to_revert():
    quantize_dynamic = torch.ao.quantization.quantize_dynamic
    model = manualbp.convert(plain_model(), backend="reference")
    for spec in ({nn.Linear}, {manualbp.Linear}):
        with pytest.raises(QuantizationError, match=r"manualbp.Linear \(in_features=8.*manualbp.revert\(model\)"):
            quantize_dynamic(model, spec, inplace=False)
    mlp = nn.Sequential(manualbp.MLP([8, 16, 4]))
    with pytest.raises(QuantizationError, match="manualbp.revert"):
        quantize_dynamic(mlp, {nn.Linear})
    with pytest.raises(QuantizationError, match="manualbp.revert"):
        torch.ao.quantization.prepare(nn.Sequential(manualbp.Linear(4, 4)))
    assert all(type(m) is manualbp.Linear for m in model if isinstance(m, nn.Linear)), "the model is unchanged"


def test_revert_then_quantize_dynamic_quantizes_and_keeps_the_activations():
    original = plain_model()
    expected = torch.ao.quantization.quantize_dynamic(copy.deepcopy(original), {nn.Linear})
    model = manualbp.revert(manualbp.convert(copy.deepcopy(original), backend="reference"))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear})
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert [type(m) for m in quantized] == [dynamic, nn.GELU, dynamic, nn.ReLU, dynamic], [type(m) for m in quantized]
    x = torch.randn(6, 8)
    out = quantized(x)
    assert torch.equal(out, expected(x)), "the same as quantizing the original model"
    error = (out - original(x)).abs().max().item()
    assert 0 < error < 0.05, f"int8 dynamic quantization error {error:.3e} (expected > 0: it is quantized)"


def test_a_qconfig_set_by_hand_is_honoured():
    model = manualbp.convert(plain_model(), backend="reference")
    model[0].qconfig = None  # leave this layer unquantized on purpose
    for layer in (model[2], model[4]):
        layer.qconfig = None
    x = torch.randn(3, 8)
    before = model(x)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear})
    assert all(type(m) is manualbp.Linear for m in quantized[::2]), "opted out: left alone, as asked"
    assert torch.equal(quantized(x), before), "output of the opted-out layers"
    del model[0].qconfig
    assert not hasattr(model[0], "qconfig"), "unset: absent to anyone but torch.ao.quantization, as on nn.Linear"
    assert getattr(model[0], "qconfig", "default") == "default"
    with pytest.raises(AttributeError, match="qconfig"):
        del model[0].qconfig

    plain = nn.Linear(3, 3)
    plain.qconfig = torch.ao.quantization.default_dynamic_qconfig  # set before convert: still there after
    manualbp.convert(plain)
    assert plain.qconfig is torch.ao.quantization.default_dynamic_qconfig, "qconfig"
    assert manualbp.revert(plain).qconfig is torch.ao.quantization.default_dynamic_qconfig, "qconfig after revert"


@pytest.mark.parametrize("config_name", ["Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"])
def test_torchao_quantize_works_on_manualbp_layers(config_name):
    quantization = optional_import("torchao.quantization", "torchao is not installed")
    config = getattr(quantization, config_name)
    original = plain_model()
    model = manualbp.convert(copy.deepcopy(original), backend="reference")
    expected = copy.deepcopy(original)
    quantization.quantize_(expected, config())
    quantization.quantize_(model, config())
    assert all(type(m) is manualbp.Linear and manualbp.quantization.is_quantized(m.weight) for m in model[::2]), \
        [type(m.weight) for m in model[::2]]
    assert model[0].activation.name == "gelu" and model[2].activation.name == "relu", "activations kept"
    x = torch.randn(6, 8)
    out = model(x)
    assert torch.equal(out, expected(x)), "the same as torchao on the plain model (linear, then the activation)"
    error = (out - original(x)).abs().max().item()
    assert 0 < error < 0.05, f"int8 quantization error {error:.3e} (expected > 0: it is quantized)"
