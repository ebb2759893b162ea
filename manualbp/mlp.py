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

import functools
from typing import List, Optional, Sequence, Union

from torch import Tensor, nn
from torch.nn.modules import module as _module_globals  # the global module hooks

from . import backends, config, ops
from .activations import Activation, get_activation, torch_module
from .function import apply
from .functional import as_rows, differentiable, enter, from_rows, legacy_tracing, run_in, traced_forward
from .mlp_function import forward_stack, mlp_function
from .modules import Linear, has_hooks


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
    None, activations[l] what manualbp.get_activation takes (a name, an Activation, a PyTorch activation
    module or its class) -> [..., sizes[-1]].
    ``recompute=True`` keeps only the input and each pre-activation Z for the backward.
    Under ``torch.autocast`` every input is cast to the autocast dtype, as nn.Linear's are.
    """
    weights, biases = list(weights), list(biases)
    if len(weights) == 0 or len(weights) != len(biases) or len(weights) != len(activations):
        raise ValueError(
            f"expected one weight, one bias (or None) and one activation per layer, and at least one layer; "
            f"got {len(weights)} weights, {len(biases)} biases, {len(activations)} activations"
        )
    config.check_flag(recompute, "mlp(recompute=)")
    activations = tuple(get_activation(a) for a in activations)
    input, weights, biases, name, context = enter(input, weights, biases, backend)
    if legacy_tracing():
        return run_in(context, traced_forward, input, weights, biases, activations)
    x = as_rows(input)
    return from_rows(run_in(context, _mlp, x, weights, biases, activations, bool(recompute), name), input)


def _mlp(x, weights, biases, activations, recompute: bool, backend: str) -> Tensor:
    """The stack's output [M, sizes[-1]] from checked x [M, sizes[0]] and layers, the backend resolved."""
    params = [t for pair in zip(weights, biases) for t in pair]  # w0, b0, w1, b1, ...
    direct = ops.dispatch_free((x, *params))
    if differentiable(direct, x, *params):
        return apply(mlp_function(), direct, x, activations, recompute, backend, direct, *params)[0]
    # no_grad / inference_mode / nothing requires grad: keep nothing
    return forward_stack(ops.route(direct), backend, x, weights, biases, activations, recompute, save=False)[0]


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


def _global_hooks() -> bool:
    """Whether global module hooks (nn.modules.module.register_module_*_hook) are registered."""
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks
                or _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks)


_PLAIN_PARAMETERS = (Tensor, nn.Parameter)


@functools.lru_cache(maxsize=None)
def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a PyTorch built without distributed
        return ()
    return DTensor


class MLP(nn.Module):
    """A stack of dense layers with a hand-written backward, run as one autograd node.

    ``MLP(sizes=[in, h1, ..., out])``: input [..., in] -> output [..., out]. Layer l maps
    sizes[l] to sizes[l+1]; hidden layers apply ``activation``, the last one
    ``last_activation`` (names of manualbp.ACTIVATIONS in any letter case, PyTorch
    activation modules such as nn.LeakyReLU(0.2) or classes such as nn.SiLU, or
    Activation objects from ``manualbp.get_activation``).

    ``recompute=True`` keeps for the backward only the input and each pre-activation
    Z, and recomputes every hidden A = f(Z) in the backward: less memory than
    nn.Linear + activation modules, which keep both A and (for gelu, silu, ...) Z.
    ``backend`` pins the stack to 'triton' or 'reference' (None: the global setting).

    Where a layer has hooks (tensor parallel plans, FSDP2's ``fully_shard`` on each
    layer, user hooks) or a parameter is a DTensor, the stack runs layer by layer,
    each ``manualbp.Linear`` called as a module so that its hooks fire: the same
    outputs and gradients, one autograd node per layer, and ``recompute`` does not
    apply (each layer keeps what a manualbp.Linear keeps).

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
        config.check_flag(bias, "MLP(bias=)")
        config.check_flag(recompute, "MLP(recompute=)")
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

    def _per_layer(self, layers: List[Linear], parameters: List[Optional[Tensor]]) -> bool:
        # Hooks on a layer (tensor parallel, FSDP2's fully_shard per layer, user hooks) and DTensor
        # parameters need each layer called as a module: the fused stack reads parameters directly.
        if _global_hooks() or any(has_hooks(layer) for layer in layers):
            return True
        others = [t for t in parameters if t is not None and type(t) not in _PLAIN_PARAMETERS]
        return bool(others) and any(isinstance(t, _dtensor_type()) for t in others)

    def forward(self, input: Tensor) -> Tensor:
        layers = self.layers
        weights = [layer.weight for layer in layers]
        biases = [layer.bias for layer in layers]
        if self._per_layer(layers, weights + biases):
            for layer in layers:
                input = layer(input)
            return input
        return mlp(input, weights, biases, [layer.activation for layer in layers], recompute=self.recompute,
                   backend=self.backend)

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
                modules.append(torch_module(layer.activation))
        sequential = nn.Sequential(*modules)
        sequential.load_state_dict(self.state_dict())
        for copy_, original in zip(sequential.parameters(), self.parameters()):
            copy_.requires_grad_(original.requires_grad)
        sequential.train(self.training)
        return sequential

    def extra_repr(self) -> str:
        text = f"sizes={list(self.sizes)}, recompute={self.recompute}"
        return text if self.backend is None else f"{text}, backend={self.backend!r}"
