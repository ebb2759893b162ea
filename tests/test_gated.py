"""The gated layer (functional.gated_linear, manualbp.GatedMLP) against autograd and a Llama-style nn.Module MLP.

Both backends (Triton through the interpreter on the CPU), every activation: gradcheck and gradgradcheck in
float64; the Llama MLP's numbers in float32 within PyTorch's own error against float64 (checks.py's rule), and
bitwise on the reference backend; odd, 1-D, 3-D, empty and non-contiguous inputs; bad input; torch.func, forward
AD, torch.compile, torch.export, fake and meta tensors, FLOP counting, autocast, checkpointing; what recompute
saves. Tensor parallel: tests/test_gated_parallel.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import manualbp
from checks import assert_close_to_float64, operator_calls, torch_activation
from manualbp import backends
from manualbp.functional import gated_linear

BACKENDS = ["reference", "triton"]
ACTIVATIONS = list(manualbp.ACTIVATIONS)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KEYS = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
KEYS_MODULES = [key.split(".")[0] for key in KEYS]


def require(backend: str, dtype: torch.dtype = torch.float64) -> None:
    reason = backends.triton_unavailable_reason(DEVICE, dtype)
    if backend == "triton" and reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


class LlamaStyleMLP(nn.Module):
    """transformers' LlamaMLP, written out: down_proj(act_fn(gate_proj(x)) * up_proj(x)), the activation any
    of the catalogue's torch modules."""

    def __init__(self, hidden, intermediate, activation="silu", bias=False, dtype=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=DEVICE)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=DEVICE)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, dtype=dtype, device=DEVICE)
        self.act_fn = manualbp.activations.torch_module(activation)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def pair(activation, backend, dtype=torch.float32, hidden=6, intermediate=10, bias=False, recompute=False, seed=0):
    torch.manual_seed(seed)
    ours = manualbp.GatedMLP(hidden, intermediate, activation, bias=bias, recompute=recompute, device=DEVICE,
                             dtype=dtype, backend=backend)
    theirs = LlamaStyleMLP(hidden, intermediate, activation, bias=bias, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def tensors(lead, k, n, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)

    scale = 1 / max(k, 1) ** 0.5
    return (draw(*lead, k), draw(n, k, scale=scale), draw(n, k, scale=scale), draw(n) if bias else None,
            draw(n) if bias else None, draw(*lead, n))


def torch_gated(x, gate_weight, up_weight, gate_bias, up_bias, activation):
    """The baseline: two nn.functional.linear and the torch activation module."""
    return (torch_activation(activation, nn.functional.linear(x, gate_weight, gate_bias))
            * nn.functional.linear(x, up_weight, up_bias))


def run(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


# --------------------------------------------------------------------------------------
# gradcheck, gradgradcheck
# --------------------------------------------------------------------------------------


@pytest.mark.stacks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation, recompute, backend):
    """Reverse and forward mode (and batched reverse) against finite differences, float64, with biases."""
    require(backend)
    x, gate_weight, up_weight, gate_bias, up_bias, _ = tensors((3,), 4, 3, torch.float64, seed=1)
    inputs = [t.requires_grad_(True) for t in (x, gate_weight, up_weight, gate_bias, up_bias)]

    def fn(*args):
        return gated_linear(*args, activation=activation, recompute=recompute, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True), \
        f"gradcheck [{activation}, {backend}, recompute={recompute}]"


@pytest.mark.stacks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck(activation, backend):
    require(backend)
    x, gate_weight, up_weight, gate_bias, up_bias, _ = tensors((3,), 4, 3, torch.float64, seed=2)
    inputs = [t.requires_grad_(True) for t in (x, gate_weight, up_weight, gate_bias, up_bias)]

    def fn(*args):
        return gated_linear(*args, activation=activation, backend=backend)

    assert torch.autograd.gradgradcheck(fn, inputs), f"gradgradcheck [{activation}, {backend}]"


@pytest.mark.parametrize("slope", [0.2, -0.3])
def test_leaky_relu_slope_gradcheck(slope):
    x, gate_weight, up_weight, gate_bias, up_bias, _ = tensors((4,), 3, 3, torch.float64, seed=3)
    inputs = [t.requires_grad_(True) for t in (x, gate_weight, up_weight, gate_bias, up_bias)]
    fn = lambda *a: gated_linear(*a, activation="leaky_relu", negative_slope=slope)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True), f"gradcheck leaky_relu slope={slope}"


