"""Activations f and their derivatives f', written side by side.

Every activation is a pair of elementwise functions of the pre-activation z:

    f(z)        the forward,  a = f(z)
    f_grad(z)   the derivative f'(z) used in the backward, delta = grad_a * f'(z)

and, where f' can be read off the output a (so the forward saves a, not z, and
an nn.Linear + activation pair saves nothing extra), a third one

    f_grad_from_output(a)   the same f'(z), computed from a = f(z)

and, beside them, the product the backward actually needs,

    delta(grad_a, z)        δ = G ⊙ f'(z), in one pass
    delta_from_output(grad_a, a)   the same from a = f(z)

The Triton kernels implement f and f' under the same names in
``triton_kernels/activations.py``, by the formulas written here.

The PyTorch reference backend runs on PyTorch's own fused elementwise kernels:
f is PyTorch's activation (gelu, silu, ... as one op), and ``delta`` is the fused
backward kernel eager autograd runs for that f (``aten.gelu_backward`` and the
like: one pass over [M, N] where G * f'(z) in separate torch ops takes up to ten).
The reference backward is then bitwise eager's wherever the matrix products are
too, and as fast. The formulas f_grad / f_grad_from_output are the math: tests
check ``delta`` against ``grad_a * f_grad(z)`` and f_grad against autograd of f,
and double backward (create_graph=True) differentiates them, since not every
fused kernel has a derivative (``silu_backward`` has none; PyTorch's own silu
switches to a formula under create_graph in the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

_SQRT_2_PI = math.sqrt(2.0 / math.pi)  # sqrt(2/pi), for tanh-GELU
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # 1/sqrt(2 pi), the normal density's constant
_GELU_TANH_C = 0.044715  # cubic coefficient of the tanh approximation
_ATEN = torch.ops.aten  # PyTorch's fused backward kernels, for delta


# identity: f(z) = z, f'(z) = 1
def identity(z: Tensor) -> Tensor:
    return z


def identity_grad(z: Tensor) -> Tensor:
    return torch.ones_like(z)


def identity_grad_from_output(a: Tensor) -> Tensor:
    return torch.ones_like(a)


def identity_delta(grad_a: Tensor, z: Tensor) -> Tensor:
    return grad_a  # δ = G ⊙ 1, no pass at all


identity_delta_from_output = identity_delta


# relu: f(z) = max(z, 0), f'(z) = 0 where z <= 0, else 1  (0 at z = 0; 1 at NaN, where PyTorch passes G through)
def relu(z: Tensor) -> Tensor:
    return torch.relu(z)


def relu_grad(z: Tensor) -> Tensor:
    return (~(z <= 0)).to(z.dtype)


def relu_grad_from_output(a: Tensor) -> Tensor:
    return (~(a <= 0)).to(a.dtype)  # a <= 0 exactly when z <= 0; a is NaN exactly when z is


def relu_delta(grad_a: Tensor, z: Tensor) -> Tensor:
    return _ATEN.threshold_backward(grad_a, z, 0)  # G where z > 0, else 0


relu_delta_from_output = relu_delta  # the same test on a: a > 0 exactly when z > 0


# leaky_relu: f(z) = z if z > 0 else s z, f'(z) = 1 if z > 0 else s
def leaky_relu(z: Tensor, negative_slope: float = 0.01) -> Tensor:
    return torch.nn.functional.leaky_relu(z, negative_slope)


def leaky_relu_grad(z: Tensor, negative_slope: float = 0.01) -> Tensor:
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))


def leaky_relu_grad_from_output(a: Tensor, negative_slope: float = 0.01) -> Tensor:
    # Valid for s >= 0 only: then a > 0 exactly when z > 0.
    return torch.where(a > 0, torch.ones_like(a), torch.full_like(a, negative_slope))


def leaky_relu_delta(grad_a: Tensor, z: Tensor, negative_slope: float = 0.01) -> Tensor:
    return _ATEN.leaky_relu_backward(grad_a, z, negative_slope, False)  # G if z > 0 else s G


leaky_relu_delta_from_output = leaky_relu_delta  # s >= 0 only, as above: the same test on a


# gelu (exact): f(z) = z Phi(z), f'(z) = Phi(z) + z phi(z)
# (Phi, phi: the standard normal CDF and density; Phi(z) = (1 + erf(z / sqrt 2)) / 2)
def gelu(z: Tensor) -> Tensor:
    return torch.nn.functional.gelu(z)  # z Phi(z), in PyTorch's one fused pass


def gelu_grad(z: Tensor) -> Tensor:
    pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return torch.addcmul(torch.special.ndtr(z), z, pdf)  # Phi(z) + z phi(z), one fused pass for the sum


def gelu_delta(grad_a: Tensor, z: Tensor) -> Tensor:
    return _ATEN.gelu_backward(grad_a, z, approximate="none")


# gelu_tanh: f(z) = z/2 (1 + tanh(u)), u = sqrt(2/pi) (z + c z^3)
#            f'(z) = (1 + tanh u)/2 + z/2 (1 - tanh^2 u) du/dz,  du/dz = sqrt(2/pi) (1 + 3c z^2)
def gelu_tanh(z: Tensor) -> Tensor:
    return torch.nn.functional.gelu(z, approximate="tanh")  # z/2 (1 + tanh u), in one fused pass


def gelu_tanh_grad(z: Tensor) -> Tensor:
    u = _SQRT_2_PI * (z + _GELU_TANH_C * z * z * z)
    t = torch.tanh(u)
    du_dz = _SQRT_2_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du_dz


def gelu_tanh_delta(grad_a: Tensor, z: Tensor) -> Tensor:
    return _ATEN.gelu_backward(grad_a, z, approximate="tanh")


# silu: f(z) = z sigma(z), f'(z) = sigma(z) (1 + z (1 - sigma(z)))
def silu(z: Tensor) -> Tensor:
    return torch.nn.functional.silu(z)  # z sigma(z), in one fused pass


def silu_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def silu_delta(grad_a: Tensor, z: Tensor) -> Tensor:
    return _ATEN.silu_backward(grad_a, z)


# sigmoid: f(z) = 1 / (1 + e^-z), f'(z) = f(z) (1 - f(z))
def sigmoid(z: Tensor) -> Tensor:
    return torch.sigmoid(z)


def sigmoid_grad(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s)


def sigmoid_grad_from_output(a: Tensor) -> Tensor:
    return a * (1.0 - a)


def sigmoid_delta_from_output(grad_a: Tensor, a: Tensor) -> Tensor:
    # (G (1 - a)) a; 16-bit data on CUDA: each operation rounded to that dtype (see tanh_delta_from_output)
    return _ATEN.sigmoid_backward(grad_a, a)


def sigmoid_delta(grad_a: Tensor, z: Tensor) -> Tensor:
    return sigmoid_delta_from_output(grad_a, torch.sigmoid(z))  # a recomputed (MLP with recompute=True)


# tanh: f(z) = tanh z, f'(z) = 1 - tanh^2 z
def tanh(z: Tensor) -> Tensor:
    return torch.tanh(z)


def tanh_grad(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return 1.0 - t * t


def tanh_grad_from_output(a: Tensor) -> Tensor:
    return 1.0 - a * a


def tanh_delta_from_output(grad_a: Tensor, a: Tensor) -> Tensor:
    # G (1 - a a). For 16-bit data PyTorch's CUDA kernel rounds each of the three operations to that dtype (c10 half
    # arithmetic) where its CPU kernel rounds once, from float32; the Triton kernels follow the CUDA one.
    return _ATEN.tanh_backward(grad_a, a)


def tanh_delta(grad_a: Tensor, z: Tensor) -> Tensor:
    return tanh_delta_from_output(grad_a, torch.tanh(z))  # a recomputed (MLP with recompute=True)


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
    _delta: Callable
    _delta_from_output: Optional[Callable]
    # The options as keyword arguments of the functions above (decided by the fields above, so not compared).
    _options: dict = field(default_factory=dict, compare=False, repr=False)

    def _check_from_output(self) -> None:
        if not self.saves_output:
            raise RuntimeError(f"activation {self.name!r} cannot compute f' from its output; use f_grad(z) / delta(z)")

    def f(self, z: Tensor) -> Tensor:
        """a = f(z), elementwise."""
        return self._f(z, **self._options)

    def f_grad(self, z: Tensor) -> Tensor:
        """f'(z), elementwise."""
        return self._f_grad(z, **self._options)

    def f_grad_from_output(self, a: Tensor) -> Tensor:
        """f'(z) computed from a = f(z); only where ``saves_output``."""
        self._check_from_output()
        return self._f_grad_from_output(a, **self._options)

    def delta(self, grad_a: Tensor, saved: Tensor, from_output: bool) -> Tensor:
        """δ = grad_a ⊙ f'(z) [M, N] in one fused pass, from saved = a (from_output) or z. Not differentiable."""
        if from_output:
            self._check_from_output()
            return self._delta_from_output(grad_a, saved, **self._options)
        return self._delta(grad_a, saved, **self._options)

    @property
    def kernel_slope(self) -> float:
        """NEGATIVE_SLOPE as the Triton kernels take it: a compile-time constant, so pinned to 0
        where unused (any other value would compile a needless kernel variant)."""
        return self.negative_slope if self.name == "leaky_relu" else 0.0

    def extra_repr(self) -> str:
        if self.name == "leaky_relu":
            return f"activation={self.name!r}, negative_slope={self.negative_slope}"
        return f"activation={self.name!r}"


