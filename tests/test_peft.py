"""peft LoRA on manualbp.Linear (manualbp.peft): the update goes inside the activation, merged or not."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import manualbp
from manualbp import backends
from checks import optional_import
from test_convert import DEVICE

peft = optional_import("peft", "peft is a test dependency (pip install .[test])", module_level=True)
mpeft = optional_import("manualbp.peft", "manualbp.peft needs peft", module_level=True)

RTOL, ATOL = 1e-10, 1e-10  # float64


def require_backend(backend: str) -> None:
    if backend == "triton":
        reason = backends.triton_unavailable_reason(DEVICE, torch.float64)
        if reason is not None:
            pytest.skip(f"triton backend unavailable: {reason}")


def close(actual, expected, label):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{label}\n{m}")


def lora_model(activation="gelu", backend="reference", dropout=0.0, bias=True, **config):
    """A two-layer model whose first manualbp.Linear has ``activation``, with LoRA on it (non-zero A and B)."""
    torch.manual_seed(10)
    model = nn.Sequential(
        manualbp.Linear(6, 5, bias=bias, activation=activation, dtype=torch.float64, device=DEVICE, backend=backend),
        manualbp.Linear(5, 3, dtype=torch.float64, device=DEVICE, backend=backend),
    )
    config = peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=["0"],
                             init_lora_weights=False, **config)  # False: B is random too, not zero
    return mpeft.get_peft_model(model, config)


def formula(layer, x, dropped=None):
    """f(x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ) in plain PyTorch, with its own autograd."""
    base = layer.base_layer
    weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    z = x @ base.weight.T + (base.bias if base.bias is not None else 0)
    z = z + layer.scaling["default"] * ((x if dropped is None else dropped) @ weight_a.T @ weight_b.T)
    return manualbp.get_activation(base.activation).f(z)


def grads(output, tensors):
    torch.manual_seed(11)
    return torch.autograd.grad(output, tensors, torch.randn_like(output))


# The triton backend (through the interpreter on the CPU: slow) runs gelu and identity only.
@pytest.mark.parametrize("activation, backend", [("gelu", "reference"), ("relu", "reference"), ("tanh", "reference"),
                                                 ("identity", "reference"), ("gelu", "triton"), ("identity", "triton")])
def test_unmerged_merged_and_formula_agree(activation, backend):
    require_backend(backend)
    model = lora_model(activation, backend)
    layer = model.base_model.model[0]
    assert type(layer) is mpeft.LoraLinear, f"LoRA layer: {type(layer)}"
    weight_a, weight_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert weight_b.abs().min() > 0 and weight_a.abs().min() > 0, "non-zero LoRA weights"
    x = torch.randn(2, 4, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)  # 3-D input

    expected = formula(layer, x)
    unmerged = layer(x)
    close(unmerged, expected, f"{activation}/{backend}: unmerged vs formula")
    tensors = (x, weight_a, weight_b)
    for name, ours, theirs in zip(("dx", "dA", "dB"), grads(unmerged, tensors), grads(expected, tensors)):
        close(ours, theirs, f"{activation}/{backend}: {name} unmerged vs formula")

    with torch.no_grad():
        weight_before = layer.base_layer.weight.clone()
    model.merge_adapter()
    assert layer.merged
    close(layer(x), expected, f"{activation}/{backend}: merged vs formula")
    model.unmerge_adapter()
    close(layer.base_layer.weight, weight_before, f"{activation}/{backend}: unmerge restores W")
    with model.disable_adapter():
        close(layer(x), layer.base_layer(x), f"{activation}/{backend}: disabled adapter is the base layer")

    merged = model.merge_and_unload()
    assert type(merged[0]) is manualbp.Linear and merged[0].activation.name == activation
    close(merged[0](x), expected, f"{activation}/{backend}: merge_and_unload vs formula")


def test_plain_peft_adds_after_the_activation_and_check_says_so():
    """The bug this module exists for: peft's own nn.Linear LoRA layer on an activated manualbp.Linear."""
    model = lora_model("gelu")
    layer = model.base_model.model[0]
    x = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
    wrong = layer.base_layer(x) + layer.scaling["default"] * layer.lora_B["default"](layer.lora_A["default"](x))
    assert (wrong - formula(layer, x)).abs().max() > 1e-3, "the two formulas differ on this data"

    plain = nn.Sequential(manualbp.Linear(6, 5, activation="gelu", dtype=torch.float64))
    plain = peft.get_peft_model(plain, peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(RuntimeError, match=r"f\(x Wᵀ \+ b \+ s x Aᵀ Bᵀ\).*manualbp.peft.register"):
        mpeft.check(plain)
    identity = peft.get_peft_model(nn.Sequential(manualbp.Linear(6, 5)), peft.LoraConfig(r=2, target_modules=["0"]))
    assert mpeft.check(identity) is identity, "with activation identity peft's own layer is right"
    with pytest.raises(RuntimeError, match="manualbp.revert"):
        mpeft.get_peft_model(nn.Sequential(manualbp.Linear(6, 5, activation="relu")),
                             peft.IA3Config(target_modules=["0"], feedforward_modules=[]))


@pytest.mark.parametrize("activation", ["gelu", "identity"])
def test_plain_peft_lora_raises_when_it_would_add_after_the_activation(activation):
    """peft.get_peft_model without manualbp.peft: the forward raises instead of computing f(x Wᵀ + b) + s x Aᵀ Bᵀ;
    with the adapter merged or disabled peft calls only the layer, which is then right."""
    torch.manual_seed(3)
    model = nn.Sequential(manualbp.Linear(6, 5, activation=activation, dtype=torch.float64, device=DEVICE))
    plain = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["0"],
                                                                        init_lora_weights=False))
    x = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
    layer = plain.base_model.model[0]
    if activation == "identity":
        close(plain(x), formula(layer, x), "identity: peft's own layer is right")
    else:
        _raises_then_right_merged_or_disabled(plain, model, layer, x)


