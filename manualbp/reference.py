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

Why this order (docs/derivation.md derives it): in denominator layout the chain
rule multiplies the transposed Jacobians innermost-first. For one sample,
∂C/∂x = (∂z/∂x)(∂a/∂z)(∂C/∂a) = Wᵀ diag(f'(z)) g = Wᵀ δ; stacking samples as
rows transposes every product, (Wᵀ δ)ᵀ = δᵀ W, which is the row-wise δ W. ∂C/∂W
is read off the differential: dZ = X dWᵀ, so dC = tr(δᵀ dZ) = tr(δᵀ X dWᵀ)
= tr((δᵀ X)ᵀ dW), hence ∂C/∂W = δᵀ X, the sum over samples of δᵢ xᵢᵀ.

This module is the ``reference`` backend: plain PyTorch, no autograd in the
backward (each line below is one of the equations above). Because the same ops
are differentiable, it also serves double backward (``create_graph=True``).
The Triton kernels (``triton_kernels/dense.py``) compute the same equations.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .activations import Activation

_HALF = (torch.float16, torch.bfloat16)


def _elementwise(fn, t: Tensor) -> Tensor:
    # Activations of float16/bfloat16 run in float32 and are rounded once, as PyTorch's own do.
    return fn(t.float()).to(t.dtype) if t.dtype in _HALF else fn(t)


def pre_activation(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Z = X Wᵀ + b: x [M, K], weight [N, K], bias [N] or None -> z [M, N]."""
    if bias is None:
        return torch.mm(x, weight.t())  # [M, K] [K, N]
    return torch.addmm(bias, x, weight.t())  # b + [M, K] [K, N]


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation):
    """A = f(X Wᵀ + b): x [M, K], weight [N, K], bias [N] or None -> (a [M, N], z [M, N])."""
    z = pre_activation(x, weight, bias)  # Z = X Wᵀ + b      [M, N]
    if activation.name == "identity":
        return z, z
    a = _elementwise(activation.f, z)  # A = f(Z)          [M, N]
    return a, z


def activation_grad(activation: Activation, saved: Tensor, from_output: bool) -> Tensor:
    """f'(Z) [M, N], from saved = A (from_output) or saved = Z."""
    if from_output:
        return _elementwise(activation.f_grad_from_output, saved)
    return _elementwise(activation.f_grad, saved)


def linear_backward(
    grad_a: Tensor,
    x: Tensor,
    weight: Tensor,
    f_prime: Optional[Tensor],
    needs_grad_x: bool,
    needs_grad_weight: bool,
    needs_grad_bias: bool,
):
    """The backward of A = f(X Wᵀ + b), in denominator layout.

    grad_a [M, N] = G = ∂C/∂A; x [M, K]; weight [N, K]; f_prime [M, N] = f'(Z),
    or None for the identity (f' = 1). Returns (grad_x [M, K], grad_weight [N, K],
    grad_bias [N]), each None when not needed.
    """
    if f_prime is None:
        delta = grad_a  # δ = G ⊙ 1             [M, N]
    elif grad_a.dtype in _HALF:
        delta = (grad_a.float() * f_prime.float()).to(grad_a.dtype)  # δ = G ⊙ f'(Z), in float32
    else:
        delta = grad_a * f_prime  # δ = G ⊙ f'(Z)         [M, N]
    grad_x = delta.mm(weight) if needs_grad_x else None  # ∂C/∂X = δ W   [M, K] = [M, N] [N, K]
    grad_weight = delta.t().mm(x) if needs_grad_weight else None  # ∂C/∂W = δᵀ X  [N, K] = [N, M] [M, K]
    grad_bias = delta.sum(dim=0) if needs_grad_bias else None  # ∂C/∂b = 1ᵀ δ  [N]
    return grad_x, grad_weight, grad_bias
