"""manualbp.revert: the inverse of convert, back to plain PyTorch modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import manualbp
from checks import optional_import
from test_convert import all_activations_sequential


def plain_types(model: nn.Module):
    """(qualified name, class, activation options) of every module: the structure to compare."""
    return [(name, type(m), getattr(m, "negative_slope", None), getattr(m, "approximate", None))
            for name, m in model.named_modules()]


def assert_no_manualbp(model: nn.Module, label: str) -> None:
    left = [name for name, m in model.named_modules() if isinstance(m, (manualbp.Linear, manualbp.MLP))]
    assert not left, f"{label}: manualbp modules left: {left}"


def assert_bitwise(model, original, inputs, label, kwargs=None):
    """Outputs and every parameter's gradient bitwise equal (both models are plain PyTorch)."""
    results = []
    for m in (model, original):
        m.zero_grad(set_to_none=True)
        out = m(*inputs, **(kwargs or {}))
        out = out if isinstance(out, torch.Tensor) else out.logits
        out.backward(torch.ones_like(out) / out.numel())
        results.append((out.detach(), {name: p.grad for name, p in m.named_parameters()}))
    (out, grads), (out_ref, grads_ref) = results
    assert torch.equal(out, out_ref), f"{label}: output differs by {(out - out_ref).abs().max():.3e}"
    assert set(grads) == set(grads_ref), f"{label}: parameter names"
    for name, grad in grads.items():
        kind = "dw" if name.endswith("weight") else "db" if name.endswith("bias") else "d"
        assert (grad is None) == (grads_ref[name] is None), f"{label}: {kind} of {name}: gradient present in one only"
        assert grad is None or torch.equal(grad, grads_ref[name]), f"{label}: {kind} of {name} differs"


def test_round_trip_sequential_with_every_activation():
    original = all_activations_sequential()
    converted = manualbp.convert(copy.deepcopy(original), backend="reference")
    parameters = list(converted.parameters())
    x = torch.randn(5, 6, dtype=torch.float64)
    manualbp_out = converted(x).detach()
    model, report = manualbp.revert(converted, return_report=True)
    assert model is converted, "inplace=True returns the model itself"
    assert plain_types(model) == plain_types(original), "the original classes, slots and activation options"
    assert list(model.state_dict()) == list(original.state_dict()), "state_dict keys"
    assert all(a is b for a, b in zip(model.parameters(), parameters)), "the very same Parameter objects"
    assert not hasattr(model[0], "activation") and not hasattr(model[0], "backend"), "manualbp attributes removed"
    assert [r.name for r in report.reverted] == [str(i) for i in range(0, 16, 2)]
    assert [r.restored for r in report.reverted] == [str(i) for i in range(1, 15, 2)] + [None]
    assert report.skipped == [] and "leaky_relu(negative_slope=0.2)" in str(report)
    assert_bitwise(model, original, [x], "revert(convert(sequential))")
    # The reference backend computes what the plain modules compute, bit for bit, on this 2-D input.
    assert torch.equal(model(x), manualbp_out), "output of the converted model (reference) vs the reverted one"


