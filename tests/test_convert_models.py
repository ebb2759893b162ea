"""convert() inside real models: small transformers models built from their configs (random weights, no
download) and stand-ins for timm's Mlp/GluMlp. Every MLP activation is fused by a module pattern
(manualbp/patterns.py) and the report says so, block by block; the converted model's outputs and gradients
match the original's (float32: within twice PyTorch's own error against float64), three AdamW steps give the
same losses (float64), on both backends; revert() gives back the original modules; state_dict keys stay;
blocks left alone are listed with the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import manualbp
from manualbp import backends, patterns
from checks import assert_close_to_float64, optional_import

transformers = optional_import("transformers", "transformers is a test dependency (pip install .[test])")
transformers.logging.set_verbosity_error()

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VOCAB, LENGTH = 40, 5
SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
DECODER = dict(SMALL, vocab_size=VOCAB, intermediate_size=24, num_key_value_heads=1, max_position_embeddings=16)


# --------------------------------------------------------------------------------------
# Stand-ins for timm's Mlp and GluMlp (timm needs torchvision, which has no build for this
# torch here): the same children, names and forward order as timm.layers.mlp's classes.
# --------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """timm's Mlp, as its forward runs: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, features: int, hidden: int, act_layer=nn.GELU, norm_layer=None):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(0.0)
        self.norm = norm_layer(hidden) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class GluMlp(nn.Module):
    """timm's GluMlp: fc1 holds both halves; the gate is the second where gate_last (timm's default)."""

    def __init__(self, features: int, hidden: int, act_layer=nn.Sigmoid, gate_last=True, norm_layer=None):
        super().__init__()
        self.chunk_dim = -1
        self.gate_last = gate_last
        self.fc1 = nn.Linear(features, hidden)
        self.act = act_layer()
        self.drop1 = nn.Dropout(0.0)
        self.norm = norm_layer(hidden // 2) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden // 2, features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        x1, x2 = self.fc1(x).chunk(2, dim=self.chunk_dim)
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class TimmLike(nn.Module):
    """A small vision-transformer-like stack of timm MLP blocks with residuals and a head."""

    def __init__(self, gated: bool):
        super().__init__()
        self.blocks = nn.ModuleList([
            GluMlp(16, 32), GluMlp(16, 32, act_layer=nn.SiLU, gate_last=False, norm_layer=nn.LayerNorm),
        ] if gated else [Mlp(16, 32), Mlp(16, 32, act_layer=nn.SiLU, norm_layer=nn.LayerNorm)])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


# --------------------------------------------------------------------------------------
# The models: (builder, inputs(generator), {MLP block class: pattern})
# --------------------------------------------------------------------------------------


def _ids(generator):
    return {"input_ids": torch.randint(0, VOCAB, (2, LENGTH), generator=generator)}


def _t5_inputs(generator):
    return {**_ids(generator), "decoder_input_ids": torch.randint(0, VOCAB, (2, 3), generator=generator)}


def _t5(feed_forward_proj):
    return lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
        feed_forward_proj=feed_forward_proj, dropout_rate=0.0))


def _decoder(name, **extra):
    def build():
        config_class = getattr(transformers, f"{name}Config", None)
        model_class = getattr(transformers, f"{name}ForCausalLM", None)
        if config_class is None or model_class is None:
            pytest.skip(f"transformers {transformers.__version__} has no {name}ForCausalLM")
        return model_class(config_class(**DECODER, **extra))
    return build


