"""The gated layer's operators (``torch.ops.manualbp.gated_*``), beside the dense layer's in ``ops.py``.

    gated_forward(x, gate_weight, up_weight, gate_bias?, up_bias?, activation, negative_slope, save, backend)
        -> (A = f(Z_g) ⊙ Z_u [M, I], Z_g [M, I], Z_u [M, I]); Z_g, Z_u are [0] unless save
    gated_backward(grad_a, x?, gate_weight, up_weight, gate_bias?, up_bias?, z_gate?, z_up?, activation,
                   negative_slope, needs, backend)
        -> (∂C/∂X [M, K], ∂C/∂W_g [I, K], ∂C/∂W_u [I, K], ∂C/∂b_g [I], ∂C/∂b_u [I]), [0] where needs says no;
           z_gate, z_up None: recomputed from x, the weights and biases (``recompute=True``)
    gated_jvp(x, gate_weight, up_weight, gate_bias?, up_bias?, z_gate?, z_up?, tangent_x?, tangent_gate_weight?,
              tangent_up_weight?, tangent_gate_bias?, tangent_up_bias?, activation, negative_slope, backend)
        -> dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u [M, I]

and the gating alone, for projections that ran as modules (GatedMLP with hooks, adapters or quantized weights):

    gate_forward(z_gate, z_up, activation, negative_slope, backend) -> A = f(Z_g) ⊙ Z_u [M, I]
    gate_backward(grad_a, z_gate, z_up, activation, negative_slope, backend) -> (δ_g, δ_u) [M, I]
    gate_jvp(z_gate, z_up, tangent_gate?, tangent_up?, activation, negative_slope, backend) -> dA [M, I]

x [M, K], weights [I, K], biases [I]; needs = [x, gate_weight, up_weight, gate_bias, up_bias].
The equations are in ``gated_reference.py``; the Triton kernels in ``triton_kernels/gated.py``.
Each operator has what the dense layer's have (``ops.py``): a fake implementation, a vmap
rule, a FLOP formula, DTensor sharding rules and a decomposition for torch.export. The
sharding rules are data parallel (rows sharded) and column-wise (I sharded: gate_proj and
up_proj of the Llama tensor-parallel plan; down_proj is a dense layer, row-wise). Row-wise
sharding of the gated layer itself has none: f of a partial sum is not the sum of f's.
"""

from __future__ import annotations

import importlib
import sys
from typing import List, Optional

import torch
from torch import Tensor

from . import backends, config, gated_reference, ops
from .activations import Activation

NEEDS = ("x", "gate_weight", "up_weight", "gate_bias", "up_bias")


def _check_shapes(op: str, x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor],
                  up_bias: Optional[Tensor]) -> None:
    # functional.gated_linear validates before this point; these are for direct calls of torch.ops.manualbp.*.
    if (x.dim() != 2 or gate_weight.dim() != 2 or gate_weight.shape != up_weight.shape
            or (x.shape[1] != gate_weight.shape[1])):
        raise ValueError(f"manualbp::{op}: expected x [M, K] and gate_weight, up_weight [I, K], got "
                         f"{tuple(x.shape)}, {tuple(gate_weight.shape)} and {tuple(up_weight.shape)}")
    for name, bias in (("gate_bias", gate_bias), ("up_bias", up_bias)):
        if bias is not None and tuple(bias.shape) != (gate_weight.shape[0],):
            raise ValueError(f"manualbp::{op}: {name} must have shape ({gate_weight.shape[0]},), "
                             f"got {tuple(bias.shape)}")


def _triton():
    """The Triton launchers of the gated layer: one dict lookup once imported (an import statement here cost every
    call ~7k instructions, as backends.kernels() says of the dense layer's)."""
    gated = _modules.get(_GATED)
    if gated is None:
        backends.kernels()  # Triton's import error, if any, raised as the dense layer raises it
        gated = importlib.import_module(_GATED)
    return gated


_modules, _GATED = sys.modules, f"{__package__}.triton_kernels.gated"


# --------------------------------------------------------------------------------------
# The computations (the Triton launchers or the reference, by the resolved backend)
# --------------------------------------------------------------------------------------


