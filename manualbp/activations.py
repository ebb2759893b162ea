"""Activations f and their derivatives f', written side by side.

Every activation is a pair of elementwise functions of the pre-activation z:

    f(z)        the forward,  a = f(z)
    f_grad(z)   the derivative f'(z) used in the backward, delta = grad_a * f'(z)

and, where f' can be read off the output a (so the forward saves a, not z, and
an nn.Linear + activation pair saves nothing extra), a third one

    f_grad_from_output(a)   the same f'(z), computed from a = f(z)

The Triton kernels implement the same names in ``triton_kernels/activations.py``.
Where PyTorch has the forward f as one fused op (gelu, silu, leaky_relu) the
reference calls it, with the formula beside it: the reference forward is then
bitwise PyTorch's, and f is not what this package writes by hand; every f' is.
All functions are plain differentiable torch ops, so the reference backward can
also be differentiated again (double backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

_SQRT_2_PI = math.sqrt(2.0 / math.pi)  # sqrt(2/pi), for tanh-GELU
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # 1/sqrt(2 pi), the normal density's constant
_GELU_TANH_C = 0.044715  # cubic coefficient of the tanh approximation


# identity: f(z) = z, f'(z) = 1
def identity(z: Tensor) -> Tensor:
    return z


def identity_grad(z: Tensor) -> Tensor:
    return torch.ones_like(z)


def identity_grad_from_output(a: Tensor) -> Tensor:
    return torch.ones_like(a)


# relu: f(z) = max(z, 0), f'(z) = [z > 0]  (0 at z = 0, as PyTorch)
def relu(z: Tensor) -> Tensor:
    return torch.relu(z)


def relu_grad(z: Tensor) -> Tensor:
    return (z > 0).to(z.dtype)


def relu_grad_from_output(a: Tensor) -> Tensor:
    return (a > 0).to(a.dtype)  # a > 0 exactly when z > 0


# leaky_relu: f(z) = z if z > 0 else s z, f'(z) = 1 if z > 0 else s
def leaky_relu(z: Tensor, negative_slope: float = 0.01) -> Tensor:
    return torch.nn.functional.leaky_relu(z, negative_slope)


def leaky_relu_grad(z: Tensor, negative_slope: float = 0.01) -> Tensor:
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))


def leaky_relu_grad_from_output(a: Tensor, negative_slope: float = 0.01) -> Tensor:
    # Valid for s >= 0 only: then a > 0 exactly when z > 0.
    return torch.where(a > 0, torch.ones_like(a), torch.full_like(a, negative_slope))


# gelu (exact): f(z) = z Phi(z), f'(z) = Phi(z) + z phi(z)
# (Phi, phi: the standard normal CDF and density; Phi(z) = (1 + erf(z / sqrt 2)) / 2)
def gelu(z: Tensor) -> Tensor:
    return torch.nn.functional.gelu(z)  # z Phi(z), in PyTorch's one fused pass


def gelu_grad(z: Tensor) -> Tensor:
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return torch.addcmul(torch.special.ndtr(z), z, pdf)  # Phi(z) + z phi(z), one fused pass for the sum


# gelu_tanh: f(z) = z/2 (1 + tanh(u)), u = sqrt(2/pi) (z + c z^3)
#            f'(z) = (1 + tanh u)/2 + z/2 (1 - tanh^2 u) du/dz,  du/dz = sqrt(2/pi) (1 + 3c z^2)
def gelu_tanh(z: Tensor) -> Tensor:
    return torch.nn.functional.gelu(z, approximate="tanh")  # z/2 (1 + tanh u), in one fused pass


def gelu_tanh_grad(z: Tensor) -> Tensor:
    u = _SQRT_2_PI * (z + _GELU_TANH_C * z * z * z)
    t = torch.tanh(u)
    du_dz = _SQRT_2_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du_dz


# silu: f(z) = z sigma(z), f'(z) = sigma(z) (1 + z (1 - sigma(z)))
def silu(z: Tensor) -> Tensor:
    return torch.nn.functional.silu(z)  # z sigma(z), in one fused pass


def silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


# sigmoid: f(z) = 1 / (1 + e^-z), f'(z) = f(z) (1 - f(z))
def sigmoid(z: Tensor) -> Tensor:
    return torch.sigmoid(z)


def sigmoid_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s)


def sigmoid_grad_from_output(a: Tensor) -> Tensor:
    return a * (1.0 - a)


# tanh: f(z) = tanh z, f'(z) = 1 - tanh^2 z
def tanh(z: Tensor) -> Tensor:
    return torch.tanh(z)


def tanh_grad(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return 1.0 - t * t


def tanh_grad_from_output(a: Tensor) -> Tensor:
    return 1.0 - a * a


@dataclass(frozen=True)
class Activation:
    """One activation with its options bound.

    ``saves_output`` says what the forward keeps for the backward: ``a`` when
    f' can be computed from it (``f_grad_from_output``), otherwise ``z``.
    ``kernel_id`` is the number the Triton kernels use for the same activation.
    """

    name: str
    kernel_id: int
    negative_slope: float
    saves_output: bool
    _f: Callable
    _f_grad: Callable
    _f_grad_from_output: Optional[Callable]

    def _options(self) -> dict:
        return {"negative_slope": self.negative_slope} if self.name == "leaky_relu" else {}

    def f(self, z: Tensor) -> Tensor:
        """a = f(z), elementwise."""
        return self._f(z, **self._options())

    def f_grad(self, z: Tensor) -> Tensor:
        """f'(z), elementwise."""
        return self._f_grad(z, **self._options())

    def f_grad_from_output(self, a: Tensor) -> Tensor:
        """f'(z) computed from a = f(z); only where ``saves_output``."""
        if not self.saves_output:
            raise RuntimeError(f"activation {self.name!r} cannot compute f' from its output; use f_grad(z)")
        return self._f_grad_from_output(a, **self._options())

    @property
    def kernel_slope(self) -> float:
        """NEGATIVE_SLOPE as the Triton kernels take it: a compile-time constant, so pinned to 0
        where unused (any other value would compile a needless kernel variant)."""
        return self.negative_slope if self.name == "leaky_relu" else 0.0

    def extra_repr(self) -> str:
        if self.name == "leaky_relu":
            return f"activation={self.name!r}, negative_slope={self.negative_slope}"
        return f"activation={self.name!r}"