LINEAR_ACT = "Linear + activation"
MODELS = {
    "bert": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **SMALL)), _ids,
        {"BertIntermediate": LINEAR_ACT, "BertPredictionHeadTransform": LINEAR_ACT}),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)), _ids, {"GPT2MLP": LINEAR_ACT}),
    "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **SMALL)),
        lambda generator: {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator)},
        {"ViTMLP": LINEAR_ACT, "ViTIntermediate": LINEAR_ACT}),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        word_embed_proj_dim=16, max_position_embeddings=16, dropout=0.0, attention_dropout=0.0)), _ids,
        {"OPTDecoderLayer": LINEAR_ACT}),  # fc1, activation_fn, fc2 beside the attention, in the layer itself
    "t5": (_t5("relu"), _t5_inputs, {"T5DenseActDense": LINEAR_ACT}),
    "t5-gated": (_t5("gated-gelu"), _t5_inputs, {"T5DenseGatedActDense": "T5 gated feed-forward"}),
    "llama": (_decoder("Llama"), _ids, {"LlamaMLP": "gated MLP"}),
    "mistral": (_decoder("Mistral"), _ids, {"MistralMLP": "gated MLP"}),
    "qwen2": (_decoder("Qwen2"), _ids, {"Qwen2MLP": "gated MLP"}),
    "qwen3": (_decoder("Qwen3", head_dim=8), _ids, {"Qwen3MLP": "gated MLP"}),
    "gemma": (_decoder("Gemma", head_dim=8), _ids, {"GemmaMLP": "gated MLP"}),
    "phi3": (_decoder("Phi3", pad_token_id=0), _ids, {"Phi3MLP": "fused gate_up"}),
    "timm-mlp": (lambda: TimmLike(gated=False), lambda generator: {"x": torch.randn(2, 3, 16, generator=generator)},
                 {"Mlp": LINEAR_ACT}),
    "timm-glu": (lambda: TimmLike(gated=True), lambda generator: {"x": torch.randn(2, 3, 16, generator=generator)},
                 {"GluMlp": "timm GluMlp"}),
}
# Mistral's and Qwen's MLPs are Llama's class under other names: the interpreted Triton runs (slow) take Llama's.
CASES = [(name, backend) for name in MODELS for backend in ("reference", "triton")
         if backend == "reference" or name not in ("mistral", "qwen2", "qwen3")]


def build(name: str, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name][0]().to(DEVICE, dtype).train()


def inputs(name: str, dtype, seed: int = 1) -> dict:
    batch = MODELS[name][1](torch.Generator().manual_seed(seed))
    return {k: v.to(DEVICE, dtype) if v.is_floating_point() else v.to(DEVICE) for k, v in batch.items()}


def output(model, batch) -> torch.Tensor:
    out = model(**batch)
    return out if isinstance(out, torch.Tensor) else out.logits


def require(backend: str, dtype=torch.float32) -> None:
    if backend == "triton":
        reason = backends.triton_unavailable_reason(DEVICE, dtype)
        if reason is not None:
            pytest.skip(f"triton backend unavailable: {reason}")


def convert(model, backend):
    converted = copy.deepcopy(model)
    return manualbp.convert(converted, backend=backend, return_report=True)


# --------------------------------------------------------------------------------------
# The report, block by block; structure and keys
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_every_mlp_activation_is_fused_and_reported(name):
    original = build(name)
    model, report = convert(original, "reference")
    expected = MODELS[name][2]
    blocks = [(path, type(m).__name__) for path, m in original.named_modules() if type(m).__name__ in expected]
    assert blocks, f"{name}: the model holds none of {sorted(expected)}"
    for path, kind in blocks:
        fusions = [r for r in report.replaced if r.pattern == expected[kind]
                   and (r.name == path or r.name.startswith(f"{path}."))]
        assert len(fusions) == 1, f"{name}: {path} ({kind}) fused once by {expected[kind]!r}:\n{report}"
        fusion = fusions[0]
        act = original.get_submodule(fusion.fused)
        assert manualbp.activations.from_model_module(act) is not None, f"{name}: {fusion.fused} is an activation"
        assert type(model.get_submodule(fusion.fused)) is patterns.Fused, f"{name}: {fusion.fused} holds Fused"
        assert fusion.activation != "identity", f"{name}: {path} fused with an activation"
    left = [path for path, m in model.named_modules() if patterns.activation_like(m)]
    assert left == [], f"{name}: activation modules not fused: {left}\n{report}"
    assert report.skipped == [], f"{name}: nothing left alone:\n{report}"
    assert not any(type(m) is nn.Linear or patterns.is_conv1d(m) for m in model.modules()), f"{name}: all converted"
    assert list(model.state_dict()) == list(original.state_dict()), f"{name}: state_dict keys unchanged"
    for (key, value), (key_ref, value_ref) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(value, value_ref) and value.shape == value_ref.shape, f"{name}: state_dict[{key!r}]"
    text = str(report)
    for path, kind in blocks:
        assert f"[pattern: {expected[kind]}]" in text and path in text, f"{name}: the report names {path}"