def _compute_gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act: Activation, save: bool,
                           backend: str):
    """(a, z_gate, z_up) [M, I]; the Z's None unless save."""
    if backend == "triton":
        return _triton().gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act.kernel_id,
                                       act.kernel_slope, save=save)
    a, z_gate, z_up = gated_reference.gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act)
    if not save:
        return a, None, None
    return a, (z_gate.clone() if z_gate is z_up else z_gate), z_up


def _compute_gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, act: Activation,
                            needs: List[bool], backend: str):
    """The five gradients (None where needs says no); Z_g, Z_u recomputed from x where not given."""
    if backend == "triton":
        # δ in the matmuls' loads up to dense.PROLOGUE_MAX_K, stored once above (gated.gated_backward); the setting
        # off: stored at every size
        return _triton().gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up,
                                        act.kernel_id, act.kernel_slope, needs,
                                        delta_in_loads=None if config.get().delta_prologue else False)
    if z_gate is None:  # recompute=True: rebuild both from what was kept
        z_gate, z_up = gated_reference.pre_activations(x, gate_weight, up_weight, gate_bias, up_bias)
    delta_gate, delta_up = gated_reference.deltas(grad_a, z_gate, z_up, act)
    return gated_reference.gated_backward(delta_gate, delta_up, x, gate_weight, up_weight, needs)


def _compute_gated_jvp(x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, tangent_x, tangent_gate_weight,
                       tangent_up_weight, tangent_gate_bias, tangent_up_bias, act: Activation, backend: str):
    if backend == "triton":
        return _triton().gated_jvp(x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, tangent_x,
                                   tangent_gate_weight, tangent_up_weight, tangent_gate_bias, tangent_up_bias,
                                   act.kernel_id, act.kernel_slope)
    if z_gate is None:
        z_gate, z_up = gated_reference.pre_activations(x, gate_weight, up_weight, gate_bias, up_bias)
    tangent_z_gate = gated_reference.tangent_pre_activation(x, gate_weight, tangent_x, tangent_gate_weight,
                                                            tangent_gate_bias)
    tangent_z_up = gated_reference.tangent_pre_activation(x, up_weight, tangent_x, tangent_up_weight,
                                                          tangent_up_bias)
    return gated_reference.gated_jvp(z_gate, z_up, act, tangent_z_gate, tangent_z_up)


# --------------------------------------------------------------------------------------
# The operators: argument checks, then the computation; [0] for an output not asked for
# --------------------------------------------------------------------------------------


def _gated_forward(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor],
                   up_bias: Optional[Tensor], activation_name: str, negative_slope: float, save: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(A = f(X W_gᵀ + b_g) ⊙ (X W_uᵀ + b_u) [M, I], Z_g, Z_u [M, I] or [0] unless save)."""
    _check_shapes("gated_forward", x, gate_weight, up_weight, gate_bias, up_bias)
    ops._check_backend("gated_forward", backend)
    a, z_gate, z_up = _compute_gated_forward(x, gate_weight, up_weight, gate_bias, up_bias,
                                             ops.activation(activation_name, negative_slope), save, backend)
    if z_gate is None:
        return a, ops._placeholder(x), ops._placeholder(x)
    return a, z_gate, z_up


def _gated_forward_fake(x, gate_weight, up_weight, gate_bias, up_bias, activation_name, negative_slope, save,
                        backend):
    _check_shapes("gated_forward", x, gate_weight, up_weight, gate_bias, up_bias)
    shape = (x.shape[0], gate_weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save else (0,)), x.new_empty(shape if save else (0,))


def _check_needs(op: str, needs: List[bool], x, gate_weight, z_gate, z_up) -> None:
    if len(needs) != len(NEEDS):
        raise ValueError(f"manualbp::{op}: needs must give one bool for each of {list(NEEDS)}, got {needs}")
    if (z_gate is None) != (z_up is None):
        raise ValueError(f"manualbp::{op}: pass both z_gate and z_up, or neither (recomputed from x)")
    if x is None and (z_gate is None or needs[1] or needs[2]):
        raise ValueError(f"manualbp::{op}: ∂C/∂W_g, ∂C/∂W_u and recomputing Z need x; got None")


def _gated_backward(grad_a: Tensor, x: Optional[Tensor], gate_weight: Tensor, up_weight: Tensor,
                    gate_bias: Optional[Tensor], up_bias: Optional[Tensor], z_gate: Optional[Tensor],
                    z_up: Optional[Tensor], activation_name: str, negative_slope: float, needs: List[bool],
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂C/∂X, ∂C/∂W_g, ∂C/∂W_u, ∂C/∂b_g, ∂C/∂b_u); needs = [x, gate_weight, up_weight, gate_bias, up_bias]."""
    _check_needs("gated_backward", needs, x, gate_weight, z_gate, z_up)
    ops._check_backend("gated_backward", backend)
    grads = _compute_gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up,
                                    ops.activation(activation_name, negative_slope), needs, backend)
    return tuple(ops._placeholder(grad_a) if grad is None else grad for grad in grads)


