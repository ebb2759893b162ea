"""``manualbp.convert(model)``: put manualbp layers into an existing model.

Every plain ``nn.Linear`` becomes a ``manualbp.Linear`` that keeps the very same
``weight`` and ``bias`` Parameters (so their values, device, dtype,
``requires_grad``, any optimizer already holding them, and weights tied to other
modules all carry over) and the same hooks and attributes: the module object is
kept and its class becomes ``manualbp.Linear``, the way
``torch.nn.utils.parametrize`` changes a module's class.

Inside an ``nn.Sequential``, a Linear directly followed by a supported activation
module is fused into one layer, A = f(X Wᵀ + b), and the activation module is
replaced by ``nn.Identity`` so that the indices (and state_dict keys) stay valid:

    nn.ReLU, nn.LeakyReLU, nn.GELU (approximate='none' or 'tanh'), nn.SiLU, nn.Sigmoid, nn.Tanh

Inside a model's own blocks (BERT's intermediate layer, GPT-2's MLP of transformers
``Conv1D`` layers, a Llama MLP's gating, ...) the fusions come from the table of module
patterns in ``manualbp/patterns.py``, each checked against the block's own forward before
it is applied; transformers' ``Conv1D`` layers are converted too, keeping their
transposed weight Parameter.

A fusion changes what the Linear outputs, so it is not done where that would be
visible: when either module has hooks, or when the Linear also appears elsewhere
in the model.

Subclasses of ``nn.Linear`` (``nn.MultiheadAttention``'s ``out_proj``, parametrized
or quantization-aware layers, ...) may compute something else in their forward;
they are left alone unless ``include_subclasses`` asks for them, and reported.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

from torch import nn
from torch.nn.utils import parametrize

from . import backends, config, patterns
from .activations import Activation, from_torch_module, get_activation, torch_module
from .modules import Linear, has_hooks

# --------------------------------------------------------------------------------------
# Activation modules <-> activations
# --------------------------------------------------------------------------------------


def activation_from_module(module: Optional[nn.Module]) -> Optional[Activation]:
    """The manualbp activation that ``module`` computes, or None if it is not one fusion supports
    (the activation catalogue, ``activations.from_torch_module``: exact classes only)."""
    return from_torch_module(module)


def module_for_activation(activation: Union[str, Activation]) -> nn.Module:
    """The PyTorch module computing the same activation (nn.Identity for 'identity'): the catalogue's."""
    return torch_module(activation)


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replacement:
    """One module made a manualbp module: its qualified name ('' for the model itself),
    its former class, the activation fused into it ('identity' if none), the qualified
    name of the activation module replaced by nn.Identity (or by ``patterns.Fused``; None
    if none), the module pattern that found the fusion (``manualbp.patterns``; None in an
    nn.Sequential or for a lone Linear), and what the module became."""

    name: str
    original: str
    activation: str
    fused: Optional[str] = None
    pattern: Optional[str] = None
    result: str = "manualbp.Linear"


@dataclass(frozen=True)
class Skipped:
    """An nn.Linear (or subclass) left as it was, and why."""

    name: str
    original: str
    reason: str


@dataclass
class ConversionReport:
    """What :func:`convert` did: ``replaced`` and ``skipped``, each in model order."""

    replaced: List[Replacement] = field(default_factory=list)
    skipped: List[Skipped] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"manualbp.convert: {len(self.replaced)} replaced, {len(self.skipped)} left alone"]
        for r in self.replaced:
            slot = "nn.Identity" if r.pattern is None else "Fused"
            fused = f" + {r.fused} (now {slot})" if r.fused else ""
            pattern = f" [pattern: {r.pattern}]" if r.pattern else ""
            lines.append(f"  replaced {r.name or '<model>'} ({r.original}{fused}) -> {r.result}({r.activation}){pattern}")
        return "\n".join(lines + _skipped_lines(self.skipped))


def _skipped_lines(skipped: List[Skipped]) -> List[str]:
    """The report's lines for modules left alone (convert's and revert's)."""
    return [f"  skipped  {s.name or '<model>'} ({s.original}): {s.reason}" for s in skipped]


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------