class _Entry(NamedTuple):
    kernel_id: int  # the number the Triton kernels use (triton_kernels/activations.py reads it here)
    f: Callable
    f_grad: Callable
    f_grad_from_output: Optional[Callable]  # None: f' needs z
    delta: Callable
    delta_from_output: Optional[Callable]
    module: Callable[..., nn.Module]  # the PyTorch module computing f, from the activation's options


# The activation catalogue: every fact about an activation, in one place. Everything else
# (the kernels' ids, convert/revert's modules, MLP.to_sequential, the tests) reads it.
_TABLE = {
    "identity": _Entry(0, identity, identity_grad, identity_grad_from_output, identity_delta,
                       identity_delta_from_output, nn.Identity),
    "relu": _Entry(1, relu, relu_grad, relu_grad_from_output, relu_delta, relu_delta_from_output, nn.ReLU),
    "leaky_relu": _Entry(2, leaky_relu, leaky_relu_grad, leaky_relu_grad_from_output,
                         leaky_relu_delta, leaky_relu_delta_from_output, nn.LeakyReLU),
    "gelu": _Entry(3, gelu, gelu_grad, None, gelu_delta, None, lambda: nn.GELU(approximate="none")),
    "gelu_tanh": _Entry(4, gelu_tanh, gelu_tanh_grad, None, gelu_tanh_delta, None,
                        lambda: nn.GELU(approximate="tanh")),
    "silu": _Entry(5, silu, silu_grad, None, silu_delta, None, nn.SiLU),
    "sigmoid": _Entry(6, sigmoid, sigmoid_grad, sigmoid_grad_from_output, sigmoid_delta,
                      sigmoid_delta_from_output, nn.Sigmoid),
    "tanh": _Entry(7, tanh, tanh_grad, tanh_grad_from_output, tanh_delta, tanh_delta_from_output, nn.Tanh),
}