def _gated_backward_fake(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, activation_name,
                         negative_slope, needs, backend):
    _check_needs("gated_backward", needs, x, gate_weight, z_gate, z_up)
    rows, width = grad_a.shape[0], gate_weight.shape[1]
    shapes = ((rows, width), tuple(gate_weight.shape), tuple(up_weight.shape), (gate_weight.shape[0],),
              (gate_weight.shape[0],))
    return tuple(grad_a.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


def _check_tangents(op: str, x, gate_weight, up_weight, tangents) -> None:
    if all(t is None for t in tangents):
        raise ValueError(f"manualbp::{op}: at least one tangent is needed")
    for name, tangent, primal in zip(("tangent_x", "tangent_gate_weight", "tangent_up_weight"), tangents,
                                     (x, gate_weight, up_weight)):
        if tangent is not None and tangent.shape != primal.shape:
            raise ValueError(f"manualbp::{op}: {name} must have the shape of its primal {tuple(primal.shape)}, "
                             f"got {tuple(tangent.shape)}")


def _gated_jvp(x: Tensor, gate_weight: Tensor, up_weight: Tensor, gate_bias: Optional[Tensor],
               up_bias: Optional[Tensor], z_gate: Optional[Tensor], z_up: Optional[Tensor],
               tangent_x: Optional[Tensor], tangent_gate_weight: Optional[Tensor],
               tangent_up_weight: Optional[Tensor], tangent_gate_bias: Optional[Tensor],
               tangent_up_bias: Optional[Tensor], activation_name: str, negative_slope: float,
               backend: str) -> Tensor:
    """dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u [M, I]; a None tangent is zero; Z's None: recomputed."""
    tangents = (tangent_x, tangent_gate_weight, tangent_up_weight, tangent_gate_bias, tangent_up_bias)
    _check_shapes("gated_jvp", x, gate_weight, up_weight, tangent_gate_bias, tangent_up_bias)
    _check_tangents("gated_jvp", x, gate_weight, up_weight, tangents)
    ops._check_backend("gated_jvp", backend)
    return _compute_gated_jvp(x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, *tangents,
                              ops.activation(activation_name, negative_slope), backend)


def _gated_jvp_fake(x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, tangent_x, tangent_gate_weight,
                    tangent_up_weight, tangent_gate_bias, tangent_up_bias, activation_name, negative_slope, backend):
    tangents = (tangent_x, tangent_gate_weight, tangent_up_weight, tangent_gate_bias, tangent_up_bias)
    _check_tangents("gated_jvp", x, gate_weight, up_weight, tangents)
    return next(t for t in tangents if t is not None).new_empty((x.shape[0], gate_weight.shape[0]))


def _check_gate(op: str, z_gate: Tensor, z_up: Tensor) -> None:
    if z_gate.dim() != 2 or z_gate.shape != z_up.shape:
        raise ValueError(f"manualbp::{op}: expected z_gate and z_up of one shape [M, I], got {tuple(z_gate.shape)} "
                         f"and {tuple(z_up.shape)}")


def _compute_gate_forward(z_gate, z_up, act: Activation, backend: str) -> Tensor:
    if backend == "triton":
        return _triton().gate_forward(z_gate, z_up, act.kernel_id, act.kernel_slope)
    return gated_reference.gate(z_gate, z_up, act)


def _compute_gate_backward(grad_a, z_gate, z_up, act: Activation, backend: str):
    if backend == "triton":
        return _triton().gate_backward(grad_a, z_gate, z_up, act.kernel_id, act.kernel_slope)
    delta_gate, delta_up = gated_reference.deltas(grad_a, z_gate, z_up, act)
    return delta_gate, (delta_up.clone() if delta_up is grad_a else delta_up)


def _compute_gate_jvp(z_gate, z_up, tangent_gate, tangent_up, act: Activation, backend: str) -> Tensor:
    if backend == "triton":
        return _triton().gate_jvp(z_gate, z_up, tangent_gate, tangent_up, act.kernel_id, act.kernel_slope)
    return gated_reference.gated_jvp(z_gate, z_up, act, tangent_gate, tangent_up)


def _gate_forward(z_gate: Tensor, z_up: Tensor, activation_name: str, negative_slope: float,
                  backend: str) -> Tensor:
    """A = f(Z_g) ⊙ Z_u [M, I]."""
    _check_gate("gate_forward", z_gate, z_up)
    ops._check_backend("gate_forward", backend)
    return _compute_gate_forward(z_gate, z_up, ops.activation(activation_name, negative_slope), backend)


def _gate_forward_fake(z_gate, z_up, activation_name, negative_slope, backend):
    _check_gate("gate_forward", z_gate, z_up)
    return z_gate.new_empty(z_gate.shape)


def _gate_backward(grad_a: Tensor, z_gate: Tensor, z_up: Tensor, activation_name: str, negative_slope: float,
                   backend: str) -> tuple[Tensor, Tensor]:
    """(δ_g, δ_u) = (G ⊙ Z_u ⊙ f'(Z_g), G ⊙ f(Z_g)) [M, I]."""
    _check_gate("gate_backward", z_gate, z_up)
    ops._check_backend("gate_backward", backend)
    return _compute_gate_backward(grad_a, z_gate, z_up, ops.activation(activation_name, negative_slope), backend)


def _gate_backward_fake(grad_a, z_gate, z_up, activation_name, negative_slope, backend):
    _check_gate("gate_backward", z_gate, z_up)
    return grad_a.new_empty(z_gate.shape), grad_a.new_empty(z_gate.shape)


def _gate_jvp(z_gate: Tensor, z_up: Tensor, tangent_gate: Optional[Tensor], tangent_up: Optional[Tensor],
              activation_name: str, negative_slope: float, backend: str) -> Tensor:
    """dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u [M, I]; a None tangent is zero (not both)."""
    _check_gate("gate_jvp", z_gate, z_up)
    if tangent_gate is None and tangent_up is None:
        raise ValueError("manualbp::gate_jvp: at least one tangent is needed")
    ops._check_backend("gate_jvp", backend)
    return _compute_gate_jvp(z_gate, z_up, tangent_gate, tangent_up, ops.activation(activation_name, negative_slope),
                             backend)


def _gate_jvp_fake(z_gate, z_up, tangent_gate, tangent_up, activation_name, negative_slope, backend):
    return (tangent_gate if tangent_gate is not None else tangent_up).new_empty(z_gate.shape)


gated_forward = ops._register("gated_forward", _gated_forward, _gated_forward_fake)
gated_backward = ops._register("gated_backward", _gated_backward, _gated_backward_fake)
gated_jvp = ops._register("gated_jvp", _gated_jvp, _gated_jvp_fake)
gate_forward = ops._register("gate_forward", _gate_forward, _gate_forward_fake)
gate_backward = ops._register("gate_backward", _gate_backward, _gate_backward_fake)
gate_jvp = ops._register("gate_jvp", _gate_jvp, _gate_jvp_fake)
OPERATORS = (gated_forward, gated_backward, gated_jvp, gate_forward, gate_backward, gate_jvp)


class direct:  # noqa: N801 - a namespace, as ops.direct
    """The computations as plain calls, for plain eager code (``ops.dispatch_free``): Activation objects,
    None for an output not asked for."""

    gated_forward = staticmethod(_compute_gated_forward)
    gated_backward = staticmethod(_compute_gated_backward)
    gated_jvp = staticmethod(_compute_gated_jvp)
    gate_forward = staticmethod(_compute_gate_forward)
    gate_backward = staticmethod(_compute_gate_backward)
    gate_jvp = staticmethod(_compute_gate_jvp)


class dispatched:  # noqa: N801 - a namespace, as ops.dispatched
    """The operators through torch's dispatcher, called as :class:`direct` is."""

    @staticmethod
    def gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act, save, backend):
        a, z_gate, z_up = gated_forward(x, gate_weight, up_weight, gate_bias, up_bias, act.name, act.kernel_slope,
                                        save, backend)
        return (a, z_gate, z_up) if save else (a, None, None)

    @staticmethod
    def gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, act, needs, backend):
        return ops._wanted(gated_backward(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up,
                                          act.name, act.kernel_slope, needs, backend), needs)

    @staticmethod
    def gated_jvp(x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, tangent_x, tangent_gate_weight,
                  tangent_up_weight, tangent_gate_bias, tangent_up_bias, act, backend):
        return gated_jvp(x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, tangent_x,
                         tangent_gate_weight, tangent_up_weight, tangent_gate_bias, tangent_up_bias, act.name,
                         act.kernel_slope, backend)

    @staticmethod
    def gate_forward(z_gate, z_up, act, backend):
        return gate_forward(z_gate, z_up, act.name, act.kernel_slope, backend)

    @staticmethod
    def gate_backward(grad_a, z_gate, z_up, act, backend):
        return gate_backward(grad_a, z_gate, z_up, act.name, act.kernel_slope, backend)

    @staticmethod
    def gate_jvp(z_gate, z_up, tangent_gate, tangent_up, act, backend):
        return gate_jvp(z_gate, z_up, tangent_gate, tangent_up, act.name, act.kernel_slope, backend)


