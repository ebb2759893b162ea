"""``manualbp.functional.linear``: the dense layer as a function, like ``torch.nn.functional.linear``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, ops
from .activations import Activation, get_activation
from .function import LinearFunction, forward

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(input, weight, bias) -> None:
    """Every bad-input error, raised before anything runs; names what was wrong and what was expected."""
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; expected a real floating dtype: float16, bfloat16, float32 or float64"
            )
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if input.dim() == 0:
        raise ValueError(f"input must have at least 1 dimension [..., in_features={in_features}], got a 0-d tensor")
    if input.shape[-1] != in_features:
        raise ValueError(
            f"input's last dimension is {input.shape[-1]} (shape {tuple(input.shape)}), but weight "
            f"{tuple(weight.shape)} expects in_features = {in_features}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"bias must have shape ({out_features},) to match weight {tuple(weight.shape)}, "
                         f"got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {input.dtype}; expected the same dtype")
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}; expected the same device")


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(t, dtype: torch.dtype):
    # What autocast casts: float16/bfloat16/float32 tensors. float64 is left alone, as nn.Linear's is.
    return t.to(dtype) if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t


def linear(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: "str | Activation" = "identity",
    *,
    backend: Optional[str] = None,
    **activation_options,
) -> Tensor:
    """A = f(input Wᵀ + b) with the hand-written backward.

    input [..., in_features], weight [out_features, in_features], bias [out_features]
    or None -> [..., out_features]. ``activation`` is one of manualbp.ACTIVATIONS
    (options such as ``negative_slope=`` for leaky_relu go in ``activation_options``);
    ``backend`` is 'auto', 'triton' or 'reference' (None: the global setting).
    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as nn.Linear's are.
    """
    activation = get_activation(activation, **activation_options)
    if isinstance(input, Tensor) and isinstance(weight, Tensor):
        cast_to = _autocast_dtype(input.device.type)
        if cast_to is not None:
            with torch.autocast(input.device.type, enabled=False):
                return linear(
                    _autocast(input, cast_to), _autocast(weight, cast_to), _autocast(bias, cast_to),
                    activation, backend=backend,
                )
    _check_inputs(input, weight, bias)
    if torch.compiler.is_compiling():
        # torch.compile / torch.export: the layer as custom operators, opaque to the compiler (see manualbp/ops.py).
        return ops.linear(input, weight, bias, activation, backend)
    name = backends.resolve(backend, input.device, input.dtype)

    # Flatten the leading dimensions: the kernels see x [M, K]. A view whenever the strides allow;
    # a 2-D input is used as it is (a view would add two autograd nodes to every step).
    flat = input.dim() == 2
    x = input if flat else input.reshape(input.shape[:-1].numel(), input.shape[-1])  # numel: in_features may be 0
    needs_graph = torch.is_grad_enabled() and (
        input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_graph:
        a = LinearFunction.apply(x, weight, bias, activation, name)
    else:
        # no_grad / inference_mode / nothing requires grad: compute A only, save nothing.
        a, _ = forward(name, x, weight, bias, activation)
    return a if flat else a.reshape(*input.shape[:-1], weight.shape[0])