# name -> (kernel id, f, f', f' from the output or None)
_TABLE = {
    "identity": (0, identity, identity_grad, identity_grad_from_output),
    "relu": (1, relu, relu_grad, relu_grad_from_output),
    "leaky_relu": (2, leaky_relu, leaky_relu_grad, leaky_relu_grad_from_output),
    "gelu": (3, gelu, gelu_grad, None),
    "gelu_tanh": (4, gelu_tanh, gelu_tanh_grad, None),
    "silu": (5, silu, silu_grad, None),
    "sigmoid": (6, sigmoid, sigmoid_grad, sigmoid_grad_from_output),
    "tanh": (7, tanh, tanh_grad, tanh_grad_from_output),
}

ACTIVATIONS: tuple[str, ...] = tuple(_TABLE)


def get_activation(name: "str | Activation", **options) -> Activation:
    """Look up an activation by name and bind its options.

    The only option is ``negative_slope`` (float, default 0.01) of ``leaky_relu``.
    Raises ValueError for an unknown name (listing the valid ones), for an option
    the activation does not take, and for a bad option value.
    """
    if isinstance(name, Activation):
        if options:
            raise ValueError(f"activation options {sorted(options)} cannot be given with an Activation object")
        return name
    if not isinstance(name, str) or name not in _TABLE:
        raise ValueError(f"unknown activation {name!r}; expected one of: {', '.join(ACTIVATIONS)}")
    allowed = {"negative_slope"} if name == "leaky_relu" else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        takes = f"takes only {sorted(allowed)}" if allowed else "takes no options"
        raise ValueError(f"activation {name!r} {takes}; got {unknown}")
    slope = options.get("negative_slope")
    slope = 0.01 if slope is None else slope
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise ValueError(f"negative_slope must be a finite real number, got {slope!r}")
    kernel_id, f, f_grad, f_grad_from_output = _TABLE[name]
    # leaky_relu's f' can be read off a only when the slope keeps the sign: s >= 0.
    saves_output = f_grad_from_output is not None and not (name == "leaky_relu" and slope < 0)
    return Activation(
        name=name,
        kernel_id=kernel_id,
        negative_slope=float(slope),
        saves_output=saves_output,
        _f=f,
        _f_grad=f_grad,
        _f_grad_from_output=f_grad_from_output if saves_output else None,
    )
