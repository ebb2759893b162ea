"""Quantization of models with manualbp layers: it quantizes them, or says clearly that it cannot.

- torchao (``torchao.quantization.quantize_``) finds a manualbp.Linear as an
  nn.Linear (isinstance) and swaps its ``weight`` for a quantized tensor subclass.
  manualbp's kernels take plain tensors, so such a layer computes
  a = f(F.linear(x, W_quantized, b)): torchao's quantized matmul, then the
  layer's activation, in the forward and through autograd in the backward.
- ``torch.ao.quantization`` (``quantize_dynamic``, ``prepare``, ``prepare_qat``,
  ``quantize``) swaps modules by their exact class, so it would skip a
  manualbp.Linear and return the layer unquantized without a word. It reads every
  module's ``qconfig`` first; on a manualbp.Linear that read, from
  torch.ao.quantization's own code, raises :class:`QuantizationError` pointing to
  ``manualbp.revert``, unless a ``qconfig`` was set on the layer by hand
  (``layer.qconfig = None`` leaves it unquantized on purpose). To any other reader an
  unset ``qconfig`` is simply absent (AttributeError), as on nn.Linear.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

from .activations import Activation


class QuantizationError(RuntimeError):
    """torch.ao.quantization met a manualbp layer it would silently leave unquantized."""


def _qconfig_error(layer) -> QuantizationError:
    return QuantizationError(
        f"torch.ao.quantization cannot quantize manualbp.Linear ({layer.extra_repr()}): it swaps modules by exact "
        f"class, so it would leave this layer unquantized without a word. Call manualbp.revert(model) first "
        f"(nn.Linear + activation module: quantize_dynamic(model, {{nn.Linear}}) then quantizes the linear part "
        f"and keeps the activation), use torchao's quantize_ (which quantizes manualbp.Linear in place), or set "
        f"layer.qconfig = None to leave this layer unquantized on purpose.")


def _get_qconfig(layer):
    if "qconfig" in layer.__dict__:  # set by hand (or by torch.ao.quantization after it read None)
        return layer.__dict__["qconfig"]
    reader = sys._getframe(1).f_globals.get("__name__", "")  # who reads it (getattr adds no Python frame)
    if reader.startswith(_QUANTIZATION_MODULES):
        raise _qconfig_error(layer)
    raise AttributeError(f"'{type(layer).__name__}' object has no attribute 'qconfig'")  # to anyone else: unset


def _set_qconfig(layer, value) -> None:
    layer.__dict__["qconfig"] = value


def _del_qconfig(layer) -> None:
    if layer.__dict__.pop("qconfig", _MISSING) is _MISSING:
        raise AttributeError("qconfig")


_MISSING = object()
_QUANTIZATION_MODULES = ("torch.ao.quantization", "torch.quantization")  # eager mode quantization's modules

# manualbp.Linear's ``qconfig``: what torch.ao.quantization reads before it decides to skip the layer.
qconfig_guard = property(_get_qconfig, _set_qconfig, _del_qconfig,
                         doc="unless set by hand: raises QuantizationError to torch.ao.quantization, which would "
                             "skip this layer, and is absent to anyone else")


def is_quantized(weight: Optional[Tensor]) -> bool:
    """Whether ``weight`` is one of torchao's quantized tensor subclasses (torchao need not be installed)."""
    utils = sys.modules.get("torchao.utils")  # a torchao tensor exists only once torchao is imported
    base = getattr(utils, "TorchAOBaseTensor", None)
    return base is not None and isinstance(weight, base)


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation) -> Tensor:
    """a = f(input Wᵀ + b) with a torchao-quantized W: torchao's own linear, then f.

    input [..., in_features], weight [out_features, in_features] (quantized) -> [..., out_features].
    """
    return activation.f(torch.nn.functional.linear(input, weight, bias))