def _describe(activation: Activation) -> str:
    if activation.name == "leaky_relu":
        return f"leaky_relu(negative_slope={activation.negative_slope})"
    return activation.name


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def in_model_order(model: nn.Module, *entries: list) -> None:
    """Sort each list of report entries (with a ``name``) as model.named_modules() lists their modules."""
    order = {}
    for name, _ in model.named_modules(remove_duplicate=False):
        order.setdefault(name, len(order))
    for entry_list in entries:
        entry_list.sort(key=lambda entry: order.get(entry.name, len(order)))


def parameters_problem(module: nn.Module) -> Optional[str]:
    """None if a Linear's (or Conv1D's) weight and bias are plain Parameters a manualbp layer can use, else why not."""
    if parametrize.is_parametrized(module):
        return "parametrized (torch.nn.utils.parametrize); its weight is computed, not a Parameter"
    for name in ("weight", "bias"):
        value = getattr(module, name, None)
        if value is not None and not isinstance(value, nn.Parameter):
            return f"its {name} is a {type(value).__name__}, not an nn.Parameter"
        if isinstance(value, nn.parameter.UninitializedParameter):
            return f"its {name} is not initialized yet (nn.LazyLinear before its first forward)"
    return None


class _Converter:
    def __init__(self, model: nn.Module, fuse: bool, include_subclasses, backend: Optional[str]):
        self.fuse = fuse
        self.include_subclasses = include_subclasses
        self.backend = backend
        self.report = ConversionReport()
        self.visited: set = set()
        # How often each module appears in the model (a module may be registered in several places).
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))

    def why_not(self, module: nn.Module) -> Optional[str]:
        """None if ``module`` is to be converted, else why not. Only called for nn.Linear instances."""
        if isinstance(module, Linear):
            return "already a manualbp.Linear"
        if type(module) is not nn.Linear:
            wanted = self.include_subclasses is True or (
                isinstance(self.include_subclasses, tuple) and isinstance(module, self.include_subclasses)
            )
            if not wanted:
                return (f"a subclass of nn.Linear ({type(module).__qualname__}) whose forward may differ; "
                        f"pass include_subclasses=True or a tuple of classes to convert it")
        return parameters_problem(module)

    def make(self, module: nn.Linear, activation: Activation, name: str, fused: Optional[str]) -> None:
        original = type(module).__qualname__
        patterns.make_manualbp(module, activation, self.backend)
        self.report.replaced.append(Replacement(name, original, _describe(activation), fused))

    def visit_patterns(self, model: nn.Module) -> None:
        """The module patterns (manualbp.patterns) in every block with fuse=True, and every transformers
        Conv1D; before :meth:`visit`, which then converts the Linears left."""
        matcher = patterns.Matcher(parameters_problem, self.uses)
        identity = get_activation("identity")
        for path, block in list(model.named_modules()):
            if not self.fuse or isinstance(block, patterns.SKIPPED_BLOCKS):
                continue
            found, reasons = matcher.find(block)
            for fusion in found:
                original = {name: type(child).__qualname__ for name, child in block._modules.items()
                            if child is not None}
                original[""] = type(block).__qualname__
                patterns.apply(block, fusion, self.backend)
                act = _qualified(path, fusion.act)
                if fusion.gated is None:
                    linear = block._modules[fusion.linear]
                    self.report.replaced.append(Replacement(
                        _qualified(path, fusion.linear), original[fusion.linear], _describe(fusion.activation), act,
                        fusion.pattern, patterns.result_name(linear)))
                    continue
                self.report.replaced.append(Replacement(path, original[""], _describe(fusion.activation), act,
                                                        fusion.pattern, patterns.result_name(block)))
                for name in (fusion.gated.gate, fusion.gated.up):
                    if name is not None:
                        self.report.replaced.append(Replacement(_qualified(path, name), original[name], "identity"))
            if reasons:
                self.report.skipped.append(Skipped(path, type(block).__qualname__, "; ".join(reasons)))
        for path, module in list(model.named_modules()):
            if patterns.is_conv1d(module):
                reason = parameters_problem(module)
                if reason is not None:
                    self.report.skipped.append(Skipped(path, "Conv1D", reason))
                    continue
                patterns.make_manualbp(module, identity, self.backend)
                self.report.replaced.append(Replacement(path, "Conv1D", "identity",
                                                        result=patterns.result_name(module)))

    def visit(self, root: nn.Module, prefix: str = "") -> None:
        if id(root) in self.visited:
            return  # a shared submodule: converted where it was first seen
        self.visited.add(id(root))
        names = [name for name, child in root._modules.items() if child is not None]
        sequential = isinstance(root, nn.Sequential)
        for position, name in enumerate(names):
            child = root._modules[name]
            path = _qualified(prefix, name)
            if not isinstance(child, nn.Linear) or id(child) in self.visited:
                self.visit(child, path)
                continue
            reason = self.why_not(child)
            if reason is not None:
                if not isinstance(child, Linear):
                    self.report.skipped.append(Skipped(path, type(child).__qualname__, reason))
                self.visit(child, path)  # a skipped subclass may hold Linears of its own
                continue
            self.visited.add(id(child))
            activation, fused = get_activation("identity"), None
            if self.fuse and sequential and position + 1 < len(names):
                follower_name = names[position + 1]
                follower = root._modules[follower_name]
                candidate = activation_from_module(follower)
                if (candidate is not None and not has_hooks(child) and not has_hooks(follower)
                        and self.uses[id(child)] == 1):
                    activation, fused = candidate, _qualified(prefix, follower_name)
                    root._modules[follower_name] = nn.Identity()
            self.make(child, activation, path, fused)


