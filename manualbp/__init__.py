"""manualbp: drop-in PyTorch dense layers whose backward pass is written by hand.

    Z = X Wᵀ + b,  A = f(Z)
    δ = G ⊙ f'(Z),  ∂C/∂X = δ W,  ∂C/∂W = δᵀ X,  ∂C/∂b = 1ᵀ δ   (denominator layout)

The equations live in ``manualbp.reference``; the Triton kernels in
``manualbp.triton_kernels``. Importing manualbp needs neither Triton nor a GPU.

Beyond one layer: ``manualbp.MLP`` (a stack as one autograd node, ``mlp.py`` and
``mlp_function.py``), ``manualbp.GatedMLP`` (a Llama-family MLP, its gating
A = f(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u) one autograd node: ``gated*.py``),
``manualbp.convert`` (nn.Linear -> manualbp.Linear in any model, ``conversion.py``; the
fusions inside a model's own blocks by the module patterns of ``patterns.py``).

The layers, bottom up: the Triton kernels and their launchers (``triton_kernels/``)
and the reference (``reference.py``), both reached as PyTorch operators
(``ops.py``: torch.ops.manualbp.*, with fake, vmap, FLOP and DTensor rules); one
autograd Function per layer over them (``function.py``, ``mlp_function.py``), for
eager code, torch.func and torch.compile alike; the modules (``modules.py``,
``mlp.py``) and ``functional.py``, whose one entry path validates, applies autocast
and chooses the backend. Settings: ``manualbp.config``.
"""

from . import config, functional, ops
from .activations import ACTIVATIONS, Activation, get_activation
from .backends import BACKENDS, get_backend, set_backend, use_backend
from .conversion import ConversionReport, convert
from .function import LinearFunction
from .gated import GatedMLP
from .gated_function import GatedLinearFunction
from .memory import saved_bytes
from .mlp import MLP
from .mlp_function import MLPFunction
from .modules import Linear
from .revert import RevertReport, revert

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "BACKENDS",
    "ConversionReport",
    "GatedLinearFunction",
    "GatedMLP",
    "Linear",
    "LinearFunction",
    "MLP",
    "MLPFunction",
    "RevertReport",
    "config",
    "convert",
    "functional",
    "get_activation",
    "get_backend",
    "ops",
    "revert",
    "saved_bytes",
    "set_backend",
    "use_backend",
]
