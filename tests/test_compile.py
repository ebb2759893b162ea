"""torch.compile, torch.export and the custom operators behind them (manualbp/ops.py).

The operators are checked with torch.library.opcheck and gradcheck, eagerly, on
both backends (Triton through the interpreter on the CPU). torch.compile is
kept to few graphs: on two CPU cores each Inductor compile takes seconds.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manualbp
from manualbp import backends

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)

OPS = torch.ops.manualbp
# The GPU where there is one (compiled kernels), else the CPU (the kernels through the interpreter).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require(backend: str, dtype=torch.float64) -> None:
    reason = backends.triton_unavailable_reason(DEVICE, dtype)
    if backend == "triton" and reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


def tensors(*shapes, dtype=torch.float64, requires_grad=True):
    return [torch.randn(*shape, dtype=dtype, device=DEVICE, requires_grad=requires_grad) for shape in shapes]


# --------------------------------------------------------------------------------------
# The operators, eagerly
# --------------------------------------------------------------------------------------

# (activation, negative_slope): f' from Z (gelu, leaky_relu < 0), from A (relu, tanh, leaky_relu >= 0), none.
ACTIVATIONS = [("identity", 0.0), ("relu", 0.0), ("gelu", 0.0), ("tanh", 0.0), ("leaky_relu", -0.3)]


def _activation(name, slope):
    return manualbp.ops.activation(name, slope)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name,slope", ACTIVATIONS, ids=[a for a, _ in ACTIVATIONS])
def test_opcheck_every_operator(backend, name, slope):
    """torch.library.opcheck (schema, fake implementation, dispatcher, AOT) of every manualbp operator."""
    require(backend)
    torch.manual_seed(0)
    activation = _activation(name, slope)
    x, weight, bias = tensors((5, 4), (3, 4), (3,), requires_grad=False)
    grad_a = torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    saves = ["z", "f_prime"] if name != "identity" and not activation.saves_output else [""]
    for save in saves:
        for b in (bias, None):
            torch.library.opcheck(OPS.linear_forward.default, (x, weight, b, name, slope, save, backend))
        a, z = OPS.linear_forward(x, weight, bias, name, slope, save or "z", backend)
        saved, kind = (None, "z") if name == "identity" else ((a, "a") if activation.saves_output else (z, save or "z"))
        for needs in ([True, True, True], [False, True, False], [True, False, True]):
            torch.library.opcheck(OPS.linear_backward.default,
                                  (grad_a, x, weight, saved, name, slope, kind, needs, backend))
        tangents = tensors((5, 4), (3, 4), (3,), requires_grad=False)
        for present in ([0, 1, 2], [0], [1], [2]):
            tx, tw, tb = [t if index in present else None for index, t in enumerate(tangents)]
            torch.library.opcheck(OPS.linear_jvp.default, (x, weight, saved, tx, tw, tb, name, slope, kind, backend))
        for want in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(OPS.delta.default, (grad_a, saved, name, slope, kind, *want, backend))
        if saved is not None:  # δₗ₋₁ = (δₗ Wₗ) ⊙ f'(Zₗ₋₁): here δ [5, 3] against a [3, 3] weight, saved [5, 3]
            square = torch.randn(3, 3, dtype=torch.float64, device=DEVICE)
            for want in (True, False):
                torch.library.opcheck(OPS.matmul_times_activation_grad.default,
                                      (grad_a, square, saved, name, slope, kind, want, backend))
    torch.library.opcheck(OPS.activation_forward.default, (grad_a, name, slope, backend))
    torch.library.opcheck(OPS.matmul.default, (x, weight.t(), backend))


def test_operator_errors_are_clear():
    x, weight = torch.randn(3, 4), torch.randn(2, 5)  # errors come before any device work: the CPU will do
    with pytest.raises(ValueError, match=r"expected x \[M, K\] and weight \[N, K\]"):
        OPS.linear_forward(x, weight, None, "relu", 0.0, "", "reference")
    weight = torch.randn(2, 4)
    with pytest.raises(ValueError, match="save must be one of"):
        OPS.linear_forward(x, weight, None, "gelu", 0.0, "a", "reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        OPS.linear_forward(x, weight, None, "relu", 0.0, "", "auto")  # operators take a resolved backend
    with pytest.raises(ValueError, match="needs saved = A, Z or f'"):
        OPS.linear_backward(torch.randn(3, 2), x, weight, None, "gelu", 0.0, "z", [True, True, True], "reference")
    with pytest.raises(ValueError, match="cannot compute f' from its output"):
        OPS.linear_backward(torch.randn(3, 2), x, weight, torch.randn(3, 2), "gelu", 0.0, "a", [True, True, True],
                            "reference")
    with pytest.raises(ValueError, match="at least one of tangent_x"):
        OPS.linear_jvp(x, weight, None, None, None, None, "identity", 0.0, "z", "reference")
    # Called alone (as an exported program calls it), the operator differentiates as the layer does
    # (its autograd formula is the layer's backward, manualbp/function.py).
    x_grad = x.clone().requires_grad_(True)
    out, _ = OPS.linear_forward(x_grad, weight, None, "relu", 0.0, "", "reference")
    out.sum().backward()
    x_layer = x.clone().requires_grad_(True)
    manualbp.functional.linear(x_layer, weight.detach(), None, "relu").sum().backward()
    torch.testing.assert_close(x_grad.grad, x_layer.grad, rtol=0, atol=0, msg=lambda m: f"operator dx: {m}")


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------


class Net(nn.Module):
    """manualbp.Linear layers (one converted from nn.Linear + nn.SiLU) around a manualbp.MLP."""

    def __init__(self):
        super().__init__()
        self.embed = manualbp.convert(nn.Sequential(nn.Linear(8, 16), nn.SiLU()))
        self.mlp = manualbp.MLP([16, 32, 16], activation="gelu", last_activation="tanh", recompute=True)
        self.head = manualbp.Linear(16, 4, activation="leaky_relu", negative_slope=0.1)

    def forward(self, x):
        return self.head(self.mlp(self.embed(x)) + 1.0)


def run(module, model, x):
    """Output, dx and the parameters' gradients of one forward/backward of ``module`` (model or its compiled self)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.square().sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(eager, compiled, label):
    # The same operators run the same kernels on the same data, and what Inductor compiles
    # around them (+ 1.0, views) is exact: the results are identical.
    (out, dx, grads), (out_c, dx_c, grads_c) = eager, compiled
    torch.testing.assert_close(out_c, out, rtol=0, atol=0, msg=lambda m: f"{label}: output\n{m}")
    torch.testing.assert_close(dx_c, dx, rtol=0, atol=0, msg=lambda m: f"{label}: dx\n{m}")
    assert set(grads_c) == set(grads)
    for name in grads:
        kind = "dw" if name.endswith("weight") else "db"
        torch.testing.assert_close(grads_c[name], grads[name], rtol=0, atol=0,
                                   msg=lambda m: f"{label}: {kind} of {name}\n{m}")


