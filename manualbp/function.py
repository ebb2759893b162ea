"""The autograd Function of the dense layer, and the two backends behind it.

One ``torch.autograd.Function`` per layer. Its backward does not ask autograd
for anything: it evaluates the equations of ``reference.py``,

    δ = G ⊙ f'(Z),   ∂C/∂X = δ W,   ∂C/∂W = δᵀ X,   ∂C/∂b = 1ᵀ δ,

either in Triton kernels or in plain PyTorch, and computes only what
``ctx.needs_input_grad`` asks for.

Saved for backward (by reference, nothing is copied):
    x [M, K]                     the factor of ∂C/∂W = δᵀ X; only when the weight needs a
                                 gradient (a frozen layer keeps no activation it does not need)
    weight [N, K]                the factor of ∂C/∂X = δ W (a parameter: no memory)
    bias [N] or None             only to recompute Z in a double backward
    A [M, N]                     when f' can be computed from the output
                                 (relu, leaky_relu with slope >= 0, sigmoid, tanh)
    Z [M, N]                     otherwise (gelu, gelu_tanh, silu, leaky_relu with slope < 0)
    nothing else                 for identity (f' = 1)
The same as nn.Linear followed by the PyTorch activation module saves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, reference
from .activations import Activation


def forward(backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation, need_z: bool):
    """(A, Z or None) = (f(X Wᵀ + b), X Wᵀ + b) on the chosen backend; x [M, K] -> [M, N]."""
    if backend == "triton":
        return backends.kernels().linear_forward(
            x, weight, bias, activation.kernel_id, activation.kernel_slope, write_z=need_z
        )
    a, z = reference.linear_forward(x, weight, bias, activation)
    return a, (z if need_z else None)


def activation(backend: str, activation: Activation, z: Tensor) -> Tensor:
    """A = f(Z) [M, N] from a kept Z, on the chosen backend (manualbp.MLP with recompute=True)."""
    if activation.name == "identity":
        return z
    if backend == "triton":
        return backends.kernels().activation_forward(z, activation.kernel_id, activation.kernel_slope)
    return reference.activation_forward(activation, z)


def backward(backend: str, grad_a: Tensor, x: Tensor, weight: Tensor, saved: Optional[Tensor],
             activation: Activation, needs_grad_x: bool, needs_grad_weight: bool, needs_grad_bias: bool,
             from_output: Optional[bool] = None):
    """(∂C/∂X, ∂C/∂W, ∂C/∂b), each None when not needed. grad_a [M, N]; saved: A or Z [M, N], None for identity.

    ``from_output`` says whether ``saved`` is A (True) or Z (False); None means what
    this layer's forward saves, ``activation.saves_output``. (manualbp.MLP with
    recompute=True keeps only Z, so it passes False for every activation.)
    """
    if from_output is None:
        from_output = activation.saves_output
    elif from_output and not activation.saves_output:
        raise ValueError(f"activation {activation.name!r} cannot compute f' from its output A; pass Z")
    if backend == "triton":
        dense = backends.kernels()
        delta, grad_bias = dense.delta_and_bias_grad(
            grad_a, saved, activation.kernel_id, activation.kernel_slope, from_output,
            want_delta=needs_grad_x or needs_grad_weight, want_bias=needs_grad_bias,
        )
        grad_x = dense.matmul(delta, weight) if needs_grad_x else None  # ∂C/∂X = δ W   [M, N] [N, K]
        grad_weight = dense.matmul(delta.t(), x) if needs_grad_weight else None  # ∂C/∂W = δᵀ X  [N, M] [M, K]
        return grad_x, grad_weight, grad_bias
    delta = reference.delta(grad_a, saved, activation, from_output)  # δ = G ⊙ f'(Z)  [M, N]
    return reference.linear_backward(delta, x, weight, needs_grad_x, needs_grad_weight, needs_grad_bias)


def differentiable_backward(grad_a: Tensor, x: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                            activation: Activation, needs_grad_x: bool, needs_grad_weight: bool,
                            needs_grad_bias: bool, a: Optional[Tensor] = None):
    """The backward for create_graph=True (double backward): what ``backward`` returns, in differentiable torch ops.

    f' must depend on x, W and b in the graph being built: Z is recomputed from the
    saved inputs, or, where x was not kept (frozen weight), f' is read off the
    layer's output ``a``, which the graph already connects to x, W and b. An
    activation whose f' needs Z then has nothing to differentiate: a clear error.
    """
    if activation.name == "identity":
        delta = grad_a
    elif x is not None:
        z = reference.pre_activation(x, weight, bias)
        delta = reference.differentiable_delta(grad_a, z, activation, False)
    elif activation.saves_output and a is not None:
        delta = reference.differentiable_delta(grad_a, a, activation, True)
    else:
        raise RuntimeError(
            f"double backward (create_graph=True) through a manualbp layer with activation {activation.name!r} "
            f"and a frozen weight: f' depends on Z = X Wᵀ + b, and X was not saved because the weight needs no "
            f"gradient (as nn.Linear does). Set weight.requires_grad_(True) for this computation, or use an "
            f"activation whose f' comes from its output (identity, relu, leaky_relu with slope >= 0, sigmoid, tanh)."
        )
    return reference.linear_backward(delta, x, weight, needs_grad_x, needs_grad_weight, needs_grad_bias)


class LinearFunction(torch.autograd.Function):
    """A = f(X Wᵀ + b) with a hand-written backward. x [M, K], weight [N, K], bias [N] or None -> [M, N]."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation, backend: str):
        identity = activation.name == "identity"
        need_z = not (identity or activation.saves_output)
        a, z = forward(backend, x, weight, bias, activation, need_z)
        saved = None if identity else (a if activation.saves_output else z)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, bias, saved)
        ctx.activation = activation
        ctx.backend = backend
        return a

    @staticmethod
    def backward(ctx, grad_a: Tensor):
        x, weight, bias, saved = ctx.saved_tensors
        needs_grad_x, needs_grad_weight, needs_grad_bias = ctx.needs_input_grad[:3]
        activation = ctx.activation
        if torch.is_grad_enabled():
            grads = differentiable_backward(
                grad_a, x, weight, bias, activation, needs_grad_x, needs_grad_weight, needs_grad_bias, a=saved
            )
        else:
            grads = backward(
                ctx.backend, grad_a, x, weight, saved, activation, needs_grad_x, needs_grad_weight, needs_grad_bias
            )
        grad_x, grad_weight, grad_bias = grads
        return grad_x, grad_weight, grad_bias, None, None