def route(is_direct: bool):
    """:class:`direct` or :class:`dispatched` (``ops.dispatch_free`` decides)."""
    return direct if is_direct else dispatched


# --------------------------------------------------------------------------------------
# vmap rules: the batch folded into M where only x is batched, else one call per entry
# --------------------------------------------------------------------------------------


def _gated_forward_vmap(info, in_dims, x, gate_weight, up_weight, gate_bias, up_bias, activation_name,
                        negative_slope, save, backend):
    if any(dim is not None for dim in in_dims[1:5]):  # a batch of weights (model ensembling)
        return ops._by_loop(gated_forward)(info, in_dims, x, gate_weight, up_weight, gate_bias, up_bias,
                                           activation_name, negative_slope, save, backend)
    x = x.movedim(in_dims[0], 0)
    size, rows = x.shape[0], x.shape[1]
    outputs = gated_forward(x.reshape(size * rows, x.shape[2]), gate_weight, up_weight, gate_bias, up_bias,
                            activation_name, negative_slope, save, backend)
    if save:
        return tuple(t.view(size, rows, t.shape[1]) for t in outputs), (0, 0, 0)
    return (outputs[0].view(size, rows, outputs[0].shape[1]), *outputs[1:]), (0, None, None)


torch.library.register_vmap(gated_forward, _gated_forward_vmap)
for _op in (gated_backward, gated_jvp, gate_forward, gate_backward, gate_jvp):
    torch.library.register_vmap(_op, ops._by_loop(_op))

