"""The autograd Function of the gated layer (``functional.gated_linear``, ``manualbp.GatedMLP``).

    forward   A = f(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u)                       manualbp::gated_forward
    backward  δ_g = G ⊙ Z_u ⊙ f'(Z_g), δ_u = G ⊙ f(Z_g),
              ∂C/∂X = δ_g W_g + δ_u W_u, ∂C/∂W = δᵀ X, ∂C/∂b = 1ᵀ δ          manualbp::gated_backward
    jvp       dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u                     manualbp::gated_jvp

The equations are in ``gated_reference.py``, the operators in ``gated_ops.py``; this
mirrors the dense layer's ``function.py`` (and uses its helpers). What it keeps:
    recompute=False   Z_g and Z_u [M, I] (eager ``act(gate(x)) * up(x)`` keeps those and
                      f(Z_g) as well), x [M, K] where a weight needs a gradient
    recompute=True    x only; the backward rebuilds Z_g and Z_u from x and the parameters
The weights and, with recompute, the biases are kept too: parameters, so no memory.
A double backward (create_graph=True) recomputes Z_g, Z_u from x and the parameters in
differentiable ops. Where no weight needs a gradient (frozen weights: x not kept), it reads
the kept Z_g and Z_u instead: then those are differentiable outputs of the Function
(connected to x and the biases by this node), so the double backward differentiates δ_g and
δ_u through them, as the dense layer does with its frozen weight (function.py). Nothing more
is kept for it: Z_g and Z_u, 2·M·I·element_size bytes, are what the first-order backward
keeps anyway. Not while torch.compile traces (compiled code has no double backward). For
forward mode, x, the weights, biases and Z's are kept only while a forward-mode transform is active.

:class:`GateFunction` is the gating alone, A = f(Z_g) ⊙ Z_u from Z's computed elsewhere (GatedMLP's
projections run as modules: hooks, adapters, quantized weights); it keeps Z_g and Z_u, as the layer does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import gated_ops, gated_reference, ops
from .activations import Activation
from .function import _check_unchanged, _tangents, _version, forward_mode_active

_NONE = (None,) * 9  # one per forward argument


def differentiable_backward(grad_a: Optional[Tensor], x: Optional[Tensor], gate_weight: Tensor, up_weight: Tensor,
                            gate_bias: Optional[Tensor], up_bias: Optional[Tensor], activation: Activation, needs,
                            z_gate: Optional[Tensor] = None, z_up: Optional[Tensor] = None,
                            grad_z_gate: Optional[Tensor] = None, grad_z_up: Optional[Tensor] = None):
    """The backward for create_graph=True: the same equations in differentiable torch ops, so that the gradients
    depend on x and the parameters in the graph being built. Z_g, Z_u [M, I] recomputed from the inputs, or, where
    x was not kept (frozen weights), the layer's connected Z outputs (z_gate, z_up). grad_z_gate, grad_z_up:
    ∂C/∂Z reaching those outputs (a double backward through δ), added to δ_g, δ_u; grad_a may then be None."""
    if x is not None:
        z_gate, z_up = gated_reference.pre_activations(x, gate_weight, up_weight, gate_bias, up_bias)
    deltas = [grad_z_gate, grad_z_up]
    if grad_a is not None:
        formed = gated_reference.differentiable_deltas(grad_a, z_gate, z_up, activation)
        deltas = [d if g is None else d + g for d, g in zip(formed, deltas)]
    some = next(d for d in deltas if d is not None)
    delta_gate, delta_up = (d if d is not None else torch.zeros_like(some) for d in deltas)
    return gated_reference.gated_backward(delta_gate, delta_up, x, gate_weight, up_weight, needs)


class GatedLinearFunction(torch.autograd.Function):
    """A = f(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u) with a hand-written backward and jvp.

    ``GatedLinearFunction.apply(x, gate_weight, up_weight, gate_bias, up_bias, activation, recompute, backend,
    direct)``: x [M, K], weights [I, K], biases [I] or None, activation an Activation, backend 'triton' or
    'reference' (resolved), direct = ``ops.dispatch_free`` of the tensors -> (a [M, I], z_gate, z_up), the
    Z's [M, I] ([0] with recompute) not differentiable, except where the weights are frozen (module docstring).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor],
                up_bias: Optional[Tensor], activation: Activation, recompute: bool, backend: str, direct: bool):
        a, z_gate, z_up = gated_ops.route(direct).gated_forward(x, gate_weight, up_weight, gate_bias, up_bias,
                                                                activation, not recompute, backend)
        if z_gate is None:
            return a, a.new_empty((0,)), a.new_empty((0,))
        return a, z_gate, z_up

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gate_weight, up_weight, gate_bias, up_bias, activation, recompute, backend, direct = inputs
        _, z_gate, z_up = output
        needs = ctx.needs_input_grad[:5]
        # Under torch.func every backward is differentiable (jacrev, hessian): keep x to recompute Z. In forward
        # mode x is kept for jvp anyway (save_for_forward): keeping it here too costs nothing.
        keep_x = recompute or needs[1] or needs[2] or (not direct and forward_mode_active())
        biases = (gate_bias, up_bias) if recompute else (None, None)  # read again only to recompute Z
        kept_z = (None, None) if recompute else (z_gate, z_up)
        ctx.save_for_backward(x if keep_x else None, gate_weight, up_weight, *biases, *kept_z)
        # No x to recompute Z from (frozen weights): the kept Z's are outputs connected to x and the biases by this
        # node, so that a double backward differentiates δ through them (the module docstring).
        ctx.z_connected = not keep_x and not torch.compiler.is_compiling()
        if not ctx.z_connected:
            ctx.mark_non_differentiable(z_gate, z_up)
        ctx.set_materialize_grads(False)  # as LinearFunction: no zeros built for the Z outputs' gradients
        ctx.activation, ctx.backend, ctx.direct, ctx.recompute = activation, backend, direct, recompute
        ctx.saved_unchanged = direct and ops.saved_unchanged()
        # For a double backward only (it recomputes Z): parameters, so no memory; versions to detect changes.
        ctx.biases = (gate_bias, up_bias)
        if direct:  # plain eager code: plain tensors, not compiling (ops.dispatch_free); no call per bias
            ctx.versions = (None if gate_bias is None else gate_bias._version,
                            None if up_bias is None else up_bias._version)
        else:
            ctx.versions = (_version(gate_bias), _version(up_bias))
        if not direct and forward_mode_active():
            ctx.save_for_forward(x, gate_weight, up_weight, gate_bias, up_bias, *kept_z)

    @staticmethod
    def backward(ctx, grad_a: Optional[Tensor], grad_z_gate: Optional[Tensor], grad_z_up: Optional[Tensor]):
        # ∂C/∂Z reaches the kept Z's only where they are connected (a double backward through δ); elsewhere they
        # are not differentiable and what arrives for them (zeros, when compiled) is not a gradient.
        grad_zs = (grad_z_gate, grad_z_up) if ctx.z_connected else (None, None)
        reaches_z = grad_zs[0] is not None or grad_zs[1] is not None
        if grad_a is None and not reaches_z:  # no gradient reached A (nor Z): every gradient is zero
            return _NONE
        saved = ctx.saved_tensors
        x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up = saved
        needs = list(ctx.needs_input_grad[:5])
        needs[3] = needs[3] and ctx.biases[0] is not None
        needs[4] = needs[4] and ctx.biases[1] is not None
        if torch.is_grad_enabled() or reaches_z:
            if x is None and not ctx.z_connected:
                raise RuntimeError(
                    "double backward (create_graph=True) through a manualbp gated layer whose forward torch.compile "
                    "traced with frozen weights: Z_g, Z_u depend on x, which was not kept, and the kept Z's are not "
                    "connected (compiled code has no double backward). Run the forward eagerly, make a weight "
                    "require grad, or use GatedMLP(recompute=True), which always keeps x.")
            gate_bias = _check_unchanged(ctx.biases[0], ctx.versions[0], "bias")
            up_bias = _check_unchanged(ctx.biases[1], ctx.versions[1], "bias")
            grads = differentiable_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, ctx.activation,
                                            needs, z_gate, z_up, *grad_zs)
        else:
            # The forward's tensors were plain; the modes, G, and what saved-tensor hooks returned may not be.
            direct = ctx.direct and ops.dispatch_free((grad_a,) if ctx.saved_unchanged else (grad_a, *saved))
            grads = gated_ops.route(direct).gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias,
                                                           z_gate, z_up, ctx.activation, needs, ctx.backend)
        return (*grads, None, None, None, None)

    @staticmethod
    def jvp(ctx, tangent_x, tangent_gate_weight, tangent_up_weight, tangent_gate_bias, tangent_up_bias, *_):
        tangents = (tangent_x, tangent_gate_weight, tangent_up_weight, tangent_gate_bias, tangent_up_bias)
        if all(t is None for t in tangents):
            return None, None, None  # no tangent came in: A's is zero
        x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up = ctx.saved_tensors  # what save_for_forward kept
        tangents = _tangents((x, gate_weight, up_weight, gate_bias, up_bias), tangents)
        # Forward mode is never plain eager code (a dual level or a torch.func transform is active).
        tangent_a = gated_ops.dispatched.gated_jvp(x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up,
                                                   *tangents, ctx.activation, ctx.backend)
        return tangent_a, None, None


