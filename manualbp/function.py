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
    one [M, N] tensor for f', its "saved kind":
      "a"  A                     when f' can be computed from the output
                                 (relu, leaky_relu with slope >= 0, sigmoid, tanh)
      "z"  Z                     otherwise, on the reference backend (PyTorch's fused
                                 backward kernels take Z), and for leaky_relu with slope < 0
                                 (f' is a select on Z, exact where a rounded slope would not be)
      "f_prime"  f'(Z)           otherwise (gelu, gelu_tanh, silu) on the Triton backend: the
                                 forward epilogue evaluates f' once, so the backward's δ is one multiply
    nothing else                 for identity (f' = 1)
As many bytes as nn.Linear followed by the PyTorch activation module saves.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import backends, reference
from .activations import Activation

SAVED_KINDS = ("a", "z", "f_prime")

# f' formed inside the backward matmuls' operand loads is evaluated once per output tile of
# each matmul (the same element many times): done where it is a multiply or a select, from
# A, from f'(Z), or for relu / leaky_relu from Z; otherwise δ takes one elementwise pass.
_SELECT_FROM_Z = ("identity", "relu", "leaky_relu")


def saved_kind(backend: str, activation: Activation) -> Optional[str]:
    """What a layer's forward keeps for f' (see the module docstring): "a", "z", "f_prime", or None (identity)."""
    if activation.name == "identity":
        return None
    if activation.saves_output:
        return "a"
    if backend == "triton" and activation.name not in _SELECT_FROM_Z:
        return "f_prime"  # gelu, gelu_tanh, silu: f' evaluated once, in the forward epilogue
    return "z"  # the reference's fused kernels take Z; leaky_relu < 0: f' is a select on Z, exact


def prologue_enabled() -> bool:
    """False when the environment sets MANUALBP_DELTA_PROLOGUE=0: δ then always takes its own pass (for A/B timing)."""
    return os.environ.get("MANUALBP_DELTA_PROLOGUE", "1") != "0"


def forward(backend: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation,
            save: Optional[str] = None):
    """(A, saved or None) on the chosen backend: A = f(X Wᵀ + b), x [M, K] -> [M, N].

    ``save``: None (A only), "z" (also Z = X Wᵀ + b) or "f_prime" (also f'(Z)).
    """
    if save not in (None, "z", "f_prime"):
        raise ValueError(f"save must be None, 'z' or 'f_prime', got {save!r}")
    if backend == "triton":
        return backends.kernels().linear_forward(
            x, weight, bias, activation.kernel_id, activation.kernel_slope,
            write_z=save is not None, f_prime_as_z=save == "f_prime",
        )
    a, z = reference.linear_forward(x, weight, bias, activation)
    if save == "f_prime":
        return a, reference.activation_grad(activation, z, "z")
    return a, (z if save == "z" else None)


def activation(backend: str, activation: Activation, z: Tensor) -> Tensor:
    """A = f(Z) [M, N] from a kept Z, on the chosen backend (manualbp.MLP with recompute=True)."""
    if activation.name == "identity":
        return z
    if backend == "triton":
        return backends.kernels().activation_forward(z, activation.kernel_id, activation.kernel_slope)
    return reference.activation_forward(activation, z)


def backward(backend: str, grad_a: Tensor, x: Tensor, weight: Tensor, saved: Optional[Tensor],
             activation: Activation, needs_grad_x: bool, needs_grad_weight: bool, needs_grad_bias: bool,
             kind: Optional[str] = None):
    """(∂C/∂X, ∂C/∂W, ∂C/∂b), each None when not needed. grad_a [M, N]; saved [M, N], None for identity.

    ``kind`` says what ``saved`` is: "a", "z" or "f_prime"; None means what this
    layer's forward saves on this backend (``saved_kind``). manualbp.MLP passes "z"
    or "a" for what it keeps.
    """
    if kind is None:
        kind = saved_kind(backend, activation)
    elif kind not in SAVED_KINDS:
        raise ValueError(f"kind must be one of {SAVED_KINDS}, got {kind!r}")
    elif kind == "a" and not activation.saves_output:
        raise ValueError(f"activation {activation.name!r} cannot compute f' from its output A; pass Z or f'(Z)")
    kind = kind or "z"  # identity: nothing is read
    if backend == "triton":
        dense = backends.kernels()
        if prologue_enabled() and (kind != "z" or activation.name in _SELECT_FROM_Z):
            # δ formed in both matmuls' operand loads, ∂C/∂b from the ∂C/∂W matmul: no pass over [M, N] of its own.
            return dense.linear_backward(
                grad_a, x, weight, saved, activation.kernel_id, activation.kernel_slope, kind,
                want_x=needs_grad_x, want_weight=needs_grad_weight, want_bias=needs_grad_bias,
            )
        delta, grad_bias = dense.delta_and_bias_grad(
            grad_a, saved, activation.kernel_id, activation.kernel_slope, kind,
            want_delta=needs_grad_x or needs_grad_weight, want_bias=needs_grad_bias,
        )
        grad_x = dense.matmul(delta, weight) if needs_grad_x else None  # ∂C/∂X = δ W   [M, N] [N, K]
        grad_weight = dense.matmul(delta.t(), x) if needs_grad_weight else None  # ∂C/∂W = δᵀ X  [N, M] [M, K]
        return grad_x, grad_weight, grad_bias
    delta = reference.delta(grad_a, saved, activation, kind)  # δ = G ⊙ f'(Z)  [M, N]
    return reference.linear_backward(delta, x, weight, needs_grad_x, needs_grad_weight, needs_grad_bias)


def differentiable_backward(grad_a: Tensor, x: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                            activation: Activation, needs_grad_x: bool, needs_grad_weight: bool,
                            needs_grad_bias: bool, a: Optional[Tensor] = None):
    """The backward for create_graph=True (double backward): what ``backward`` returns, in differentiable torch ops.

    f' must depend on x, W and b in the graph being built: Z is recomputed from the
    saved inputs, or, where x was not kept (frozen weight), f' is read off the
    layer's output ``a`` (pass it only where it is what was saved), which the graph
    already connects to x, W and b. An activation whose f' needs Z then has nothing
    to differentiate: a clear error.
    """
    if activation.name == "identity":
        delta = grad_a
    elif x is not None:
        z = reference.pre_activation(x, weight, bias)
        delta = reference.differentiable_delta(grad_a, z, activation, "z")
    elif activation.saves_output and a is not None:
        delta = reference.differentiable_delta(grad_a, a, activation, "a")
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
        kind = saved_kind(backend, activation)
        a, extra = forward(backend, x, weight, bias, activation, save=None if kind in (None, "a") else kind)
        saved = a if kind == "a" else extra  # None for identity
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, bias, saved)
        ctx.activation = activation
        ctx.backend = backend
        ctx.kind = kind
        return a

    @staticmethod
    def backward(ctx, grad_a: Tensor):
        x, weight, bias, saved = ctx.saved_tensors
        needs_grad_x, needs_grad_weight, needs_grad_bias = ctx.needs_input_grad[:3]
        activation = ctx.activation
        if torch.is_grad_enabled():
            grads = differentiable_backward(
                grad_a, x, weight, bias, activation, needs_grad_x, needs_grad_weight, needs_grad_bias,
                a=saved if ctx.kind == "a" else None,
            )
        else:
            grads = backward(
                ctx.backend, grad_a, x, weight, saved, activation, needs_grad_x, needs_grad_weight, needs_grad_bias,
                kind=ctx.kind,
            )
        grad_x, grad_weight, grad_bias = grads
        return grad_x, grad_weight, grad_bias, None, None