# --------------------------------------------------------------------------------------
# Outputs and gradients (float32 against float64), three AdamW steps (float64)
# --------------------------------------------------------------------------------------


def outputs_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = output(model, batch)
    out.backward(torch.ones_like(out) / out.numel() + out.detach() / out.numel())
    return out.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("name, backend", CASES)
def test_outputs_and_gradients_match_float32(name, backend):
    require(backend)
    original = build(name)
    exact = copy.deepcopy(original).double()
    model, _ = convert(original, backend)
    out, grads = outputs_and_grads(model, inputs(name, torch.float32))
    out_ref, grads_ref = outputs_and_grads(original, inputs(name, torch.float32))
    out_exact, grads_exact = outputs_and_grads(exact, inputs(name, torch.float64))
    assert_close_to_float64(f"{name} ({backend}): output", out, out_ref, out_exact)
    assert set(grads) == set(grads_exact), f"{name}: parameter names"
    for key, grad in grads.items():
        assert_close_to_float64(f"{name} ({backend}): gradient of {key}", grad, grads_ref[key], grads_exact[key])


@pytest.mark.parametrize("name, backend", CASES)
def test_three_adamw_steps_give_the_same_losses(name, backend):
    require(backend, torch.float64)
    original = build(name, torch.float64)
    model, _ = convert(original, backend)
    losses = []
    for m in (original, model):
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2)
        curve = []
        for step in range(3):
            out = output(m, inputs(name, torch.float64, seed=10 + step))
            loss = (out * out).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            curve.append(loss.item())
        losses.append(curve)
    for step, (ours, theirs) in enumerate(zip(*reversed(losses))):
        assert abs(ours - theirs) <= 1e-10 * max(1.0, abs(theirs)), (
            f"{name} ({backend}): step {step + 1} loss {ours!r} vs the original's {theirs!r}")
    assert losses[0][0] != losses[0][-1], f"{name}: the loss moved (the steps trained something)"


# --------------------------------------------------------------------------------------
# revert()
# --------------------------------------------------------------------------------------


def structure(model):
    return [(path, type(m)) for path, m in model.named_modules()]


@pytest.mark.parametrize("name", MODELS)
def test_revert_gives_back_the_original_modules(name):
    original = build(name).eval()
    model, converted = convert(original, "reference")
    activations = {path: m for path, m in model.named_modules() if type(m) is patterns.Fused}
    reverted, report = manualbp.revert(model, return_report=True)
    assert reverted is model and report.skipped == [], f"{name}: everything reverted:\n{report}"
    assert structure(reverted) == structure(original), f"{name}: the original classes in every slot"
    for path, marker in activations.items():
        assert reverted.get_submodule(path) is marker.original, f"{name}: {path} is the model's own module again"
    assert not any(hasattr(m, "activation") or "_manualbp_original_class" in m.__dict__
                   for m in reverted.modules()), f"{name}: manualbp attributes removed"
    assert list(reverted.state_dict()) == list(original.state_dict()), f"{name}: state_dict keys"
    batch = inputs(name, torch.float32)
    with torch.no_grad():
        assert torch.equal(output(reverted, batch), output(original, batch)), f"{name}: the same plain forward"
    again, report = manualbp.convert(reverted, backend="reference", return_report=True)
    assert [(r.name, r.pattern) for r in report.replaced] == [(r.name, r.pattern) for r in converted.replaced], (
        f"{name}: converting the reverted model fuses the same blocks")


# --------------------------------------------------------------------------------------
# What the check against the block's own forward refuses, and what is left alone
# --------------------------------------------------------------------------------------


class Gated(nn.Module):
    """A Llama MLP's children with a forward to choose."""

    def __init__(self, forward):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.act_fn = nn.SiLU()
        self._forward = forward

    def forward(self, x):
        return self._forward(self, x)