ACTIVATIONS: tuple[str, ...] = tuple(_TABLE)


def kernel_id(name: str) -> int:
    """The number of activation ``name`` in the Triton kernels."""
    return _TABLE[name].kernel_id


def torch_module(activation: "str | Activation") -> nn.Module:
    """The PyTorch module computing the same activation (nn.Identity for 'identity')."""
    activation = get_activation(activation)
    return _TABLE[activation.name].module(**activation._options)


def _module_activation(module: nn.Module) -> Optional["Activation"]:
    """The activation an nn.Module instance computes (nn.Identity included), or None.

    Exact classes only (a subclass may compute something else); the options are read off the
    instance (LeakyReLU's negative_slope, GELU's approximate). ``inplace`` changes no value of
    the layer's output, so it is accepted (the fused layer writes its output once, in any case).
    """
    for name, entry in _TABLE.items():
        options = {"negative_slope": getattr(module, "negative_slope", None)} if name == "leaky_relu" else {}
        if None in options.values():
            continue
        candidate = entry.module(**options)
        if type(module) is type(candidate) and getattr(module, "approximate", None) == getattr(
                candidate, "approximate", None):
            return get_activation(name, **options)
    return None


def from_torch_module(module: Optional[nn.Module]) -> Optional["Activation"]:
    """The activation that ``module`` computes, or None if the catalogue has none for it.

    Exact classes only (a subclass may compute something else); nn.Identity is not an activation here.
    """
    if type(module) is nn.Identity:
        return None
    return _module_activation(module)


