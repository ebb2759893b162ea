"""manualbp.convert: nn.Linear -> manualbp.Linear in arbitrary models, with fusion inside nn.Sequential."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import manualbp
from manualbp import backends
from checks import optional_import

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)

RTOL, ATOL = 1e-10, 1e-12  # float64
# The GPU where there is one (compiled kernels), else the CPU (the kernels through the interpreter).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require_triton(dtype=torch.float64) -> None:
    reason = backends.triton_unavailable_reason(DEVICE, dtype)
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


def outputs_and_grads(model: nn.Module, *inputs, **kwargs):
    out = model(*inputs, **kwargs)
    if not isinstance(out, torch.Tensor):
        out = out.logits if hasattr(out, "logits") else out[0]
    torch.manual_seed(123)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same(converted, original, inputs, label, kwargs=None, float_inputs=()):
    kwargs = kwargs or {}
    out, grads = outputs_and_grads(converted, *inputs, **kwargs)
    out_ref, grads_ref = outputs_and_grads(original, *inputs, **kwargs)
    torch.testing.assert_close(out, out_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{label}: output\n{m}")
    assert set(grads) == set(grads_ref), f"{label}: parameter names"
    for name, grad in grads.items():
        if grads_ref[name] is None:
            assert grad is None, f"{label}: {name} got a gradient, the original did not"
            continue
        kind = "dw" if name.endswith("weight") else "db" if name.endswith("bias") else "d"
        torch.testing.assert_close(grad, grads_ref[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{label}: {kind} of {name}\n{m}")


def all_activations_sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(),
        nn.Linear(8, 8), nn.LeakyReLU(0.2),
        nn.Linear(8, 8), nn.GELU(),
        nn.Linear(8, 8), nn.GELU(approximate="tanh"),
        nn.Linear(8, 8), nn.SiLU(),
        nn.Linear(8, 8), nn.Sigmoid(),
        nn.Linear(8, 8), nn.Tanh(),
        nn.Linear(8, 4),
    ).double()


def test_sequential_fuses_every_supported_activation():
    require_triton()
    original = all_activations_sequential().to(DEVICE)
    model, report = manualbp.convert(copy.deepcopy(original), return_report=True)
    expected = ["relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "identity"]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert all(type(m) is manualbp.Linear for m in linears), [type(m) for m in linears]
    assert [m.activation.name for m in linears] == expected
    assert linears[1].activation.negative_slope == 0.2
    assert [type(m) for m in model[1::2]] == [nn.Identity] * 7, "fused activation modules become nn.Identity"
    assert len(model) == len(original), "indices stay valid"
    assert list(model.state_dict()) == list(original.state_dict()), "state_dict keys unchanged"
    assert [r.name for r in report.replaced] == [str(i) for i in range(0, 16, 2)]
    assert [r.fused for r in report.replaced] == [str(i) for i in range(1, 15, 2)] + [None]
    assert report.skipped == []
    assert "gelu_tanh" in str(report) and "leaky_relu(negative_slope=0.2)" in str(report)
    assert model[0].weight.device.type == DEVICE.type, "the device is kept"
    assert_same(model, original, [torch.randn(3, 6, dtype=torch.float64, device=DEVICE)], "fused nn.Sequential")


def test_keeps_parameters_device_dtype_requires_grad_and_optimizer():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3, bias=False)).double()
    model[0].bias.requires_grad_(False)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # built before the conversion
    manualbp.convert(model, backend="reference")
    assert list(model.parameters()) == parameters and all(
        a is b for a, b in zip(model.parameters(), parameters)), "the very same Parameter objects"
    assert model[0].weight.dtype == torch.float64 and model[0].weight.device.type == "cpu"
    assert model[0].bias.requires_grad is False and model[0].weight.requires_grad is True
    assert model[2].bias is None
    assert model[0].backend == "reference"
    before = model[2].weight.detach().clone()
    model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    assert model[0].bias.grad is None, "requires_grad=False is kept"
    optimizer.step()
    assert not torch.equal(model[2].weight, before), "the optimizer built before convert() updates the new layers"


def test_not_fused_outside_sequential_with_hooks_or_when_shared():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()  # an attribute, not a Sequential slot: the order of calls is in forward

        def forward(self, x):
            return self.fc(self.act(x))  # the activation first: no Linear + activation pattern (the probe says so)

    shared = nn.Linear(4, 4)
    hooked = nn.Linear(4, 4)
    seen = []
    hooked.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    act_with_hook = nn.Tanh()
    act_with_hook.register_forward_pre_hook(lambda module, args: None)
    torch.manual_seed(2)
    model = nn.Sequential(Block(), shared, nn.ReLU(), shared, nn.GELU(), hooked, nn.SiLU(), nn.Linear(4, 4),
                          act_with_hook).double()
    original = copy.deepcopy(model)
    _, report = manualbp.convert(model, backend="reference", return_report=True)
    assert type(model[0].fc) is manualbp.Linear and model[0].fc.activation.name == "identity"
    assert type(model[0].act) is nn.ReLU
    assert model[1] is model[3] and model[1].activation.name == "identity", "a shared Linear is converted once, unfused"
    assert [type(model[i]) for i in (2, 4, 6, 8)] == [nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh], "nothing was fused"
    assert model[5].activation.name == "identity"
    assert [r.fused for r in report.replaced] == [None] * 4
    assert [s.name for s in report.skipped] == ["0"], "the block is listed as matching no pattern"
    assert "computes something else than the pattern" in report.skipped[0].reason, report.skipped[0].reason
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_same(model, original, [x], "unfused model")
    # The hook (deep-copied with the model) ran in both: on the converted Linear it sees the same output.
    assert len(seen) == 2, f"the forward hook ran {len(seen)} times, expected once per model"
    torch.testing.assert_close(seen[0], seen[1], rtol=RTOL, atol=ATOL, msg=lambda m: f"hooked output\n{m}")


def test_subclasses_left_alone_unless_asked():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, Scaled(8, 8), nn.ReLU()).double()
    original = copy.deepcopy(model)
    _, report = manualbp.convert(model, backend="reference", return_report=True)
    assert type(layer.linear1) is manualbp.Linear and type(layer.linear2) is manualbp.Linear
    out_proj = layer.self_attn.out_proj
    assert type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear, "MHA's out_proj is a subclass"
    assert type(model[1]) is Scaled and type(model[2]) is nn.ReLU, "a subclass is neither converted nor fused"
    assert {s.name for s in report.skipped} == {"0.self_attn.out_proj", "1"}
    assert all("include_subclasses" in s.reason for s in report.skipped)
    assert_same(model, original, [torch.randn(2, 5, 8, dtype=torch.float64)], "TransformerEncoderLayer + subclass")

    # Asked for: a tuple of classes, or all subclasses.
    model = copy.deepcopy(original)
    _, report = manualbp.convert(model, include_subclasses=(Scaled,), return_report=True)
    assert type(model[1]) is manualbp.Linear and model[1].activation.name == "relu"
    assert [s.name for s in report.skipped] == ["0.self_attn.out_proj"]
    model = copy.deepcopy(original)
    manualbp.convert(model, include_subclasses=True)
    assert type(model[0].self_attn.out_proj) is manualbp.Linear


def test_inplace_false_root_linear_and_bad_arguments():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    converted = manualbp.convert(model, inplace=False)
    assert converted is not model and type(model[0]) is nn.Linear and type(model[1]) is nn.Tanh, "original untouched"
    assert type(converted[0]) is manualbp.Linear and converted[0].weight is not model[0].weight

    linear = nn.Linear(3, 2)
    same, report = manualbp.convert(linear, return_report=True)
    assert same is linear and type(linear) is manualbp.Linear, "an nn.Linear model is converted itself"
    assert [r.name for r in report.replaced] == [""]

    again, report = manualbp.convert(converted, return_report=True)
    assert report.replaced == [] and report.skipped == [], "converting twice changes nothing"

    with pytest.raises(TypeError, match="expects an nn.Module"):
        manualbp.convert(lambda x: x)
    with pytest.raises(ValueError, match="unknown backend"):
        manualbp.convert(nn.Linear(2, 2), backend="gpu")
    with pytest.raises(TypeError, match="include_subclasses"):
        manualbp.convert(nn.Linear(2, 2), include_subclasses=(nn.ReLU,))


def test_third_party_transformers_model_float64():
    transformers = optional_import("transformers", "transformers is a test dependency (pip install .[test])")
    require_triton()
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(5)
    original = transformers.BertForMaskedLM(config).double().to(DEVICE)  # random weights from the config: no download
    count = sum(type(m) is nn.Linear for m in original.modules())
    model = copy.deepcopy(original)
    _, report = manualbp.convert(model, return_report=True)
    assert len(report.replaced) == count and count >= 14, f"replaced {len(report.replaced)} of {count} nn.Linear"
    assert not any(type(m) is nn.Linear for m in model.modules())
    # BERT ties its output projection to the word embeddings; the tie survives.
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    input_ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert_same(model, original, [], "BertForMaskedLM", kwargs=dict(input_ids=input_ids))
