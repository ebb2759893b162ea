"""manualbp's operators: each kernel launcher, and its reference twin, as one PyTorch operator.

    linear_forward(x, weight, bias?, activation, negative_slope, save, backend) -> (a, saved)
        A = f(X Wᵀ + b) [M, N]; saved = Z ("z"), f'(Z) ("f_prime") or [0] ("")
    linear_backward(grad_a, x?, weight?, saved?, activation, negative_slope, saved_kind, needs, backend)
        -> (∂C/∂X [M, K], ∂C/∂W [N, K], ∂C/∂b [N]), [0] where needs says no
    linear_jvp(x, weight, saved?, tangent_x?, tangent_weight?, tangent_bias?, activation, negative_slope,
               saved_kind, backend) -> dA = f'(Z) ⊙ (dX Wᵀ + X dWᵀ + db) [M, N]
    activation_forward(z, activation, negative_slope, backend) -> A = f(Z)            (MLP, recompute=True)
    delta(grad_a, saved?, activation, negative_slope, saved_kind, want_delta, want_bias, backend)
        -> (δ = G ⊙ f'(Z) [M, N], ∂C/∂b = 1ᵀ δ [N])                                   (MLP, top layer)
    matmul(a, b, backend) -> a b                                                       (MLP, δᵀ X)
    matmul_times_activation_grad(delta, weight, saved?, activation, negative_slope, saved_kind, want_bias,
                                 backend) -> (δₗ₋₁ = (δₗ Wₗ) ⊙ f'(Zₗ₋₁), 1ᵀ δₗ₋₁)           (MLP, fused)

x [M, K], weight [N, K], bias [N]; the equations are in ``reference.py``. ``backend``
is already resolved ('triton' or 'reference', by ``backends.resolve``); ``saved``
is what f' comes from: A ("a"), Z ("z") or f'(Z) ("f_prime"), None for identity.
Operators cannot return None: an output nobody asked for is an empty tensor [0].

Each operator has, beside its implementation:
  a fake implementation   shapes only: FakeTensorMode, meta tensors, torch.compile/export tracing
  a vmap rule             batched rows folded into M where the math allows, else one call per batch entry
  a FLOP formula          the matmuls, as FlopCounterMode counts nn.Linear's (2MNK per product)
  a DTensor sharding rule (the matmul operators): data parallel (rows sharded), column-wise
                          (weight rows sharded), row-wise (contracted dimension sharded, identity only:
                          the output is a partial sum, and f of a partial sum is not the sum of f's)
  a decomposition         for torch.export only: the reference backend's computation in aten ops,
                          which ``ExportedProgram.run_decompositions()`` (default table) and
                          ``torch.onnx.export(dynamo=True)`` apply, so the exported program needs no manualbp
The layers' autograd Functions (function.py, mlp_function.py) call these operators
from their forward, backward and jvp, so eager code, torch.func and torch.compile
all run the same Function. Only linear_forward has an autograd formula, for programs
from torch.export, which record it alone: function.py registers the layer's own backward.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
from typing import List, Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from . import backends, config, reference
from .activations import Activation, get_activation

_LIB = "manualbp"
SAVES = ("", "z", "f_prime")
SAVED_KINDS = ("a", "z", "f_prime")

# f' formed inside the backward matmuls' operand loads is evaluated once per output tile of
# each matmul (the same element many times): done where it is a multiply or a select, from
# A, from f'(Z), or for relu / leaky_relu from Z; otherwise δ takes one elementwise pass.
_SELECT_FROM_Z = ("identity", "relu", "leaky_relu")


@functools.lru_cache(maxsize=None)
def activation(name: str, negative_slope: float) -> Activation:
    """The Activation an operator's (name, negative_slope) arguments describe.

    Cached: every operator call needs it, and building the (frozen) Activation costs more
    than a small layer's matmul. A bad name or slope raises every time (errors are not cached).
    """
    return get_activation(name, negative_slope=negative_slope) if name == "leaky_relu" else get_activation(name)


def _placeholder(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _bad_choice(op: str, argument: str, value, allowed: Sequence[str]):
    return ValueError(f"manualbp::{op}: {argument} must be one of {list(allowed)}, got {value!r}")


# The checks below run on every call: a plain test first, the message only on failure.
def _check_backend(op: str, backend: str) -> None:
    if backend != "triton" and backend != "reference":
        raise _bad_choice(op, "backend", backend, ("triton", "reference"))


def _check_save(op: str, save: str) -> None:
    if save not in SAVES:
        raise _bad_choice(op, "save", save, SAVES)


def _check_linear(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    # functional.linear validates before this point; these are for direct calls of torch.ops.manualbp.*.
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"manualbp::{op}: expected x [M, K] and weight [N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"manualbp::{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _check_saved(op: str, act: Activation, saved: Optional[Tensor], saved_kind: str) -> None:
    if saved_kind not in SAVED_KINDS:
        raise _bad_choice(op, "saved_kind", saved_kind, SAVED_KINDS)
    if act.name == "identity":
        return
    if saved is None:
        raise ValueError(f"manualbp::{op}: activation {act.name!r} needs saved = A, Z or f'(Z), got None")
    if saved_kind == "a" and not act.saves_output:
        raise ValueError(f"manualbp::{op}: activation {act.name!r} cannot compute f' from its output A; "
                         f"pass Z or f'(Z)")


# The Triton kernels module: imported on first use by backends.kernels(), then one dict lookup a call (no call).
_modules, _DENSE = sys.modules, backends._DENSE

_IMPLEMENTATIONS = {}  # operator -> its Python implementation (for the export decompositions)


def _register(name: str, schema_fn, fake_fn):
    op = torch.library.custom_op(f"{_LIB}::{name}", mutates_args=())(schema_fn)
    op.register_fake(fake_fn)
    _IMPLEMENTATIONS[op] = schema_fn
    return op


# --------------------------------------------------------------------------------------
# Implementations. Each operator's kernel checks its arguments (for callers of
# torch.ops.manualbp.*) and runs its computation (_compute_*: the Triton launcher or the
# reference, by the resolved backend). A computation takes the Activation itself and
# returns None for an output nobody asked for; the operator turns that into [0].
# --------------------------------------------------------------------------------------


def _compute_linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: Activation, save: str,
                            backend: str) -> tuple[Tensor, Optional[Tensor]]:
    """A = f(X Wᵀ + b) [M, N] and, as save says, Z or f'(Z) [M, N] (None for "")."""
    if backend == "triton":
        a, saved = (_modules.get(_DENSE) or backends.kernels()).linear_forward(
            x, weight, bias, act.kernel_id, act.kernel_slope, write_z=bool(save), f_prime_as_z=save == "f_prime")
    else:
        a, z = reference.linear_forward(x, weight, bias, act)
        saved = reference.activation_grad(act, z, "z") if save == "f_prime" else (z if save == "z" else None)
    return a, (saved.clone() if saved is a else saved)  # identity: outputs may not alias each other