def test_the_probe_decides_which_fusion_the_forward_allows():
    torch.manual_seed(2)
    swapped = Gated(lambda m, x: m.down_proj(m.act_fn(m.up_proj(x)) * m.gate_proj(x)))  # the gate is up_proj
    twice = Gated(lambda m, x: m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x) + m.gate_proj(x)))
    hooked = Gated(lambda m, x: m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x)))
    hooked.gate_proj.register_forward_hook(lambda module, args, output: None)
    model = nn.ModuleList([swapped, twice, hooked]).double()
    original = copy.deepcopy(model)
    _, report = manualbp.convert(model, backend="reference", return_report=True)
    assert type(swapped) is Gated and swapped.up_proj.activation.name == "silu", (
        "not the gated pattern (its forward gates with up_proj); the activation fused into up_proj, as the probe found")
    assert type(swapped.act_fn) is patterns.Fused and swapped.act_fn.into == "up_proj"
    assert type(twice) is Gated and type(twice.act_fn) is nn.SiLU, "gate_proj's output is used twice: left alone"
    assert type(hooked) is Gated and type(hooked.act_fn) is nn.SiLU, "a hook on gate_proj would be bypassed"
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"1", "2"}, f"the blocks left alone are listed:\n{report}"
    assert "computes something else than the pattern" in reasons["1"], reasons["1"]
    assert "hooks" in reasons["2"], reasons["2"]
    x = torch.randn(3, 8, dtype=torch.float64)
    for index in range(3):
        torch.testing.assert_close(model[index](x), original[index](x), rtol=1e-12, atol=1e-14,
                                   msg=lambda m: f"block {index}: the same output\n{m}")


def test_a_shared_activation_module_is_fused_in_each_block_and_comes_back_shared():
    torch.manual_seed(6)
    act = nn.GELU(approximate="tanh")
    model = nn.ModuleList([Mlp(4, 8), Mlp(4, 8)]).double()
    model[0].act = model[1].act = act
    x = torch.randn(3, 4, dtype=torch.float64)
    before = [block(x) for block in model]
    _, report = manualbp.convert(model, backend="reference", return_report=True)
    assert [r.fused for r in report.replaced if r.fused] == ["0.act", "1.act"], str(report)
    assert all(block.fc1.activation.name == "gelu_tanh" for block in model)
    for block, expected in zip(model, before):
        torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-14, msg=lambda m: f"output\n{m}")
    manualbp.revert(model)
    assert model[0].act is act and model[1].act is act, "the one module, back in both slots"


def test_activations_outside_the_catalogue_are_listed():
    torch.manual_seed(3)
    original = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, intermediate_size=32, max_position_embeddings=16, hidden_act="quick_gelu", **SMALL))
    model, report = convert(original, "reference")
    skipped = {s.name: s.reason for s in report.skipped}
    assert set(skipped) == {"encoder.layer.0.intermediate", "encoder.layer.1.intermediate"}, str(report)
    assert all("QuickGELUActivation" in r and "not an activation in manualbp's catalogue" in r
               for r in skipped.values()), skipped
    assert model.pooler.dense.activation.name == "tanh", "BertPooler's dense + tanh fused (nn.Tanh)"
    assert type(model.encoder.layer[0].intermediate.dense) is manualbp.Linear, "converted, not fused"


@pytest.mark.parametrize("name, block, reason", [
    ("Bloom", "h.0.mlp", "gelu_impl (BloomGelu) is not an activation in manualbp's catalogue"),
    ("Mixtral", "layers.0.mlp.experts", "act_fn: no nn.Linear or transformers Conv1D child to fuse it into"),
])
def test_blocks_left_alone_are_listed_with_the_reason(name, block, reason):
    config_class, model_class = getattr(transformers, f"{name}Config", None), getattr(transformers, f"{name}Model", None)
    if config_class is None or model_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}Model")
    torch.manual_seed(7)
    config = config_class(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          n_layer=1, n_head=2, intermediate_size=32, num_key_value_heads=1, num_local_experts=2)
    model, report = convert(model_class(config), "reference")
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped.get(block) == reason, f"{name}: {block} listed as left alone, and why:\n{report}"


