"""``manualbp.MLP``: a stack of dense layers whose forward and backward are one autograd node.

    MLP(sizes=[in, h1, ..., out]):   Xₗ₊₁ = fₗ(Xₗ Wₗᵀ + bₗ),  l = 0 .. L-1

Hidden layers use ``activation``, the last one ``last_activation``. The equations,
and what is kept for the backward with and without ``recompute``, are in
``manualbp/mlp_function.py``; here are the functional form (validation, autocast,
backend choice) and the module (parameters, no math).

Parameters and state_dict: layer l is a ``manualbp.Linear`` registered under the
name ``str(2 * l)``, so the keys are ``0.weight``, ``0.bias``, ``2.weight``, ... —
exactly those of the equivalent ``nn.Sequential(nn.Linear, activation, nn.Linear, ...)``
(activation modules have no parameters). A state_dict moves between the two
with plain ``load_state_dict`` in either direction; :meth:`MLP.to_sequential`
builds that nn.Sequential.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import backends, ops
from .activations import Activation, get_activation
from .conversion import module_for_activation
from .functional import _autocast, _autocast_dtype, _check_inputs
from .mlp_function import MLPFunction, forward_stack
from .modules import Linear


def _check_layers(input: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> None:
    """Every bad-input error, raised before anything runs; layer 0 is checked as functional.linear checks it."""
    _check_inputs(input, weights[0], biases[0])
    for index in range(1, len(weights)):
        weight, bias, previous = weights[index], biases[index], weights[index - 1]
        if not isinstance(weight, Tensor):
            raise TypeError(f"layer {index}: weight must be a torch.Tensor, got {type(weight).__name__}")
        if bias is not None and not isinstance(bias, Tensor):
            raise TypeError(f"layer {index}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if weight.dim() != 2 or weight.shape[1] != previous.shape[0]:
            raise ValueError(
                f"layer {index}: weight must have shape [out_features, {previous.shape[0]}] (layer {index - 1} "
                f"has out_features = {previous.shape[0]}), got {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"layer {index}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        for name, t in (("weight", weight), ("bias", bias)):
            if t is not None and t.dtype != input.dtype:
                raise TypeError(f"layer {index}: {name} has dtype {t.dtype} but input has dtype {input.dtype}; "
                                f"expected the same dtype")
            if t is not None and t.device != input.device:
                raise ValueError(f"layer {index}: {name} is on {t.device} but input is on {input.device}; "
                                 f"expected the same device")


def mlp(
    input: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    activations: Sequence[Union[str, Activation]],
    *,
    recompute: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """A stack of dense layers with the hand-written backward, as one autograd node.

    input [..., sizes[0]], weights[l] [sizes[l+1], sizes[l]], biases[l] [sizes[l+1]] or
    None, activations[l] a name of manualbp.ACTIVATIONS or an Activation -> [..., sizes[-1]].
    ``recompute=True`` keeps only the input and each pre-activation Z for the backward.
    Under ``torch.autocast`` every input is cast to the autocast dtype, as nn.Linear's are.
    """
    weights, biases = list(weights), list(biases)
    if len(weights) == 0 or len(weights) != len(biases) or len(weights) != len(activations):
        raise ValueError(
            f"expected one weight, one bias (or None) and one activation per layer, and at least one layer; "
            f"got {len(weights)} weights, {len(biases)} biases, {len(activations)} activations"
        )
    activations = tuple(get_activation(a) for a in activations)
    if isinstance(input, Tensor) and all(isinstance(w, Tensor) for w in weights):
        cast_to = _autocast_dtype(input.device.type)
        if cast_to is not None:
            with torch.autocast(input.device.type, enabled=False):
                return mlp(
                    _autocast(input, cast_to), [_autocast(w, cast_to) for w in weights],
                    [_autocast(b, cast_to) for b in biases], activations, recompute=recompute, backend=backend,
                )
    _check_layers(input, weights, biases)
    if torch.compiler.is_compiling():
        # torch.compile / torch.export: the stack as custom operators, opaque to the compiler (see manualbp/ops.py).
        return ops.mlp(input, weights, biases, activations, recompute, backend)
    name = backends.resolve(backend, input.device, input.dtype)

    flat = input.dim() == 2  # used as it is: a view would add two autograd nodes to every step
    x = input if flat else input.reshape(input.shape[:-1].numel(), input.shape[-1])  # the kernels see x [M, K]
    params = [t for pair in zip(weights, biases) for t in pair]  # w0, b0, w1, b1, ...
    needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, *params))
    if needs_graph:
        output = MLPFunction.apply(x, activations, bool(recompute), name, *params)
    else:
        # no_grad / inference_mode / nothing requires grad: keep nothing.
        output, _ = forward_stack(name, x, weights, biases, activations, recompute, save=False)
    return output if flat else output.reshape(*input.shape[:-1], weights[-1].shape[0])


def _check_sizes(sizes) -> List[int]:
    try:
        sizes = list(sizes)
    except TypeError:
        raise TypeError(f"sizes must be a sequence of layer widths [in, h1, ..., out], got {sizes!r}") from None
    if len(sizes) < 2:
        raise ValueError(f"sizes must hold at least [in_features, out_features], got {sizes}")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"sizes must be non-negative integers, got {sizes}")
    return sizes


class MLP(nn.Module):
    """A stack of dense layers with a hand-written backward, run as one autograd node.

    ``MLP(sizes=[in, h1, ..., out])``: input [..., in] -> output [..., out]. Layer l maps
    sizes[l] to sizes[l+1]; hidden layers apply ``activation``, the last one
    ``last_activation`` (names of manualbp.ACTIVATIONS, or Activation objects from
    ``manualbp.get_activation`` for options such as leaky_relu's ``negative_slope``).

    ``recompute=True`` keeps for the backward only the input and each pre-activation
    Z, and recomputes every hidden A = f(Z) in the backward: less memory than
    nn.Linear + activation modules, which keep both A and (for gelu, silu, ...) Z.
    ``backend`` pins the stack to 'triton' or 'reference' (None: the global setting).

    Layer l is the ``manualbp.Linear`` ``self[str(2*l)]`` — see :attr:`layers` — so the
    state_dict keys (``0.weight``, ``0.bias``, ``2.weight``, ...) are those of the
    equivalent nn.Sequential (:meth:`to_sequential`), and initialisation draws the
    same random numbers as that nn.Sequential would.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: Union[str, Activation] = "gelu",
        last_activation: Union[str, Activation] = "identity",
        bias: bool = True,
        recompute: bool = False,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        sizes = _check_sizes(sizes)
        hidden = get_activation(activation)  # bad names fail before any allocation
        last = get_activation(last_activation)
        backends.check_backend(backend, "MLP(backend=)")
        super().__init__()
        count = len(sizes) - 1
        for index in range(count):
            layer = Linear(sizes[index], sizes[index + 1], bias=bias, activation=hidden if index < count - 1 else last,
                           device=device, dtype=dtype, backend=backend)
            self.add_module(str(2 * index), layer)  # nn.Sequential's index of the same Linear
        self.sizes = tuple(sizes)
        self.recompute = bool(recompute)
        self.backend = backend

    @property
    def layers(self) -> List[Linear]:
        """The dense layers, first to last."""
        return [self._modules[str(2 * index)] for index in range(len(self.sizes) - 1)]

    def forward(self, input: Tensor) -> Tensor:
        layers = self.layers
        return mlp(
            input,
            [layer.weight for layer in layers],
            [layer.bias for layer in layers],
            [layer.activation for layer in layers],
            recompute=self.recompute,
            backend=self.backend,
        )

    def to_sequential(self) -> nn.Sequential:
        """The equivalent ``nn.Sequential(nn.Linear, activation module, ..., nn.Linear[, activation])``.

        Holds copies of the parameters (same values, device, dtype and requires_grad)
        under the same state_dict keys. Hidden identity activations become nn.Identity,
        so that the indices match; a last identity activation is left out.
        """
        modules: List[nn.Module] = []
        layers = self.layers
        for index, layer in enumerate(layers):
            weight = layer.weight
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            modules.append(linear)
            if index < len(layers) - 1 or layer.activation.name != "identity":
                modules.append(module_for_activation(layer.activation))
        sequential = nn.Sequential(*modules)
        sequential.load_state_dict(self.state_dict())
        for copy_, original in zip(sequential.parameters(), self.parameters()):
            copy_.requires_grad_(original.requires_grad)
        sequential.train(self.training)
        return sequential

    def extra_repr(self) -> str:
        text = f"sizes={list(self.sizes)}, recompute={self.recompute}"
        return text if self.backend is None else f"{text}, backend={self.backend!r}"
