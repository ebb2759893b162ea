"""The gated layer: ``functional.gated_linear`` and ``manualbp.GatedMLP`` (SwiGLU, GEGLU, ReGLU, GLU, bilinear).

    gated_linear:  A = f(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u)          [..., intermediate]
    GatedMLP:      down_proj(gated_linear(x, gate_proj.weight, up_proj.weight, ...))   [..., hidden]

The equations are in ``gated_reference.py``, what is kept for the backward in
``gated_function.py``; here are the functional form (validation, autocast, backend
choice) and the module (parameters, no math). The activation names the variant:
silu → SwiGLU (Llama, Mistral, Qwen, Phi-3), gelu / gelu_tanh → GEGLU (Gemma: gelu_tanh),
relu → ReGLU, sigmoid → GLU, identity → bilinear; tanh and leaky_relu as well.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import backends, config, gated_ops, ops, quantization
from .activations import Activation, get_activation
from .function import apply
from .functional import (FLOAT_DTYPES, _any_autocast, _autocast, _autocast_dtype, _check_inputs, _first_layer_ok,
                         as_rows, differentiable, from_rows, run_in)
from .gated_function import gate_function, gated_linear_function
from .modules import Linear, has_hooks


def _check_gated(input, gate_weight, up_weight, gate_bias, up_bias) -> None:
    """Every bad-input error of gated_linear, before anything runs."""
    if (_first_layer_ok(input, gate_weight, gate_bias) and _first_layer_ok(input, up_weight, up_bias)
            and gate_weight.shape == up_weight.shape):
        return  # the checks below as one expression, for every call (functional.check_layers)
    for label, weight, bias in (("gate", gate_weight, gate_bias), ("up", up_weight, up_bias)):
        try:
            _check_inputs(input, weight, bias)
        except (TypeError, ValueError) as error:
            raise type(error)(f"gated_linear: {label}_weight / {label}_bias: {error}") from None
    if gate_weight.shape != up_weight.shape:
        raise ValueError(f"gated_linear: gate_weight {tuple(gate_weight.shape)} and up_weight "
                         f"{tuple(up_weight.shape)} must have the same shape [intermediate, in_features]")


def _enter(input, tensors, backend: Optional[str]):
    """Autocast (as nn.Linear casts its inputs), validation, backend choice: functional.enter for two weights
    that read the same input. Returns (input, tensors, backend, autocast context or None)."""
    cast_to = _autocast_dtype(input.device.type) if _any_autocast() and isinstance(input, Tensor) else None
    if cast_to is not None and all(isinstance(w, Tensor) for w in tensors[:2]):
        input, tensors = _autocast(input, cast_to), [_autocast(t, cast_to) for t in tensors]
    else:
        cast_to = None
    _check_gated(input, *tensors)
    name = backends.resolve(backend, input.device, input.dtype)
    context = torch.autocast(input.device.type, enabled=False) if cast_to is not None else None
    return input, tensors, name, context


def gated_linear(
    input: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    gate_bias: Optional[Tensor] = None,
    up_bias: Optional[Tensor] = None,
    activation: "str | Activation" = "silu",
    *,
    recompute: bool = False,
    backend: Optional[str] = None,
    **activation_options,
) -> Tensor:
    """A = f(input W_gᵀ + b_g) ⊙ (input W_uᵀ + b_u) with the hand-written backward and jvp.

    input [..., in_features], gate_weight and up_weight [intermediate, in_features], gate_bias
    and up_bias [intermediate] or None -> [..., intermediate]. ``activation`` is one of
    manualbp.ACTIVATIONS (options such as ``negative_slope=`` for leaky_relu in
    ``activation_options``). ``recompute=True`` keeps only the input for the backward, which
    recomputes Z_g and Z_u (else both are kept). ``backend``: 'auto', 'triton' or 'reference'
    (None: the global setting). Under ``torch.autocast`` the inputs are cast as nn.Linear's are.
    """
    activation = get_activation(activation, **activation_options)
    config.check_flag(recompute, "gated_linear(recompute=)")
    input, tensors, name, context = _enter(input, [gate_weight, up_weight, gate_bias, up_bias], backend)
    x = as_rows(input)
    return from_rows(run_in(context, _gated_linear, x, *tensors, activation, recompute, name), input)


def _gated_linear(x, gate_weight, up_weight, gate_bias, up_bias, activation: Activation, recompute: bool,
                  backend: str) -> Tensor:
    """a [M, I] from checked x [M, K] and parameters, the backend resolved."""
    tensors = (x, gate_weight, up_weight, gate_bias, up_bias)
    direct = ops.dispatch_free(tensors)
    if differentiable(direct, *tensors):
        return apply(gated_linear_function(direct), direct, *tensors, activation, recompute, backend, direct)[0]
    # no_grad / inference_mode / nothing requires grad: compute A only, keep nothing
    return gated_ops.route(direct).gated_forward(*tensors, activation, False, backend)[0]


def gating(z_gate: Tensor, z_up: Tensor, activation: "str | Activation" = "silu", *, backend: Optional[str] = None,
         **activation_options) -> Tensor:
    """A = f(Z_g) ⊙ Z_u with the hand-written backward (δ_g, δ_u): the gating alone, from projections computed
    elsewhere. z_gate, z_up [..., intermediate], one shape and dtype -> [..., intermediate]."""
    activation = get_activation(activation, **activation_options)
    for name, t in (("z_gate", z_gate), ("z_up", z_up)):
        if not isinstance(t, Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() == 0:
            raise TypeError(f"gating: {name} must be a floating-point torch.Tensor of at least 1 dimension, got "
                            f"{type(t).__name__ if not isinstance(t, Tensor) else (t.dtype, tuple(t.shape))}")
    if z_gate.shape != z_up.shape or z_gate.dtype != z_up.dtype or z_gate.device != z_up.device:
        raise ValueError(f"gating: z_gate and z_up must have one shape, dtype and device, got {tuple(z_gate.shape)} "
                         f"{z_gate.dtype} {z_gate.device} and {tuple(z_up.shape)} {z_up.dtype} {z_up.device}")
    name = backends.resolve(backend, z_gate.device, z_gate.dtype)
    rows = (as_rows(z_gate), as_rows(z_up))
    direct = ops.dispatch_free(rows)
    if differentiable(direct, *rows):
        a = apply(gate_function(direct), direct, *rows, activation, name, direct)
    else:
        a = gated_ops.route(direct).gate_forward(*rows, activation, name)
    return from_rows(a, z_gate)


class GatedMLP(nn.Module):
    """A Llama-family MLP: ``down_proj(f(gate_proj(x)) ⊙ up_proj(x))``, the gating with a hand-written backward.

    input [..., hidden_size] -> output [..., hidden_size]. ``gate_proj`` and ``up_proj``
    (hidden_size -> intermediate_size) and ``down_proj`` (intermediate_size -> hidden_size)
    are ``manualbp.Linear`` layers (identity activation): nn.Linear's parameters, shapes,
    initialisation (drawn in that order, as transformers' LlamaMLP draws them) and
    state_dict keys (``gate_proj.weight``, ``up_proj.weight``, ``down_proj.weight``, and
    ``.bias`` with ``bias=True``). ``activation``: silu → SwiGLU, gelu / gelu_tanh → GEGLU,
    relu → ReGLU, sigmoid → GLU, identity → bilinear, tanh, leaky_relu.

    ``recompute=True`` keeps only the input of the gating for its backward (Z_g, Z_u
    recomputed there). Where gate_proj or up_proj is not a plain manualbp.Linear any more
    (a LoRA adapter wrapped around it), has hooks (a tensor-parallel plan, user hooks) or a
    torchao-quantized weight, each projection is called as a module and the gating
    f(Z_g) ⊙ Z_u on what they return is its own autograd node (:func:`gating`): the adapters,
    hooks and quantized matmuls act where they would in the original MLP.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: Union[str, Activation] = "silu",
        bias: bool = False,
        recompute: bool = False,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        config.check_flag(bias, "GatedMLP(bias=)")
        config.check_flag(recompute, "GatedMLP(recompute=)")
        bound = get_activation(activation)  # bad names fail before any allocation
        backends.check_backend(backend, "GatedMLP(backend=)")
        super().__init__()
        options = {"bias": bias, "device": device, "dtype": dtype, "backend": backend}
        self.gate_proj = Linear(hidden_size, intermediate_size, **options)
        self.up_proj = Linear(hidden_size, intermediate_size, **options)
        self.down_proj = Linear(intermediate_size, hidden_size, **options)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation = bound
        self.recompute = bool(recompute)
        self.backend = backend

    @staticmethod
    def _fused_parameters(gate: nn.Module, up: nn.Module):
        """(gate_weight, up_weight, gate_bias, up_bias) where the projections gate and up run inside the gated
        layer, None where each runs as a module (the class docstring)."""
        if not (type(gate) is Linear and type(up) is Linear and not has_hooks(gate) and not has_hooks(up)
                and gate.activation.name == "identity" and up.activation.name == "identity"):
            return None
        gate_weight, up_weight = gate.weight, up.weight
        # torchao's quantize_ swaps in quantized weights (tensor subclasses, never plain Parameters): each projection
        # then runs torchao's own linear
        if ((type(gate_weight) is not nn.Parameter and quantization.is_quantized(gate_weight))
                or (type(up_weight) is not nn.Parameter and quantization.is_quantized(up_weight))):
            return None
        return gate_weight, up_weight, gate.bias, up.bias

    def forward(self, input: Tensor) -> Tensor:
        modules = self._modules  # each submodule asked once (nn.Module's __getattr__ on every access)
        gate, up = modules["gate_proj"], modules["up_proj"]
        parameters = self._fused_parameters(gate, up)
        if parameters is not None:
            a = gated_linear(input, *parameters, self.activation, recompute=self.recompute, backend=self.backend)
        else:
            a = gating(gate(input), up(input), self.activation, backend=self.backend)
        return modules["down_proj"](a)

    def extra_repr(self) -> str:
        text = (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"{self.activation.extra_repr()}, recompute={self.recompute}")
        return text if self.backend is None else f"{text}, backend={self.backend!r}"