# transformers' activation modules (transformers.activations, exact classes matched by name, so that
# transformers need not be imported): the catalogue's function each computes, and how its numbers differ
# from the catalogue's f. Only convert's module patterns take these (manualbp.patterns), and each fusion is
# checked there against the block's own forward in float64 before it is applied; get_activation does not
# (it takes the modules computed exactly). QuickGELU (x σ(1.702 x)), ClippedGELU, ReLU², Mish, xIELU, ...:
# no catalogue function, not mapped.
TRANSFORMERS_ACTIVATIONS = {
    "GELUActivation": ("gelu", "none: nn.functional.gelu (with use_gelu_python=True: x/2 (1 + erf(x/√2)) in "
                               "separate ops, which rounds differently)"),
    "GELUTanh": ("gelu_tanh", "none: nn.functional.gelu(approximate='tanh') (with use_gelu_tanh_python=True: "
                              "the tanh formula in separate ops, which rounds differently)"),
    "PytorchGELUTanh": ("gelu_tanh", "none: nn.functional.gelu(approximate='tanh') (an alias of GELUTanh)"),
    "NewGELUActivation": ("gelu_tanh", "the tanh formula in separate ops: rounding only"),
    "AccurateGELUActivation": ("gelu_tanh", "the tanh formula in separate ops: rounding only"),
    "FastGELUActivation": ("gelu_tanh", "sqrt(2/pi) rounded to 0.7978845608 (3.6e-12 relative) and the formula in "
                                        "separate ops"),
    "SiLUActivation": ("silu", "none: nn.functional.silu"),
}


def from_model_module(module: Optional[nn.Module]) -> Optional["Activation"]:
    """:func:`from_torch_module`, and transformers' activation modules of TRANSFORMERS_ACTIVATIONS too."""
    if type(module).__module__ == "transformers.activations" and type(module).__name__ in TRANSFORMERS_ACTIVATIONS:
        return get_activation(TRANSFORMERS_ACTIVATIONS[type(module).__name__][0])
    return from_torch_module(module)


def _module_class_name(module_class) -> Optional[str]:
    """The catalogue's name for an activation module class with its default options (nn.GELU: 'gelu'), or None."""
    for name, entry in _TABLE.items():  # table order: 'gelu' before 'gelu_tanh', both nn.GELU
        if module_class is type(entry.module()):
            return name
    return None


# Names in any letter case: the catalogue's ('leaky_relu') and its PyTorch modules' class names ('LeakyReLU');
# where two share a class (nn.GELU), the class name means the class's default (approximate='none': 'gelu').
def _aliases() -> dict:
    aliases = {}
    for name, entry in _TABLE.items():
        aliases.setdefault(name.lower(), name)
        aliases.setdefault(type(entry.module()).__name__.lower(), name)
    return aliases


_ALIASES = _aliases()


