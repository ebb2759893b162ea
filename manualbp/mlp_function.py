"""The autograd Function of a stack of dense layers (``manualbp.MLP``).

Layer l (l = 0 .. L-1) computes, with X₀ the input and Xₗ₊₁ = Aₗ,

    Zₗ = Xₗ Wₗᵀ + bₗ,   Aₗ = fₗ(Zₗ)

and the backward walks the layers in reverse with the one-layer equations of
``reference.py`` (G_{L-1} = ∂C/∂A of the output):

    δₗ = Gₗ ⊙ fₗ'(Zₗ),  ∂C/∂Wₗ = δₗᵀ Xₗ,  ∂C/∂bₗ = 1ᵀ δₗ,  Gₗ₋₁ = ∂C/∂Xₗ = δₗ Wₗ

each step on the chosen backend through the operators of ``ops.py``, as the
one-layer ``LinearFunction``. Forward mode (jvp) pushes a tangent up the stack,
layer by layer: dAₗ = fₗ'(Zₗ) ⊙ (dXₗ Wₗᵀ + Xₗ dWₗᵀ + dbₗ), dXₗ₊₁ = dAₗ.

What is kept for the backward, besides X₀ and the parameters:

    recompute=False   what a stack of LinearFunctions (or of nn.Linear + activation
                      modules) keeps: every hidden Aₗ (the next layer's X), and Zₗ where
                      f' cannot be read off Aₗ (gelu, gelu_tanh, silu, leaky_relu < 0)
    recompute=True    Zₗ only; each Xₗ₊₁ = fₗ(Zₗ) is recomputed in the backward,
                      one layer at a time, and f'(Zₗ) is computed from Zₗ

The recomputed Aₗ is f(Zₗ) of the *stored* Zₗ, by the backend's own f (the
reference's torch ops, or the Triton kernels' f in ``_activation_kernel``). The
reference computes its forward A the same way, so there it is bitwise the
forward's A; the Triton forward applies f to the unrounded accumulator, which
equals the stored Z for float32/float64 data (bitwise the same A again) but not
for float16/bfloat16, where the two can differ in the last bit.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import config, function, ops, reference
from .activations import Activation


def _needs_z(activation: Activation) -> bool:
    # f' must be computed from Z: gelu, gelu_tanh, silu, leaky_relu with a negative slope.
    return activation.name != "identity" and not activation.saves_output


def kept_plan(activations: Sequence[Activation], recompute: bool) -> List[Tuple[bool, bool]]:
    """For each layer, (keep A, keep Z): what the forward keeps for the backward.

    The last layer's A is the stack's output; "keep A" there means the output itself
    is kept (f' read off A), never a copy. A hidden identity layer has A = Z; it is
    kept once, as A without recompute and as Z with it.
    """
    last = len(activations) - 1
    plan = []
    for index, activation in enumerate(activations):
        identity = activation.name == "identity"
        if recompute:
            keep_a = False
            keep_z = (index < last) or not identity  # hidden: to recompute the next X; any: for f'(Z)
        else:
            keep_a = (index < last) or (activation.saves_output and not identity)
            keep_z = _needs_z(activation)
        plan.append((keep_a, keep_z))
    return plan


def recompute_activation(activation: Activation, z: Tensor) -> Tensor:
    """A = f(Z) in differentiable torch ops (double backward), with the reference's rule for half precision."""
    return reference.activation_forward(activation, z)


def _activation(route, backend: str, activation: Activation, z: Tensor) -> Tensor:
    """A = f(Z) from a kept Z, on the backend (identity: Z itself, no copy)."""
    if activation.name == "identity":
        return z
    return route.activation_forward(z, activation, backend)


def forward_stack(route, backend: str, x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                  activations: Sequence[Activation], recompute: bool, save: bool) -> Tuple[Tensor, List[Tensor]]:
    """The stack's forward: x [M, sizes[0]] -> (A_{L-1} [M, sizes[-1]], kept).

    ``route``: how the operators are called (``ops.route``), here and in the functions below.

    ``kept`` lists, layer by layer, the tensors ``kept_plan`` asks for (A before Z),
    except the output itself; empty when ``save`` is False (no backward will run).
    """
    plan = kept_plan(activations, recompute) if save else None
    last = len(weights) - 1
    kept: List[Tensor] = []
    h = x
    for index, (weight, bias, activation) in enumerate(zip(weights, biases, activations)):
        identity = activation.name == "identity"
        keep_a, keep_z = plan[index] if save else (False, False)
        a, z = route.linear_forward(h, weight, bias, activation, "z" if keep_z and not identity else "", backend)
        if keep_a and index < last:
            kept.append(a)
        if keep_z:
            kept.append(a if identity else z)  # identity: Z is A
        h = a
    return h, kept


def _unpack_kept(activations: Sequence[Activation], recompute: bool, output: Optional[Tensor],
                 kept: Sequence[Tensor]) -> Tuple[List[Optional[Tensor]], List[Optional[Tensor]]]:
    """(A per layer or None, Z per layer or None) from the flat ``kept`` list of forward_stack."""
    plan = kept_plan(activations, recompute)
    last = len(activations) - 1
    kept_a: List[Optional[Tensor]] = []
    kept_z: List[Optional[Tensor]] = []
    position = 0
    for index, (keep_a, keep_z) in enumerate(plan):
        a = z = None
        if keep_a:
            if index < last:
                a = kept[position]
                position += 1
            else:
                a = output
        if keep_z:
            z = kept[position]
            position += 1
        kept_a.append(a)
        kept_z.append(z)
    if position != len(kept):
        raise RuntimeError(f"manualbp MLP backward: expected {position} kept tensors, got {len(kept)}")
    return kept_a, kept_z


def backward_stack(route, backend: str, grad_output: Tensor, x: Tensor, weights: Sequence[Tensor],
                   activations: Sequence[Activation], recompute: bool, output: Optional[Tensor],
                   kept: Sequence[Tensor], needs_grad_x: bool, needs_grad_weights: Sequence[bool],
                   needs_grad_biases: Sequence[bool]):
    """The stack's backward, layer L-1 down to 0. grad_output [M, sizes[-1]] = ∂C/∂A_{L-1}.

    Returns (∂C/∂X₀ or None, [∂C/∂Wₗ or None], [∂C/∂bₗ or None]). Stops at the lowest
    layer below which nothing needs a gradient.

    reference: each layer runs the one-layer backward (manualbp::linear_backward).
    triton: the same equations, but δₗ₋₁ = (δₗ Wₗ) ⊙ fₗ₋₁'(Zₗ₋₁) and ∂C/∂bₗ₋₁ are formed in
    the epilogue of the matmul that computes δₗ Wₗ, so only the top layer's δ takes a
    separate elementwise pass over [M, N]. The setting ``mlp_fusion=False``
    (manualbp.config; MANUALBP_MLP_FUSION=0) runs the per-layer steps instead, to measure
    what the fusion buys.
    """
    count = len(weights)
    kept_a, kept_z = _unpack_kept(activations, recompute, output, kept)
    grad_weights: List[Optional[Tensor]] = [None] * count
    grad_biases: List[Optional[Tensor]] = [None] * count
    # below[l]: something in layers < l (or X₀) needs a gradient, so ∂C/∂Xₗ must be computed.
    below = [needs_grad_x]
    for index in range(count - 1):
        below.append(below[-1] or needs_grad_weights[index] or needs_grad_biases[index])

    def layer_input(index: int) -> Tensor:  # Xₗ, kept or recomputed as f(Zₗ₋₁)
        if index == 0:
            return x
        if kept_a[index - 1] is not None:
            return kept_a[index - 1]
        return _activation(route, backend, activations[index - 1], kept_z[index - 1])

    def saved_for_f_prime(index: int):  # (what f' is computed from, its kind: "z" or "a")
        if activations[index].name == "identity":
            return None, "z"
        if kept_z[index] is not None:
            return kept_z[index], "z"
        return kept_a[index], "a"

    if backend == "triton" and config.get().mlp_fusion:
        grad_x = _backward_fused(route, grad_output, weights, activations, needs_grad_weights, needs_grad_biases, below,
                                 layer_input, saved_for_f_prime, grad_weights, grad_biases)
        return (grad_x if needs_grad_x else None), grad_weights, grad_biases

    grad = grad_output  # Gₗ = ∂C/∂Aₗ
    grad_x = None
    for index in reversed(range(count)):
        saved, kind = saved_for_f_prime(index)
        activation = activations[index]
        needs = [below[index], needs_grad_weights[index], needs_grad_biases[index]]
        grad_x, grad_weights[index], grad_biases[index] = route.linear_backward(
            grad, layer_input(index) if needs[1] else None, weights[index], saved, activation, kind, needs, backend)
        if not below[index]:
            break
        grad = grad_x  # ∂C/∂Xₗ is G of layer l-1
    return (grad_x if needs_grad_x else None), grad_weights, grad_biases


def _backward_fused(route, grad_output, weights, activations, needs_grad_weights, needs_grad_biases, below,
                    layer_input, saved_for_f_prime, grad_weights, grad_biases) -> Optional[Tensor]:
    """backward_stack on the Triton kernels; fills grad_weights/grad_biases, returns ∂C/∂X₀ or None."""
    top = len(weights) - 1
    saved, kind = saved_for_f_prime(top)
    activation = activations[top]
    # The top layer's δ from the incoming G: the one separate elementwise pass.
    want_bias = needs_grad_biases[top]
    identity = activation.name == "identity"  # δ = G itself: no copy (an operator's output cannot alias G)
    want_delta = (needs_grad_weights[top] or below[top]) and not identity
    delta, grad_bias = route.delta(grad_output, saved, activation, kind, want_delta, want_bias,
                                   "triton") if want_delta or want_bias else (None, None)
    delta = grad_output if identity else delta
    grad_biases[top] = grad_bias
    for index in reversed(range(top + 1)):
        if needs_grad_weights[index]:
            grad_weights[index] = route.transposed_matmul(delta, layer_input(index), "triton")  # ∂C/∂Wₗ = δₗᵀ Xₗ
        if not below[index]:
            return None
        if index == 0:
            return route.matmul(delta, weights[0], "triton")  # ∂C/∂X₀ = δ₀ W₀
        saved, kind = saved_for_f_prime(index - 1)
        activation = activations[index - 1]
        # δₗ₋₁ = (δₗ Wₗ) ⊙ fₗ₋₁'(Zₗ₋₁) and ∂C/∂bₗ₋₁ = 1ᵀ δₗ₋₁, in one matmul kernel.
        want_bias = needs_grad_biases[index - 1]
        delta, grad_biases[index - 1] = route.matmul_times_activation_grad(
            delta, weights[index], saved, activation, kind, want_bias, "triton")
    return None


def jvp_stack(backend: str, x: Tensor, weights: Sequence[Tensor], activations: Sequence[Activation],
              recompute: bool, output: Optional[Tensor], kept: Sequence[Tensor], tangent_x: Optional[Tensor],
              tangent_weights: Sequence[Optional[Tensor]], tangent_biases: Sequence[Optional[Tensor]]) -> Tensor:
    """The stack's forward mode: dA_{L-1} [M, sizes[-1]] from tangents of x and of the parameters (None: zero).

    Layer by layer, innermost first (numerator layout): dAₗ = fₗ'(Zₗ) ⊙ (dXₗ Wₗᵀ + Xₗ dWₗᵀ + dbₗ), dXₗ₊₁ = dAₗ.
    """
    kept_a, kept_z = _unpack_kept(activations, recompute, output, kept)
    tangent = tangent_x
    for index, (weight, activation) in enumerate(zip(weights, activations)):
        if tangent is None and tangent_weights[index] is None and tangent_biases[index] is None:
            continue  # nothing below carries a tangent yet
        if index == 0:
            h = x
        elif kept_a[index - 1] is not None:
            h = kept_a[index - 1]
        else:
            h = _activation(ops.dispatched, backend, activations[index - 1], kept_z[index - 1])  # Xₗ = fₗ₋₁(Zₗ₋₁)
        if activation.name == "identity":
            saved, kind = None, "z"
        elif kept_z[index] is not None:
            saved, kind = kept_z[index], "z"
        else:
            saved, kind = kept_a[index], "a"
        # Forward mode is never plain eager code (a dual level or a torch.func transform is active).
        tangent = ops.dispatched.linear_jvp(h, weight, saved, tangent, tangent_weights[index], tangent_biases[index],
                                            activation, kind, backend)
    return tangent


def differentiable_backward(grad_output: Tensor, x: Tensor, weights: Sequence[Tensor],
                            biases: Sequence[Optional[Tensor]], activations: Sequence[Activation],
                            needs_grad_x: bool, needs_grad_weights: Sequence[bool],
                            needs_grad_biases: Sequence[bool]):
    """The same backward in differentiable torch ops, for double backward (create_graph=True).

    Every Xₗ and Zₗ is recomputed from X₀ and the parameters, so that f'(Zₗ) and Xₗ
    depend on them in the graph being built. Returns what backward_stack returns.
    """
    xs, zs = [], []
    h = x
    for weight, bias, activation in zip(weights, biases, activations):
        xs.append(h)
        z = reference.pre_activation(h, weight, bias)  # Zₗ = Xₗ Wₗᵀ + bₗ
        zs.append(z)
        h = recompute_activation(activation, z)  # Aₗ = fₗ(Zₗ)
    count = len(weights)
    grad_weights: List[Optional[Tensor]] = [None] * count
    grad_biases: List[Optional[Tensor]] = [None] * count
    grad = grad_output
    for index in reversed(range(count)):
        activation = activations[index]
        delta = reference.differentiable_delta(grad, zs[index], activation, "z")  # δₗ = Gₗ ⊙ fₗ'(Zₗ)
        grad, grad_weights[index], grad_biases[index] = reference.linear_backward(
            delta, xs[index], weights[index], True, needs_grad_weights[index], needs_grad_biases[index],
        )
    return (grad if needs_grad_x else None), grad_weights, grad_biases


class MLPFunction(torch.autograd.Function):
    """A stack of dense layers as one autograd node, with a hand-written backward and jvp.

    ``MLPFunction.apply(x, activations, recompute, backend, direct, w0, b0, w1, b1, ...)``:
    x [M, sizes[0]], wₗ [sizes[l+1], sizes[l]], bₗ [sizes[l+1]] or None, activations a
    tuple of Activation (one per layer), backend 'triton' or 'reference' (resolved),
    direct = ``ops.dispatch_free`` of the tensors -> (A_{L-1} [M, sizes[-1]], *kept),
    the kept tensors not differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, activations: Tuple[Activation, ...], recompute: bool, backend: str, direct: bool,
                *params):
        output, kept = forward_stack(ops.route(direct), backend, x, params[0::2], params[1::2], activations,
                                     recompute, save=True)
        return (output, *kept)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, activations, recompute, backend, direct, *params = inputs
        result, kept = output[0], output[1:]
        last_keeps_output = kept_plan(activations, recompute)[-1][0]
        # Everything through save_for_backward, so that saved-tensor hooks (checkpointing,
        # offloading, memory measurement) see all of it. Parameters cost nothing extra.
        saved = (x, result if last_keeps_output else None, *params, *kept)
        ctx.save_for_backward(*saved)
        if not direct and function.forward_mode_active():  # direct: plain eager code, no forward mode
            ctx.save_for_forward(*saved)
        if kept:
            ctx.mark_non_differentiable(*kept)
        ctx.set_materialize_grads(False)  # no zeros built for the kept outputs' gradients (see LinearFunction)
        ctx.activations = activations
        ctx.recompute = recompute
        ctx.backend = backend
        ctx.direct = direct
        ctx.saved_unchanged = direct and ops.saved_unchanged()
        ctx.layers = len(params) // 2

    @staticmethod
    def _unpack(ctx):
        saved = ctx.saved_tensors
        count = ctx.layers
        params = saved[2:2 + 2 * count]
        return saved[0], saved[1], params[0::2], params[1::2], saved[2 + 2 * count:]

    @staticmethod
    def backward(ctx, grad_output: Optional[Tensor], *grad_kept):
        count = ctx.layers
        if grad_output is None:  # no gradient reached the output: every gradient is zero
            return (None,) * (5 + 2 * count)
        x, output, weights, biases, kept = MLPFunction._unpack(ctx)
        needs = ctx.needs_input_grad
        needs_grad_x = needs[0]
        needs_grad_weights = needs[5::2]
        needs_grad_biases = [needs[6 + 2 * index] and biases[index] is not None for index in range(count)]
        if torch.is_grad_enabled():
            # create_graph=True: differentiable torch ops, every Z recomputed from the saved inputs.
            grad_x, grad_weights, grad_biases = differentiable_backward(
                grad_output, x, weights, biases, ctx.activations, needs_grad_x, needs_grad_weights, needs_grad_biases
            )
        else:
            # The forward's tensors were plain; the modes, G, and what saved-tensor hooks returned may not be.
            direct = ctx.direct and ops.dispatch_free(
                (grad_output,) if ctx.saved_unchanged else (grad_output, x, output, *weights, *kept))
            grad_x, grad_weights, grad_biases = backward_stack(
                ops.route(direct), ctx.backend, grad_output, x, weights, ctx.activations, ctx.recompute, output, kept,
                needs_grad_x, needs_grad_weights, needs_grad_biases,
            )
        grads = [grad_x, None, None, None, None]
        for grad_weight, grad_bias in zip(grad_weights, grad_biases):
            grads += [grad_weight, grad_bias]
        return tuple(grads)

    @staticmethod
    def jvp(ctx, tangent_x, _activations, _recompute, _backend, _direct, *tangent_params):
        x, output, weights, biases, kept = MLPFunction._unpack(ctx)  # in jvp: what save_for_forward kept
        if tangent_x is None and all(tangent is None for tangent in tangent_params):
            return (None, *([None] * len(kept)))  # no tangent came in
        params = [t for pair in zip(weights, biases) for t in pair]
        tangent_x, *tangent_params = function._tangents((x, *params), (tangent_x, *tangent_params))
        tangent = jvp_stack(ctx.backend, x, weights, ctx.activations, ctx.recompute, output, kept, tangent_x,
                            tangent_params[0::2], tangent_params[1::2])
        return (tangent, *([None] * len(kept)))


class TracedMLPFunction(MLPFunction):
    """MLPFunction as torch.compile traces it (Dynamo does not trace a custom jvp; see TracedLinearFunction)."""

    jvp = torch.autograd.Function.jvp


def mlp_function():
    """The Function a call should apply: MLPFunction, or its traceable twin while torch.compile traces."""
    return TracedMLPFunction if torch.compiler.is_compiling() else MLPFunction
