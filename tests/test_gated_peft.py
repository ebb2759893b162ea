"""peft LoRA on manualbp.GatedMLP: adapters on gate_proj, up_proj and down_proj act inside the gating.

LoRA on gate_proj must give f(x W_gᵀ + s x A_gᵀ B_gᵀ) ⊙ (...), the update before f, as it does on transformers'
LlamaMLP. GatedMLP calls a wrapped projection as a module (peft's own LoRA layer: right for identity, which
gate_proj, up_proj and down_proj have), so the update lands where it does in the Llama MLP; the numbers are
compared with LoRA on the Llama-style nn.Linear MLP, unmerged and merged.
"""

from __future__ import annotations

import pytest
import torch

import manualbp
from checks import optional_import
from test_gated import DEVICE, LlamaStyleMLP, require

peft = optional_import("peft", "peft is a test dependency (pip install .[test])", module_level=True)
mpeft = optional_import("manualbp.peft", "manualbp.peft needs peft", module_level=True)

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def adapted(model, seed=5):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)  # B random too
    torch.manual_seed(seed)  # the same adapter weights for both models (the same modules, in the same order)
    return mpeft.get_peft_model(model, config)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_lora_on_gate_up_down_matches_the_llama_mlp(activation, backend):
    require(backend)
    torch.manual_seed(0)
    ours = manualbp.GatedMLP(6, 10, activation, dtype=torch.float64, device=DEVICE, backend=backend)
    theirs = LlamaStyleMLP(6, 10, activation, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = adapted(ours), adapted(theirs)
    x = torch.randn(3, 4, 6, dtype=torch.float64, device=DEVICE)
    names = [name for name, p in theirs.named_parameters() if p.requires_grad]
    assert len(names) == 6 and all("lora_" in name for name in names), f"trainable: {names}"
    results = []
    for model in (ours, theirs):
        out = model(x)
        trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        assert sorted(trainable) == sorted(names), f"trainable parameters {sorted(trainable)}"
        results.append([out] + list(torch.autograd.grad(out.square().sum(), [trainable[n] for n in names])))
    for label, o, t in zip(["output"] + names, *results):
        torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-10, msg=lambda m: f"{label} [{activation}]: {m}")
    for model in (ours, theirs):
        model.merge_adapter()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10, msg=lambda m: f"merged: {m}")
    torch.testing.assert_close(ours(x), results[1][0], rtol=1e-10, atol=1e-10,
                               msg=lambda m: f"merged vs unmerged: {m}")


def test_merged_adapters_run_the_fused_gating():
    """Merged (merge_and_unload), the projections are plain manualbp.Linear again: one gated node."""
    from checks import operator_calls

    model = adapted(manualbp.GatedMLP(6, 10, dtype=torch.float64, backend="reference")).merge_and_unload()
    assert type(model.gate_proj) is manualbp.Linear, f"merged gate_proj is {type(model.gate_proj)}"
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    with operator_calls() as calls:
        model(x).sum().backward()
    assert "gated_backward" in [name for name, _ in calls], f"operators {[name for name, _ in calls]}"