def _accepted() -> str:
    """What get_activation accepts, for its errors."""
    return (f"one of: {', '.join(ACTIVATIONS)} (any letter case, or the PyTorch class's name such as 'LeakyReLU'), "
            f"an Activation, or one of the PyTorch modules nn.Identity, nn.ReLU, nn.LeakyReLU, "
            f"nn.GELU (approximate='none' or 'tanh'), nn.SiLU, nn.Sigmoid, nn.Tanh, as an instance or the class "
            f"(exact classes, not subclasses)")


def _resolve_module(activation, options: dict) -> "str | Activation":
    """An activation given as a PyTorch module instance or class, as get_activation takes it."""
    if isinstance(activation, nn.Module):
        if options:
            raise ValueError(f"activation options {sorted(options)} cannot be given with a module instance "
                             f"({activation!r}): they are read off the module")
        from .modules import has_hooks  # modules imports this module

        if has_hooks(activation):
            raise ValueError(f"activation module {activation!r} has hooks, which a manualbp layer would never "
                             f"call; pass the module without hooks, or its name")
        bound = _module_activation(activation)
        what = f"module {activation!r} ({type(activation).__module__}.{type(activation).__qualname__})"
    else:
        bound = _module_class_name(activation)
        what = f"class {activation.__module__}.{activation.__qualname__}"
    if bound is None:
        raise ValueError(f"activation {what} is not one manualbp computes exactly; "
                         f"expected {_accepted()}")
    return bound


def get_activation(name: "str | Activation | nn.Module | type", **options) -> Activation:
    """Look up an activation and bind its options.

    ``name``: a name of ACTIVATIONS in any letter case ('GELU', 'Relu'), or the name of its
    PyTorch module class ('LeakyReLU'); an Activation (returned as it is); or a PyTorch
    activation module, an instance (nn.GELU(approximate='tanh'), nn.LeakyReLU(0.2): options
    read off it) or the class (nn.SiLU; nn.LeakyReLU: its default slope 0.01, as PyTorch's).
    Exact classes only: a subclass, or a module the catalogue does not compute exactly
    (nn.ReLU6, nn.Softplus, ...), is a ValueError naming what is accepted.
    The only option is ``negative_slope`` (float, default 0.01) of ``leaky_relu``.
    Raises ValueError for an unknown name (listing the valid ones), TypeError for an option
    the activation does not take, and ValueError for a bad option value.
    """
    if isinstance(name, nn.Module) or (isinstance(name, type) and issubclass(name, nn.Module)):
        name = _resolve_module(name, options)
    if isinstance(name, Activation):
        if options:
            raise ValueError(f"activation options {sorted(options)} cannot be given with an Activation object")
        return name
    if not isinstance(name, str) or name.lower() not in _ALIASES:
        raise ValueError(f"unknown activation {name!r}; expected {_accepted()}")
    name = _ALIASES[name.lower()]
    allowed = {"negative_slope"} if name == "leaky_relu" else set()
    unknown = sorted(set(options) - allowed)
    if unknown:  # an unexpected keyword argument, as Python reports one: TypeError
        takes = f"takes only {sorted(allowed)}" if allowed else "takes no options"
        raise TypeError(f"activation {name!r} {takes}; got {unknown}")
    slope = options.get("negative_slope")
    slope = 0.01 if slope is None else slope
    if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
        raise ValueError(f"negative_slope must be a finite real number, got {slope!r}")
    entry = _TABLE[name]
    # leaky_relu's f' can be read off a only when the slope keeps the sign: s >= 0.
    saves_output = entry.f_grad_from_output is not None and not (name == "leaky_relu" and slope < 0)
    return Activation(
        name=name,
        kernel_id=entry.kernel_id,
        negative_slope=float(slope),
        saves_output=saves_output,
        _f=entry.f,
        _f_grad=entry.f_grad,
        _f_grad_from_output=entry.f_grad_from_output if saves_output else None,
        _delta=entry.delta,
        _delta_from_output=entry.delta_from_output if saves_output else None,
        _options={"negative_slope": float(slope)} if name == "leaky_relu" else {},
    )
