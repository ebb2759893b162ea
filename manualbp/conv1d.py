"""transformers' ``Conv1D`` (GPT-2, GPT, ...) with manualbp's hand-written backward.

``Conv1D`` is a Linear whose weight is stored transposed: ``weight`` [in_features (nx),
out_features (nf)], forward ``x weight + bias``. ``manualbp.convert`` changes a Conv1D's class
to :class:`Conv1D` below (the same module object, as it does for nn.Linear), which computes
a = f(x Wᵀ + b) with W = ``weight.t()`` [nf, nx], a view of the very Parameter the model,
its optimizers and its state_dict hold (so nothing is copied and the key and shape stay
``[nx, nf]``); autograd transposes ∂C/∂W = δᵀ X back into the Parameter's layout. It stays
a subclass of transformers' Conv1D, so code that asks ``isinstance(m, Conv1D)`` (peft's LoRA
sizes its adapters so) still sees one.

Imported only where a model holds a Conv1D, so transformers is installed.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

import torch
from torch import Tensor
from transformers.pytorch_utils import Conv1D as _Conv1D

from . import functional as F
from .activations import Activation


class Conv1D(_Conv1D):
    """transformers' Conv1D followed by an activation, with the hand-written backward.

    input [..., nx] -> output [..., nf], a = f(x Wᵀ + b), W = weight.t(): weight [nx, nf], bias [nf].
    Made only by ``manualbp.convert`` (and undone by ``manualbp.revert``).
    """

    activation: Activation
    backend: Optional[str]

    def forward(self, input: Tensor) -> Tensor:
        activation = self.activation
        if "peft" in sys.modules and activation.name != "identity" and not torch.compiler.is_compiling():
            # peft's own LoRA layer would add its update after f: silently wrong (manualbp/peft.py)
            importlib.import_module(f"{__package__}.peft").check_caller(self, sys._getframe(1))
        return F.linear(input, self.weight.t(), self.bias, activation, backend=self.backend)

    def __repr__(self) -> str:
        text = f"manualbp.Conv1D(nf={self.nf}, nx={self.nx}, {self.activation.extra_repr()}"
        return f"{text})" if self.backend is None else f"{text}, backend={self.backend!r})"
