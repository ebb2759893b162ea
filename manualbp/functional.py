"""``manualbp.functional.linear``: the dense layer as a function, like ``torch.nn.functional.linear``.

``gated_linear`` (the gated layer, ``gated.py``) is importable from here too.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backends, ops, reference  # ops registers the operators
from .activations import Activation, get_activation
from .function import apply, forward_mode_active, forward_save, linear_function

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# One C call for "is autocast on for any device" (absent: ask per device, as below).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


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


def _first_layer_ok(input, weight, bias) -> bool:
    """True only where _check_inputs would pass: the same checks as one expression, for every call."""
    if not (isinstance(input, Tensor) and isinstance(weight, Tensor)):
        return False
    dtype, device, shape, weight_shape = input.dtype, input.device, input.shape, weight.shape
    if (dtype not in FLOAT_DTYPES or weight.dtype != dtype or weight.device != device or len(weight_shape) != 2
            or not shape or shape[-1] != weight_shape[1]):
        return False
    return bias is None or (isinstance(bias, Tensor) and bias.dtype == dtype and bias.device == device
                            and bias.shape == (weight_shape[0],))


def check_layers(input, weights: Sequence, biases: Sequence) -> None:
    """Every bad-input error of a stack of layers (one layer: functional.linear), before anything runs."""
    if not _first_layer_ok(input, weights[0], biases[0]):
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


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast(t, dtype: torch.dtype):
    # What autocast casts: float16/bfloat16/float32 tensors. float64 is left alone, as nn.Linear's is.
    return t.to(dtype) if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t


def enter(input, weights: Sequence, biases: Sequence, backend: Optional[str]):
    """The one entry path of functional.linear and manualbp.MLP: autocast, validation, backend choice.

    Returns (input, weights, biases, backend, autocast): the tensors cast as autocast casts
    nn.Linear's inputs, checked; the backend resolved ('triton' or 'reference'); and a
    context manager to run the layer in (autocast off after the cast, as in nn.Linear's
    matmul), None where autocast is off.
    """
    weights, biases = list(weights), list(biases)
    # Autocast first asked (one C call), the weights' types only under autocast: this runs on every call.
    cast_to = _autocast_dtype(input.device.type) if _any_autocast() and isinstance(input, Tensor) else None
    if cast_to is not None and all(isinstance(w, Tensor) for w in weights):
        input = _autocast(input, cast_to)
        weights = [_autocast(w, cast_to) for w in weights]
        biases = [_autocast(b, cast_to) for b in biases]
    else:
        cast_to = None
    if legacy_tracing():
        # The tracer warns that each shape comparison is kept as a constant: here they are (the weights'
        # shapes), and the traced aten::linear checks the input's last dimension whenever the trace runs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            check_layers(input, weights, biases)
    else:
        check_layers(input, weights, biases)
    name = backends.resolve(backend, input.device, input.dtype)
    context = torch.autocast(input.device.type, enabled=False) if cast_to is not None else None
    return input, weights, biases, name, context


def run_in(context, fn, *args):
    """fn(*args), inside context unless it is None (enter's autocast context)."""
    if context is None:
        return fn(*args)
    with context:
        return fn(*args)


def differentiable(direct: bool, *tensors: Optional[Tensor]) -> bool:
    """Whether this call needs the autograd Function: reverse mode wants a graph, or a forward-mode tangent
    or a torch.func transform may be present. Otherwise the forward operator runs alone and keeps nothing.
    direct: ``ops.dispatch_free(tensors)``, which rules out exporting and forward mode.

    torch.export records the forward operator alone (a backward through the exported program reaches
    its autograd formula, function.py, which recomputes what the node did not keep): the operator is
    recorded keeping nothing, as nn.Linear exports as one aten.linear whatever requires grad.
    """
    if not direct and ops.exporting():
        return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return not direct and forward_mode_active()


_tracing_state = torch._C._get_tracing_state  # what torch.jit.is_tracing() asks; one C call per layer call


def legacy_tracing() -> bool:
    """Whether torch.jit.trace is recording now (torch.onnx.export(..., dynamo=False) traces with it)."""
    return _tracing_state() is not None


def traced_forward(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                   activations: Sequence[Activation]) -> Tensor:
    """What a stack of layers runs while the legacy tracer records: the reference forward in aten ops.

    x [..., sizes[0]] -> [..., sizes[-1]], any leading dimensions, as F.linear takes them (so the
    trace runs at any rank, as nn.Linear's does). The legacy tracer records aten ops only: a Triton
    launch cannot be traced at all, and an autograd Function's forward is recorded incompletely (a
    legacy ONNX graph lost a GELU). So, on either backend, a layer records F.linear and the torch
    activation, the graph nn.Linear + activation traces to (as torch.export's decompositions do):
    the trace and its ONNX graph compute the model (the triton backend's up to rounding), and a
    backward through the traced module is aten autograd's, not manualbp's.
    """
    for weight, bias, activation in zip(weights, biases, activations):
        x = reference.linear_forward(x, weight, bias, activation)[0]
    return x


def as_rows(input: Tensor) -> Tensor:
    """input [..., K] as x [M, K], the leading dimensions flattened (a view where the strides allow).

    A 2-D input is used as it is: a view would add two autograd nodes to every step.
    """
    if input.dim() == 2:
        return input
    if input.dim() == 1:
        return input.unsqueeze(0)
    if type(input) is not Tensor:
        input = _gathered_inner_shards(input)
    return input.flatten(0, -2)


def _gathered_inner_shards(input: Tensor) -> Tensor:
    """A DTensor sharded on a leading dimension other than the first (the sequence of [B, S, K]) replicated there,
    so that the rows can be flattened; any other tensor as it is. DTensor's own flatten all-gathers implicitly on
    PyTorch 2.13, raised on 2.11 ("cannot be performed without redistribution": an H200 image, 2026-12-04) and
    gives a strided sharding on 2.7: done here explicitly, the same on every version. nn.Linear keeps S sharded (its
    matmul needs no rows): the communication differs, the values do not (tests/test_tensor_parallel.py)."""
    if not torch.distributed.is_available():
        return input
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(input, DTensor):
        return input
    last = input.dim() - 1
    placements = tuple(Replicate() if isinstance(p, Shard) and 0 < p.dim % input.dim() < last else p
                       for p in input.placements)
    if placements == tuple(input.placements):
        return input
    return input.redistribute(input.device_mesh, placements)


def from_rows(a: Tensor, input: Tensor) -> Tensor:
    """a [M, N] back to [..., N] with the leading dimensions of input."""
    return a if input.dim() == 2 else a.reshape(*input.shape[:-1], a.shape[-1])


def linear(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    activation: "str | Activation" = "identity",
    *,
    backend: Optional[str] = None,
    **activation_options,
) -> Tensor:
    """A = f(input Wᵀ + b) with the hand-written backward and jvp.

    input [..., in_features], weight [out_features, in_features], bias [out_features]
    or None -> [..., out_features]. ``activation`` is a name of manualbp.ACTIVATIONS (any
    letter case) or a PyTorch activation module or class (see manualbp.get_activation;
    options such as ``negative_slope=`` for leaky_relu go in ``activation_options``);
    ``backend`` is 'auto', 'triton' or 'reference' (None: the global setting).
    Under ``torch.autocast`` the inputs are cast to the autocast dtype, as nn.Linear's are.
    """
    activation = get_activation(activation, **activation_options)
    input, (weight,), (bias,), name, context = enter(input, [weight], [bias], backend)
    if legacy_tracing():
        return run_in(context, traced_forward, input, [weight], [bias], [activation])
    x = as_rows(input)
    return from_rows(run_in(context, _linear, x, weight, bias, activation, name), input)


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation, backend: str) -> Tensor:
    """a [M, N] from checked x [M, K], weight [N, K], bias [N] or None, the backend resolved."""
    direct = ops.dispatch_free((x, weight, bias))
    if differentiable(direct, x, weight, bias):
        return apply(linear_function(direct), direct, x, weight, bias, activation, backend,
                     forward_save(backend, activation, weight, direct), direct)[0]
    # no_grad / inference_mode / nothing requires grad: compute A only, keep nothing
    return ops.route(direct).linear_forward(x, weight, bias, activation, "", backend)[0]


from .gated import gated_linear  # noqa: E402 - gated.py builds on this module
