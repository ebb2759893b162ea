"""``nn.Module``s: drop-in replacements for ``nn.Linear`` (+ activation). No math here."""

from __future__ import annotations

import importlib
import sys
from typing import Optional

import torch
from torch import Tensor, nn

from . import backends, config, quantization
from . import functional as F
from .activations import get_activation


def has_hooks(module: nn.Module) -> bool:
    """Whether module has forward or backward hooks of its own (global module hooks not counted)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


class Linear(nn.Linear):
    """``nn.Linear`` followed by an activation, with a hand-written backward.

    input [..., in_features] -> output [..., out_features], a = f(x Wᵀ + b).
    Same parameters, shapes, names, initialisation and ``state_dict`` as
    ``nn.Linear``: ``weight`` [out_features, in_features], ``bias`` [out_features].
    ``activation`` is a name of manualbp.ACTIVATIONS (any letter case) or the PyTorch
    module (nn.GELU(), nn.LeakyReLU(0.2), nn.SiLU, ...: see manualbp.get_activation); its
    options (``negative_slope`` for leaky_relu) are keyword arguments. ``backend`` pins this layer to
    'triton' or 'reference' (None: the global setting, see manualbp.set_backend).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation="identity",
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
        **activation_options,
    ) -> None:
        given_activation = isinstance(bias, (str, nn.Module)) or (
            isinstance(bias, type) and issubclass(bias, nn.Module))
        hint = (f"; the third argument is bias, as in nn.Linear: to choose the activation pass "
                f"activation={bias!r}") if given_activation else ""
        config.check_flag(bias, "Linear(bias=)", hint)
        bound = get_activation(activation, **activation_options)  # bad names fail before any allocation
        backends.check_backend(backend, "Linear(backend=)")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = bound
        self.backend = backend

    # torch.ao.quantization would skip this layer silently: reading its qconfig raises instead (quantization.py).
    qconfig = quantization.qconfig_guard

    def __prepare_scriptable__(self):
        """torch.jit.script calls this on every module it is about to compile (a manualbp.MLP's layers too)."""
        raise RuntimeError(
            "torch.jit.script cannot compile manualbp.Linear (nor manualbp.MLP, whose layers these are): its "
            "forward is Python that TorchScript's compiler does not take (an autograd Function with a hand-written "
            "backward, Triton launches). Export with torch.export.export(model, args) or "
            "torch.onnx.export(..., dynamo=True); torch.jit.trace(model, args) records the layers as plain aten "
            "ops; or script manualbp.revert(model, inplace=False), the same model with nn.Linear layers."
        )

    def forward(self, input: Tensor) -> Tensor:
        weight, bias, activation = self.weight, self.bias, self.activation
        if "peft" in sys.modules and activation.name != "identity" and not torch.compiler.is_compiling():
            # peft's own LoRA layer would add its update after f: silently wrong (manualbp/peft.py)
            importlib.import_module(f"{__package__}.peft").check_caller(self, sys._getframe(1))
        # torchao's quantize_ swaps in a quantized weight (a tensor subclass, never a plain Parameter)
        if type(weight) is not nn.Parameter and quantization.is_quantized(weight):
            return quantization.linear(input, weight, bias, activation)
        return F.linear(input, weight, bias, activation, backend=self.backend)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, {self.activation.extra_repr()}"
        return text if self.backend is None else f"{text}, backend={self.backend!r}"
