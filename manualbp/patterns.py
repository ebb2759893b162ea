"""Module patterns: where ``manualbp.convert`` fuses a Linear with its activation inside a model's own blocks.

Outside an ``nn.Sequential`` the order in which a block calls its children is in its
``forward``, not in its structure; so each pattern below says how a block is recognised
(its children's names and types), and every candidate is then **checked against the
block's own forward** before it is applied: a deep copy of the block, in float64, runs its
forward on a random input of shape [2, 3, in_features] before and after the pattern is
applied to the copy (reference backend, the same random state for both, so dropout in
training mode draws the same mask), and the two outputs must agree to 1e-9 relative. A
forward that computes something else (another order, an extra term, a scale, another
activation than the mapping says) differs there by far more than float64 rounding, and the
block is left alone and reported with the difference. What the probe cannot see: a forward
whose path depends on the input's values or size beyond the probe's (none of the blocks
below has one). Its cost: one deep copy of the block in float64 and two forwards, per block.

=======================  ===========================================  ==================================
pattern                  recognised by (children; forward checked)    replacement (revert undoes it)
=======================  ===========================================  ==================================
Linear + activation      a child nn.Linear or transformers Conv1D     the Linear (or Conv1D) becomes a
                         and a child activation module (PyTorch's     manualbp layer with that activation
                         or transformers', activations.py); the       (same module object and Parameters);
                         Linear whose forward feeds it is found by    the activation's slot holds
                         the probe. BertIntermediate, Roberta-,       :class:`Fused` (an nn.Identity that
                         ViTMLP, GPT2MLP (Conv1D), T5DenseActDense,   remembers the module), so the
                         timm Mlp, poolers and heads alike.           block's own forward is unchanged.
gated MLP                gate_proj, up_proj, down_proj, act_fn:       the block's class becomes
                         down(act(gate(x)) ⊙ up(x)). Llama, Mistral,  manualbp.GatedMLP (its state_dict
                         Qwen2/3, Gemma (tanh-GELU), ...              is already this one)
T5 gated feed-forward    wi_0, wi_1, wo, dropout, act:                :class:`GatedBlock` with this
                         wo(dropout(act(wi_0 x) ⊙ wi_1 x)), cast to   pattern's tail (dropout, cast, wo)
                         wo's dtype
fused gate_up            gate_up_proj, down_proj, activation_fn:      :class:`GatedBlock`; gate and up are
                         g, u = gate_up(x).chunk(2); down(act(g) ⊙ u)  row halves (views) of the one
                         Phi-3                                        gate_up_proj weight
timm GluMlp              fc1, act, drop1, norm, fc2, drop2 (the gate  :class:`GatedBlock`, the gate half
                         is fc1's second half where gate_last)        as the block's gate_last says
timm SwiGLU              fc1_g, fc1_x, act, drop1, norm, fc2, drop2   :class:`GatedBlock`
transformers Conv1D      any other Conv1D (attention projections)     manualbp.conv1d.Conv1D, identity
=======================  ===========================================  ==================================

Candidates are blocks whose children hold leaf modules at most (an MLP, or a transformer
layer with its MLP's Linears as direct children, as OPT's and BART's; never a model: the
probe copies the whole block). A block matching no pattern is left alone;
where it holds a Linear and an activation module, the report lists it with the reason (its activation is not in the catalogue, the
probe found a difference, a hook would be bypassed, ...). Fusion is refused, as in an
nn.Sequential, where a module involved has hooks of its own or the Linear is used elsewhere.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import gated_reference
from .activations import Activation, from_model_module, get_activation
from .gated import GatedMLP, gated_linear
from .modules import Linear, has_hooks

PROBE_SHAPE = (2, 3)  # the probe input's leading dimensions: [2, 3, in_features]
PROBE_RTOL = 1e-9  # float64: far above rounding (and FastGELU's 3.6e-12), far below any other forward
CAST = "<cast to the next layer's dtype>"  # a step of a gated tail (T5's forward casts before wo)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NOT_ACTIVATIONS = {"MultiheadAttention", "Softmax", "Softmin", "LogSoftmax", "Softmax2d"}


class Fused(nn.Identity):
    """What an activation module's slot holds once convert fused it into a Linear: the identity.

    ``original``: the module it replaced (kept for revert, not registered: no state_dict entry);
    ``into``: where it went (the Linear's name in the block, or the gated block's gate and up).
    """

    def __init__(self, original: nn.Module, into: str) -> None:
        super().__init__()
        self.__dict__["original"] = original  # not a submodule: .to(), state_dict and hooks never see it
        self.into = into

    def extra_repr(self) -> str:
        return f"into={self.into!r}, was {type(self.original).__name__}"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D itself (not a subclass: a subclass may compute something else)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__ == "transformers.pytorch_utils"


def _conv1d_class():
    from .conv1d import Conv1D  # imports transformers: only where a model holds a Conv1D

    return Conv1D


def make_manualbp(module: nn.Module, activation: Activation, backend: Optional[str]) -> None:
    """nn.Linear (or a subclass) -> manualbp.Linear, Conv1D -> manualbp.conv1d.Conv1D: the same object, class changed."""
    if is_conv1d(module):
        module._manualbp_original_class = type(module)
        module.__class__ = _conv1d_class()
    else:
        if type(module) is not nn.Linear:
            module._manualbp_original_class = type(module)  # for manualbp.revert
        module.__class__ = Linear  # same object: Parameters, hooks, attributes and references stay valid
    module.activation = activation
    module.backend = backend


def result_name(module: nn.Module) -> str:
    """What a converted module is now, as the report names it."""
    names = {Linear: "manualbp.Linear", GatedMLP: "manualbp.GatedMLP", GatedBlock: "manualbp.patterns.GatedBlock"}
    return names.get(type(module), f"{type(module).__module__}.{type(module).__qualname__}")


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.in_features


# --------------------------------------------------------------------------------------
# The gated blocks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatedPattern:
    """A gated MLP block: ``tail(f(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u))``.

    ``gate``/``up``: the children holding W_g and W_u; ``up`` None where ``gate`` holds both as
    row halves ([W_g; W_u], or [W_u; W_g] where the block's attribute ``gate_last`` is true).
    ``tail``: the children the forward applies to the gating's output, in order (CAST: to the
    next child's weight dtype, as T5's forward does). ``target``: the class the block becomes.
    """

    name: str
    models: str
    gate: str
    up: Optional[str]
    act: str
    tail: Tuple[str, ...]
    target: str = "GatedBlock"
    gate_last: Optional[str] = None

    @property
    def children(self) -> frozenset:
        return frozenset(n for n in (self.gate, self.up, self.act, *self.tail) if n not in (None, CAST))


GATED_PATTERNS: Tuple[GatedPattern, ...] = (
    GatedPattern("gated MLP", "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2/3, ...", "gate_proj", "up_proj", "act_fn",
                 ("down_proj",), target="GatedMLP"),
    GatedPattern("T5 gated feed-forward", "T5DenseGatedActDense (T5 v1.1, Flan-T5, mT5, ...)", "wi_0", "wi_1", "act",
                 ("dropout", CAST, "wo")),
    GatedPattern("fused gate_up", "Phi-3 (Phi3MLP)", "gate_up_proj", None, "activation_fn", ("down_proj",)),
    GatedPattern("timm GluMlp", "timm.layers.GluMlp", "fc1", None, "act", ("drop1", "norm", "fc2", "drop2"),
                 gate_last="gate_last"),
    GatedPattern("timm SwiGLU", "timm.layers.SwiGLU", "fc1_g", "fc1_x", "act", ("drop1", "norm", "fc2", "drop2")),
)
PATTERNS = {p.name: p for p in GATED_PATTERNS}


def _plain(module: nn.Module) -> bool:
    """A manualbp.Linear with the identity and no hooks: its weight may be used directly."""
    return type(module) is Linear and module.activation.name == "identity" and not has_hooks(module)


class GatedBlock(nn.Module):
    """A model's own gated MLP block after convert: ``tail(f(x W_gᵀ + b_g) ⊙ (x W_uᵀ + b_u))``, the gating
    by ``manualbp.functional.gated_linear``. Its children and state_dict keys are the block's own.

    input [..., in_features] -> the block's output. Where a projection is not a plain manualbp.Linear any
    more (a LoRA adapter around it) or has hooks, the projections are called as modules and the gating
    f(Z_g) ⊙ Z_u is differentiated by autograd, as ``manualbp.GatedMLP`` does.
    """

    manualbp_pattern: str
    gate_last: bool
    activation: Activation
    recompute: bool
    backend: Optional[str]

    def _gating(self, input: Tensor) -> Tensor:
        pattern = PATTERNS[self.manualbp_pattern]
        gate = self._modules[pattern.gate]
        if pattern.up is not None:
            up = self._modules[pattern.up]
            if _plain(gate) and _plain(up):
                return gated_linear(input, gate.weight, up.weight, gate.bias, up.bias, self.activation,
                                    recompute=self.recompute, backend=self.backend)
            return gated_reference.gate(gate(input), up(input), self.activation)
        if _plain(gate):  # [W_g; W_u] (or [W_u; W_g]): row halves, views of the one Parameter
            weights = gate.weight.chunk(2, dim=0)
            biases = gate.bias.chunk(2, dim=0) if gate.bias is not None else (None, None)
            g, u = (1, 0) if self.gate_last else (0, 1)
            return gated_linear(input, weights[g], weights[u], biases[g], biases[u], self.activation,
                                recompute=self.recompute, backend=self.backend)
        halves = gate(input).chunk(2, dim=-1)
        return gated_reference.gate(halves[1], halves[0], self.activation) if self.gate_last else \
            gated_reference.gate(halves[0], halves[1], self.activation)

    def forward(self, input: Tensor) -> Tensor:
        a = self._gating(input)
        tail = PATTERNS[self.manualbp_pattern].tail
        for index, step in enumerate(tail):
            if step == CAST:
                weight = getattr(self._modules[tail[index + 1]], "weight", None)
                if isinstance(weight, Tensor) and weight.dtype not in (a.dtype, torch.int8):
                    a = a.to(weight.dtype)
            else:
                a = self._modules[step](a)
        return a

    def extra_repr(self) -> str:
        text = f"pattern={self.manualbp_pattern!r}, {self.activation.extra_repr()}, recompute={self.recompute}"
        return text if self.backend is None else f"{text}, backend={self.backend!r}"


_ADDED = "_manualbp_added"  # the attributes a gated conversion added to the block (revert removes them)


def _set(block: nn.Module, **attributes) -> None:
    added = block.__dict__.setdefault(_ADDED, [])
    for name, value in attributes.items():
        if name not in block.__dict__:
            added.append(name)
        block.__dict__[name] = value


def apply_gated(block: nn.Module, pattern: GatedPattern, activation: Activation, backend: Optional[str]) -> None:
    """Make ``block`` (recognised as ``pattern``) a GatedMLP or GatedBlock, in place."""
    for name in (pattern.gate, pattern.up):
        if name is not None and type(block._modules[name]) is nn.Linear:
            make_manualbp(block._modules[name], get_activation("identity"), backend)
    block.__dict__["_manualbp_original_class"] = type(block)
    act = block._modules[pattern.act]
    gate_last = bool(getattr(block, pattern.gate_last, False)) if pattern.gate_last else False
    if pattern.target == "GatedMLP":
        gate = block._modules[pattern.gate]
        block.__class__ = GatedMLP
        _set(block, hidden_size=gate.in_features, intermediate_size=gate.out_features)
    else:
        block.__class__ = GatedBlock
        _set(block, manualbp_pattern=pattern.name, gate_last=gate_last)
    _set(block, activation=activation, recompute=False, backend=backend)
    into = f"{pattern.gate} ⊙ {pattern.up}" if pattern.up else f"{pattern.gate} (gate {'second' if gate_last else 'first'} half)"
    block._modules[pattern.act] = Fused(act, into)


def revert_gated(block: nn.Module) -> None:
    """Undo :func:`apply_gated`: the block's own class and attributes, its activation module back in its slot."""
    for name in block.__dict__.pop(_ADDED, []):
        block.__dict__.pop(name, None)
    block.__class__ = block.__dict__.pop("_manualbp_original_class")


