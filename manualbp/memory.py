"""What a forward keeps for the backward, measured."""

from __future__ import annotations

import torch
from torch import nn


def saved_bytes(module: nn.Module, *inputs: torch.Tensor, count_inputs: bool = True) -> int:
    """Bytes of the distinct storages that one call ``module(*inputs)`` saves for backward.

    The module's parameters are never counted: they exist anyway, and saving one
    keeps a reference, not a copy. ``count_inputs=False`` leaves out the inputs as
    well, leaving only the activations the forward adds to memory. Counted per
    storage, so a tensor saved twice (an output that is also the next layer's
    input) counts once.
    """
    known = {p.untyped_storage().data_ptr() for p in module.parameters()}
    if not count_inputs:
        known |= {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(storages.values())