# --------------------------------------------------------------------------------------
# Against the Llama-style nn.Module MLP
# --------------------------------------------------------------------------------------


@pytest.mark.stacks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_llama_mlp_in_float32(activation, bias, backend):
    """Output and every gradient within twice PyTorch's own float32 error against float64 (checks.py)."""
    require(backend, torch.float32)
    ours, theirs = pair(activation, backend, bias=bias, hidden=12, intermediate=35)
    exact = copy.deepcopy(theirs).double()
    x = torch.randn(2, 17, 12, device=DEVICE)
    grad_out = torch.randn(2, 17, 12, device=DEVICE)
    results = []
    for model, inputs in ((ours, (x, grad_out)), (theirs, (x, grad_out)), (exact, (x.double(), grad_out.double()))):
        x_ = inputs[0].clone().requires_grad_(True)
        out = model(x_)
        out.backward(inputs[1])
        results.append([("out", out.detach()), ("dx", x_.grad)]
                       + [(name, p.grad) for name, p in model.named_parameters()])
    for (label, o), (label_t, t), (_, e) in zip(*results):
        assert label == label_t, f"parameter order {label} vs {label_t}"
        assert_close_to_float64(f"{label} [{activation}, {backend}, bias={bias}]", o, t, e)


@pytest.mark.stacks
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_is_bitwise_the_llama_mlp(activation, recompute):
    """The reference backend runs eager's own ops in eager's order: the same bits, float32."""
    ours, theirs = pair(activation, "reference", bias=True, recompute=recompute, hidden=8, intermediate=20)
    x = torch.randn(3, 5, 8, device=DEVICE)
    grad_out = torch.randn(3, 5, 8, device=DEVICE)
    results = []
    for model in (ours, theirs):
        x_ = x.clone().requires_grad_(True)
        out = model(x_)
        out.backward(grad_out)
        results.append([out.detach(), x_.grad] + [p.grad for p in model.parameters()])
    for label, o, t in zip(["out", "dx"] + [n for n, _ in ours.named_parameters()], *results):
        torch.testing.assert_close(o, t, rtol=0, atol=0, msg=lambda m: f"{label} [{activation}]: {m}")


# --------------------------------------------------------------------------------------
# Shapes and layouts
# --------------------------------------------------------------------------------------

# (leading dims, in_features K, intermediate I): odd, 1-D, 3-D, empty batch, the smallest, past the interpreter's
# 32-wide tiles, no input features, no intermediate features.
SHAPES = [((7,), 5, 3), ((), 5, 3), ((2, 3), 5, 4), ((0,), 5, 3), ((1,), 1, 1), ((33,), 37, 35), ((5,), 0, 3),
          ((4,), 6, 0)]


