"""``manualbp.revert(model)``: the inverse of :func:`manualbp.convert`, back to plain PyTorch.

Every ``manualbp.Linear`` becomes an ``nn.Linear`` again (the same module object,
its class changed back, as ``convert`` changed it: Parameters, hooks and attributes
stay), followed by the PyTorch module of its activation (none for 'identity'):

- where ``convert`` fused an activation module into the Linear, it left an
  ``nn.Identity`` in the next slot of the ``nn.Sequential``; the activation module
  goes back into that slot, so indices and state_dict keys are the original ones;
- anywhere else (a ``manualbp.Linear(..., activation="gelu")`` built by hand) the
  slot gets ``nn.Sequential(nn.Linear, activation module)``, so the keys gain a
  ``.0`` (``fc.weight`` -> ``fc.0.weight``); the report says so.

Every ``manualbp.MLP`` becomes the ``nn.Sequential`` of :meth:`MLP.to_sequential`
(same structure and state_dict keys), holding the MLP's own Parameters.

What convert's module patterns (``manualbp/patterns.py``) did is undone first: each
``patterns.Fused`` slot gets back the very activation module it replaced, the layer it
was fused into its own class (nn.Linear, transformers' Conv1D), a gated block its own
class (LlamaMLP, Phi3MLP, ...) and attributes; converted Conv1D layers become Conv1D again.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

from torch import nn

from . import patterns
from .conversion import Skipped, _describe, _qualified, _skipped_lines, in_model_order, module_for_activation
from .mlp import MLP
from .modules import Linear, has_hooks


@dataclass(frozen=True)
class Reversion:
    """One manualbp module made plain PyTorch: its qualified name ('' for the model itself),
    'Linear' or 'MLP', its activation(s), what it became, and where the activation module
    went: ``restored``, the qualified name of the nn.Identity slot it refilled, or ``wrapped``
    (the slot now holds nn.Sequential(nn.Linear, activation): its state_dict keys gained '.0')."""

    name: str
    kind: str
    activation: str
    result: str
    restored: Optional[str] = None
    wrapped: bool = False


@dataclass
class RevertReport:
    """What :func:`revert` did: ``reverted`` and ``skipped`` (left as manualbp modules), in model order."""

    reverted: List[Reversion] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"manualbp.revert: {len(self.reverted)} reverted, {len(self.skipped)} left alone"]
        for r in self.reverted:
            lines.append(f"  reverted {r.name or '<model>'} (manualbp.{r.kind}, {r.activation}) -> {r.result}")
        return "\n".join(lines + _skipped_lines(self.skipped))


def _to_plain(layer: Linear) -> nn.Linear:
    """The same module object as an nn.Linear (or the nn.Linear subclass convert found) again."""
    original = layer.__dict__.pop("_manualbp_original_class", nn.Linear)
    for name in ("activation", "backend"):
        layer.__dict__.pop(name, None)
    layer.__class__ = original
    return layer


def _activation_module(layer: Linear) -> nn.Module:
    module = module_for_activation(layer.activation)
    module.train(layer.training)
    return module


class _Reverter:
    def __init__(self, model: nn.Module):
        self.report = RevertReport()
        self.done: dict = {}  # id(manualbp module) -> what replaces it in every slot (shared modules stay shared)
        self.visited: set = set()
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def mlp(self, mlp: MLP, path: str) -> nn.Module:
        layers = mlp.layers
        described = ", ".join(_describe(layer.activation) for layer in layers)
        modules: List[nn.Module] = []
        for index, layer in enumerate(layers):
            activation = layer.activation
            modules.append(_to_plain(layer))
            if index < len(layers) - 1 or activation.name != "identity":  # the layout of MLP.to_sequential
                modules.append(module_for_activation(activation))
        sequential = nn.Sequential(*modules)
        sequential.train(mlp.training)
        self.report.reverted.append(Reversion(path, "MLP", described, "nn.Sequential, the layout of to_sequential()"))
        return sequential

    def patterns(self, model: nn.Module) -> None:
        """Undo convert's module patterns (manualbp.patterns): every Fused slot gets its activation module back,
        the layer it went into its own class; then every converted Conv1D. Before :meth:`visit`."""
        for path, block in list(model.named_modules()):
            for slot, marker in patterns.fused_slots(block):
                restored, name = _qualified(path, slot), path
                if isinstance(block, patterns.GATED_BLOCKS) and "_manualbp_original_class" in block.__dict__:
                    described, kind = _describe(block.activation), type(block).__qualname__
                    patterns.revert_gated(block)
                    result = f"{type(block).__qualname__}, {type(marker.original).__name__} back in {restored}"
                else:
                    linear = block._modules.get(marker.into)
                    if not patterns.is_manualbp_layer(linear):
                        self.report.skipped.append(Skipped(restored, "Fused", (
                            f"the layer it was fused into ({marker.into}) is a {type(linear).__qualname__} now, "
                            f"not a manualbp layer")))
                        continue
                    if has_hooks(linear):  # left fused; a manualbp.Linear is reported by visit
                        if patterns.is_manualbp_conv1d(linear):
                            self.report.skipped.append(Skipped(_qualified(path, marker.into), "Conv1D", (
                                "it has hooks that see f(x Wᵀ + b); as a plain layer they would see x Wᵀ + b")))
                        continue
                    described = _describe(linear.activation)
                    kind = "Conv1D" if patterns.is_manualbp_conv1d(linear) else "Linear"
                    _to_plain(linear)
                    result = f"{type(linear).__qualname__}, {type(marker.original).__name__} back in {restored}"
                    name = _qualified(path, marker.into)
                marker.original.train(marker.training)
                block._modules[slot] = marker.original
                self.report.reverted.append(Reversion(name, kind, described, result, restored=restored))
        for path, module in list(model.named_modules()):
            if patterns.is_manualbp_conv1d(module) and module.activation.name == "identity":
                _to_plain(module)
                self.report.reverted.append(Reversion(path, "Conv1D", "identity", type(module).__qualname__))

    def why_not(self, child: nn.Module) -> Optional[str]:
        if type(child) is MLP or type(child) is Linear:
            if type(child) is MLP and has_hooks(child):
                return "the MLP has hooks; the nn.Sequential replacing it would not run them"
            if type(child) is MLP and any(has_hooks(layer) for layer in child.layers):
                return "a layer of the MLP has hooks, which MLP.forward never runs and nn.Sequential would"
            if type(child) is Linear and child.activation.name != "identity" and has_hooks(child):
                return "it has hooks that see f(x Wᵀ + b); as an nn.Linear they would see x Wᵀ + b"
            return None
        return (f"a subclass of manualbp.{'MLP' if isinstance(child, MLP) else 'Linear'} "
                f"({type(child).__qualname__}) whose forward may differ")

    def visit(self, root: nn.Module, prefix: str = "") -> None:
        if id(root) in self.visited:
            return
        self.visited.add(id(root))
        names = [name for name, child in root._modules.items() if child is not None]
        for position, name in enumerate(names):
            child = root._modules[name]
            path = _qualified(prefix, name)
            if id(child) in self.done:  # a shared manualbp module, reverted where first seen
                root._modules[name] = self.done[id(child)]
                continue
            if not isinstance(child, (Linear, MLP)):
                self.visit(child, path)
                continue
            reason = self.why_not(child)
            if reason is not None:
                self.report.skipped.append(Skipped(path, type(child).__qualname__, reason))
                continue
            if isinstance(child, MLP):
                self.done[id(child)] = root._modules[name] = self.mlp(child, path)
                continue
            activation = child.activation
            if activation.name == "identity":
                self.done[id(child)] = _to_plain(child)
                self.report.reverted.append(Reversion(path, "Linear", "identity", type(child).__qualname__))
                continue
            slot = names[position + 1] if isinstance(root, nn.Sequential) and position + 1 < len(names) else None
            follower = root._modules[slot] if slot is not None else None
            if (type(follower) is nn.Identity and not has_hooks(follower)
                    and self.uses[id(follower)] == 1 and self.uses[id(child)] == 1):
                # The slot convert emptied: the activation module goes back where it was.
                module = root._modules[slot] = _activation_module(child)
                linear = self.done[id(child)] = _to_plain(child)
                restored = _qualified(prefix, slot)
                self.report.reverted.append(Reversion(
                    path, "Linear", _describe(activation),
                    f"{type(linear).__qualname__}, {type(module).__name__} back in {restored}", restored=restored))
            else:
                module = _activation_module(child)
                linear = _to_plain(child)
                wrapper = nn.Sequential(linear, module)
                wrapper.train(linear.training)
                self.done[id(child)] = root._modules[name] = wrapper
                self.report.reverted.append(Reversion(
                    path, "Linear", _describe(activation),
                    f"nn.Sequential({type(linear).__qualname__}, {type(module).__name__}): "
                    f"keys now {_qualified(path, '0')}.*", wrapped=True))


def revert(
    model: nn.Module,
    inplace: bool = True,
    *,
    share_parameters: Optional[bool] = None,
    return_report: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, RevertReport]]:
    """Replace every ``manualbp.Linear`` and ``manualbp.MLP`` of ``model`` by plain PyTorch modules; returns the model.

    model             any nn.Module (a manualbp.Linear or MLP itself too: then the plain module is returned)
    inplace           True: change ``model`` itself; False: revert a copy of it
    share_parameters  with inplace=False, True gives a copy holding the very same Parameter
                      objects (training one trains the other); False (the default there) a
                      deep copy. inplace=True always keeps the model's own Parameters.
    return_report     also return a :class:`RevertReport`

    ``revert(convert(m))`` computes what ``m`` computed, with ``m``'s state_dict keys. A module
    that cannot be reverted without a visible difference (hooks on an activated Linear or on
    an MLP, subclasses of manualbp's modules) is left as it was and reported as skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert() expects an nn.Module, got {type(model).__name__}")
    if share_parameters is None:
        share_parameters = inplace
    if inplace and not share_parameters:
        raise ValueError("revert(inplace=True) keeps the model's own Parameters; "
                         "pass inplace=False for a copy with copied Parameters")
    if not inplace:
        memo = {id(p): p for p in model.parameters()} if share_parameters else {}
        model = copy.deepcopy(model, memo)
    reverter = _Reverter(model)
    reverter.patterns(model)
    holder = nn.Module()  # a root manualbp module is replaced too: make it the only child of a holder
    holder._modules[""] = model
    reverter.visit(holder)
    result = holder._modules[""]
    in_model_order(result, reverter.report.reverted, reverter.report.skipped)
    return (result, reverter.report) if return_report else result