def test_conv1d_keeps_its_parameter_and_class_family():
    original = build("gpt2")
    model = copy.deepcopy(original)
    c_fc = model.transformer.h[0].mlp.c_fc
    weight = c_fc.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before convert
    manualbp.convert(model, backend="reference")
    assert c_fc.weight is weight and weight.shape == (16, 64), "the very Parameter, [nx, nf] as the model stores it"
    assert isinstance(c_fc, transformers.pytorch_utils.Conv1D), "still a Conv1D (peft sizes adapters by that)"
    assert c_fc.activation.name == "gelu_tanh"
    before = weight.detach().clone()
    output(model, inputs("gpt2", torch.float32)).sum().backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape, "the gradient in the Parameter's layout"
    optimizer.step()
    assert not torch.equal(weight, before), "the optimizer built before convert() trains the converted layer"


def test_t5_casts_before_wo_and_dropout_draws_the_same_mask():
    torch.manual_seed(4)
    config = transformers.T5Config(d_model=16, d_ff=24, num_heads=2, d_kv=8, feed_forward_proj="gated-gelu",
                                   dropout_rate=0.3)
    config.dense_act_fn = "gelu_pytorch_tanh"  # nn.functional.gelu's own tanh GELU: bitwise the catalogue's f
    original = transformers.models.t5.modeling_t5.T5DenseGatedActDense(config).train()
    original.wi_0.to(torch.bfloat16), original.wi_1.to(torch.bfloat16)  # wo kept in float32, as T5 loads it
    block = copy.deepcopy(original)
    same, report = manualbp.convert(block, backend="reference", return_report=True)
    assert same is block and type(block) is patterns.GatedBlock, f"a root block is converted itself:\n{report}"
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    results = []
    for model in (block, original):
        torch.manual_seed(5)
        results.append(model(x))
    assert results[0].dtype == results[1].dtype == torch.float32, "cast to wo's dtype before wo"
    assert torch.equal(results[0], results[1]), "the same dropout mask, the same bfloat16 gating, the same output"
    again, report = manualbp.convert(block, return_report=True)
    assert report.replaced == [] and report.skipped == [], "converting twice changes nothing"
    assert type(manualbp.revert(block)) is type(original)


def test_transformers_activation_modules_compute_the_catalogue_function():
    """activations.TRANSFORMERS_ACTIVATIONS: each module's function is the catalogue's, the stated difference."""
    acts = transformers.activations
    table = manualbp.activations.TRANSFORMERS_ACTIVATIONS
    z = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    bitwise = {"GELUActivation", "GELUTanh", "PytorchGELUTanh", "SiLUActivation"}  # the catalogue's own op
    checked = []
    for name, (catalogue, difference) in table.items():
        module_class = getattr(acts, name, None)
        if module_class is None:  # not in this transformers version
            continue
        module = module_class()
        f = manualbp.activations.from_model_module(module)
        assert f is not None and f.name == catalogue, f"{name} maps to {catalogue}"
        for dtype in (torch.float64, torch.float32):
            ours, theirs = f.f(z.to(dtype)), module(z.to(dtype))
            if name in bitwise:
                assert torch.equal(ours, theirs), f"{name} ({dtype}): bitwise the catalogue's f ({difference})"
            # a formula in separate ops: a few units in the last place of |f| <= 8; FastGELU's constant
            # is 3.6e-12 relative off, times |z| <= 8 (measured: 2 ulps; FastGELU 9.1e-13 in float64)
            bound = 8 * 8 * torch.finfo(dtype).eps + (3.6e-12 * 8 if name == "FastGELUActivation" else 0.0)
            assert (ours - theirs).abs().max().item() <= bound, f"{name} ({dtype}): {difference}"
        checked.append(name)
    assert {"GELUActivation", "NewGELUActivation", "SiLUActivation"} <= set(checked), checked
    for name in ("QuickGELUActivation", "ClippedGELUActivation", "ReLUSquaredActivation", "MishActivation",
                 "LinearActivation", "LaplaceActivation"):
        module_class = getattr(acts, name, None)
        if module_class is not None:
            module = module_class(-10, 10) if name == "ClippedGELUActivation" else module_class()
            assert manualbp.activations.from_model_module(module) is None, f"{name}: no catalogue function"