def test_compiled_graphs_hold_the_operators_forward_and_backward():
    # aot_eager with graph recording: each manualbp layer is one operator node, forward and backward, in one graph.
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    torch._dynamo.reset()
    torch.manual_seed(3)
    model = Net().to(DEVICE)
    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    x = torch.randn(2, 3, 8, device=DEVICE)
    with manualbp.use_backend("reference"):
        assert_same(run(model, model, x), run(compiled, model, x), "aot_eager")
    assert len(recorder.graphs) == 1, f"{len(recorder.graphs)} graphs: a graph break"
    forward, backward = recorder.fw_graphs[0].code, recorder.bw_graphs[0].code
    # Two manualbp.Linear and the MLP's two layers; on the reference backend the MLP backward runs per layer.
    assert forward.count("torch.ops.manualbp.linear_forward") == 4, forward
    assert backward.count("torch.ops.manualbp.linear_backward") == 4, backward
    assert backward.count("torch.ops.manualbp.activation_forward") == 1, "recompute: the hidden A from Z"
    torch._dynamo.reset()


def test_exporting_is_false_under_torch_compile_and_true_under_export():
    # Dynamo before torch 2.13 traced torch.compiler.is_exporting() as a constant True under torch.compile too: the
    # layers then took their no-gradient path and the compiled backward failed ("no autograd formula").
    torch._dynamo.reset()

    def probe(x):
        return x + 1, manualbp.ops.exporting()

    _, compiled = torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(2))
    assert compiled is False, "ops.exporting() traced by torch.compile"
    assert manualbp.ops.exporting() is False, "ops.exporting() in eager code"

    class Probe(nn.Module):
        def forward(self, x):
            return x + float(manualbp.ops.exporting())  # 1.0 only while exporting

    program = torch.export.export(Probe(), (torch.zeros(2),))
    assert torch.equal(program.module()(torch.zeros(2)), torch.ones(2)), \
        f"ops.exporting() under torch.export\n{program}"
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def compiled_net():
    """One Inductor compilation (fullgraph=True: a graph break raises) shared by the tests below."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    model = Net().to(DEVICE)
    yield model, torch.compile(model, fullgraph=True)
    torch._dynamo.reset()


def test_torch_compile_fullgraph_inductor_matches_eager(compiled_net):
    model, compiled = compiled_net
    for shape in ((2, 3, 8), (5, 8)):  # the second batch size recompiles with dynamic shapes
        x = torch.randn(*shape, device=DEVICE)
        assert_same(run(model, model, x), run(compiled, model, x), f"inductor, input {shape}")


def test_torch_compile_runs_the_triton_kernels(compiled_net, monkeypatch):
    # On a GPU the kernels are compiled; on the CPU they run through the interpreter. Either
    # way the compiled graph's operators must launch them, exactly as often as eager does.
    require("triton", torch.float32)
    model, compiled = compiled_net
    dense = backends.kernels()
    calls = {"linear_forward": 0, "delta_and_bias_grad": 0, "matmul": 0}
    for name in calls:
        original = getattr(dense, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dense, name, counting)  # the operators look the launchers up when they run
    x = torch.randn(2, 3, 8, device=DEVICE)
    eager = run(model, model, x)
    eager_calls = dict(calls)
    calls.update(dict.fromkeys(calls, 0))
    assert_same(eager, run(compiled, model, x), "inductor")
    assert eager_calls["linear_forward"] == 4, f"eager launches: {eager_calls}"  # 2 Linear + 2 MLP layers
    assert calls == eager_calls, f"Triton launches: compiled {calls}, eager {eager_calls}"


def test_a_warm_compiled_step_builds_no_launch_plan(compiled_net, monkeypatch):
    # What mode="reduce-overhead" and CUDA graphs need of the launch path, checkable on the CPU: once a compiled
    # step has run, the same step again tunes and compiles no kernel (triton_kernels/launch.py builds no plan).
    require("triton", torch.float32)
    from manualbp.triton_kernels import launch

    model, compiled = compiled_net
    x = torch.randn(2, 3, 8, device=DEVICE)
    first = run(compiled, model, x)
    plans = dict(launch.PLANS)

    def no_build(*args, **kwargs):
        raise AssertionError(f"a warm compiled step built a launch plan: {args[:2]}")

    monkeypatch.setattr(launch, "build", no_build)
    assert_same(first, run(compiled, model, x), "inductor, warm")
    assert launch.PLANS == plans, "no plan added"


def test_torch_export_holds_the_operators():
    torch.manual_seed(5)
    model = Net().eval().to(DEVICE)
    x = torch.randn(3, 8, device=DEVICE)
    with manualbp.use_backend("reference"), torch.no_grad():
        program = torch.export.export(model, (x,))
        code = program.graph_module.code
        assert code.count("torch.ops.manualbp.linear_forward") == 4, code
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)