class TracedGatedLinearFunction(GatedLinearFunction):
    """GatedLinearFunction as torch.compile traces it (Dynamo does not trace a custom jvp; see
    function.TracedLinearFunction)."""

    jvp = torch.autograd.Function.jvp


def gated_linear_function(direct: bool = False):
    """The Function a call should apply: GatedLinearFunction, or its traceable twin while torch.compile traces.

    direct: ``ops.dispatch_free`` held for this call, so nothing is compiling (not asked again)."""
    return GatedLinearFunction if direct or not torch.compiler.is_compiling() else TracedGatedLinearFunction


class GateFunction(torch.autograd.Function):
    """A = f(Z_g) ⊙ Z_u with a hand-written backward (δ_g, δ_u) and jvp.

    ``GateFunction.apply(z_gate, z_up, activation, backend, direct)``: z_gate, z_up [M, I] -> a [M, I].
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(z_gate: Tensor, z_up: Tensor, activation: Activation, backend: str, direct: bool):
        return gated_ops.route(direct).gate_forward(z_gate, z_up, activation, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z_gate, z_up, activation, backend, direct = inputs
        ctx.save_for_backward(z_gate, z_up)
        ctx.set_materialize_grads(False)
        ctx.activation, ctx.backend, ctx.direct = activation, backend, direct
        ctx.saved_unchanged = direct and ops.saved_unchanged()
        if not direct and forward_mode_active():
            ctx.save_for_forward(z_gate, z_up)

    @staticmethod
    def backward(ctx, grad_a: Optional[Tensor]):
        if grad_a is None:
            return None, None, None, None, None
        z_gate, z_up = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: f' by its formula, in differentiable ops
            delta_gate, delta_up = gated_reference.differentiable_deltas(grad_a, z_gate, z_up, ctx.activation)
        else:
            direct = ctx.direct and ops.dispatch_free((grad_a,) if ctx.saved_unchanged else (grad_a, z_gate, z_up))
            delta_gate, delta_up = gated_ops.route(direct).gate_backward(grad_a, z_gate, z_up, ctx.activation,
                                                                         ctx.backend)
        needs_gate, needs_up = ctx.needs_input_grad[:2]
        return (delta_gate if needs_gate else None), (delta_up if needs_up else None), None, None, None

    @staticmethod
    def jvp(ctx, tangent_gate, tangent_up, *_):
        if tangent_gate is None and tangent_up is None:
            return None
        z_gate, z_up = ctx.saved_tensors
        return gated_ops.dispatched.gate_jvp(z_gate, z_up, tangent_gate, tangent_up, ctx.activation, ctx.backend)


class TracedGateFunction(GateFunction):
    """GateFunction as torch.compile traces it (no custom jvp: see function.TracedLinearFunction)."""

    jvp = torch.autograd.Function.jvp


def gate_function(direct: bool = False):
    """GateFunction, or its traceable twin while torch.compile traces (direct: as gated_linear_function's)."""
    return GateFunction if direct or not torch.compiler.is_compiling() else TracedGateFunction
