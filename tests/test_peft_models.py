"""peft LoRA on the blocks convert() fuses in real models (manualbp.peft beside manualbp/patterns.py): on a
fused Linear or Conv1D the update goes inside the activation, on a gated block inside the gating; the
converted model with adapters computes what peft computes on the original model, merged or not."""

from __future__ import annotations

import copy

import pytest
import torch

import manualbp
from checks import optional_import
from test_convert_models import build, inputs, output

peft = optional_import("peft", "peft is a test dependency (pip install .[test])", module_level=True)
mpeft = optional_import("manualbp.peft", "manualbp.peft needs peft", module_level=True)

RTOL, ATOL = 1e-10, 1e-12  # float64: the same products, the activation's formula rounded differently at most

# model: (LoRA targets, the adapted module whose type is checked, what it wraps)
TARGETS = {
    "bert": (["dense"], "bert.encoder.layer.0.intermediate.dense", "Linear"),
    "gpt2": (["c_fc", "c_proj"], "transformer.h.0.mlp.c_fc", "Conv1D"),
    "llama": (["gate_proj", "up_proj", "down_proj"], "model.layers.0.mlp.gate_proj", "Linear"),
    "phi3": (["gate_up_proj", "down_proj"], "model.layers.0.mlp.gate_up_proj", "Linear"),
    "t5-gated": (["wi_0", "wi_1", "wo"], "encoder.block.0.layer.1.DenseReluDense.wi_0", "Linear"),
}


def adapted(model, targets, convert: bool):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    if not convert:
        return peft.get_peft_model(model, config)
    manualbp.convert(model, backend="reference")
    return mpeft.get_peft_model(model, config)


def outputs_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = output(model, batch)
    out.backward(out.detach() / out.numel())
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", TARGETS)
def test_lora_stays_inside_the_activation_and_the_gating(name):
    targets, adapted_name, wrapped = TARGETS[name]
    original = build(name, torch.float64)
    theirs = adapted(copy.deepcopy(original), targets, convert=False)
    ours = adapted(copy.deepcopy(original), targets, convert=True)
    lora = {key: p for key, p in theirs.named_parameters() if "lora_" in key}
    assert lora, f"{name}: peft added adapters"
    with torch.no_grad():  # the same random A and B in both (B non-zero: init_lora_weights=False)
        for key, p in ours.named_parameters():
            if "lora_" in key:
                p.copy_(lora[key])
    layer = ours.base_model.model.get_submodule(adapted_name)
    assert type(layer) in (mpeft.LoraLinear, peft.tuners.lora.Linear), f"{name}: {type(layer)}"
    assert type(layer.get_base_layer()).__name__ == wrapped, f"{name}: the adapter wraps the converted {wrapped}"
    if wrapped == "Conv1D":
        assert type(layer) is mpeft.LoraLinear and layer.fan_in_fan_out, "a Conv1D's LoRA: fan_in_fan_out"
    batch = inputs(name, torch.float64)
    out, grads = outputs_and_grads(ours, batch)
    out_ref, grads_ref = outputs_and_grads(theirs, batch)
    torch.testing.assert_close(out, out_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: output\n{m}")
    assert set(grads) == set(grads_ref) and all("lora_" in key for key in grads), f"{name}: only adapters train"
    for key, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[key], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{name}: gradient of {key}\n{m}")
    ours.merge_adapter()
    with torch.no_grad():
        merged = output(ours, batch)
    torch.testing.assert_close(merged, out_ref, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: merged\n{m}")
    ours.unmerge_adapter()


def test_peft_own_lora_on_a_fused_conv1d_raises():
    model = build("gpt2", torch.float64)
    manualbp.convert(model, backend="reference")
    config = peft.LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False)
    plain = peft.get_peft_model(model, config)  # peft's own layer would add its update after f
    with pytest.raises(RuntimeError, match="peft adapter layers wrap manualbp"):
        mpeft.check(plain)
    with pytest.raises(RuntimeError, match="peft adapter layers wrap manualbp"):
        output(plain, inputs("gpt2", torch.float64))