# --------------------------------------------------------------------------------------
# The check against the block's own forward
# --------------------------------------------------------------------------------------


def probe(block: nn.Module, apply: Callable[[nn.Module], None], features: int) -> Optional[str]:
    """None if ``apply`` (a pattern, applied to a float64 deep copy of ``block``) leaves the block's forward
    computing the same on a random input [2, 3, features], else why not (see the module's docstring)."""
    tensors = list(block.parameters()) + list(block.buffers())
    if any(t.is_meta for t in tensors):
        return "its parameters are on the meta device: no values to check the pattern against its forward with"
    device = tensors[0].device if tensors else torch.device("cpu")
    try:
        twin = copy.deepcopy(block).double()
    except Exception as error:  # noqa: BLE001 - the reason is reported
        return f"it cannot be deep-copied to check the pattern against its forward ({type(error).__name__}: {error})"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*PROBE_SHAPE, features, generator=generator, dtype=torch.float64).to(device)
    outputs = []
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for step in ("before", "after"):
            if step == "after":
                apply(twin)
            torch.manual_seed(0)
            try:
                out = twin(x)
            except Exception as error:  # noqa: BLE001 - a forward that takes other inputs: not this pattern
                return f"its forward cannot run on one input [..., {features}] {step} the pattern " \
                       f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            if not isinstance(out, Tensor):
                return f"its forward returns a {type(out).__name__}, not a tensor"
            outputs.append(out)
    before, after = outputs
    if before.shape != after.shape:
        return f"the pattern changes its output's shape from {tuple(before.shape)} to {tuple(after.shape)}"
    scale = before.abs().max().item() if before.numel() else 0.0
    difference = (after - before).abs().max().item() if before.numel() else 0.0
    if not difference <= PROBE_RTOL * (1.0 + scale):  # NaN fails too
        return f"its forward computes something else than the pattern: max |difference| {difference:.3e} " \
               f"(outputs up to {scale:.3e}) on a float64 probe"
    return None