@pytest.mark.stacks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_shapes_against_pytorch(activation, shape, backend):
    require(backend, torch.float32)
    lead, k, n = shape
    inputs = tensors(lead, k, n, torch.float32, seed=4)
    fn = lambda *a: gated_linear(*a, activation=activation, backend=backend)  # noqa: E731
    base = lambda *a: torch_gated(*a, activation)  # noqa: E731
    ours, theirs = run(fn, inputs[:5], inputs[5]), run(base, inputs[:5], inputs[5])
    exact = run(base, [t.double() for t in inputs[:5]], inputs[5].double())
    for label, o, t, e in zip(("out", "dx", "dW_g", "dW_u", "db_g", "db_u"), ours, theirs, exact):
        assert_close_to_float64(f"{label} [{activation}, {backend}, {shape}]", o, t, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Transposed x and weights, a strided bias, a stride-0 (expanded) G: the same numbers as contiguous copies."""
    require(backend)
    x, gate_weight, up_weight, gate_bias, up_bias, _ = tensors((6,), 5, 4, torch.float64, seed=5)
    odd = (x.t().contiguous().t(), gate_weight.t().contiguous().t(), up_weight.t().contiguous().t(),
           torch.stack([gate_bias, gate_bias], 1)[:, 0], up_bias)
    assert not odd[0].is_contiguous() and not odd[3].is_contiguous(), "the layouts under test"
    grad_out = torch.ones(1, 1, dtype=torch.float64, device=DEVICE).expand(6, 4)
    fn = lambda *a: gated_linear(*a, activation="gelu", backend=backend)  # noqa: E731
    plain, strided = run(fn, (x, gate_weight, up_weight, gate_bias, up_bias), grad_out), run(fn, odd, grad_out)
    for label, p, s in zip(("out", "dx", "dW_g", "dW_u", "db_g", "db_u"), plain, strided):
        torch.testing.assert_close(s, p, rtol=1e-12, atol=1e-12, msg=lambda m: f"{label} [{backend}]: {m}")


# --------------------------------------------------------------------------------------
# The module: parameters, state_dict, init, repr; bad input
# --------------------------------------------------------------------------------------


@pytest.mark.stacks
def test_state_dict_and_init_are_a_llama_mlps():
    torch.manual_seed(3)
    ours = manualbp.GatedMLP(8, 20)
    torch.manual_seed(3)
    theirs = LlamaStyleMLP(8, 20)
    assert list(ours.state_dict()) == KEYS, f"keys {list(ours.state_dict())}"
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), f"{key}: not the same initial values as nn.Linear's"
    with_bias = manualbp.GatedMLP(8, 20, bias=True)
    assert sorted(with_bias.state_dict()) == sorted(KEYS + [k.replace("weight", "bias") for k in KEYS]), \
        f"bias=True keys {sorted(with_bias.state_dict())}"
    ours.load_state_dict(LlamaStyleMLP(8, 20).state_dict())  # and back
    assert "activation='silu'" in repr(ours) and "recompute=False" in repr(ours), f"repr: {ours!r}"


def test_loads_transformers_llama_mlp():
    """transformers' own LlamaMLP (built from a config: random weights): its state_dict loads, same outputs."""
    from checks import optional_import

    optional_import("transformers", "transformers is not installed")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=16, intermediate_size=44, hidden_act="silu", num_attention_heads=2,
                         num_key_value_heads=2)
    theirs = LlamaMLP(config)
    ours = manualbp.GatedMLP(16, 44, "silu", backend="reference")  # eager's own ops: the same bits
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0, msg=lambda m: f"LlamaMLP output: {m}")


@pytest.mark.stacks
@pytest.mark.parametrize("call, error, match", [
    (lambda: gated_linear(torch.randn(2, 4), torch.randn(3, 5), torch.randn(3, 5)), ValueError, "gate_weight"),
    (lambda: gated_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 4)), ValueError, "same shape"),
    (lambda: gated_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4), torch.randn(2)), ValueError,
     "gate_bias"),
    (lambda: gated_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4), None, torch.randn(3, 1)),
     ValueError, "up_bias"),
    (lambda: gated_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4).double()), TypeError, "dtype"),
    (lambda: gated_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4), activation="swish"), ValueError,
     "unknown activation"),
    (lambda: gated_linear(torch.tensor(1.0), torch.randn(3, 4), torch.randn(3, 4)), ValueError, "0-d"),
    (lambda: gated_linear(torch.randn(2, 4), torch.randn(3, 4), "w"), TypeError, "torch.Tensor"),
    (lambda: gated_linear(torch.randn(2, 4).int(), torch.randn(3, 4), torch.randn(3, 4)), TypeError, "dtype"),
    (lambda: gated_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4), recompute=1), TypeError,
     "recompute"),
    (lambda: manualbp.GatedMLP(4, 8, "geglu"), ValueError, "unknown activation"),
    (lambda: manualbp.GatedMLP(4, 8, bias="yes"), TypeError, "bias"),
    (lambda: manualbp.GatedMLP(4, 8, backend="cuda"), ValueError, "backend"),
    (lambda: torch.ops.manualbp.gated_backward(torch.randn(2, 3), None, torch.randn(3, 4), torch.randn(3, 4), None,
                                               None, None, None, "silu", 0.0, [True] * 5, "reference"),
     ValueError, "need x"),
], ids=["in_features", "gate_vs_up", "gate_bias", "up_bias", "mixed_dtypes", "activation", "0-d", "not_a_tensor",
        "int", "recompute_flag", "module_activation", "module_bias", "module_backend", "operator_needs_x"])