@pytest.mark.parametrize("name", ["bert", "ctrl"])
def test_round_trip_transformers_model(name):
    transformers = optional_import("transformers", "transformers is a test dependency (pip install .[test])")
    torch.manual_seed(5)
    if name == "bert":
        config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        original = transformers.BertForMaskedLM(config)
        tied = ("cls.predictions.decoder", "bert.embeddings.word_embeddings")
    else:  # CTRL's feed-forward blocks are nn.Sequential(Linear, ReLU, Linear): convert fuses the ReLU
        config = transformers.CTRLConfig(vocab_size=40, n_positions=16, n_embd=16, dff=32, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        original = transformers.CTRLLMHeadModel(config)
        tied = ("lm_head", "transformer.w")
    original = original.double().eval()
    model, converted = manualbp.convert(copy.deepcopy(original), backend="reference", return_report=True)
    fused = sum(r.fused is not None for r in converted.replaced)
    # CTRL: its two nn.Sequential ReLUs; BERT: by module pattern, two BertIntermediate GELUs and the MLM head's
    assert fused == (2 if name == "ctrl" else 3), f"fused activations: {fused}"
    model, report = manualbp.revert(model, return_report=True)
    assert_no_manualbp(model, name)
    assert plain_types(model) == plain_types(original), f"{name}: structure"
    assert list(model.state_dict()) == list(original.state_dict()), f"{name}: state_dict keys"
    assert len(report.reverted) == len(converted.replaced), f"{name}: every converted layer reverted"
    assert sum(r.restored is not None for r in report.reverted) == fused, f"{name}: activation slots refilled"
    head, embedding = (model.get_submodule(n) for n in tied)
    assert head.weight is embedding.weight, f"{name}: the weight tie survives"
    input_ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    assert_bitwise(model, original, [], name, kwargs=dict(input_ids=input_ids))


def test_mlp_becomes_its_to_sequential():
    torch.manual_seed(6)
    mlp = manualbp.MLP([5, 7, 6, 3], activation=manualbp.get_activation("leaky_relu", negative_slope=0.3),
                       last_activation="tanh", dtype=torch.float64, backend="reference")
    mlp.layers[1].bias.requires_grad_(False)
    mlp.eval()
    expected = mlp.to_sequential()
    parameters = list(mlp.parameters())
    model = nn.Sequential(nn.Linear(4, 5, dtype=torch.float64), mlp)
    model, report = manualbp.revert(model, return_report=True)
    sequential = model[1]
    assert plain_types(sequential) == plain_types(expected), "the layout of MLP.to_sequential()"
    assert list(sequential.state_dict()) == list(expected.state_dict()), "state_dict keys"
    for key, value in expected.state_dict().items():
        assert torch.equal(sequential.state_dict()[key], value), f"state_dict[{key!r}]"
    assert all(a is b for a, b in zip(sequential.parameters(), parameters)), "the MLP's own Parameters"
    assert [p.requires_grad for p in sequential.parameters()] == [p.requires_grad for p in expected.parameters()]
    assert not sequential.training and not any(m.training for m in sequential.modules()), "eval mode kept"
    assert [(r.name, r.kind) for r in report.reverted] == [("1", "MLP")]
    x = torch.randn(3, 5, dtype=torch.float64)
    assert_bitwise(sequential, expected, [x], "revert(MLP) vs MLP.to_sequential()")

    # An MLP that is the model itself, with a hidden identity (kept as nn.Identity) and a last one (left out).
    mlp = manualbp.MLP([4, 4, 2], activation="identity", dtype=torch.float64)
    expected = mlp.to_sequential()
    reverted = manualbp.revert(mlp)
    assert plain_types(reverted) == plain_types(expected) and [type(m) for m in reverted] == [nn.Linear, nn.Identity,
                                                                                               nn.Linear]


def test_hand_built_activated_linear_is_wrapped_and_shared_stays_shared():
    torch.manual_seed(7)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = manualbp.Linear(4, 4, activation="gelu_tanh", dtype=torch.float64, backend="reference")

        def forward(self, x):
            return self.fc(x)

    shared = manualbp.Linear(4, 4, activation="silu", dtype=torch.float64, backend="reference")
    model = nn.Sequential(Block(), shared, nn.Identity(), shared, manualbp.Linear(4, 3, dtype=torch.float64))
    x = torch.randn(2, 4, dtype=torch.float64)
    before = model(x).detach()
    model, report = manualbp.revert(model, return_report=True)
    assert_no_manualbp(model, "hand-built")
    fc = model[0].fc
    assert type(fc) is nn.Sequential and type(fc[0]) is nn.Linear and type(fc[1]) is nn.GELU
    assert fc[1].approximate == "tanh"
    assert "0.fc.weight" not in model.state_dict() and "0.fc.0.weight" in model.state_dict(), "keys gain .0"
    assert model[1] is model[3] and type(model[1]) is nn.Sequential, "a shared layer stays one module"
    assert type(model[2]) is nn.Identity, "an nn.Identity after a shared layer is not filled (it runs twice)"
    assert type(model[4]) is nn.Linear, "identity: a plain nn.Linear, nothing added"
    assert [r.wrapped for r in report.reverted] == [True, True, False]
    assert "keys now 0.fc.0.*" in str(report)
    torch.testing.assert_close(model(x), before, rtol=1e-12, atol=1e-14, msg=lambda m: f"output\n{m}")

    root = manualbp.revert(manualbp.Linear(3, 2, activation="relu"))
    assert type(root) is nn.Sequential and [type(m) for m in root] == [nn.Linear, nn.ReLU], "a root layer"


def test_copies_subclasses_skips_and_bad_arguments():
    torch.manual_seed(8)
    model = manualbp.convert(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), backend="reference")
    copied = manualbp.revert(model, inplace=False)
    assert type(model[0]) is manualbp.Linear, "inplace=False leaves the model alone"
    assert type(copied[1]) is nn.Tanh and copied[0].weight is not model[0].weight
    assert torch.equal(copied[0].weight, model[0].weight), "copied values"
    shared = manualbp.revert(model, inplace=False, share_parameters=True)
    assert shared is not model and shared[0].weight is model[0].weight, "share_parameters=True: the same Parameters"
    with pytest.raises(ValueError, match="inplace=False"):
        manualbp.revert(model, share_parameters=False)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        manualbp.revert("model")

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    original = nn.Sequential(Scaled(3, 3), nn.ReLU()).double()
    model = manualbp.convert(copy.deepcopy(original), include_subclasses=True)
    model = manualbp.revert(model)
    assert plain_types(model) == plain_types(original), "a converted subclass gets its own class back"
    assert_bitwise(model, original, [torch.randn(2, 3, dtype=torch.float64)], "subclass round trip")

    class Custom(manualbp.Linear):
        pass

    hooked = manualbp.Linear(3, 3, activation="relu")
    hooked.register_forward_hook(lambda module, args, output: None)
    mlp = manualbp.MLP([3, 3, 3])
    mlp.layers[0].register_forward_pre_hook(lambda module, args: None)
    model = nn.Sequential(Custom(3, 3), hooked, nn.Identity(), mlp)
    model, report = manualbp.revert(model, return_report=True)
    assert type(model[0]) is Custom and type(model[1]) is manualbp.Linear and model[3] is mlp, "left alone"
    assert [s.name for s in report.skipped] == ["0", "1", "3"]
    assert "whose forward may differ" in report.skipped[0].reason and "hooks" in report.skipped[1].reason
    assert "MLP.forward never runs" in report.skipped[2].reason
