"""PEFT LoRA on ``manualbp.Linear`` (and converted Conv1D), with the low-rank update inside the activation.

A LoRA adapter (A [r, in_features], B [out_features, r], scale s) on a layer
a = f(x Wᵀ + b) must compute

    z = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ,    a = f(z)                  [..., out_features]

which is what merging does (W + s B A). peft's own LoRA layer for nn.Linear adds
s · x Aᵀ Bᵀ to the layer's *output*, f(x Wᵀ + b) + s · x Aᵀ Bᵀ: right for
activation 'identity', wrong for every other one. :class:`LoraLinear` is peft's
LoRA layer with the forward above: z through ``manualbp.functional.linear`` with
activation 'identity' (the hand-written backward for W, b, x), the LoRA term by
peft's own modules, then ``Activation.f`` of manualbp's activation (autograd's exact
derivative of f). Merging, unmerging, saving and loading are peft's, unchanged.

Use it through this module's :func:`get_peft_model` / :func:`from_pretrained`, or
register it on a ``LoraConfig`` yourself with :func:`register`; :func:`check` finds a
model adapted without it, and a manualbp.Linear with an activation raises when peft's own
adapter layer calls it (:func:`check_caller`; eager code). LoRA variants on a layer with an activation (DoRA and the
others peft lists in ``lora_variants``) and mixed-adapter batches (``adapter_names=``)
raise ``NotImplementedError``: each assumes the base layer's output is x Wᵀ + b.

In the gated blocks convert makes (``manualbp.GatedMLP``, ``manualbp.patterns.GatedBlock``), the gate
and up projections keep the identity: peft's own layer is right for them, and a block whose gate or
up projection is wrapped in an adapter calls both as modules and gates their outputs,
f(Z_g + s x A_gᵀ B_gᵀ) ⊙ (Z_u + s x A_uᵀ B_uᵀ), so the update stays inside the gating.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

try:
    import peft
    from peft.tuners.lora.layer import Linear as _PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
except ModuleNotFoundError as error:  # pragma: no cover - the message is the point
    raise ImportError('manualbp.peft needs peft: pip install peft (or pip install -e ".[test]")') from error

from . import functional, patterns, quantization
from .conv1d import Conv1D  # peft needs transformers, so Conv1D's module imports here
from .modules import Linear, has_hooks

__all__ = ["LoraLinear", "check", "check_caller", "from_pretrained", "get_peft_model", "register"]


def _activated(layer: nn.Module) -> bool:
    return patterns.is_manualbp_layer(layer) and layer.activation.name != "identity"


class LoraLinear(_PeftLoraLinear):
    """peft's LoRA layer for a ``manualbp.Linear``: a = f(x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ).

    input [..., in_features] -> output [..., out_features]. With activation 'identity'
    this is peft's own layer, unchanged. On a Conv1D that convert made a manualbp layer
    (``manualbp.conv1d.Conv1D``: weight [in_features, out_features] = Wᵀ) it is peft's LoRA
    for a Conv1D (``fan_in_fan_out``), whatever the config says, as peft's own dispatch does.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        base = self.get_base_layer()
        variant = self.resolve_lora_variant(config=config)
        if variant is not None and _activated(base):
            raise NotImplementedError(
                f"peft's {type(variant).__name__} (adapter {adapter_name!r}) on a manualbp.Linear with "
                f"activation {base.activation.name!r}: the variant assumes the layer outputs x Wᵀ + b, so it would "
                f"compute a different model. Use plain LoRA here, or manualbp.revert(model) first.")
        if _activated(base) and quantization.is_quantized(base.weight):
            raise NotImplementedError(
                f"LoRA on a torchao-quantized manualbp.Linear with activation {base.activation.name!r} "
                f"(adapter {adapter_name!r}): merging into a quantized weight is not supported here; "
                f"apply LoRA before quantizing, or manualbp.revert(model) first")
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        base = self.get_base_layer()
        if not _activated(base):
            return super().forward(x, *args, **kwargs)  # f = identity: peft's sum is the formula
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError(
                f"mixed-adapter batches (adapter_names=) on a manualbp.Linear with activation "
                f"{base.activation.name!r} are not supported; run one adapter per batch, or revert first")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)  # f(x (W + s B A)ᵀ + b): the weights hold the update
        if has_hooks(base):
            raise NotImplementedError(
                "the manualbp.Linear under this LoRA layer has hooks: the unmerged forward computes "
                "f(x Wᵀ + b + s x Aᵀ Bᵀ) without calling it, so they would not run; remove them, or merge the adapter")
        weight = base.weight.t() if self.fan_in_fan_out else base.weight  # Conv1D stores Wᵀ
        z = functional.linear(x, weight, base.bias, "identity", backend=base.backend)  # [..., out_features]
        dtype = z.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
            x_lora = self._cast_input_dtype(x, lora_A.weight.dtype)  # peft may keep adapters in float32
            z = z + lora_B(lora_A(self.lora_dropout[adapter](x_lora))) * self.scaling[adapter]
        return base.activation.f(z.to(dtype))


