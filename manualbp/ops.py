"""PyTorch custom operators of manualbp: what torch.compile and torch.export see.

    manualbp::linear_forward(x, weight, bias, activation, negative_slope, save, backend) -> (a, z or f'(z))
    manualbp::linear_backward(grad_a, x, weight, saved, activation, negative_slope, saved_kind,
                              needs_grad, backend) -> (grad_x, grad_weight, grad_bias)
    manualbp::mlp_forward(x, weights, biases, has_bias, activations, negative_slopes, recompute, save, backend)
                              -> [output, *kept]
    manualbp::mlp_backward(grad_output, x, weights, output, kept, activations, negative_slopes, recompute,
                           needs_grad, backend) -> [grad_x, *grad_weights, *grad_biases]

Why operators: a plain autograd.Function that launches Triton kernels is traced
by torch.compile into AOTAutograd, whose partitioner and fake-tensor tracing then
have to see through the launches (and have failed to in real projects). An
operator is opaque instead: the compiler sees one node with a fake (shape-only)
implementation, and the autograd formula registered below, which calls the
backward operator. Eager code keeps using ``LinearFunction``/``MLPFunction``;
``functional.linear`` and ``manualbp.MLP`` route here only while
``torch.compiler.is_compiling()``.

These are ``custom_op``s, not ``triton_op``s: their implementation picks the
backend when it runs, from its real tensors (``backend`` is 'auto', 'triton',
'reference', or '' for the global setting), so the compiled graph runs the Triton
kernels wherever eager would (CUDA, or the CPU interpreter with TRITON_INTERPRET=1),
and the fake implementations never touch Triton: no interpreter runs on fake
tensors, which is what breaks a ``triton_op`` under TRITON_INTERPRET=1.

Operators cannot return None: an output that is not computed (Z when not needed,
a gradient nobody asked for) is an empty tensor of shape [0].

What a layer keeps for f' (``save``: "z" or "f_prime", see ``function.saved_kind``)
is decided by the wrapper when the graph is traced, from the backend that would run
then, so that a compiled graph keeps what eager keeps (and its gradients are bitwise
eager's); the backward operator is told what it gets (``saved_kind``), so either
backend computes right gradients from either kind, whatever runs later.

Double backward (create_graph=True): the registered backward then runs the same
equations in differentiable torch ops (``function.differentiable_backward``,
``mlp_function.differentiable_backward``), as LinearFunction and MLPFunction do.

The arguments are 2-D: x [M, K], weight [N, K], bias [N]. The Python wrappers
:func:`linear` and :func:`mlp` flatten leading dimensions as ``functional.linear``
does; they expect inputs already validated (functional.linear / mlp.mlp do that).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends, function, mlp_function
from .activations import Activation, get_activation

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _activation(name: str, negative_slope: float) -> Activation:
    return get_activation(name, negative_slope=negative_slope) if name == "leaky_relu" else get_activation(name)


def _activations(names: str, negative_slopes: Sequence[float]) -> Tuple[Activation, ...]:
    # A schema has no str[]: the names travel as one comma-separated string.
    names = names.split(",")
    if len(names) != len(negative_slopes):
        raise ValueError(f"{len(names)} activations but {len(negative_slopes)} negative slopes; expected one per layer")
    return tuple(_activation(name, slope) for name, slope in zip(names, negative_slopes))


def _resolve(backend: str, t: Tensor) -> str:
    return backends.resolve(backend or None, t.device, t.dtype)


def _placeholder(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _check_2d(op: str, x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> None:
    # The wrappers validate everything before this point; these are for direct calls of torch.ops.manualbp.*.
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {tuple(x.shape)}")
    width = x.shape[1]
    for index, (weight, bias) in enumerate(zip(weights, biases)):
        if weight.dim() != 2 or weight.shape[1] != width:
            raise ValueError(f"{op}: weight {index} must have shape [N, {width}], got {tuple(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{op}: bias {index} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        width = weight.shape[0]


# --------------------------------------------------------------------------------------
# One dense layer
# --------------------------------------------------------------------------------------


@torch.library.custom_op("manualbp::linear_forward", mutates_args=())
def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, negative_slope: float,
                   save: str, backend: str) -> Tuple[Tensor, Tensor]:
    """(A, Z or f'(Z)): x [M, K] -> a [M, N] and, as save says ("z", "f_prime", or "" for none), [M, N] or [0]."""
    _check_2d("manualbp::linear_forward", x, [weight], [bias])
    _check_save(save)
    a, z = function.forward(_resolve(backend, x), x, weight, bias, _activation(activation, negative_slope),
                            save=save or None)
    if z is None:
        z = _placeholder(x)
    elif z is a:
        z = z.clone()  # identity: an operator's outputs may not alias each other
    return a, z


@linear_forward.register_fake
def _(x, weight, bias, activation, negative_slope, save, backend):
    _check_2d("manualbp::linear_forward", x, [weight], [bias])
    _check_save(save)
    rows, columns = x.shape[0], weight.shape[0]
    return x.new_empty((rows, columns)), x.new_empty((rows, columns) if save else (0,))


def _check_save(save: str) -> None:
    if save not in ("", "z", "f_prime"):
        raise ValueError(f"manualbp::linear_forward: save must be '', 'z' or 'f_prime', got {save!r}")


@torch.library.custom_op("manualbp::linear_backward", mutates_args=())
def linear_backward(grad_a: Tensor, x: Tensor, weight: Tensor, saved: Optional[Tensor], activation: str,
                    negative_slope: float, saved_kind: str, needs_grad: List[bool],
                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(∂C/∂X [M, K], ∂C/∂W [N, K], ∂C/∂b [N]), each [0] where needs_grad says no.

    saved [M, N]: A, Z or f'(Z), as saved_kind says ("a", "z", "f_prime"); None for identity.
    """
    needs_grad_x, needs_grad_weight, needs_grad_bias = needs_grad
    bound = _activation(activation, negative_slope)
    if saved is None and bound.name != "identity":
        raise ValueError(f"manualbp::linear_backward: activation {activation!r} needs saved = A, Z or f'(Z), "
                         f"got None")
    grads = function.backward(
        _resolve(backend, grad_a), grad_a, x, weight, saved, bound,
        needs_grad_x, needs_grad_weight, needs_grad_bias, kind=saved_kind,
    )
    return tuple(_placeholder(grad_a) if grad is None else grad for grad in grads)


@linear_backward.register_fake
def _(grad_a, x, weight, saved, activation, negative_slope, saved_kind, needs_grad, backend):
    needs_grad_x, needs_grad_weight, needs_grad_bias = needs_grad
    return (
        grad_a.new_empty(tuple(x.shape) if needs_grad_x else (0,)),
        grad_a.new_empty(tuple(weight.shape) if needs_grad_weight else (0,)),
        grad_a.new_empty((weight.shape[0],) if needs_grad_bias else (0,)),
    )


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, activation, negative_slope, save, backend = inputs
    a, z = output
    bound = _activation(activation, negative_slope)
    if bound.name == "identity":
        saved, kind = None, "z"  # nothing is read
    elif bound.saves_output:
        saved, kind = a, "a"
    elif save:
        saved, kind = z, save
    else:
        raise ValueError(
            f"manualbp::linear_forward with activation {activation!r} and save='' cannot be differentiated: "
            f"its f' needs Z. Call it with save='z' or 'f_prime' when a gradient is wanted."
        )
    ctx.save_for_backward(x, weight, bias, saved)
    ctx.activation = bound
    ctx.backend = backend
    ctx.kind = kind
    ctx.mark_non_differentiable(z)


def _linear_backward(ctx, grad_a, grad_z):
    x, weight, bias, saved = ctx.saved_tensors
    needs_grad_x, needs_grad_weight, needs_grad_bias = ctx.needs_input_grad[:3]
    needs_grad_bias = needs_grad_bias and bias is not None
    activation = ctx.activation
    if torch.is_grad_enabled():
        grad_x, grad_weight, grad_bias = function.differentiable_backward(
            grad_a, x, weight, bias, activation, needs_grad_x, needs_grad_weight, needs_grad_bias
        )
    else:
        grad_x, grad_weight, grad_bias = torch.ops.manualbp.linear_backward(
            grad_a, x, weight, saved, activation.name, activation.kernel_slope,
            ctx.kind, [needs_grad_x, needs_grad_weight, needs_grad_bias], ctx.backend,
        )
        grad_x = grad_x if needs_grad_x else None
        grad_weight = grad_weight if needs_grad_weight else None
        grad_bias = grad_bias if needs_grad_bias else None
    return grad_x, grad_weight, grad_bias, None, None, None, None


torch.library.register_autograd(
    "manualbp::linear_forward", _linear_backward, setup_context=_linear_setup_context
)


# --------------------------------------------------------------------------------------
# A stack of dense layers (manualbp.MLP)
# --------------------------------------------------------------------------------------


def _kept_shapes(rows: int, weights: Sequence[Tensor], activations: Sequence[Activation], recompute: bool):
    shapes = []
    last = len(weights) - 1
    for index, (keep_a, keep_z) in enumerate(mlp_function.kept_plan(activations, recompute)):
        columns = weights[index].shape[0]
        if keep_a and index < last:
            shapes.append((rows, columns))
        if keep_z:
            shapes.append((rows, columns))
    return shapes


def _per_layer(biases: Sequence[Tensor], has_bias: Sequence[bool]) -> List[Optional[Tensor]]:
    # The operators take the biases that exist (a Tensor[] with None in it would not be
    # differentiable) and has_bias, one flag per layer.
    if sum(has_bias) != len(biases):
        raise ValueError(f"{len(biases)} biases given but has_bias marks {sum(has_bias)} layers")
    present = iter(biases)
    return [next(present) if flag else None for flag in has_bias]


@torch.library.custom_op("manualbp::mlp_forward", mutates_args=())
def mlp_forward(x: Tensor, weights: List[Tensor], biases: List[Tensor], has_bias: List[bool], activations: str,
                negative_slopes: List[float], recompute: bool, save: bool, backend: str) -> List[Tensor]:
    """[A_{L-1} [M, sizes[-1]], *kept]: the stack's output and what its backward needs (nothing if not save)."""
    per_layer = _per_layer(biases, has_bias)
    _check_2d("manualbp::mlp_forward", x, weights, per_layer)
    bound = _activations(activations, negative_slopes)
    output, kept = mlp_function.forward_stack(_resolve(backend, x), x, weights, per_layer, bound, recompute, save)
    return [output, *kept]


@mlp_forward.register_fake
def _(x, weights, biases, has_bias, activations, negative_slopes, recompute, save, backend):
    _check_2d("manualbp::mlp_forward", x, weights, _per_layer(biases, has_bias))
    bound = _activations(activations, negative_slopes)
    rows = x.shape[0]
    shapes = [(rows, weights[-1].shape[0])]
    if save:
        shapes += _kept_shapes(rows, weights, bound, recompute)
    return [x.new_empty(shape) for shape in shapes]


@torch.library.custom_op("manualbp::mlp_backward", mutates_args=())
def mlp_backward(grad_output: Tensor, x: Tensor, weights: List[Tensor], output: Optional[Tensor],
                 kept: List[Tensor], activations: str, negative_slopes: List[float], recompute: bool,
                 needs_grad: List[bool], backend: str) -> List[Tensor]:
    """[∂C/∂X₀, ∂C/∂W₀ .. ∂C/∂W_{L-1}, ∂C/∂b₀ .. ∂C/∂b_{L-1}]; [0] where needs_grad (same order) says no."""
    count = len(weights)
    bound = _activations(activations, negative_slopes)
    grad_x, grad_weights, grad_biases = mlp_function.backward_stack(
        _resolve(backend, grad_output), grad_output, x, weights, bound, recompute, output, kept,
        needs_grad[0], needs_grad[1:1 + count], needs_grad[1 + count:],
    )
    grads = [grad_x, *grad_weights, *grad_biases]
    return [_placeholder(grad_output) if grad is None else grad for grad in grads]


@mlp_backward.register_fake
def _(grad_output, x, weights, output, kept, activations, negative_slopes, recompute, needs_grad, backend):
    shapes = [tuple(x.shape)] + [tuple(w.shape) for w in weights] + [(w.shape[0],) for w in weights]
    return [grad_output.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs_grad)]


def _mlp_setup_context(ctx, inputs, output):
    x, weights, biases, has_bias, activations, negative_slopes, recompute, save, backend = inputs
    bound = _activations(activations, negative_slopes)
    if not save:
        raise ValueError("manualbp::mlp_forward with save=False cannot be differentiated; call it with save=True")
    result, kept = output[0], output[1:]
    last_keeps_output = mlp_function.kept_plan(bound, recompute)[-1][0]
    ctx.save_for_backward(x, result if last_keeps_output else None, *weights, *biases, *kept)
    ctx.activations = bound
    ctx.recompute = recompute
    ctx.backend = backend
    ctx.has_bias = list(has_bias)
    if kept:
        ctx.mark_non_differentiable(*kept)


def _mlp_backward(ctx, grads):
    saved = ctx.saved_tensors
    count = len(ctx.has_bias)
    x, output = saved[0], saved[1]
    weights = saved[2:2 + count]
    present = sum(ctx.has_bias)
    biases = _per_layer(saved[2 + count:2 + count + present], ctx.has_bias)
    kept = list(saved[2 + count + present:])
    needs_x, needs_weights, needs_present = ctx.needs_input_grad[:3]
    needs_biases = _per_layer(needs_present, ctx.has_bias)
    needs_biases = [bool(need) for need in needs_biases]  # None (no bias) -> False
    grad_output = grads[0]
    activations = ctx.activations
    if torch.is_grad_enabled():
        grad_x, grad_weights, grad_biases = mlp_function.differentiable_backward(
            grad_output, x, weights, biases, activations, needs_x, needs_weights, needs_biases
        )
    else:
        needs = [needs_x, *needs_weights, *needs_biases]
        flat = torch.ops.manualbp.mlp_backward(
            grad_output, x, list(weights), output, kept,
            ",".join(a.name for a in activations), [a.kernel_slope for a in activations], ctx.recompute,
            needs, ctx.backend,
        )
        flat = [grad if need else None for grad, need in zip(flat, needs)]
        grad_x, grad_weights, grad_biases = flat[0], flat[1:1 + count], flat[1 + count:]
    grad_present = [grad for grad, flag in zip(grad_biases, ctx.has_bias) if flag]
    return grad_x, list(grad_weights), grad_present, None, None, None, None, None, None


torch.library.register_autograd("manualbp::mlp_forward", _mlp_backward, setup_context=_mlp_setup_context)


# --------------------------------------------------------------------------------------
# Wrappers used by functional.linear and manualbp.MLP while compiling
# --------------------------------------------------------------------------------------


def _needs_graph(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _backend_argument(backend: Optional[str]) -> str:
    if backend is None:
        return ""  # the global setting, read when the operator runs
    return backends._check_name(backend, "the backend= argument")


@torch.compiler.assume_constant_result
def _save_for(backend: Optional[str], device: torch.device, dtype: torch.dtype, activation: Activation) -> str:
    # What eager's LinearFunction keeps on the backend that would run now: evaluated once, when the graph is
    # traced (the compiler does not trace the backend choice itself: it imports modules and reads settings).
    kind = function.saved_kind(backends.resolve(backend, device, dtype), activation)
    return kind if kind in ("z", "f_prime") else ""


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation,
           backend: Optional[str] = None) -> Tensor:
    """``functional.linear`` through the operators: input [..., K] -> [..., N]. Inputs already validated."""
    x = input.reshape(input.shape[:-1].numel(), input.shape[-1])
    save = _save_for(backend, input.device, input.dtype, activation) if _needs_graph(input, weight, bias) else ""
    a, _ = torch.ops.manualbp.linear_forward(
        x, weight, bias, activation.name, activation.kernel_slope, save, _backend_argument(backend)
    )
    return a.reshape(*input.shape[:-1], weight.shape[0])


def mlp(input: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
        activations: Sequence[Activation], recompute: bool, backend: Optional[str] = None) -> Tensor:
    """``mlp.mlp`` through the operators: input [..., sizes[0]] -> [..., sizes[-1]]. Inputs already validated."""
    x = input.reshape(input.shape[:-1].numel(), input.shape[-1])
    save = _needs_graph(input, *weights, *biases)
    flat = torch.ops.manualbp.mlp_forward(
        x, list(weights), [b for b in biases if b is not None], [b is not None for b in biases],
        ",".join(a.name for a in activations),
        [a.kernel_slope for a in activations], recompute, save, _backend_argument(backend),
    )
    return flat[0].reshape(*input.shape[:-1], weights[-1].shape[0])