# --------------------------------------------------------------------------------------
# FLOP formulas: 2MIK per matrix product, as FlopCounterMode counts the two nn.Linear's
# --------------------------------------------------------------------------------------


def _register_flops():
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.manualbp.gated_forward)
    def _(x_shape, gate_weight_shape, *args, **kwargs) -> int:
        return 2 * 2 * x_shape[0] * gate_weight_shape[0] * x_shape[1]  # X W_gᵀ and X W_uᵀ

    @register_flop_formula(torch.ops.manualbp.gated_backward)
    def _(grad_a_shape, x_shape, gate_weight_shape, up_weight_shape, gate_bias_shape, up_bias_shape, z_gate_shape,
          z_up_shape, activation_name, negative_slope, needs, *args, **kwargs) -> int:
        rows, width = grad_a_shape[0], gate_weight_shape[1]
        product = 2 * rows * gate_weight_shape[0] * width
        recomputed = 2 * product if z_gate_shape is None else 0  # Z_g and Z_u again (recompute=True)
        return product * (2 * int(needs[0]) + int(needs[1]) + int(needs[2])) + recomputed

    @register_flop_formula(torch.ops.manualbp.gated_jvp)
    def _(x_shape, gate_weight_shape, up_weight_shape, gate_bias_shape, up_bias_shape, z_gate_shape, z_up_shape,
          tangent_x_shape, tangent_gate_weight_shape, tangent_up_weight_shape, *args, **kwargs) -> int:
        product = 2 * x_shape[0] * gate_weight_shape[0] * x_shape[1]
        recomputed = 2 * product if z_gate_shape is None else 0
        return product * (2 * (tangent_x_shape is not None) + (tangent_gate_weight_shape is not None)
                          + (tangent_up_weight_shape is not None)) + recomputed