# --------------------------------------------------------------------------------------
# Recognition: one block at a time
# --------------------------------------------------------------------------------------


_ACTIVATION_NAME = re.compile(r"gelu|relu|silu|swish|sigmoid|tanh|mish|activation", re.IGNORECASE)


def activation_like(module: nn.Module) -> bool:
    """A module that looks like an elementwise activation (PyTorch's, transformers', or a class named like one,
    such as BLOOM's BloomGelu), in the catalogue or not: what the report lists where it is not fused."""
    kind = type(module)
    if from_model_module(module) is not None:
        return True
    if kind.__module__ in ("torch.nn.modules.activation", "transformers.activations"):
        return kind.__name__ not in _NOT_ACTIVATIONS
    return next(module.children(), None) is None and bool(_ACTIVATION_NAME.search(kind.__name__)) \
        and not isinstance(module, (nn.Linear, Fused))


@dataclass
class Found:
    """One fusion found in a block: the pattern's name, the children involved, what to do."""

    pattern: str
    activation: Activation
    act: str  # the activation's slot
    linear: Optional[str] = None  # Linear + activation: the Linear
    gated: Optional[GatedPattern] = None


class Matcher:
    """Finds and checks the fusions of one block. ``linear_problem(module)`` (from convert) says why a
    Linear may not be converted (None if it may); ``uses``: how often each module appears in the model."""

    def __init__(self, linear_problem: Callable[[nn.Module], Optional[str]], uses: Dict[int, int]) -> None:
        self.linear_problem = linear_problem
        self.uses = uses

    def _linear_problem(self, module: nn.Module) -> Optional[str]:
        if type(module) is not nn.Linear and not is_conv1d(module):
            return f"{type(module).__qualname__} is not an nn.Linear or transformers Conv1D"
        if has_hooks(module):
            return "it has hooks, which would see the activation's output"
        if self.uses[id(module)] != 1:
            return "it is used in more than one place"
        return self.linear_problem(module)

    def find(self, block: nn.Module) -> Tuple[List[Found], List[str]]:
        """(the fusions applied to ``block``, why others were not), each checked by :func:`probe`."""
        children = {name: child for name, child in block._modules.items() if child is not None}
        if any(next(grandchild.children(), None) is not None
               for child in children.values() for grandchild in child.children()):
            # The probe copies the whole block: an MLP or a transformer layer (children of leaf modules), no deeper.
            if self._pairs(children):
                return [], ["not checked: it holds blocks of blocks (the probe would copy them all); "
                            "only blocks whose children hold leaf modules at most are matched"]
            return [], []
        gated = []  # why a gated pattern with these children's names did not apply (timm's Mlp has GluMlp's)
        for pattern in GATED_PATTERNS:
            if set(children) == pattern.children:
                found, reason = self._gated(block, pattern)
                if found is not None:
                    return [found], []
                gated.append(f"{pattern.name} pattern: {reason}")
        found, reasons = self._dense(block, children)
        return found, ([] if found else gated) + reasons

    def _gated(self, block: nn.Module, pattern: GatedPattern) -> Tuple[Optional[Found], Optional[str]]:
        act = block._modules[pattern.act]
        activation = from_model_module(act)
        if activation is None or activation.name == "identity":
            return None, f"its activation {type(act).__qualname__} is not in manualbp's catalogue"
        if has_hooks(act):
            return None, f"its activation {pattern.act} has hooks"
        weights = []
        for name in (pattern.gate, pattern.up):
            if name is None:
                continue
            problem = self._linear_problem(block._modules[name])
            if problem is None and type(block._modules[name]) is not nn.Linear:
                problem = "a gate or up projection must be an nn.Linear"
            if problem is not None:
                return None, f"{name}: {problem}"
            weights.append(block._modules[name].weight)
        if len(weights) == 2 and (weights[0].shape != weights[1].shape
                                  or (block._modules[pattern.gate].bias is None) != (block._modules[pattern.up].bias is None)):
            return None, f"{pattern.gate} and {pattern.up} differ in shape or bias"
        if len(weights) == 1 and weights[0].shape[0] % 2:
            return None, f"{pattern.gate} has an odd number of outputs, not two halves"
        reason = probe(block, lambda twin: apply_gated(twin, pattern, activation, "reference"),
                       block._modules[pattern.gate].in_features)
        if reason is not None:
            return None, reason
        return Found(pattern.name, activation, pattern.act, gated=pattern), None

    @staticmethod
    def _pairs(children: dict) -> bool:
        """Whether ``children`` hold an activation-like module and a Linear or Conv1D."""
        return (any(activation_like(child) for child in children.values())
                and any(type(child) is nn.Linear or is_conv1d(child) for child in children.values()))

    def _dense(self, block: nn.Module, children: dict) -> Tuple[List[Found], List[str]]:
        found, reasons, taken = [], [], set()
        linears = [name for name, child in children.items() if type(child) is nn.Linear or is_conv1d(child)]
        for act_name, act in children.items():
            if not activation_like(act):
                continue
            activation = from_model_module(act)
            if activation is None or activation.name == "identity":
                reasons.append(f"{act_name} ({type(act).__qualname__}) is not an activation in manualbp's catalogue")
                continue
            if not linears:
                reasons.append(f"{act_name}: no nn.Linear or transformers Conv1D child to fuse it into")
                continue
            if has_hooks(act):  # a shared activation module is fine: only this slot changes
                reasons.append(f"{act_name}: it has hooks, which the fused layer would not run")
                continue
            tried = []
            for linear_name in linears:
                if linear_name in taken:
                    continue
                problem = self._linear_problem(children[linear_name])
                if problem is None:
                    problem = probe(block, lambda twin: apply_dense(twin, linear_name, act_name, activation,
                                                                    "reference"),
                                    in_features(children[linear_name]))
                if problem is None:
                    found.append(Found("Linear + activation", activation, act_name, linear=linear_name))
                    taken.add(linear_name)
                    break
                tried.append(f"{linear_name} -> {act_name}: {problem}")
            else:
                reasons.append("; ".join(tried) if tried else f"{act_name}: no Linear left to fuse it into")
        return found, reasons