def _raises_then_right_merged_or_disabled(plain, model, layer, x):
    with pytest.raises(RuntimeError, match=r"f\(x Wᵀ \+ b \+ s x Aᵀ Bᵀ\).*manualbp.peft.register"):
        plain(x)
    with plain.disable_adapter():
        close(plain(x), model(x), "adapter disabled: the base layer alone")
    expected = formula(layer, x)
    layer.merge()
    close(plain(x), expected, "merged: f(x (W + s B A)ᵀ + b)")


def test_dropout_goes_inside_the_activation():
    model = lora_model("silu", dropout=0.5)
    layer = model.base_model.model[0]
    x = torch.randn(8, 6, dtype=torch.float64, device=DEVICE)
    torch.manual_seed(12)
    out = layer(x)
    torch.manual_seed(12)
    dropped = torch.nn.functional.dropout(x, 0.5, training=True)  # the mask peft's nn.Dropout drew
    close(out, formula(layer, x, dropped), "train mode: dropout on the LoRA input only")
    model.eval()
    expected = formula(layer, x)
    close(layer(x), expected, "eval mode: no dropout")
    model.merge_adapter()
    close(layer(x), expected, "eval mode, merged")


def test_unsupported_features_raise():
    with pytest.raises(NotImplementedError, match="DoraLinearVariant.*activation 'gelu'.*manualbp.revert"):
        lora_model("gelu", use_dora=True)
    model = lora_model("gelu")
    x = torch.randn(2, 6, dtype=torch.float64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="adapter_names"):
        model.base_model.model[0](x, adapter_names=["default", "default"])
    handle = model.base_model.model[0].base_layer.register_forward_hook(lambda module, args, output: None)
    with pytest.raises(NotImplementedError, match="has hooks"):
        model(x)
    handle.remove()

    # With activation identity peft's own code is right, DoRA included: the same model as on a plain nn.Linear.
    torch.manual_seed(13)
    plain = nn.Sequential(nn.Linear(6, 5)).double().to(DEVICE)
    converted = manualbp.convert(copy.deepcopy(plain), backend="reference")
    outputs = []
    for model in (plain, converted):
        torch.manual_seed(14)
        config = peft.LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False)
        model = mpeft.get_peft_model(model, config)
        outputs.append(model(x))
    close(outputs[1], outputs[0], "DoRA on manualbp.Linear(identity) vs on nn.Linear")

    torchao = optional_import("torchao.quantization", "torchao is not installed")
    quantized = nn.Sequential(manualbp.Linear(6, 5, activation="gelu"))
    torchao.quantize_(quantized, torchao.Int8WeightOnlyConfig())
    with pytest.raises(NotImplementedError, match="torchao-quantized"):
        mpeft.get_peft_model(quantized, peft.LoraConfig(r=2, target_modules=["0"]))