def register(config):
    """Make ``config`` (a ``peft.LoraConfig``) put :class:`LoraLinear` on every targeted manualbp.Linear and
    converted Conv1D; returns it."""
    hook = getattr(config, "_register_custom_module", None)
    if hook is None:
        raise RuntimeError(
            f"peft {peft.__version__}: {type(config).__name__} has no _register_custom_module, so manualbp cannot "
            f"put its LoRA layer on manualbp.Linear; use a LoraConfig of peft >= 0.15, or manualbp.revert(model) "
            f"before peft.get_peft_model")
    hook({Conv1D: LoraLinear, Linear: LoraLinear})
    return config


def _wrong_adapters_error(wrong) -> RuntimeError:
    return RuntimeError(
        f"peft adapter layers wrap manualbp.Linear layers with an activation: {', '.join(wrong)}. They change "
        f"the layer's output f(x Wᵀ + b) (LoRA: f(x Wᵀ + b) + s x Aᵀ Bᵀ instead of f(x Wᵀ + b + s x Aᵀ Bᵀ)). "
        f"For LoRA build the model with manualbp.peft.get_peft_model / from_pretrained, or call "
        f"manualbp.peft.register(config) first; for other adapters call manualbp.revert(model) first")


def _describe(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def check(model: nn.Module) -> nn.Module:
    """Raise if a peft adapter layer of ``model`` other than :class:`LoraLinear` wraps a manualbp.Linear with
    an activation (peft's LoRA, LoHa, VeRA, ... layers act on the layer's output f(x Wᵀ + b)); returns the model."""
    wrong = [f"{name} ({_describe(module)})" for name, module in model.named_modules()
             if isinstance(module, BaseTunerLayer) and not isinstance(module, LoraLinear)
             and _activated(module.get_base_layer())]
    if wrong:
        raise _wrong_adapters_error(wrong)
    return model


def check_caller(layer: Linear, frame) -> None:
    """Raise if ``frame`` (the caller of an activated ``layer``'s forward, or one of its Module.__call__
    frames) belongs to a peft adapter layer other than :class:`LoraLinear` that adds its update to the
    layer's output now (not merged, adapters on): what a plain ``peft.get_peft_model`` builds, silently
    wrong otherwise. Called by ``manualbp.Linear.forward`` only while peft is imported (eager code)."""
    for _ in range(4):  # Module._call_impl and _wrapped_call_impl sit between the adapter and the layer
        if frame is None:
            return
        caller = frame.f_locals.get("self")
        if caller is not None and caller is not layer:
            break
        frame = frame.f_back
    else:
        return
    if (isinstance(caller, BaseTunerLayer) and not isinstance(caller, LoraLinear)
            and caller.get_base_layer() is layer and not caller.merged and not caller.disable_adapters):
        raise _wrong_adapters_error([_describe(caller)])


def get_peft_model(model: nn.Module, config, *args, **kwargs):
    """``peft.get_peft_model`` with :class:`LoraLinear` registered on ``config``, checked with :func:`check`."""
    if isinstance(config, peft.LoraConfig):
        register(config)
    return check(peft.get_peft_model(model, config, *args, **kwargs))


def from_pretrained(model: nn.Module, model_id, *args, config=None, **kwargs):
    """``peft.PeftModel.from_pretrained`` with :class:`LoraLinear` registered on the adapter's config."""
    config = config if config is not None else peft.PeftConfig.from_pretrained(model_id)
    if isinstance(config, peft.LoraConfig):
        register(config)
    return check(peft.PeftModel.from_pretrained(model, model_id, *args, config=config, **kwargs))