def apply_dense(block: nn.Module, linear: str, act: str, activation: Activation, backend: Optional[str]) -> None:
    """Fuse ``block.<act>`` into ``block.<linear>``: the Linear a manualbp layer, the slot :class:`Fused`."""
    make_manualbp(block._modules[linear], activation, backend)
    block._modules[act] = Fused(block._modules[act], linear)


def apply(block: nn.Module, found: Found, backend: Optional[str]) -> None:
    """Apply one checked fusion to ``block`` itself."""
    if found.gated is not None:
        apply_gated(block, found.gated, found.activation, backend)
    else:
        apply_dense(block, found.linear, found.act, found.activation, backend)


def is_manualbp_conv1d(module: Optional[nn.Module]) -> bool:
    """A Conv1D convert made (manualbp.conv1d.Conv1D), asked without importing transformers."""
    return type(module).__module__ == f"{__package__}.conv1d"


def is_manualbp_layer(module: Optional[nn.Module]) -> bool:
    """A layer a Linear + activation fusion makes: manualbp.Linear or manualbp.conv1d.Conv1D."""
    return type(module) is Linear or is_manualbp_conv1d(module)


GATED_BLOCKS = (GatedMLP, GatedBlock)
SKIPPED_BLOCKS = _CONTAINERS + (Linear, GatedMLP, GatedBlock, Fused)  # never matched as blocks (Sequential: convert's own rule)


def fused_slots(block: nn.Module) -> List[Tuple[str, Fused]]:
    """The :class:`Fused` slots of ``block``, in order."""
    return [(name, child) for name, child in block._modules.items() if type(child) is Fused]
