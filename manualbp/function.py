"""The autograd Function of the dense layer: one for eager code, torch.func and torch.compile alike.

    forward   A = f(X Wᵀ + b)                                    manualbp::linear_forward
    backward  δ = G ⊙ f'(Z), ∂C/∂X = δ W, ∂C/∂W = δᵀ X, ∂C/∂b = 1ᵀ δ   manualbp::linear_backward
    jvp       dA = f'(Z) ⊙ (dX Wᵀ + X dWᵀ + db)                   manualbp::linear_jvp

The equations are in ``reference.py``; the operators in ``ops.py``. The backward
asks autograd for nothing: it evaluates those equations and computes only what
``ctx.needs_input_grad`` asks for. Under ``create_graph=True`` (double backward,
Hessians) it runs the same equations in differentiable torch ops instead
(:func:`differentiable_backward`). vmap is generated from the operators' vmap rules.
The same backward (:func:`backward`) is manualbp::linear_forward's autograd formula, for
a program from torch.export, which records that operator alone (the end of this file).

What the layer keeps, decided in one place (:func:`saved_kind` and
``LinearFunction.setup_context``) — the tensors nn.Linear followed by the PyTorch
activation module keeps, no more:
    x [M, K]          the factor of ∂C/∂W = δᵀ X: only when the weight needs a gradient
                      (or inside a torch.func transform, where backward is always differentiable)
    weight [N, K]     the factor of ∂C/∂X = δ W: only when x needs a gradient (a parameter: no memory)
    one [M, N] tensor for f', its "saved kind" (:func:`saved_kind`):
      "a"        A, where f' can be computed from the output (relu, leaky_relu with slope >= 0,
                 sigmoid, tanh)
      "z"        Z, on the reference backend (PyTorch's fused backward kernels take Z), and for
                 leaky_relu with slope < 0 (f' is a select on Z, exact where a rounded slope is not)
      "f_prime"  f'(Z) on the Triton backend for gelu, gelu_tanh, silu: the forward epilogue
                 evaluates f' once, so δ is one multiply in the backward matmuls' operand loads
                 (a trainable weight only: see the frozen weight below)
    nothing for identity (f' = 1)
The bias is never saved (∂C/∂b = 1ᵀ δ does not read it), so changing it in place
between forward and backward is as harmless as with nn.Linear. A double backward
recomputes Z = X Wᵀ + b, reading the weight and bias the forward used (it raises
if they were changed in place since); for forward mode, x and the weight are kept
only while a forward-mode transform is active.

A frozen weight (no x kept) and an f' that needs Z (gelu, gelu_tanh, silu, leaky_relu
with slope < 0): the layer keeps Z [M, N] on both backends, M·N·element_size bytes, what
nn.Linear + the activation module keep (the module keeps its input Z). On the Triton
backend that is instead of f'(Z), the same bytes; its first-order backward then forms δ
in one elementwise pass before the ∂C/∂X matmul. Z is then a differentiable output of
the Function (connected to x and b by this node), so a double backward differentiates
f'(Z) through it where it cannot recompute Z: nn.Linear + activation's second
derivative, with nothing more kept. Not while torch.compile traces (compiled code has
no double backward): there the Triton backend keeps f'(Z) as for a trainable weight.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers  # what Function.apply does first

from . import ops, reference
from .activations import Activation


def saved_kind(backend: str, activation: Activation, frozen_weight: bool = False) -> Optional[str]:
    """What a layer keeps for f' (see the module docstring): "a", "z", "f_prime", or None (identity).

    frozen_weight: the weight needs no gradient (so x is not kept) and the call may be
    differentiated twice: Z on either backend, for a double backward to differentiate f'(Z).
    """
    if activation.name == "identity":
        return None
    if activation.saves_output:
        return "a"
    if backend == "triton" and activation.name not in ops._SELECT_FROM_Z and not frozen_weight:
        return "f_prime"  # gelu, gelu_tanh, silu: f' evaluated once, in the forward epilogue
    return "z"  # the reference's fused kernels take Z; leaky_relu < 0: f' is a select on Z, exact


def forward_save(backend: str, activation: Activation, weight: Tensor, direct: bool = False) -> str:
    """The ``save`` argument of manualbp::linear_forward for a layer that will be differentiated.

    direct: ``ops.dispatch_free`` held for this call, so nothing is compiling (not asked again)."""
    frozen = not weight.requires_grad and (direct or not torch.compiler.is_compiling())
    kind = saved_kind(backend, activation, frozen)
    return kind if kind in ("z", "f_prime") else ""


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, jacrev, ...) is running."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def forward_mode_active() -> bool:
    """Whether a forward-mode tangent may reach a Function now (torch.func transforms, dual levels)."""
    return transforms_active() or forward_ad._current_level >= 0


def _check_unchanged(tensor: Optional[Tensor], version: Optional[int], name: str) -> Optional[Tensor]:
    if tensor is not None and version is not None and tensor._version != version:
        raise RuntimeError(
            f"double backward (create_graph=True) through a manualbp layer recomputes Z = X Wᵀ + b from the "
            f"{name} the forward used, but {name} was modified in place after the forward. Compute the first "
            f"gradient before changing it (first-order backward does not read it)."
        )
    return tensor


def _version(tensor: Optional[Tensor]) -> Optional[int]:
    if tensor is None or torch.compiler.is_compiling():  # a traced graph has no version counters to compare
        return None
    try:
        return tensor._version
    except (RuntimeError, NotImplementedError):  # a functorch wrapper without a version counter
        return None


def differentiable_backward(grad_a: Optional[Tensor], x: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                            activation: Activation, needs_grad_x: bool, needs_grad_weight: bool,
                            needs_grad_bias: bool, a: Optional[Tensor] = None, z: Optional[Tensor] = None,
                            grad_z: Optional[Tensor] = None):
    """The backward for create_graph=True (double backward): what linear_backward returns, in differentiable ops.

    f' must depend on x, W and b in the graph being built: Z is recomputed from the
    inputs, or, where x was not kept (frozen weight), f' is read off the layer's
    output ``a`` or its output ``z`` (pass each only where it is what was saved), which
    the graph already connects to x and b. Neither kept: a clear error.
    ``grad_z`` [M, N]: ∂C/∂Z reaching the output Z (a double backward through f'(Z)),
    added to δ; grad_a may then be None.
    """
    if grad_a is None:
        delta = grad_z
    else:
        delta = _differentiable_delta(grad_a, x, weight, bias, activation, a, z)
        if grad_z is not None:
            delta = delta + grad_z
    return reference.linear_backward(delta, x, weight, needs_grad_x, needs_grad_weight, needs_grad_bias)


def _differentiable_delta(grad_a: Tensor, x: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                          activation: Activation, a: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """δ = G ⊙ f'(Z) for differentiable_backward, f' from whichever of Z (recomputed or kept) and A is connected."""
    if activation.name == "identity":
        return grad_a
    if x is not None:
        z = reference.pre_activation(x, weight, bias)
    if z is not None:
        return reference.differentiable_delta(grad_a, z, activation, "z")
    if activation.saves_output and a is not None:
        return reference.differentiable_delta(grad_a, a, activation, "a")
    raise RuntimeError(
        f"double backward (create_graph=True) through a manualbp layer with activation {activation.name!r} "
        f"and a frozen weight: f' depends on Z = X Wᵀ + b, and neither X nor Z was kept connected (a forward "
        f"traced by torch.compile keeps f'(Z)). Run the forward eagerly, or set weight.requires_grad_(True)."
    )


def backward(ctx, grad_a: Optional[Tensor], grad_z: Optional[Tensor], x: Optional[Tensor],
             weight_for_x: Optional[Tensor], saved: Optional[Tensor]):
    """The layer's backward: (∂C/∂X, ∂C/∂W, ∂C/∂b), None where ``ctx.needs_input_grad`` says no.

    LinearFunction's, and the exported operator's autograd formula's (:func:`_exported_backward`):
    from the tensors kept (x, the weight for ∂C/∂X, A / Z / f'(Z) as ``ctx.kind`` says) and what
    setup_context put on ctx (activation, backend, kind, parameters and their versions, z_connected,
    direct, saved_unchanged). grad_z: ∂C/∂Z reaching a connected Z, or None.
    """
    needs_grad_x, needs_grad_weight, needs_grad_bias = ctx.needs_input_grad[:3]
    activation = ctx.activation
    if torch.is_grad_enabled() or grad_z is not None:
        weight = _check_unchanged(ctx.parameters[0], ctx.versions[0], "weight")
        bias = _check_unchanged(ctx.parameters[1], ctx.versions[1], "bias")
        return differentiable_backward(
            grad_a, x, weight, bias, activation, needs_grad_x, needs_grad_weight, needs_grad_bias,
            a=saved if ctx.kind == "a" else None, z=saved if ctx.z_connected else None, grad_z=grad_z,
        )
    # The forward's tensors were plain; the modes, G, and what saved-tensor hooks returned may not be.
    direct = ctx.direct and ops.dispatch_free(
        (grad_a,) if ctx.saved_unchanged else (grad_a, x, weight_for_x, saved))
    return ops.route(direct).linear_backward(
        grad_a, x, weight_for_x, saved, activation, ctx.kind or "z",
        [needs_grad_x, needs_grad_weight, needs_grad_bias], ctx.backend)


def _tangents(primals, tangents):
    """Zeros for the tangents of tensor inputs that have none, as PyTorch's own forward-mode formulas use:
    X dWᵀ with dW = 0 is NaN where X is infinite, in nn.Linear's tangent too."""
    return tuple(torch.zeros_like(primal) if tangent is None and primal is not None else tangent
                 for primal, tangent in zip(primals, tangents))


class LinearFunction(torch.autograd.Function):
    """A = f(X Wᵀ + b) with a hand-written backward and jvp.

    ``LinearFunction.apply(x, weight, bias, activation, backend, save, direct)``: x [M, K],
    weight [N, K], bias [N] or None, activation an Activation, backend 'triton' or
    'reference' (resolved), save = :func:`forward_save`, direct = ``ops.dispatch_free``
    of (x, weight, bias) -> (a [M, N], saved), where saved is Z or f'(Z) as save says
    ([0] for "") and is not differentiable, except a Z kept for a frozen weight (the module docstring).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Activation, backend: str, save: str,
                direct: bool):
        a, saved = ops.route(direct).linear_forward(x, weight, bias, activation, save, backend)
        return a, (saved if saved is not None else a.new_empty((0,)))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation, backend, save, direct = inputs
        a, extra = output
        kind = saved_kind(backend, activation, frozen_weight=save == "z")
        if kind in ("z", "f_prime") and save != kind:
            raise ValueError(f"LinearFunction: activation {activation.name!r} on the {backend} backend keeps "
                             f"{kind!r}; call it with save={kind!r} (function.forward_save)")
        saved = a if kind == "a" else (extra if kind is not None else None)
        needs_grad_x, needs_grad_weight = ctx.needs_input_grad[:2]
        # direct: plain eager code, so no torch.func transform, no forward mode, not compiling (ops.dispatch_free).
        # Under torch.func, every backward is differentiable (jacrev, hessian): keep x to recompute Z.
        # In forward mode x is kept for jvp anyway (save_for_forward): keeping it here too costs nothing.
        keep_x = needs_grad_weight or (not direct and forward_mode_active())
        ctx.save_for_backward(x if keep_x else None, weight if needs_grad_x else None, saved)
        # No x to recompute Z from (frozen weight): the kept Z is an output connected to x and b by this node, so
        # that a double backward differentiates f'(Z) through it (the module docstring).
        ctx.z_connected = kind == "z" and not keep_x and (direct or not torch.compiler.is_compiling())
        if not ctx.z_connected:
            ctx.mark_non_differentiable(extra)
        # A gradient nobody sent stays None (the default builds zeros: here an [M, N] tensor for the saved
        # output on every backward); backward reads None as zero, jvp builds its zeros itself (_tangents).
        ctx.set_materialize_grads(False)
        ctx.activation, ctx.backend, ctx.kind, ctx.direct = activation, backend, kind, direct
        ctx.saved_unchanged = direct and ops.saved_unchanged()
        # For a double backward only (it recomputes Z): parameters, so no memory; versions to detect changes.
        ctx.parameters = (weight, bias)
        if direct:
            ctx.versions = (weight._version, None if bias is None else bias._version)
        else:
            ctx.versions = (_version(weight), _version(bias))
            if forward_mode_active():
                ctx.save_for_forward(x, weight, saved)

    @staticmethod
    def backward(ctx, grad_a: Optional[Tensor], grad_extra: Optional[Tensor]):
        # ∂C/∂Z reaches the kept Z only where it is connected (a double backward through f'(Z)); elsewhere the
        # extra output is not differentiable and what arrives for it (zeros, when compiled) is not a gradient.
        grad_z = grad_extra if ctx.z_connected else None
        if grad_a is None and grad_z is None:  # no gradient reached A (nor Z): every gradient is zero
            return None, None, None, None, None, None, None
        return (*backward(ctx, grad_a, grad_z, *ctx.saved_tensors), None, None, None, None)

    @staticmethod
    def jvp(ctx, tangent_x, tangent_weight, tangent_bias, *_):
        if tangent_x is None and tangent_weight is None and tangent_bias is None:
            return None, None  # no tangent came in: A's is zero
        x, weight, saved = ctx.saved_tensors  # in jvp: what save_for_forward kept
        tangent_x, tangent_weight, tangent_bias = _tangents((x, weight, ctx.parameters[1]),
                                                           (tangent_x, tangent_weight, tangent_bias))
        # Forward mode is never plain eager code (a dual level or a torch.func transform is active).
        tangent_a = ops.dispatched.linear_jvp(x, weight, saved, tangent_x, tangent_weight, tangent_bias,
                                              ctx.activation, ctx.kind or "z", ctx.backend)
        return tangent_a, None


class TracedLinearFunction(LinearFunction):
    """LinearFunction as torch.compile traces it: the same forward, setup_context and backward.

    Dynamo does not trace an autograd.Function with a custom jvp (forward-mode AD does not
    compile), so the compiled path uses this subclass, whose jvp is Function's default.
    """

    jvp = torch.autograd.Function.jvp


def linear_function(direct: bool = False):
    """The Function a call should apply: LinearFunction, or its traceable twin while torch.compile traces.

    direct: ``ops.dispatch_free`` held for this call, so nothing is compiling (not asked again)."""
    return LinearFunction if direct or not torch.compiler.is_compiling() else TracedLinearFunction


def apply(function, direct: bool, *args):
    """``function.apply(*args)``, without torch's per-call argument binding in plain eager code.

    Once a Function defines setup_context, ``Function.apply`` binds every call's arguments
    to forward's signature (``inspect.signature(...).bind``, about 15 µs, more than a small
    layer's math) only to fill in default values. manualbp's forwards have none and are
    called positionally (tests/test_overhead.py checks both), so outside torch.func and
    torch.compile this calls what ``Function.apply`` then calls, as it calls it; where
    ``direct`` (``ops.dispatch_free`` of the tensors in args) no tensor is a functorch
    wrapper, so none needs unwrapping.
    """
    if direct:
        return super(torch.autograd.Function, function).apply(*args)
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*unwrap_dead_wrappers(args))


# --------------------------------------------------------------------------------------
# The operator's autograd formula: a program from torch.export trains
# --------------------------------------------------------------------------------------
# torch.export records a layer as manualbp::linear_forward alone, asking for A only (save="": see
# functional.differentiable), as nn.Linear exports as one aten.linear. Running that program's
# module() with parameters that require grad reaches the operator's autograd formula, registered
# here: the layer's own setup and backward (:func:`backward`), on what the operator returned.


def _exported_setup_context(ctx, inputs, output):
    """What LinearFunction.setup_context keeps, for the operator called outside the Function."""
    x, weight, bias, activation_name, negative_slope, save, backend = inputs
    a, extra = output
    activation = ops.activation(activation_name, negative_slope)
    kind = saved_kind(backend, activation, frozen_weight=save == "z")
    needs_grad_x, needs_grad_weight = ctx.needs_input_grad[:2]
    # f' needs Z, which a node asking for A only did not write: kept x, Z recomputed in the backward (one more
    # X Wᵀ, as under activation checkpointing). x also serves a double backward, which recomputes Z from it.
    ctx.recompute = kind in ("z", "f_prime") and save != kind
    saved = a if kind == "a" else (None if kind is None or ctx.recompute else extra)
    keep_x = needs_grad_weight or kind in ("z", "f_prime")
    ctx.save_for_backward(x if keep_x else None, weight if needs_grad_x else None, saved)
    ctx.mark_non_differentiable(extra)
    ctx.set_materialize_grads(False)
    ctx.activation, ctx.backend, ctx.kind, ctx.direct, ctx.saved_unchanged = activation, backend, kind, False, False
    ctx.z_connected = False
    ctx.parameters = (weight, bias)
    ctx.versions = (_version(weight), _version(bias))


def _exported_backward(ctx, grad_a: Optional[Tensor], grad_extra: Optional[Tensor]):
    """:func:`backward` for the operator's autograd formula (the saved output is not differentiable)."""
    if grad_a is None:
        return None, None, None, None, None, None, None
    x, weight_for_x, saved = ctx.saved_tensors
    if ctx.recompute and not torch.is_grad_enabled():  # a double backward recomputes Z from x itself
        weight = _check_unchanged(ctx.parameters[0], ctx.versions[0], "weight")
        bias = _check_unchanged(ctx.parameters[1], ctx.versions[1], "bias")
        saved = ops.dispatched.linear_forward(x, weight, bias, ctx.activation, ctx.kind, ctx.backend)[1]
    return (*backward(ctx, grad_a, None, x, weight_for_x, saved), None, None, None, None)


def _register_exported_autograd() -> Optional[str]:
    """Registers the formula; returns why not where this PyTorch cannot (else None)."""
    register = getattr(ops.linear_forward, "register_autograd", None)
    if register is None:
        return "this PyTorch's custom operators take no autograd formula (CustomOpDef.register_autograd)"
    register(_exported_backward, setup_context=_exported_setup_context)
    return None


EXPORTED_AUTOGRAD_UNAVAILABLE = _register_exported_autograd()
