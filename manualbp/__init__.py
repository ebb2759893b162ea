"""manualbp: drop-in PyTorch dense layers whose backward pass is written by hand.

    Z = X Wᵀ + b,  A = f(Z)
    δ = G ⊙ f'(Z),  ∂C/∂X = δ W,  ∂C/∂W = δᵀ X,  ∂C/∂b = 1ᵀ δ   (denominator layout)

The equations live in ``manualbp.reference``; the Triton kernels in
``manualbp.triton_kernels``. Importing manualbp needs neither Triton nor a GPU.
"""

from . import functional
from .activations import ACTIVATIONS, Activation, get_activation
from .backends import BACKENDS, get_backend, set_backend, use_backend
from .function import LinearFunction
from .modules import Linear

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "BACKENDS",
    "Linear",
    "LinearFunction",
    "functional",
    "get_activation",
    "get_backend",
    "set_backend",
    "use_backend",
]