def _linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation_name: str,
                    negative_slope: float, save: str, backend: str) -> tuple[Tensor, Tensor]:
    """A = f(X Wᵀ + b) [M, N] and, as save says, Z or f'(Z) [M, N] (or [0])."""
    _check_linear("linear_forward", x, weight, bias)
    _check_save("linear_forward", save)
    _check_backend("linear_forward", backend)
    a, saved = _compute_linear_forward(x, weight, bias, activation(activation_name, negative_slope), save, backend)
    return a, (_placeholder(x) if saved is None else saved)


def _linear_forward_fake(x, weight, bias, activation_name, negative_slope, save, backend):
    _check_linear("linear_forward", x, weight, bias)
    _check_save("linear_forward", save)
    rows, columns = x.shape[0], weight.shape[0]
    return x.new_empty((rows, columns)), x.new_empty((rows, columns) if save else (0,))


def _compute_linear_backward(grad_a: Tensor, x: Optional[Tensor], weight: Optional[Tensor], saved: Optional[Tensor],
                             act: Activation, saved_kind: str, needs: List[bool], backend: str):
    """(∂C/∂X [M, K], ∂C/∂W [N, K], ∂C/∂b [N]), None where needs = [x, weight, bias] says no."""
    needs_x, needs_weight, needs_bias = needs
    if backend == "triton":
        return _linear_backward_triton(grad_a, x, weight, saved, act, saved_kind, needs_x, needs_weight, needs_bias)
    delta = reference.delta(grad_a, saved, act, saved_kind)  # δ = G ⊙ f'(Z)  [M, N]
    return reference.linear_backward(delta, x, weight, needs_x, needs_weight, needs_bias)


