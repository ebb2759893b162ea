"""The gated layer's equations, forward and backward: the one place they are stated.

A gated layer (SwiGLU, GEGLU, ReGLU, GLU, bilinear: the first half of a Llama-family
MLP) has two weights that read the same input, and multiplies one product, through f,
with the other. x [M, K] holds M samples of K input features, gate_weight and
up_weight [I, K] (I: the intermediate width), gate_bias and up_bias [I] or None.
Gradients are in denominator layout, each the shape of its variable; G = ∂C/∂A [M, I].

    forward     Z_g = X W_gᵀ + b_g        [M, I] = [M, K] [K, I] + [I]
                Z_u = X W_uᵀ + b_u        [M, I]
                A = f(Z_g) ⊙ Z_u          [M, I], elementwise
    backward    δ_g = G ⊙ Z_u ⊙ f'(Z_g)   [M, I]   (∂C/∂Z_g)
                δ_u = G ⊙ f(Z_g)          [M, I]   (∂C/∂Z_u)
                ∂C/∂X = δ_g W_g + δ_u W_u  [M, K] = [M, I] [I, K] + [M, I] [I, K]
                ∂C/∂W_g = δ_gᵀ X          [I, K] = [I, M] [M, K]
                ∂C/∂W_u = δ_uᵀ X          [I, K]
                ∂C/∂b_g = 1ᵀ δ_g,  ∂C/∂b_u = 1ᵀ δ_u   [I], column sums
    forward     dZ_g = dX W_gᵀ + X dW_gᵀ + db_g,  dZ_u = dX W_uᵀ + X dW_uᵀ + db_u
    mode (jvp)  dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u      [M, I]

Why: A is a product of two elementwise factors, so its differential is the product
rule, dA = d(f(Z_g)) ⊙ Z_u + f(Z_g) ⊙ dZ_u with d(f(Z_g)) = f'(Z_g) ⊙ dZ_g. Reading
dC = ⟨G, dA⟩ = ⟨G ⊙ Z_u ⊙ f'(Z_g), dZ_g⟩ + ⟨G ⊙ f(Z_g), dZ_u⟩ gives δ_g and δ_u;
each Z is a dense layer's pre-activation, so from there the dense layer's equations
(``reference.py``) give the rest, and ∂C/∂X sums the two paths from X (both
products contract over I: in the Triton kernels, one accumulation over [δ_g δ_u]
and [W_g; W_u]). docs/derivation.md derives it in both layouts.

The factor G ⊙ Z_u is the G of the dense equation δ = G ⊙ f'(Z) for the gate: δ_g
is that δ, computed by the same fused kernel (``reference.delta``), the order of
the products as eager autograd takes them for ``act(gate(x)) * up(x)``.

What the layer keeps (gated_function.py): Z_g and Z_u, or with ``recompute`` only
X, from which the backward rebuilds both (:func:`pre_activations`).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from . import reference
from .activations import Activation


def pre_activations(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor],
                    up_bias: Optional[Tensor]):
    """(Z_g, Z_u) = (X W_gᵀ + b_g, X W_uᵀ + b_u): x [M, K], weights [I, K], biases [I] or None -> [M, I] each."""
    return reference.pre_activation(x, gate_weight, gate_bias), reference.pre_activation(x, up_weight, up_bias)


def gate(z_gate: Tensor, z_up: Tensor, activation: Activation) -> Tensor:
    """A = f(Z_g) ⊙ Z_u [M, I]."""
    return activation.f(z_gate) * z_up


def gated_forward(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor],
                  up_bias: Optional[Tensor], activation: Activation):
    """A = f(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u) -> (a [M, I], z_gate [M, I], z_up [M, I])."""
    z_gate, z_up = pre_activations(x, gate_weight, up_weight, gate_bias, up_bias)
    return gate(z_gate, z_up, activation), z_gate, z_up


def deltas(grad_a: Tensor, z_gate: Tensor, z_up: Tensor, activation: Activation):
    """(δ_g, δ_u) = (G ⊙ Z_u ⊙ f'(Z_g), G ⊙ f(Z_g)), [M, I] each; not differentiable (see differentiable_deltas)."""
    delta_gate = reference.delta(grad_a * z_up, z_gate, activation, "z")  # δ = G' ⊙ f'(Z_g), G' = G ⊙ Z_u
    delta_up = grad_a * activation.f(z_gate)  # G ⊙ f(Z_g)
    return delta_gate, delta_up


def differentiable_deltas(grad_a: Tensor, z_gate: Tensor, z_up: Tensor, activation: Activation):
    """(δ_g, δ_u) in differentiable torch ops (double backward): f' by its formula."""
    delta_gate = reference.differentiable_delta(grad_a * z_up, z_gate, activation, "z")
    delta_up = grad_a * reference.activation_forward(activation, z_gate)
    return delta_gate, delta_up


def gated_backward(delta_gate: Tensor, delta_up: Tensor, x: Optional[Tensor], gate_weight: Tensor,
                   up_weight: Tensor, needs):
    """The backward from (δ_g, δ_u) [M, I]: needs = [x, gate_weight, up_weight, gate_bias, up_bias] (bools).

    x [M, K] (None when no weight gradient is needed); weights [I, K]. Returns
    (∂C/∂X [M, K], ∂C/∂W_g [I, K], ∂C/∂W_u [I, K], ∂C/∂b_g [I], ∂C/∂b_u [I]), None where not needed.
    """
    needs_x, needs_gate_weight, needs_up_weight, needs_gate_bias, needs_up_bias = needs
    grad_x = delta_gate.mm(gate_weight) + delta_up.mm(up_weight) if needs_x else None  # δ_g W_g + δ_u W_u
    grad_gate_weight = delta_gate.t().mm(x) if needs_gate_weight else None  # δ_gᵀ X   [I, M] [M, K]
    grad_up_weight = delta_up.t().mm(x) if needs_up_weight else None  # δ_uᵀ X
    grad_gate_bias = delta_gate.sum(dim=0) if needs_gate_bias else None  # 1ᵀ δ_g
    grad_up_bias = delta_up.sum(dim=0) if needs_up_bias else None  # 1ᵀ δ_u
    return grad_x, grad_gate_weight, grad_up_weight, grad_gate_bias, grad_up_bias


def tangent_pre_activation(x: Tensor, weight: Tensor, tangent_x: Optional[Tensor], tangent_weight: Optional[Tensor],
                           tangent_bias: Optional[Tensor]) -> Optional[Tensor]:
    """dZ = dX Wᵀ + X dWᵀ + db [M, I]; None where every tangent is None (zero)."""
    tangent_z = None
    for term in (tangent_x.mm(weight.t()) if tangent_x is not None else None,  # dX Wᵀ
                 x.mm(tangent_weight.t()) if tangent_weight is not None else None,  # X dWᵀ
                 tangent_bias):  # db, added to every row
        if term is not None:
            tangent_z = term if tangent_z is None else tangent_z + term
    if tangent_z is tangent_bias and tangent_z is not None:
        tangent_z = tangent_z.expand(x.shape[0], weight.shape[0])  # db alone: one row for every sample
    return tangent_z


def gated_jvp(z_gate: Tensor, z_up: Tensor, activation: Activation, tangent_z_gate: Optional[Tensor],
              tangent_z_up: Optional[Tensor]) -> Tensor:
    """dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u [M, I] (a None tangent is zero; not both)."""
    tangent_a = None
    if tangent_z_gate is not None:
        # f'(Z_g) ⊙ dZ_g is δ = G ⊙ f'(Z) with G = dZ_g: the same fused kernel
        tangent_a = reference.delta(tangent_z_gate, z_gate, activation, "z") * z_up
    if tangent_z_up is not None:
        term = activation.f(z_gate) * tangent_z_up
        tangent_a = term if tangent_a is None else tangent_a + term
    return tangent_a
