"""The dense layer's equations, forward and backward: the one place they are stated.

A batch is stored row-wise, as in ``nn.Linear``: x [M, K] holds M samples of K
input features, weight [N, K] maps K inputs to N outputs, bias [N]. Gradients
are in denominator layout: each has the shape of its variable, so ∂C/∂W is
[N, K] like W. G = ∂C/∂A is the gradient arriving from the next layer.

    forward     Z = X Wᵀ + b          [M, N] = [M, K] [K, N] + [N] (b added to every row)
                A = f(Z)              [M, N], elementwise
    backward    δ = G ⊙ f'(Z)         [M, N], elementwise                 (∂C/∂Z)
                ∂C/∂X = δ W           [M, K] = [M, N] [N, K]
                ∂C/∂W = δᵀ X          [N, K] = [N, M] [M, K]
                ∂C/∂b = 1ᵀ δ          [N]    = column sums of δ
    forward     dZ = dX Wᵀ + X dWᵀ + db   [M, N] = [M, K] [K, N] + [M, K] [K, N] + [N]
    mode (jvp)  dA = f'(Z) ⊙ dZ            [M, N], elementwise       (the tangent of A)

Why this order (docs/derivation.md derives it): in denominator layout the chain
rule multiplies the transposed Jacobians innermost-first. For one sample,
∂C/∂x = (∂z/∂x)(∂a/∂z)(∂C/∂a) = Wᵀ diag(f'(z)) g = Wᵀ δ; stacking samples as
rows transposes every product, (Wᵀ δ)ᵀ = δᵀ W, which is the row-wise δ W. ∂C/∂W
is read off the differential: dZ = X dWᵀ, so dC = tr(δᵀ dZ) = tr(δᵀ X dWᵀ)
= tr((δᵀ X)ᵀ dW), hence ∂C/∂W = δᵀ X, the sum over samples of δᵢ xᵢᵀ.

Forward mode runs the chain the other way: a tangent (dX, dW, db) of the inputs is
pushed through the Jacobians innermost first, dZ = (∂Z/∂X) dX + (∂Z/∂W) dW + db, then
dA = (∂A/∂Z) dZ = f'(Z) ⊙ dZ: the numerator-layout order (docs/derivation.md). It is
the differential of the forward, read left to right: dZ = dX Wᵀ + X dWᵀ + db. Any of
dX, dW, db may be absent (zero).

This module is the ``reference`` backend: plain PyTorch, no autograd in the
backward (each line below is one of the equations above). δ comes from PyTorch's
fused kernel for G ⊙ f'(Z) (``delta``); for double backward (``create_graph=True``)
``differentiable_delta`` forms it from the formula for f' in differentiable ops.
The Triton kernels (``triton_kernels/dense.py``) compute the same equations.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .activations import Activation

_HALF = (torch.float16, torch.bfloat16)


def _elementwise(fn, t: Tensor) -> Tensor:
    # A formula of several ops runs in float32 for float16/bfloat16 and is rounded once, as PyTorch's fused ops do.
    return fn(t.float()).to(t.dtype) if t.dtype in _HALF else fn(t)


def pre_activation(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Z = X Wᵀ + b: x [M, K], weight [N, K], bias [N] or None -> z [M, N]."""
    # aten's linear computes exactly addmm(b, X, Wᵀ) (mm(X, Wᵀ) without b), the transpose a view, in C++.
    return torch.nn.functional.linear(x, weight, bias)  # b + [M, K] [K, N]


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation):
    """A = f(X Wᵀ + b): x [M, K], weight [N, K], bias [N] or None -> (a [M, N], z [M, N])."""
    z = pre_activation(x, weight, bias)  # Z = X Wᵀ + b      [M, N]
    return activation.f(z), z  # A = f(Z)   [M, N] (activation_forward)


def activation_forward(activation: Activation, z: Tensor) -> Tensor:
    """A = f(Z) [M, N]: PyTorch's fused op (half types computed in float32, rounded once)."""
    return activation.f(z)