def test_bad_input_raises_before_anything_runs(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------------------
# What is kept for the backward
# --------------------------------------------------------------------------------------


@pytest.mark.stacks
@pytest.mark.parametrize("backend", BACKENDS)
def test_recompute_saves_less(backend):
    """Bytes kept for the backward beyond the input (manualbp.saved_bytes), M rows, I intermediate, float32:
    the Llama MLP in eager keeps Z_g (silu's input), f(Z_g) and Z_u (the product's), and A (down_proj's input):
    4·M·I·4 bytes; GatedMLP keeps Z_g, Z_u and A: 3·M·I·4; with recompute=True only A: M·I·4."""
    require(backend, torch.float32)
    M, hidden, intermediate = 16, 8, 24
    x = torch.randn(M, hidden, device=DEVICE, requires_grad=True)
    ours, theirs = pair("silu", backend, hidden=hidden, intermediate=intermediate)
    recomputing, _ = pair("silu", backend, hidden=hidden, intermediate=intermediate, recompute=True)
    unit = M * intermediate * 4
    measured = {name: manualbp.saved_bytes(model, x, count_inputs=False)
                for name, model in (("eager", theirs), ("keep", ours), ("recompute", recomputing))}
    assert measured == {"eager": 4 * unit, "keep": 3 * unit, "recompute": unit}, f"saved bytes {measured}"


def test_no_grad_keeps_nothing_and_runs_the_forward_only():
    ours, theirs = pair("silu", "reference")
    x = torch.randn(4, 6, device=DEVICE)
    with torch.no_grad(), operator_calls() as calls:
        out = ours(x)
    assert [name for name, _ in calls] == ["gated_forward", "linear_forward"], f"operators {calls}"
    assert calls[0][1][7] is False, "no_grad: the forward keeps no Z"
    torch.testing.assert_close(out, theirs(x), rtol=0, atol=0, msg=lambda m: f"no_grad output: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_forward_and_one_backward_operator(backend):
    """The gating is one autograd node: gated_forward, then gated_backward for all five gradients."""
    require(backend, torch.float32)
    x, gate_weight, up_weight, gate_bias, up_bias, grad_out = tensors((5,), 4, 6, torch.float32, seed=6)
    leaves = [t.requires_grad_(True) for t in (x, gate_weight, up_weight, gate_bias, up_bias)]
    with operator_calls() as calls:
        gated_linear(*leaves, backend=backend).backward(grad_out)
    assert [name for name, _ in calls] == ["gated_forward", "gated_backward"], f"operators {calls}"


@pytest.mark.stacks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("lead", [(7,), (2, 3), (0,)], ids=["2d", "3d", "empty"])
def test_double_backward_with_frozen_weights(lead, activation, backend):
    """Frozen weights keep no x; a double backward then differentiates δ_g, δ_u through the kept Z_g, Z_u (connected
    outputs of the layer), giving the Llama MLP's first and second gradients for x and both biases, and keeps
    nothing more than the first-order backward: Z_g and Z_u, 2·M·I·element_size bytes, beside the parameters."""
    require(backend)
    inputs = tensors(lead, 5, 4, torch.float64, seed=3)
    x, gate_weight, up_weight, gate_bias, up_bias, grad_out = inputs

    def second_order(fn):
        leaf, biases = x.clone().requires_grad_(True), [b.clone().requires_grad_(True) for b in (gate_bias, up_bias)]
        h = leaf * 1.0  # a non-leaf, as in a network
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(h, gate_weight, up_weight, *biases)
        wrt = [leaf, *biases]
        first = torch.autograd.grad(out, wrt, grad_out, create_graph=True)
        loss = sum((g * g.detach().sin()).sum() + (g ** 2).sum() for g in first)
        second = torch.autograd.grad(loss, wrt, allow_unused=True)
        second = [torch.zeros_like(t) if g is None else g for g in second]
        return [g.detach() for g in first], second, saved

    ours_first, ours_second, saved = second_order(
        lambda *t: gated_linear(*t, activation=activation, backend=backend))
    their_first, their_second, _ = second_order(lambda h, wg, wu, bg, bu: torch_gated(h, wg, wu, bg, bu, activation))
    for order, (ours, theirs) in enumerate(((ours_first, their_first), (ours_second, their_second)), start=1):
        for name, o, t in zip(("x", "gate_bias", "up_bias"), ours, theirs):
            torch.testing.assert_close(o, t, rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"order {order} d{name} [{activation}, {backend}, {lead}]: {m}")
    activations = [t for t in saved if t is not gate_weight and t is not up_weight]
    rows = x.numel() // x.shape[-1]
    assert sorted(tuple(t.shape) for t in activations) == [(rows, 4), (rows, 4)], \
        f"kept beside the weights: Z_g and Z_u only, {[tuple(t.shape) for t in activations]}"


# --------------------------------------------------------------------------------------
# Composability: torch.func, forward AD, compile, export, fake/meta, FLOPs, autocast, checkpointing
# --------------------------------------------------------------------------------------


def close(label, ours, theirs, tol=1e-10):
    if isinstance(ours, dict):
        assert set(ours) == set(theirs), f"{label}: keys {sorted(ours)} vs {sorted(theirs)}"
        for key in ours:
            close(f"{label}[{key}]", ours[key], theirs[key], tol)
        return
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol, msg=lambda m: f"{label}: {m}")


@pytest.mark.stacks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu"])
def test_torch_func_matches_the_llama_mlp(activation, backend):
    """functional_call, grad, vmap, per-sample grads, jacrev, jvp, ensembling (batched weights), float64."""
    require(backend)
    ours, theirs = pair(activation, backend, dtype=torch.float64, bias=True, hidden=4, intermediate=6)
    params = {name: p.detach() for name, p in ours.named_parameters()}
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)

    def loss(model, p, x):
        return functional_call(model, p, (x,)).square().sum()

    close("grad", grad(loss, argnums=1)(ours, params, x), grad(loss, argnums=1)(theirs, params, x))
    rows = x.unsqueeze(1)
    close("vmap", vmap(ours)(rows), vmap(theirs)(rows))
    per_sample = vmap(grad(loss, argnums=1), in_dims=(None, None, 0))
    close("per-sample grads", per_sample(ours, params, rows), per_sample(theirs, params, rows))
    close("jacrev", jacrev(ours)(x), jacrev(theirs)(x))
    tangent = torch.randn_like(x)
    close("jvp", jvp(ours, (x,), (tangent,)), jvp(theirs, (x,), (tangent,)))
    stacked = {name: torch.stack([p, 2 * p]) for name, p in params.items()}
    ensemble = lambda model: vmap(lambda p, x: functional_call(model, p, (x,)), in_dims=(0, None))  # noqa: E731
    close("ensemble", ensemble(ours)(stacked, x), ensemble(theirs)(stacked, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_dual_tensors(backend):
    """Dual tensors on x and on every parameter: the tangent of A is eager's."""
    require(backend)
    import torch.autograd.forward_ad as fwAD

    inputs = tensors((4,), 3, 5, torch.float64, seed=7)[:5]
    tangents = [torch.randn_like(t) for t in inputs]
    results = []
    for fn in (lambda *a: gated_linear(*a, activation="gelu", backend=backend), lambda *a: torch_gated(*a, "gelu")):
        with fwAD.dual_level():
            out = fn(*[fwAD.make_dual(t, d) for t, d in zip(inputs, tangents)])
            results.append(fwAD.unpack_dual(out))
    close("primal", results[0].primal, results[1].primal)
    close("tangent", results[0].tangent, results[1].tangent)


@pytest.mark.stacks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_compile_fullgraph_is_bitwise_eager(recompute, backend):
    require(backend, torch.float32)
    ours, _ = pair("silu", backend, bias=True, recompute=recompute)
    compiled = copy.deepcopy(ours)
    x = torch.randn(2, 5, 6, device=DEVICE)
    results = []
    for model in (ours, torch.compile(compiled, fullgraph=True)):
        x_ = x.clone().requires_grad_(True)
        out = model(x_)
        out.square().sum().backward()
        results.append([out.detach(), x_.grad])
    for name, p in ours.named_parameters():
        results[0].append(p.grad)
        results[1].append(compiled.get_parameter(name).grad)
    for label, e, c in zip(["out", "dx"] + [n for n, _ in ours.named_parameters()], *results):
        torch.testing.assert_close(c, e, rtol=0, atol=0, msg=lambda m: f"compiled {label} [{backend}]: {m}")


@pytest.mark.stacks
@pytest.mark.parametrize("backend", BACKENDS)
def test_export_and_decompose(backend):
    """torch.export records gated_forward (keeping nothing); run_decompositions leaves aten ops only."""
    require(backend, torch.float32)
    ours, theirs = pair("gelu_tanh", backend, bias=True)
    x = torch.randn(3, 4, 6, device=DEVICE)
    program = torch.export.export(ours, (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert "manualbp.gated_forward.default" in targets, f"exported ops {targets}"
    torch.testing.assert_close(program.module()(x), ours(x), rtol=0, atol=0, msg=lambda m: f"exported: {m}")
    reason = manualbp.ops.decompositions_unavailable()
    if reason is not None:
        pytest.skip(f"no decomposition on this PyTorch: {reason}")
    decomposed = program.run_decompositions()
    left = [str(n.target) for n in decomposed.graph.nodes if n.op == "call_function" and "manualbp" in str(n.target)]
    assert not left, f"manualbp operators left after run_decompositions: {left}"
    torch.testing.assert_close(decomposed.module()(x), theirs(x), rtol=1e-6, atol=1e-6,
                               msg=lambda m: f"decomposed vs the Llama MLP: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_and_meta_tensors(backend, monkeypatch):
    """FakeTensorMode and device="meta": forward and backward give shapes; no kernel runs."""
    if backends.triton_unavailable_reason(DEVICE, torch.float32) is None:
        from manualbp.triton_kernels import gated

        for name in ("gated_forward", "gated_backward", "gated_jvp"):
            monkeypatch.setattr(gated, name, lambda *a, _name=name, **k: pytest.fail(f"kernel {_name} ran"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = manualbp.GatedMLP(6, 10, backend=backend, device=DEVICE)
        x = torch.randn(2, 3, 6, requires_grad=True, device=DEVICE)
        out = model(x)
        out.sum().backward()
        assert out.shape == (2, 3, 6) and model.gate_proj.weight.grad.shape == (10, 6), "fake: shapes"
    model = manualbp.GatedMLP(6, 10, device="meta", backend=backend)
    x = torch.empty(2, 3, 6, device="meta", requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert out.device.type == "meta" and x.grad.shape == x.shape, "meta: forward and backward"
    assert model.up_proj.weight.grad.shape == (10, 6), "meta: ∂C/∂W_u"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_flop_counter(recompute, backend):
    """FlopCounterMode counts the Llama MLP's matmuls (2MNK each); recompute adds the two forward products."""
    require(backend, torch.float32)
    from torch.utils.flop_counter import FlopCounterMode

    M, hidden, intermediate = 8, 6, 10
    ours, theirs = pair("silu", backend, hidden=hidden, intermediate=intermediate, recompute=recompute)
    x = torch.randn(M, hidden, device=DEVICE, requires_grad=True)

    def count(model):  # (forward, backward) FLOPs
        with FlopCounterMode(display=False) as counter:
            out = model(x)
            forward = counter.get_total_flops()
            out.sum().backward()
        return forward, counter.get_total_flops() - forward

    counts = [count(ours), count(theirs)]
    product = 2 * M * hidden * intermediate
    assert counts[1] == (3 * product, 6 * product), f"the Llama MLP's own counts {counts[1]}"
    expected = (3 * product, 6 * product + (2 * product if recompute else 0))
    assert counts[0] == expected, f"GatedMLP (forward, backward) FLOPs {counts[0]}, expected {expected}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_autocast_like_the_llama_mlp(dtype):
    """CPU autocast: float32 parameters, computed in the autocast dtype, float32 gradients; as accurate as eager."""
    try:
        with torch.autocast("cpu", dtype=dtype):
            pass
    except Exception as error:
        pytest.skip(f"torch.autocast('cpu', dtype={dtype}) is not available: {error}")
    ours, theirs = pair("silu", None, hidden=8, intermediate=24)
    x = torch.randn(4, 8)
    grad_out = torch.randn(4, 8)
    results = []
    for model in (ours, theirs):
        x_ = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            out = model(x_)
        out.float().backward(grad_out)
        results.append((out, x_.grad, model.gate_proj.weight.grad))
    (out, dx, dw), (out_t, dx_t, dw_t) = results
    assert out.dtype == out_t.dtype == dtype, f"output dtype {out.dtype}, eager's {out_t.dtype}"
    assert dx.dtype == dw.dtype == torch.float32, f"gradient dtypes {dx.dtype}, {dw.dtype}"
    exact = copy.deepcopy(theirs).double()
    for p in exact.parameters():
        p.data = p.data.to(dtype).double()  # the rounded inputs autocast computes with
    bound = 4 * (out_t.double() - exact(x.to(dtype).double())).abs().max() + torch.finfo(dtype).eps
    error = (out.double() - exact(x.to(dtype).double())).abs().max()
    assert error <= bound, f"autocast output error {error:.3g} vs float64, bound {bound:.3g} from eager's"


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointing_gives_the_same_gradients(backend):
    require(backend)
    from torch.utils.checkpoint import checkpoint

    ours, _ = pair("silu", backend, dtype=torch.float64, bias=True)
    x = torch.randn(2, 3, 6, dtype=torch.float64, device=DEVICE)
    results = []
    for fn in (ours, lambda x: checkpoint(ours, x, use_reentrant=False)):
        ours.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_(True)
        out = fn(x_)
        out.square().sum().backward()
        results.append([out.detach(), x_.grad] + [p.grad.clone() for p in ours.parameters()])
    for label, plain, checkpointed in zip(["out", "dx"] + [n for n, _ in ours.named_parameters()], *results):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0, msg=lambda m: f"checkpointed {label}: {m}")


def test_hooks_or_adapters_run_each_projection_as_a_module():
    """A hook on gate_proj must fire (and so it does: the projections are called as modules); same numbers."""
    ours, theirs = pair("silu", "reference", bias=True)
    seen = []
    ours.gate_proj.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 6, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0, msg=lambda m: f"with a hook: {m}")
    assert seen == [torch.Size([2, 10])], f"gate_proj's hook saw {seen}"


@pytest.mark.parametrize("config_name", ["Int8WeightOnlyConfig", "Int8DynamicActivationInt8WeightConfig"])
def test_torchao_quantize_as_on_the_llama_mlp(config_name):
    """torchao's quantize_ swaps quantized weights into the projections: each then runs torchao's linear (never the
    gated kernels on a quantized tensor), the gating on their outputs: the numbers of quantize_ on the Llama MLP."""
    from checks import optional_import

    quantization = optional_import("torchao.quantization", "torchao is not installed")
    ours, theirs = pair("silu", "reference", hidden=16, intermediate=32)
    original = copy.deepcopy(theirs)
    for model in (ours, theirs):
        quantization.quantize_(model, getattr(quantization, config_name)())
    assert all(manualbp.quantization.is_quantized(getattr(ours, name).weight) for name in KEYS_MODULES), \
        "every projection's weight quantized"
    x = torch.randn(5, 16)
    out = ours(x)
    torch.testing.assert_close(out, theirs(x), rtol=0, atol=0, msg=lambda m: f"quantized vs the Llama MLP's: {m}")
    error = (out - original(x)).abs().max().item()
    assert 0 < error < 0.05, f"int8 quantization error {error:.3e} (expected > 0: it is quantized)"


# --------------------------------------------------------------------------------------
# The gating alone (gated.gating): where the projections run as modules
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gating_gradcheck(activation, backend):
    """A = f(Z_g) ⊙ Z_u alone: gradcheck with forward AD and batched grads, gradgradcheck, float64, 3-D."""
    require(backend)
    from manualbp.gated import gating

    generator = torch.Generator().manual_seed(8)
    inputs = [torch.randn(2, 3, 4, dtype=torch.float64, generator=generator).to(DEVICE).requires_grad_(True)
              for _ in range(2)]
    fn = lambda z_gate, z_up: gating(z_gate, z_up, activation, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True), \
        f"gradcheck gating [{activation}, {backend}]"
    assert torch.autograd.gradgradcheck(fn, inputs), f"gradgradcheck gating [{activation}, {backend}]"


@pytest.mark.parametrize("backend", BACKENDS)
def test_projections_as_modules_keep_what_the_fused_layer_keeps(backend):
    """With a hook on gate_proj: the projections run as modules, then one gating node (gate_forward, gate_backward),
    keeping Z_g and Z_u (and down_proj's A): 3·M·I·4 bytes, as the fused layer, where eager keeps 4; the numbers
    are the Llama MLP's (float32, within PyTorch's own error against float64)."""
    require(backend, torch.float32)
    ours, theirs = pair("silu", backend, hidden=8, intermediate=24)
    ours.gate_proj.register_forward_hook(lambda module, args, out: None)
    x = torch.randn(16, 8, device=DEVICE, requires_grad=True)
    assert manualbp.saved_bytes(ours, x, count_inputs=False) == 3 * 16 * 24 * 4, "Z_g, Z_u and A"
    with operator_calls() as calls:
        out = ours(x)
        (dx,) = torch.autograd.grad(out.square().sum(), x)
    names = [name for name, _ in calls]
    assert "gate_forward" in names and "gate_backward" in names and "gated_forward" not in names, f"ops {names}"
    exact = copy.deepcopy(theirs).double()
    x64 = x.detach().double().requires_grad_(True)
    (dx64,) = torch.autograd.grad(exact(x64).square().sum(), x64)
    (dx_theirs,) = torch.autograd.grad(theirs(x).square().sum(), x)
    assert_close_to_float64(f"dx [{backend}]", dx, dx_theirs, dx64)


@pytest.mark.parametrize("call, error, match", [
    (lambda g: g(torch.randn(2, 3), torch.randn(2, 4)), ValueError, "one shape"),
    (lambda g: g(torch.randn(2, 3), torch.randn(2, 3).double()), ValueError, "dtype"),
    (lambda g: g(torch.randn(2, 3).int(), torch.randn(2, 3)), TypeError, "floating-point"),
    (lambda g: g(torch.randn(2, 3), torch.randn(2, 3), "swish"), ValueError, "unknown activation"),
], ids=["shape", "dtype", "int", "activation"])
def test_gating_bad_input(call, error, match):
    from manualbp.gated import gating

    with pytest.raises(error, match=match):
        call(gating)


@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_export_runs_in_onnxruntime(backend):
    """torch.onnx.export(dynamo=True) with a dynamic batch axis: standard ONNX operators only (the gated operators
    decomposed), and onnxruntime gives the Llama MLP's output at other batch sizes (float32, 1e-5)."""
    require(backend, torch.float32)
    from checks import optional_import

    for package in ("onnx", "onnxscript"):
        optional_import(package, f"{package} is not installed (pip install .[test])")
    onnxruntime = optional_import("onnxruntime", "onnxruntime is not installed (pip install .[test])")
    from torch.export import Dim

    ours, theirs = pair("silu", backend, bias=True, hidden=8, intermediate=20)
    exported = torch.onnx.export(ours.eval(), (torch.randn(3, 8, device=DEVICE),), dynamo=True,
                                 dynamic_shapes=({0: Dim("batch")},), verbose=False)
    domains = {node.domain for node in exported.model_proto.graph.node}
    assert domains <= {""}, f"ONNX node domains: {domains} (a custom domain would need manualbp in the runtime)"
    session = onnxruntime.InferenceSession(exported.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 17):
        x = torch.randn(batch, 8)
        (result,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = theirs.cpu()(x)
        torch.testing.assert_close(torch.from_numpy(result), expected, rtol=0, atol=1e-5,
                                   msg=lambda m: f"onnxruntime, batch {batch}: {m}")