def convert(
    model: nn.Module,
    inplace: bool = True,
    *,
    fuse: bool = True,
    include_subclasses: Union[bool, Sequence[type]] = False,
    backend: Optional[str] = None,
    return_report: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, ConversionReport]]:
    """Replace every ``nn.Linear`` (and transformers ``Conv1D``) of ``model`` by a manualbp layer; returns the model.

    model               any nn.Module (an nn.Linear itself is converted too)
    inplace             True: change ``model`` itself; False: convert a deep copy
    fuse                fuse a Linear with the supported activation module that follows
                        it in an nn.Sequential (the activation becomes nn.Identity), and
                        in the blocks the module patterns recognise (manualbp.patterns)
    include_subclasses  False: convert exact nn.Linear only; True: every subclass too;
                        a tuple of classes: those subclasses too
    backend             pin the converted layers to 'triton' or 'reference' (None: global setting)
    return_report       also return a :class:`ConversionReport` of what was replaced and skipped

    Each converted layer keeps its Parameters (same objects, so the same values,
    device, dtype, requires_grad, optimizer state and weight tying), its hooks and
    its train/eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects an nn.Module, got {type(model).__name__}")
    backends.check_backend(backend, "convert(backend=)")
    for argument, value in (("inplace", inplace), ("fuse", fuse), ("return_report", return_report)):
        config.check_flag(value, f"convert({argument}=)")
    if not isinstance(include_subclasses, bool):
        include_subclasses = tuple(include_subclasses)
        bad = [c for c in include_subclasses if not (isinstance(c, type) and issubclass(c, nn.Linear))]
        if bad:
            raise TypeError(f"include_subclasses must be a bool or classes derived from nn.Linear, got {bad}")
    if not inplace:
        model = copy.deepcopy(model)
    converter = _Converter(model, fuse, include_subclasses, backend)
    if isinstance(model, nn.Linear):
        holder = nn.Module()  # the model is one Linear: treat it as the only child of a holder
        holder._modules[""] = model
        converter.visit(holder)
    else:
        converter.visit_patterns(model)
        converter.visit(model)
        in_model_order(model, converter.report.replaced, converter.report.skipped)
    return (model, converter.report) if return_report else model