def delta(grad_a: Tensor, saved: Optional[Tensor], activation: Activation, kind: str) -> Tensor:
    """δ = G ⊙ f'(Z) [M, N] from saved = A (kind "a"), Z ("z") or f'(Z) ("f_prime"); saved is None for identity.

    From A or Z: one fused pass (``Activation.delta``: PyTorch's backward kernel for
    f, as eager autograd runs it). Not differentiable; ``differentiable_delta`` is.
    """
    if activation.name == "identity":
        return grad_a  # δ = G ⊙ 1
    if kind == "f_prime":
        return _times(grad_a, saved)
    return activation.delta(grad_a, saved, from_output=kind == "a")


def activation_grad(activation: Activation, saved: Tensor, kind: str) -> Tensor:
    """f'(Z) [M, N] by the formulas of activations.py, from saved = A (kind "a") or Z ("z")."""
    if kind == "a":
        return _elementwise(activation.f_grad_from_output, saved)
    return _elementwise(activation.f_grad, saved)


def differentiable_delta(grad_a: Tensor, saved: Optional[Tensor], activation: Activation, kind: str) -> Tensor:
    """δ = G ⊙ f'(Z) in differentiable torch ops (double backward): f' by its formula from A or Z, then the product."""
    if activation.name == "identity":
        return grad_a
    if activation.name == "relu":
        # A select, as PyTorch's threshold_backward (and the kernels): G * 0 would turn an inf or NaN G into NaN.
        return torch.where(saved <= 0, torch.zeros_like(grad_a), grad_a)
    return _times(grad_a, activation_grad(activation, saved, kind))


def _times(grad_a: Tensor, f_prime: Tensor) -> Tensor:
    if grad_a.dtype in _HALF:
        return (grad_a.float() * f_prime.float()).to(grad_a.dtype)  # in float32, rounded once
    return grad_a * f_prime


def linear_jvp(x: Optional[Tensor], weight: Optional[Tensor], saved: Optional[Tensor], activation: Activation,
               kind: str, tangent_x: Optional[Tensor], tangent_weight: Optional[Tensor],
               tangent_bias: Optional[Tensor], rows: int) -> Tensor:
    """dA = f'(Z) ⊙ (dX Wᵀ + X dWᵀ + db) [M, N], the tangent of A (forward mode).

    tangent_x [M, K] (needs weight [N, K]), tangent_weight [N, K] (needs x [M, K]),
    tangent_bias [N]: each may be None (a zero tangent). saved: A, Z or f'(Z) as kind
    says ("a", "z", "f_prime"); None for identity. rows = M.
    """
    like = tangent_x if tangent_x is not None else (tangent_weight if tangent_weight is not None else tangent_bias)
    columns = (weight if weight is not None else tangent_weight).shape[0]
    tangent_z = like.new_zeros((rows, columns))
    if tangent_x is not None:
        tangent_z = tangent_z + tangent_x.mm(weight.t())  # dX Wᵀ   [M, K] [K, N]
    if tangent_weight is not None:
        tangent_z = tangent_z + x.mm(tangent_weight.t())  # X dWᵀ   [M, K] [K, N]
    if tangent_bias is not None:
        tangent_z = tangent_z + tangent_bias  # db, added to every row
    # f'(Z) ⊙ dZ is the same elementwise product as δ = G ⊙ f'(Z): the same fused kernel.
    return delta(tangent_z, saved, activation, kind)


def linear_backward(
    delta: Tensor,
    x: Optional[Tensor],
    weight: Tensor,
    needs_grad_x: bool,
    needs_grad_weight: bool,
    needs_grad_bias: bool,
):
    """The backward of A = f(X Wᵀ + b), in denominator layout, from δ = G ⊙ f'(Z).

    delta [M, N] = ∂C/∂Z (``delta`` or ``differentiable_delta``); x [M, K] (None when
    ∂C/∂W is not needed); weight [N, K]. Returns (grad_x [M, K], grad_weight [N, K],
    grad_bias [N]), each None when not needed.
    """
    grad_x = delta.mm(weight) if needs_grad_x else None  # ∂C/∂X = δ W   [M, K] = [M, N] [N, K]
    grad_weight = delta.t().mm(x) if needs_grad_weight else None  # ∂C/∂W = δᵀ X  [N, K] = [N, M] [M, K]
    grad_bias = delta.sum(dim=0) if needs_grad_bias else None  # ∂C/∂b = 1ᵀ δ  [N]
    return grad_x, grad_weight, grad_bias