_register_flops()

# --------------------------------------------------------------------------------------
# DTensor sharding rules: rows sharded (data parallel) or I sharded (column-wise)
# --------------------------------------------------------------------------------------


def _register_sharding():
    register_sharding = ops.sharding_registrar()
    if register_sharding is None:
        return
    from torch.distributed.tensor import Partial, Replicate, Shard

    R = Replicate()

    def spec(t, placement):
        return None if t is None else placement

    @register_sharding(gated_forward._opoverload)
    def _(x, gate_weight, up_weight, gate_bias, up_bias, activation_name, negative_slope, save, backend):
        def plan(x_p, w_p, out_p):
            saved = out_p if save else R  # an unrequested output is a replicated [0]
            return [out_p, saved, saved], [x_p, w_p, w_p, spec(gate_bias, w_p), spec(up_bias, w_p),
                                           None, None, None, None]
        return [plan(Shard(0), R, Shard(0)),  # rows (samples) sharded
                plan(R, Shard(0), Shard(1)),  # column-wise: I sharded (gate_proj, up_proj of the Llama plan)
                plan(R, R, R)]

    @register_sharding(gated_backward._opoverload)
    def _(grad_a, x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, activation_name, negative_slope,
          needs, backend):
        def plan(row_p, x_p, w_p, gx_p, gw_p, gb_p):
            outputs = [p if need else R for p, need in zip((gx_p, gw_p, gw_p, gb_p, gb_p), needs)]
            inputs = [row_p, spec(x, x_p), w_p, w_p, spec(gate_bias, w_p), spec(up_bias, w_p), spec(z_gate, row_p),
                      spec(z_up, row_p), None, None, None, None]
            return outputs, inputs
        return [plan(Shard(0), Shard(0), R, Shard(0), Partial(), Partial()),  # rows: weight grads summed
                plan(Shard(1), R, Shard(0), Partial(), Shard(0), Shard(0)),  # I: ∂C/∂X summed over shards
                plan(R, R, R, R, R, R)]

    @register_sharding(gated_jvp._opoverload)
    def _(x, gate_weight, up_weight, gate_bias, up_bias, z_gate, z_up, tangent_x, tangent_gate_weight,
          tangent_up_weight, tangent_gate_bias, tangent_up_bias, activation_name, negative_slope, backend):
        def plan(x_p, w_p, out_p):
            inputs = [x_p, w_p, w_p, spec(gate_bias, w_p), spec(up_bias, w_p), spec(z_gate, out_p),
                      spec(z_up, out_p), spec(tangent_x, x_p), spec(tangent_gate_weight, w_p),
                      spec(tangent_up_weight, w_p), spec(tangent_gate_bias, w_p), spec(tangent_up_bias, w_p),
                      None, None, None]
            return [out_p], inputs
        return [plan(Shard(0), R, Shard(0)), plan(R, Shard(0), Shard(1)), plan(R, R, R)]

    # The gating alone is elementwise: any placement of [M, I] shared by every tensor (not a partial sum: f).
    placements = (Shard(0), Shard(1), R)

    @register_sharding(gate_forward._opoverload)
    def _(z_gate, z_up, activation_name, negative_slope, backend):
        return [([p], [p, p, None, None, None]) for p in placements]

    @register_sharding(gate_backward._opoverload)
    def _(grad_a, z_gate, z_up, activation_name, negative_slope, backend):
        return [([p, p], [p, p, p, None, None, None]) for p in placements]

    @register_sharding(gate_jvp._opoverload)
    def _(z_gate, z_up, tangent_gate, tangent_up, activation_name, negative_slope, backend):
        return [([p], [p, p, spec(tangent_gate, p), spec(tangent_up, p), None, None, None]) for p in placements]


_register_sharding()

# torch.export: each operator as the reference computes it (ops.register_decompositions)
_NOT_REGISTERED = ops.register_decompositions(OPERATORS)
