"""manualbp: drop-in PyTorch dense layers whose backward pass is written by hand.

    Z = X Wᵀ + b,  A = f(Z)
    δ = G ⊙ f'(Z),  ∂C/∂X = δ W,  ∂C/∂W = δᵀ X,  ∂C/∂b = 1ᵀ δ   (denominator layout)

The equations live in ``manualbp.reference``; the Triton kernels in
``manualbp.triton_kernels``. Importing manualbp needs neither Triton nor a GPU.

Beyond one layer: ``manualbp.MLP`` (a stack as one autograd node, ``mlp.py`` and
``mlp_function.py``), ``manualbp.convert`` (nn.Linear -> manualbp.Linear in any
model, ``conversion.py``), and the custom operators that torch.compile and
torch.export see (``ops.py``).
"""

from . import functional, ops
from .activations import ACTIVATIONS, Activation, get_activation
from .backends import BACKENDS, get_backend, set_backend, use_backend
from .conversion import ConversionReport, convert
from .function import LinearFunction
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
    "Linear",
    "LinearFunction",
    "MLP",
    "MLPFunction",
    "RevertReport",
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