def test_training_changes_only_lora_parameters():
    model = lora_model("gelu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable), f"trainable: {sorted(trainable)}"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(15)
    for _ in range(3):
        x = torch.randn(8, 6, dtype=torch.float64, generator=generator).to(DEVICE)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name}: a LoRA parameter was not trained"
        else:
            assert torch.equal(p, before[name]), f"{name}: a frozen parameter changed"
            assert p.grad is None, f"{name}: a frozen parameter got a gradient"


def test_converted_transformers_model_fine_tuned_with_lora():
    """CTRL (its feed-forward ReLU fused by convert) fine-tuned with LoRA: the same losses as peft on the original."""
    transformers = optional_import("transformers", "transformers is a test dependency (pip install .[test])")
    config = transformers.CTRLConfig(vocab_size=40, n_positions=12, n_embd=16, dff=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(16)
    original = transformers.CTRLLMHeadModel(config).double()
    converted, report = manualbp.convert(copy.deepcopy(original), backend="reference", return_report=True)
    assert sum(r.fused is not None for r in report.replaced) == 2, "the feed-forward ReLUs are fused"
    targets = ["ffn.0", "ffn.2", "Wq", "dense"]

    def lora(model, wrap):
        lora_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        return wrap(model, lora_config)

    original = lora(original, peft.get_peft_model)
    converted = lora(converted, mpeft.get_peft_model)
    lora_layers = [m for m in converted.modules() if isinstance(m, mpeft.LoraLinear)]
    assert len(lora_layers) == 8 and sum(m.base_layer.activation.name == "relu" for m in lora_layers) == 2
    adapters = {name: p for name, p in original.named_parameters() if p.requires_grad}
    converted.load_state_dict(original.state_dict())  # the same random LoRA weights in both
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (original, converted)]
    generator = torch.Generator().manual_seed(17)
    for step in range(3):
        ids = torch.randint(0, config.vocab_size, (2, 12), generator=generator)
        losses = []
        for model, optimizer in zip((original, converted), optimizers):
            logits = model(input_ids=ids).logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss)
        close(losses[1], losses[0], f"step {step}: loss of the converted model vs the original")
    for name, p in converted.named_parameters():
        if name in adapters:
            close(p, adapters[name], f"{name} after training")
    merged = converted.merge_and_unload()
    assert sum(isinstance(m, manualbp.Linear) and m.activation.name == "relu" for m in merged.modules()) == 2
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=generator)
    close(merged(input_ids=ids).logits, original(input_ids=ids).logits, "merged converted model vs unmerged original")


def test_saved_adapter_loads_with_manualbp_layer(tmp_path):
    model = lora_model("gelu")
    x = torch.randn(4, 6, dtype=torch.float64, device=DEVICE)
    expected = model(x).detach()
    model.save_pretrained(tmp_path)

    def fresh():
        torch.manual_seed(10)  # lora_model's base weights
        return nn.Sequential(
            manualbp.Linear(6, 5, activation="gelu", dtype=torch.float64, device=DEVICE, backend="reference"),
            manualbp.Linear(5, 3, dtype=torch.float64, device=DEVICE, backend="reference"))

    loaded = mpeft.from_pretrained(fresh(), tmp_path)
    assert type(loaded.base_model.model[0]) is mpeft.LoraLinear
    close(loaded(x), expected, "adapter saved and loaded through manualbp.peft.from_pretrained")
    with pytest.raises(RuntimeError, match="manualbp.peft"):
        mpeft.check(peft.PeftModel.from_pretrained(fresh(), tmp_path))  # peft's own loader: its nn.Linear layer