def _linear_backward(grad_a: Tensor, x: Optional[Tensor], weight: Optional[Tensor], saved: Optional[Tensor],
                     activation_name: str, negative_slope: float, saved_kind: str, needs: List[bool],
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(∂C/∂X, ∂C/∂W, ∂C/∂b); needs = [x, weight, bias]. x is read only for ∂C/∂W, weight only for ∂C/∂X."""
    needs_x, needs_weight, _ = needs
    act = activation(activation_name, negative_slope)
    _check_saved("linear_backward", act, saved, saved_kind)
    _check_backend("linear_backward", backend)
    if needs_x and weight is None or needs_weight and x is None:
        raise ValueError("manualbp::linear_backward: ∂C/∂X needs weight and ∂C/∂W needs x; got None")
    grads = _compute_linear_backward(grad_a, x, weight, saved, act, saved_kind, needs, backend)
    return tuple(_placeholder(grad_a) if grad is None else grad for grad in grads)


def _linear_backward_triton(grad_a, x, weight, saved, act, saved_kind, needs_x, needs_weight, needs_bias):
    dense = _modules.get(_DENSE) or backends.kernels()
    if weight is None:
        # Only the shape [N, K] is read when ∂C/∂X is not wanted: a stride-0 view, no memory.
        weight = grad_a.new_empty(()).expand(grad_a.shape[1], x.shape[1] if x is not None else 0)
    if config.get().delta_prologue and (saved_kind != "z" or act.name in _SELECT_FROM_Z):
        # δ formed in the operand loads of the first matmul (which also stores it when ∂C/∂W follows, read
        # plainly there), ∂C/∂b from the ∂C/∂W matmul: no pass over [M, N] of its own (dense.linear_backward).
        return dense.linear_backward(grad_a, x, weight, saved, act.kernel_id, act.kernel_slope, saved_kind,
                                     want_x=needs_x, want_weight=needs_weight, want_bias=needs_bias)
    delta, grad_bias = dense.delta_and_bias_grad(grad_a, saved, act.kernel_id, act.kernel_slope, saved_kind,
                                                 want_delta=needs_x or needs_weight, want_bias=needs_bias)
    grad_x = dense.matmul(delta, weight) if needs_x else None  # ∂C/∂X = δ W   [M, N] [N, K]
    grad_weight = dense.matmul(delta.t(), x) if needs_weight else None  # ∂C/∂W = δᵀ X  [N, M] [M, K]
    return grad_x, grad_weight, grad_bias


def _linear_backward_fake(grad_a, x, weight, saved, activation_name, negative_slope, saved_kind, needs, backend):
    needs_x, needs_weight, needs_bias = needs
    rows, columns = grad_a.shape
    width = x.shape[1] if x is not None else weight.shape[1]
    return (grad_a.new_empty((rows, width) if needs_x else (0,)),
            grad_a.new_empty((columns, width) if needs_weight else (0,)),
            grad_a.new_empty((columns,) if needs_bias else (0,)))


def _linear_jvp(x: Tensor, weight: Tensor, saved: Optional[Tensor], tangent_x: Optional[Tensor],
                tangent_weight: Optional[Tensor], tangent_bias: Optional[Tensor], activation_name: str,
                negative_slope: float, saved_kind: str, backend: str) -> Tensor:
    """dA = f'(Z) ⊙ (dX Wᵀ + X dWᵀ + db) [M, N]; a None tangent is zero."""
    act = activation(activation_name, negative_slope)
    _check_saved("linear_jvp", act, saved, saved_kind)
    _check_backend("linear_jvp", backend)
    _check_linear("linear_jvp", x, weight, tangent_bias)
    return _compute_linear_jvp(x, weight, saved, tangent_x, tangent_weight, tangent_bias, act, saved_kind, backend)


def _compute_linear_jvp(x, weight, saved, tangent_x, tangent_weight, tangent_bias, act, saved_kind, backend):
    rows, columns = _jvp_shape(x, weight, tangent_x, tangent_weight, tangent_bias)
    if backend == "triton":
        from .triton_kernels import jvp

        return jvp.linear_jvp(x, weight, saved, tangent_x, tangent_weight, tangent_bias, act.kernel_id,
                              act.kernel_slope, saved_kind, rows, columns)
    return reference.linear_jvp(x, weight, saved, act, saved_kind, tangent_x, tangent_weight, tangent_bias, rows)


def _jvp_shape(x, weight, tangent_x, tangent_weight, tangent_bias):
    if all(t is None for t in (tangent_x, tangent_weight, tangent_bias)):
        raise ValueError("manualbp::linear_jvp: at least one of tangent_x, tangent_weight, tangent_bias is needed")
    for name, tangent, primal in (("tangent_x", tangent_x, x), ("tangent_weight", tangent_weight, weight)):
        if tangent is not None and tangent.shape != primal.shape:
            raise ValueError(f"manualbp::linear_jvp: {name} must have the shape of its primal "
                             f"{tuple(primal.shape)}, got {tuple(tangent.shape)}")
    return x.shape[0], weight.shape[0]


def _linear_jvp_fake(x, weight, saved, tangent_x, tangent_weight, tangent_bias, activation_name, negative_slope,
                     saved_kind, backend):
    like = next(t for t in (tangent_x, tangent_weight, tangent_bias) if t is not None)
    return like.new_empty(_jvp_shape(x, weight, tangent_x, tangent_weight, tangent_bias))


def _activation_forward(z: Tensor, activation_name: str, negative_slope: float, backend: str) -> Tensor:
    """A = f(Z) [M, N] from a kept Z."""
    _check_backend("activation_forward", backend)
    return _compute_activation_forward(z, activation(activation_name, negative_slope), backend)


def _compute_activation_forward(z: Tensor, act: Activation, backend: str) -> Tensor:
    if act.name == "identity":
        return z.clone()
    if backend == "triton":
        return (_modules.get(_DENSE) or backends.kernels()).activation_forward(z, act.kernel_id, act.kernel_slope)
    return reference.activation_forward(act, z)


def _activation_forward_fake(z, activation_name, negative_slope, backend):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _delta(grad_a: Tensor, saved: Optional[Tensor], activation_name: str, negative_slope: float, saved_kind: str,
           want_delta: bool, want_bias: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(δ = G ⊙ f'(Z) [M, N], ∂C/∂b = 1ᵀ δ [N]), [0] where not wanted."""
    act = activation(activation_name, negative_slope)
    _check_saved("delta", act, saved, saved_kind)
    _check_backend("delta", backend)
    delta, grad_bias = _compute_delta(grad_a, saved, act, saved_kind, want_delta, want_bias, backend)
    return (_placeholder(grad_a) if delta is None else delta,
            _placeholder(grad_a) if grad_bias is None else grad_bias)


def _compute_delta(grad_a, saved, act, saved_kind, want_delta, want_bias, backend):
    if backend == "triton":
        delta, grad_bias = (_modules.get(_DENSE) or backends.kernels()).delta_and_bias_grad(
            grad_a, saved, act.kernel_id, act.kernel_slope, saved_kind, want_delta=want_delta, want_bias=want_bias)
    else:
        delta = reference.delta(grad_a, saved, act, saved_kind)
        grad_bias = delta.sum(dim=0) if want_bias else None
    delta = delta if want_delta else None
    if delta is grad_a:
        delta = delta.clone()  # identity: an operator's output may not alias its input
    return delta, grad_bias


def _delta_fake(grad_a, saved, activation_name, negative_slope, saved_kind, want_delta, want_bias, backend):
    return (grad_a.new_empty(tuple(grad_a.shape) if want_delta else (0,)),
            grad_a.new_empty((grad_a.shape[1],) if want_bias else (0,)))


def _matmul(a: Tensor, b: Tensor, backend: str) -> Tensor:
    """a b: a [M, K], b [K, N] (any strides) -> [M, N]."""
    _check_backend("matmul", backend)
    return _compute_matmul(a, b, backend)


def _compute_matmul(a: Tensor, b: Tensor, backend: str) -> Tensor:
    return (_modules.get(_DENSE) or backends.kernels()).matmul(a, b) if backend == "triton" else a.mm(b)


def _compute_transposed_matmul(a: Tensor, b: Tensor, backend: str) -> Tensor:
    """aᵀ b: a [K, M], b [K, N] -> [M, N] (the MLP's ∂C/∂W = δᵀ X); the Triton kernel reads aᵀ through swapped
    strides, where the operator would take a view (a view costs about as much as a launch's other Python)."""
    if backend == "triton":
        return (_modules.get(_DENSE) or backends.kernels()).matmul(a, b, a_transposed=True)
    return a.t().mm(b)


def _matmul_fake(a, b, backend):
    return a.new_empty((a.shape[0], b.shape[1]))


def _matmul_times_activation_grad(delta: Tensor, weight: Tensor, saved: Optional[Tensor], activation_name: str,
                                  negative_slope: float, saved_kind: str, want_bias: bool,
                                  backend: str) -> tuple[Tensor, Tensor]:
    """(δₗ₋₁ = (δₗ Wₗ) ⊙ fₗ₋₁'(Zₗ₋₁) [M, K], ∂C/∂bₗ₋₁ = 1ᵀ δₗ₋₁ [K] or [0]): delta [M, N], weight [N, K]."""
    act = activation(activation_name, negative_slope)
    _check_saved("matmul_times_activation_grad", act, saved, saved_kind)
    _check_backend("matmul_times_activation_grad", backend)
    below, grad_bias = _compute_matmul_times_activation_grad(delta, weight, saved, act, saved_kind, want_bias,
                                                             backend)
    return below, (_placeholder(delta) if grad_bias is None else grad_bias)


def _compute_matmul_times_activation_grad(delta, weight, saved, act, saved_kind, want_bias, backend):
    if backend == "triton":
        below, grad_bias = (_modules.get(_DENSE) or backends.kernels()).matmul_times_activation_grad(
            delta, weight, saved, act.kernel_id, act.kernel_slope, saved_kind, want_bias=want_bias)
    else:
        below = reference.delta(delta.mm(weight), saved, act, saved_kind)
        grad_bias = below.sum(dim=0) if want_bias else None
    return below, grad_bias


def _matmul_times_activation_grad_fake(delta, weight, saved, activation_name, negative_slope, saved_kind, want_bias,
                                       backend):
    return (delta.new_empty((delta.shape[0], weight.shape[1])),
            delta.new_empty((weight.shape[1],) if want_bias else (0,)))


linear_forward = _register("linear_forward", _linear_forward, _linear_forward_fake)
linear_backward = _register("linear_backward", _linear_backward, _linear_backward_fake)
linear_jvp = _register("linear_jvp", _linear_jvp, _linear_jvp_fake)
activation_forward = _register("activation_forward", _activation_forward, _activation_forward_fake)
delta = _register("delta", _delta, _delta_fake)
matmul = _register("matmul", _matmul, _matmul_fake)
matmul_times_activation_grad = _register("matmul_times_activation_grad", _matmul_times_activation_grad,
                                         _matmul_times_activation_grad_fake)
OPERATORS = (linear_forward, linear_backward, linear_jvp, activation_forward, delta, matmul,
             matmul_times_activation_grad)

# --------------------------------------------------------------------------------------
# How manualbp's own code calls the operators
# --------------------------------------------------------------------------------------

_PARAMETER = torch.nn.Parameter
_STRIDED = torch.strided
# What dispatch_free asks on every call, looked up once.
_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_profiler = torch.autograd.profiler
# functorch's batched/grad/functional wrappers, and the legacy vmap's (gradcheck's batched gradients)
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)  # absent: no legacy vmap


def dispatch_free(tensors) -> bool:
    """Whether torch's dispatcher would do nothing for a call on these tensors but run the computation.

    True only in plain eager code: not tracing or compiling, no torch.func transform, no
    forward-mode level, no dispatch or function mode (FakeTensorMode, FlopCounterMode,
    CommDebugMode, a default-device context...), no profiler, and every tensor (None
    skipped) a plain strided tensor (not a DTensor, fake, meta, functorch-wrapped or other
    subclass). Then the dispatcher's own work (the autograd fallback, redispatch, alias
    checks: about 10 µs a call, more than a small layer's math) buys nothing, and the
    layers call the computations directly (:class:`direct`).
    """
    if (_is_compiling() or _transforms_active() or _dispatch_modes() or _function_modes()
            or forward_ad._current_level >= 0 or _profiler._is_profiler_enabled):
        return False
    for t in tensors:
        if t is None:
            continue
        kind = type(t)
        if kind is _PARAMETER:  # functorch and legacy vmap wrap into new plain Tensors, never Parameters
            if t.is_meta or t.layout is not _STRIDED:
                return False
        elif (kind is not Tensor or t.is_meta or t.layout is not _STRIDED or _is_functorch_wrapped(t)
              or _is_legacy_batched(t)):
            return False
    return True


_top_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_unchanged() -> bool:
    """Whether ``ctx.saved_tensors`` will return the very tensors a Function saves now: no saved-tensor hooks
    (checkpointing, offloading, ``saved_tensors_hooks``) are active. False where this PyTorch cannot tell.

    A backward whose forward was ``dispatch_free`` then needs to check only its incoming gradient.
    """
    return _top_saved_hooks is not None and _top_saved_hooks(False) is None


class direct:  # noqa: N801 - a namespace, used as ops.direct.linear_forward(...)
    """The operators' computations as plain function calls, for plain eager code (:func:`dispatch_free`).

    The same signatures as :class:`dispatched` (an Activation, not its name and slope;
    None for an output not asked for), the same computations as the operators run, so
    the same results; without the dispatcher and without the argument checks, which
    the layers' entry (functional.enter) has already made.
    """

    linear_forward = staticmethod(_compute_linear_forward)
    linear_backward = staticmethod(_compute_linear_backward)
    linear_jvp = staticmethod(_compute_linear_jvp)
    activation_forward = staticmethod(_compute_activation_forward)
    delta = staticmethod(_compute_delta)
    matmul = staticmethod(_compute_matmul)
    transposed_matmul = staticmethod(_compute_transposed_matmul)
    matmul_times_activation_grad = staticmethod(_compute_matmul_times_activation_grad)


def _wanted(outputs, wants):
    return tuple(output if want else None for output, want in zip(outputs, wants))


class dispatched:  # noqa: N801 - a namespace, used as ops.dispatched.linear_forward(...)
    """The operators through torch's dispatcher (torch.ops.manualbp.*), called as :class:`direct` is.

    Everywhere but plain eager code: torch.compile, torch.export, torch.func, forward-mode
    AD, fake and meta tensors, DTensor, FlopCounterMode, the profiler.
    """

    @staticmethod
    def linear_forward(x, weight, bias, act, save, backend):
        a, saved = linear_forward(x, weight, bias, act.name, act.kernel_slope, save, backend)
        return a, (saved if save else None)

    @staticmethod
    def linear_backward(grad_a, x, weight, saved, act, saved_kind, needs, backend):
        return _wanted(linear_backward(grad_a, x, weight, saved, act.name, act.kernel_slope, saved_kind, needs,
                                       backend), needs)

    @staticmethod
    def linear_jvp(x, weight, saved, tangent_x, tangent_weight, tangent_bias, act, saved_kind, backend):
        return linear_jvp(x, weight, saved, tangent_x, tangent_weight, tangent_bias, act.name, act.kernel_slope,
                          saved_kind, backend)

    @staticmethod
    def activation_forward(z, act, backend):
        return activation_forward(z, act.name, act.kernel_slope, backend)

    @staticmethod
    def delta(grad_a, saved, act, saved_kind, want_delta, want_bias, backend):
        return _wanted(delta(grad_a, saved, act.name, act.kernel_slope, saved_kind, want_delta, want_bias, backend),
                       (want_delta, want_bias))

    @staticmethod
    def matmul(a, b, backend):
        return matmul(a, b, backend)

    @staticmethod
    def transposed_matmul(a, b, backend):  # aᵀ b: the matmul operator of the view aᵀ
        return matmul(a.t(), b, backend)

    @staticmethod
    def matmul_times_activation_grad(delta, weight, saved, act, saved_kind, want_bias, backend):
        return _wanted(matmul_times_activation_grad(delta, weight, saved, act.name, act.kernel_slope, saved_kind,
                                                    want_bias, backend), (True, want_bias))


def route(is_direct: bool):
    """:class:`direct` or :class:`dispatched`: how a layer calls the operators (``dispatch_free`` decides)."""
    return direct if is_direct else dispatched


# --------------------------------------------------------------------------------------
# vmap rules
# --------------------------------------------------------------------------------------


def _batched_first(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """t with its batch dimension first ([B, ...]); an unbatched t repeated B times."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(size, *t.shape)


def _by_loop(op):
    """vmap rule of last resort: one call per batch entry, outputs stacked (correct for any batched argument)."""
    def rule(info, in_dims, *args):
        calls = []
        for index in range(info.batch_size):
            calls.append(op(*[arg.select(dim, index) if dim is not None else arg for arg, dim in zip(args, in_dims)]))
        if isinstance(calls[0], Tensor):
            return torch.stack(calls), 0
        outputs = tuple(torch.stack(parts) for parts in zip(*calls))
        return outputs, (0,) * len(outputs)
    return rule


def _linear_forward_vmap(info, in_dims, x, weight, bias, activation_name, negative_slope, save, backend):
    x_dim, weight_dim, bias_dim = in_dims[:3]
    if weight_dim is not None or bias_dim is not None:  # a batch of weights (model ensembling): one call each
        return _by_loop(linear_forward)(info, in_dims, x, weight, bias, activation_name, negative_slope, save,
                                        backend)
    x = x.movedim(x_dim, 0)
    size, rows = x.shape[0], x.shape[1]
    a, saved = linear_forward(x.reshape(size * rows, x.shape[2]), weight, bias, activation_name, negative_slope,
                              save, backend)  # the batch folded into M
    a = a.view(size, rows, a.shape[1])
    if save:
        return (a, saved.view(size, rows, saved.shape[1])), (0, 0)
    return (a, saved), (0, None)


def _linear_jvp_vmap(info, in_dims, x, weight, saved, tangent_x, tangent_weight, tangent_bias, *options):
    x_dim, weight_dim, saved_dim, tx_dim, tw_dim, tb_dim = in_dims[:6]
    if weight_dim is not None or tw_dim is not None or tb_dim is not None:
        return _by_loop(linear_jvp)(info, in_dims, x, weight, saved, tangent_x, tangent_weight, tangent_bias,
                                    *options)
    # Only row tensors (x, saved, dX) are batched: fold the batch into M (an unbatched one repeated).
    rows = _batched_first(x, x_dim, info.batch_size).shape[1]
    x, saved, tangent_x = [None if t is None else _batched_first(t, d, info.batch_size).reshape(-1, t.shape[-1])
                           for t, d in ((x, x_dim), (saved, saved_dim), (tangent_x, tx_dim))]
    out = linear_jvp(x, weight, saved, tangent_x, tangent_weight, tangent_bias, *options)
    return out.view(info.batch_size, rows, out.shape[1]), 0


torch.library.register_vmap(linear_forward, _linear_forward_vmap)
torch.library.register_vmap(linear_jvp, _linear_jvp_vmap)
for _op in (linear_backward, activation_forward, delta, matmul, matmul_times_activation_grad):
    torch.library.register_vmap(_op, _by_loop(_op))

# --------------------------------------------------------------------------------------
# FLOP formulas: 2MNK per matrix product, as FlopCounterMode counts nn.Linear's (addmm, mm)
# --------------------------------------------------------------------------------------


def _register_flops():
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.manualbp.linear_forward)
    def _(x_shape, weight_shape, *args, **kwargs) -> int:
        return 2 * x_shape[0] * weight_shape[0] * x_shape[1]

    @register_flop_formula(torch.ops.manualbp.linear_backward)
    def _(grad_a_shape, x_shape, weight_shape, saved_shape, activation_name, negative_slope, saved_kind, needs,
          *args, **kwargs) -> int:
        rows, columns = grad_a_shape
        width = x_shape[1] if x_shape is not None else weight_shape[1]
        return 2 * rows * columns * width * (int(needs[0]) + int(needs[1]))  # δ W and δᵀ X

    @register_flop_formula(torch.ops.manualbp.linear_jvp)
    def _(x_shape, weight_shape, saved_shape, tangent_x_shape, tangent_weight_shape, *args, out_shape=None,
          **kwargs) -> int:
        rows, columns = out_shape
        width = x_shape[1]
        return 2 * rows * columns * width * ((tangent_x_shape is not None) + (tangent_weight_shape is not None))

    @register_flop_formula(torch.ops.manualbp.matmul)
    def _(a_shape, b_shape, *args, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    @register_flop_formula(torch.ops.manualbp.matmul_times_activation_grad)
    def _(delta_shape, weight_shape, *args, **kwargs) -> int:
        return 2 * delta_shape[0] * delta_shape[1] * weight_shape[1]


_register_flops()

# --------------------------------------------------------------------------------------
# DTensor sharding rules (torch.distributed.tensor): the operators run on local shards
# --------------------------------------------------------------------------------------


def _is_tensor_argument(argument) -> bool:
    kind = argument.type
    if isinstance(kind, torch.OptionalType):
        kind = kind.getElementType()
    return isinstance(kind, torch.TensorType)


def sharding_registrar():
    """torch's register_sharding, with every argument after the tensors in DTensor's cache key; None where
    this PyTorch has no distributed, or DTensor internals that differ (then no rules: a DTensor call raises
    DTensor's "no sharding strategy" error, never a rule cached under the wrong key).

    register_sharding keys DTensor's cache of sharding decisions on the tensors' specs and on
    int arguments only. Ours are str, float and bool: a decision made for an identity layer
    (a Partial output) was reused for tanh on the same shapes -- wrong values, silently
    (tests/test_tensor_parallel.py) -- and one made for a ``needs`` could be reused for another.
    """
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
        from torch.distributed.tensor.experimental import register_sharding as torch_register_sharding

        schema_infos = DTensor._op_dispatcher.sharding_propagator.op_to_schema_info
    except (ImportError, AttributeError):
        return None

    def register_sharding(overload):
        def decorate(rule):
            torch_register_sharding(overload)(rule)
            arguments = overload._schema.arguments
            first_option = next(i for i, a in enumerate(arguments) if not _is_tensor_argument(a))
            schema_infos[overload] = RuntimeSchemaInfo(static_argnum=first_option, needs_pytree=True)
            return rule
        return decorate
    return register_sharding


def _register_sharding():
    register_sharding = sharding_registrar()
    if register_sharding is None:
        return
    from torch.distributed.tensor import Partial, Replicate, Shard

    R = Replicate()

    def spec(t, placement):
        return None if t is None else placement

    def empty_or(present: bool, placement):
        return placement if present else R  # an unrequested output is a replicated [0]

    @register_sharding(linear_forward._opoverload)
    def _(x, weight, bias, activation_name, negative_slope, save, backend):
        def plan(x_p, w_p, b_p, out_p):
            return [out_p, empty_or(bool(save), out_p)], [x_p, w_p, spec(bias, b_p), None, None, None, None]
        strategies = [
            plan(Shard(0), R, R, Shard(0)),  # rows (samples) sharded
            plan(R, Shard(0), Shard(0), Shard(1)),  # column-wise: weight rows = output features sharded
            plan(R, R, R, R),
        ]
        if activation_name == "identity":
            strategies.append(plan(Shard(1), Shard(1), Partial(), Partial()))  # row-wise: a partial sum
        return strategies

    @register_sharding(linear_backward._opoverload)
    def _(grad_a, x, weight, saved, activation_name, negative_slope, saved_kind, needs, backend):
        needs_x, needs_weight, needs_bias = needs

        def plan(g_p, x_p, w_p, s_p, gx_p, gw_p, gb_p):
            outputs = [empty_or(needs_x, gx_p), empty_or(needs_weight, gw_p), empty_or(needs_bias, gb_p)]
            return outputs, [g_p, spec(x, x_p), spec(weight, w_p), spec(saved, s_p), None, None, None, None, None]
        strategies = [
            plan(Shard(0), Shard(0), R, Shard(0), Shard(0), Partial(), Partial()),
            plan(Shard(1), R, Shard(0), Shard(1), Partial(), Shard(0), Shard(0)),
            plan(R, R, R, R, R, R, R),
        ]
        if activation_name == "identity":
            strategies.append(plan(R, Shard(1), Shard(1), R, Shard(1), Shard(1), R))
        return strategies

    @register_sharding(linear_jvp._opoverload)
    def _(x, weight, saved, tangent_x, tangent_weight, tangent_bias, activation_name, negative_slope, saved_kind,
          backend):
        def plan(row_p, w_p, b_p, out_p):
            inputs = [spec(x, row_p), spec(weight, w_p), spec(saved, out_p), spec(tangent_x, row_p),
                      spec(tangent_weight, w_p), spec(tangent_bias, b_p), None, None, None, None]
            return [out_p], inputs
        return [plan(Shard(0), R, R, Shard(0)), plan(R, Shard(0), Shard(0), Shard(1)), plan(R, R, R, R)]


_register_sharding()

# --------------------------------------------------------------------------------------
# Decompositions for torch.export: each operator as the reference backend computes it
# --------------------------------------------------------------------------------------


_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None)  # looked up once: every layer call asks
_COMPILER = torch.compiler
_HAS_EXPORTING_FLAG = hasattr(torch.compiler, "_is_exporting_flag")


def exporting() -> bool:
    """Whether torch.export is tracing (or decomposing) now; False on a PyTorch without the flag.

    While Dynamo traces, the answer comes from the trace itself (:func:`_traced_exporting`): Dynamo before torch
    2.13 answers a traced is_exporting() with a constant True under torch.compile too (the layers then traced
    their no-gradient path, and the compiled backward failed), and torch 2.7's strict export traces with the flag
    behind it still False.
    """
    if _is_compiling():
        return _traced_exporting()
    if _HAS_EXPORTING_FLAG:
        return _COMPILER._is_exporting_flag
    return _IS_EXPORTING is not None and _IS_EXPORTING()


@torch.compiler.assume_constant_result
def _traced_exporting() -> bool:
    """Whether the trace running now is torch.export's: Dynamo's own flag for the trace (its InstructionTranslator's
    ``export``), or torch.compiler's exporting flag (non-strict export, which Dynamo does not run). Called by Dynamo
    at trace time, its answer a constant of the graph."""
    if _HAS_EXPORTING_FLAG and _COMPILER._is_exporting_flag:
        return True
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        trace = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):
        trace = None
    if trace is not None:
        return bool(getattr(trace, "export", False))
    return _IS_EXPORTING is not None and not _HAS_EXPORTING_FLAG and _IS_EXPORTING()


def _decomposition(implementation):
    """The operator's implementation on the reference backend (aten ops only), while exporting.

    Registered as the operator's CompositeImplicitAutograd kernel in Python (``py_impl``):
    torch.export's default decomposition table takes every such kernel, of any namespace.
    Tracing for torch.compile also offers an op with that kernel to be decomposed; outside
    torch.export this one declines (NotImplemented), so eager code and torch.compile keep
    running the operator itself, with its Triton or reference kernel.
    """
    signature = inspect.signature(implementation)

    def decompose(*args, **kwargs):
        if not exporting():
            return NotImplemented
        bound = signature.bind(*args, **kwargs)
        bound.arguments["backend"] = "reference"  # the equations, in aten ops (Triton's f'(Z) is the same f')
        return implementation(*bound.args, **bound.kwargs)

    return decompose


def register_decompositions(operators=None) -> Optional[str]:
    """Registers each operator's decomposition (default: this module's); returns why not where this PyTorch
    cannot (else None)."""
    dispatch_key = getattr(torch._C.DispatchKey, "CompositeImplicitAutograd", None)
    if _IS_EXPORTING is None or dispatch_key is None:
        return "this PyTorch has no torch.compiler.is_exporting: the decompositions could not tell export from eager"
    # Inductor (torch.compile) builds its decomposition table once, from every CompositeImplicitAutograd
    # kernel known at that moment; on torch 2.14 an operator of that table left in the graph (ours decline
    # outside export) is an error ("both a fallback and a decomp for same op"). Built before these exist,
    # the table leaves the operators to their own kernels, as torch.compile should.
    with contextlib.suppress(ImportError):
        importlib.import_module("torch._inductor.decomposition")
    for op in OPERATORS if operators is None else operators:
        overload = op._opoverload
        if not hasattr(overload, "py_impl"):
            return "this PyTorch's operators have no py_impl to register a decomposition with"
        overload.py_impl(dispatch_key)(_decomposition(_IMPLEMENTATIONS[op]))
    return None


_NOT_REGISTERED = register_decompositions()


@functools.lru_cache(maxsize=None)
def decompositions_unavailable() -> Optional[str]:
    """Why ``run_decompositions()`` would keep manualbp operators on this PyTorch, or None where it removes them.

    Checked once, lazily: building export's default table walks every operator PyTorch knows.
    """
    if _NOT_REGISTERED is not None:
        return _NOT_REGISTERED
    default_decompositions = getattr(torch.export, "default_decompositions", None)
    if default_decompositions is None or linear_forward._opoverload not in default_decompositions():
        return ("this PyTorch's default export decomposition table does not take a custom operator's "
                "CompositeImplicitAutograd kernel")
    return None
