"""Shipping without reverting: torch.export with dynamic shapes, decompositions, .pt2 files and ONNX.

Every manualbp operator has a decomposition into the reference backend's aten ops
(manualbp/ops.py), which torch.export's default table applies: ``run_decompositions()``
with no arguments leaves no manualbp node, the saved program runs where manualbp is not
installed, and ``torch.onnx.export(dynamo=True)`` needs nothing special. Eager code and
torch.compile keep running the operators themselves (tests/test_compile.py counts their
Triton launches). Each export costs seconds on two CPU cores: few models, small shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.utils._python_dispatch import TorchDispatchMode

import manualbp
from manualbp import backends, function, ops

from checks import assert_close_to_float64, operator_calls, optional_import


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test exports from a reset Dynamo, as a new process would: torch 2.7's strict export counts every export
    in a process against Dynamo's recompile limit (8), so its ninth fails, for plain nn.Linear + nn.GELU too."""
    torch._dynamo.reset()
    yield

OPS = torch.ops.manualbp
BACKENDS = ["reference", "triton"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def require(backend: str, dtype=torch.float32) -> None:
    reason = backends.triton_unavailable_reason(torch.device("cpu"), dtype)
    if backend == "triton" and reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    if ops.decompositions_unavailable() is not None:
        pytest.skip(f"no export decompositions on this PyTorch: {ops.decompositions_unavailable()}")


def three_layers(backend: str, dtype=torch.float32) -> nn.Sequential:
    """The issue's model: gelu, relu, identity."""
    torch.manual_seed(0)
    return nn.Sequential(
        manualbp.Linear(8, 16, activation="gelu", backend=backend, dtype=dtype),
        manualbp.Linear(16, 12, activation="relu", backend=backend, dtype=dtype),
        manualbp.Linear(12, 4, backend=backend, dtype=dtype),
    )


def with_mlp(backend: str) -> nn.Sequential:
    """Linear layers and an MLP (its own forward path, forward_stack) with every kind of saved tensor."""
    torch.manual_seed(1)
    return nn.Sequential(
        manualbp.Linear(8, 16, activation="gelu", backend=backend),
        manualbp.MLP([16, 12, 6], activation="silu", last_activation="tanh", backend=backend),
        manualbp.Linear(6, 4, backend=backend),
    )


def manualbp_nodes(program) -> list:
    return [str(node.target) for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if node.op == "call_function" and "manualbp" in str(node.target)]


def torch_twin(model: nn.Module) -> nn.Module:
    """The same model in plain PyTorch (nn.Linear + activation modules), for the float64 baseline."""
    return manualbp.revert(model, inplace=False)


# --------------------------------------------------------------------------------------
# torch.export with dynamic batch and sequence dimensions, decomposed
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_export_dynamic_batch_and_sequence_then_decompose(backend, strict):
    """[B, S, K] exported with B and S dynamic runs at three other sizes, before (bitwise the eager model) and
    after run_decompositions(), which leaves no manualbp node: the reference backend's aten ops."""
    require(backend)
    model = with_mlp(backend).train()  # parameters require grad: the forward still keeps nothing (below)
    example = torch.randn(2, 5, 8)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch"), 1: Dim("sequence")},),
                                  strict=strict)
    assert manualbp_nodes(program), "export keeps the manualbp operators (the Triton kernels run in .module())"
    decomposed = program.run_decompositions()
    assert manualbp_nodes(decomposed) == [], f"manualbp nodes left: {manualbp_nodes(decomposed)}"
    reference_model = with_mlp("reference")
    for shape in [(1, 1, 8), (3, 7, 8), (6, 2, 8)]:
        x = torch.randn(shape)
        with torch.no_grad():
            eager = model(x)
            torch.testing.assert_close(program.module()(x), eager, rtol=0, atol=0,
                                       msg=lambda m: f"exported {shape}: {m}")
            # The decomposition is the reference backend's computation, its non-core aten ops (silu) decomposed
            # further by PyTorch's own table: the reference's output up to float32 rounding.
            decomposed_output = decomposed.module()(x)
            torch.testing.assert_close(decomposed_output, reference_model(x), msg=lambda m: f"decomposed {shape}: {m}")
            plain = torch_twin(model)
            assert_close_to_float64(f"decomposed {shape} vs float64", decomposed_output, plain(x),
                                    plain.double()(x.double()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decomposed_program_trains_like_the_reverted_model(backend):
    """Decomposed, autograd differentiates the aten ops, as for the reverted model (the program itself trains
    through the operator's autograd formula: test_exported_program_trains_as_the_eager_model)."""
    require(backend)
    model = three_layers(backend).train()
    x = torch.randn(4, 8)
    program = torch.export.export(model, (x,))
    decomposed = program.run_decompositions().module()
    plain = torch_twin(model)
    for module in (decomposed, plain):
        module.zero_grad(set_to_none=True)
        module(x).square().sum().backward()
    for (name, ours), theirs in zip(decomposed.named_parameters(), plain.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, msg=lambda m: f"d{name}: {m}")


def _training_step(module, x):
    """(∂C/∂x, {name: ∂C/∂p}) of C = sum(module(x)²)."""
    module.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    module(leaf).square().sum().backward()
    return leaf.grad, {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


def require_exported_autograd():
    if function.EXPORTED_AUTOGRAD_UNAVAILABLE is not None:
        pytest.skip(f"no autograd formula for the exported operator: {function.EXPORTED_AUTOGRAD_UNAVAILABLE}")


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "first-layer-frozen"])
@pytest.mark.parametrize("model_kind", ["three_layers", "with_mlp"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_program_trains_as_the_eager_model(backend, model_kind, frozen):
    """ep = torch.export.export(model, (x,)); a backward through ep.module() (the operators, not decomposed) gives
    the eager model's gradients, and nn.Linear's exported twin's: each operator's autograd formula is the layer's
    own backward (manualbp/function.py), recomputing Z where the node asked for A only."""
    require(backend, torch.float64)
    require_exported_autograd()
    model = (three_layers if model_kind == "three_layers" else with_mlp)(backend).double().train()
    model[0].weight.requires_grad_(not frozen)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    assert manualbp_nodes(program), "the operators are in the program"
    twin = torch_twin(model)
    twin_program = torch.export.export(twin, (x,))
    ours_dx, ours = _training_step(program.module(), x)
    eager_dx, eager = _training_step(model, x)
    twin_dx, twin_grads = _training_step(twin_program.module(), x)
    assert set(ours) == set(eager), f"parameters with gradients: {sorted(ours)}, eager {sorted(eager)}"
    assert ("0.weight" in ours) == (not frozen), "a frozen weight gets no gradient"
    label = f"[{backend}, {model_kind}, frozen={frozen}]"
    torch.testing.assert_close(ours_dx, eager_dx, rtol=1e-12, atol=1e-12, msg=lambda m: f"dx vs eager {label}: {m}")
    torch.testing.assert_close(ours_dx, twin_dx, rtol=1e-10, atol=1e-12, msg=lambda m: f"dx vs nn {label}: {m}")
    for name in ours:
        torch.testing.assert_close(ours[name], eager[name], rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"d{name} vs eager {label}: {m}")
    # nn.Linear's twin: the same parameters under the reverted model's names (an MLP becomes an nn.Sequential).
    for (name, grad), twin_grad in zip(ours.items(), twin_grads.values()):
        torch.testing.assert_close(grad, twin_grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"d{name} vs nn {label}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_program_backward_recomputes_z_only_where_f_prime_needs_it(backend):
    """The exported nodes write A only; the backward of a gelu layer runs its forward operator once more for Z
    (f'(Z) on Triton), a relu or identity layer's does not (f' from A, or none): the one extra X Wᵀ per layer
    whose f' needs Z. The backward operators are the layer's own (manualbp::linear_backward)."""
    require(backend)
    require_exported_autograd()
    model = three_layers(backend).train()
    x = torch.randn(4, 8)
    module = torch.export.export(model, (x,)).module()
    out = module(x)
    with operator_calls() as calls:
        out.sum().backward()
    names = [name for name, _ in calls]
    expected_save = "f_prime" if backend == "triton" else "z"
    assert names.count("linear_backward") == 3, f"one linear_backward per layer: {names}"
    recomputed = [args[5] for name, args in calls if name == "linear_forward"]
    assert recomputed == [expected_save], f"forward recomputed for the gelu layer only, save={expected_save}: {calls}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_exported_program_double_backward(backend):
    """create_graph through ep.module(): gradgradcheck over the input, every activation kind of three_layers."""
    require(backend, torch.float64)
    require_exported_autograd()
    model = three_layers(backend, torch.float64).train()
    module = torch.export.export(model, (torch.randn(3, 8, dtype=torch.float64),)).module()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(module, (x,)), f"gradgradcheck through the exported program [{backend}]"


class EveryOperator(nn.Module):
    """Calls each of the seven operators once; x [M, K], weight [N, K] with N = K so that every saved fits."""

    def __init__(self, name: str, slope: float, backend: str):
        super().__init__()
        self.name, self.slope, self.backend = name, slope, backend
        activation = ops.activation(name, slope)
        self.kind = None if name == "identity" else ("a" if activation.saves_output else "z")

    def forward(self, x, weight, bias, grad_a, tangent_x, tangent_weight):
        name, slope, backend, kind = self.name, self.slope, self.backend, self.kind
        a, z = OPS.linear_forward(x, weight, bias, name, slope, "z", backend)
        outputs = [a, z]
        if name == "gelu":
            outputs.append(OPS.linear_forward(x, weight, bias, name, slope, "f_prime", backend)[1])
        saved = None if kind is None else (a if kind == "a" else z)
        kind = kind or "z"
        outputs += OPS.linear_backward(grad_a, x, weight, saved, name, slope, kind, [True, True, True], backend)
        outputs.append(OPS.linear_jvp(x, weight, saved, tangent_x, tangent_weight, bias, name, slope, kind, backend))
        outputs.append(OPS.activation_forward(z, name, slope, backend))
        outputs += OPS.delta(grad_a, saved, name, slope, kind, True, True, backend)
        outputs.append(OPS.matmul(grad_a.t(), x, backend))
        outputs += OPS.matmul_times_activation_grad(grad_a, weight, saved, name, slope, kind, True, backend)
        return tuple(outputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,slope", [("gelu", 0.0), ("relu", 0.0), ("identity", 0.0)])
def test_every_operator_decomposes_to_the_reference(backend, name, slope):
    """Each operator's decomposition computes what the reference backend computes and what the Triton kernel
    computes, up to float64 rounding; nothing of manualbp is left in the decomposed program."""
    require(backend, torch.float64)
    torch.manual_seed(2)
    inputs = [torch.randn(*shape, dtype=torch.float64) for shape in ((5, 6), (6, 6), (6,), (5, 6), (5, 6), (6, 6))]
    module = EveryOperator(name, slope, backend)
    program = torch.export.export(module, tuple(inputs))
    assert len(set(manualbp_nodes(program))) == 7, f"all seven operators exported: {manualbp_nodes(program)}"
    decomposed = program.run_decompositions()
    assert manualbp_nodes(decomposed) == [], f"manualbp nodes left: {manualbp_nodes(decomposed)}"
    ours = decomposed.module()(*inputs)
    on_reference = EveryOperator(name, slope, "reference")(*inputs)
    on_backend = module(*inputs)
    assert len(ours) == len(on_reference)
    for index, (got, want, kernel) in enumerate(zip(ours, on_reference, on_backend)):
        # run_decompositions also decomposes the reference's non-core aten ops (f' of gelu: ndtr, addcmul)
        # into core ones, whose rounding differs: equal to float64 rounding, as tests/checks.py allows.
        bound = 64 * torch.finfo(torch.float64).eps * max(1.0, want.abs().max().item() if want.numel() else 0.0)
        torch.testing.assert_close(got, want, rtol=0, atol=bound, msg=lambda m: f"output {index} vs reference: {m}")
        torch.testing.assert_close(got, kernel, rtol=0, atol=bound, msg=lambda m: f"output {index} vs {backend}: {m}")


def test_eager_code_never_runs_the_decomposition():
    """Outside torch.export the decomposition declines, and a training step dispatches the operators themselves."""
    require("reference")
    x, weight, bias = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    arguments = (x, weight, bias, "gelu", 0.0, "z", "reference")
    assert OPS.linear_forward.default.decompose(*arguments) is NotImplemented, "decompose outside export"

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    model = three_layers("reference")
    with Calls() as calls:
        model(torch.randn(3, 8)).sum().backward()
    called = set(calls.names)
    assert {"manualbp.linear_forward.default", "manualbp.linear_backward.default"} <= called, called
    assert not called & {"aten.addmm.default", "aten.mm.default", "aten.gelu.default"}, called


# --------------------------------------------------------------------------------------
# Inference-only export keeps nothing for a backward
# --------------------------------------------------------------------------------------


def _saves(program) -> list:
    """The save argument of every linear_forward node."""
    return [node.args[5] for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if node.target is torch.ops.manualbp.linear_forward.default]


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("mode", ["train", "eval", "no_grad"])
def test_exported_forward_keeps_nothing_for_backward(mode, strict):
    """Like nn.Linear's export (one aten.linear per layer whatever requires grad), the exported layers ask the
    operator for A only: no Z or f'(Z) (save=''), in train and eval mode, with and without no_grad."""
    require("triton")
    model = with_mlp("triton")  # f'(Z) would be saved for gelu on the Triton backend, Z for leaky_relu < 0
    model.train(mode == "train")
    plain = torch_twin(model).train(mode == "train")
    x = torch.randn(2, 3, 8)
    context = torch.no_grad() if mode == "no_grad" else torch.enable_grad()
    with context:
        program = torch.export.export(model, (x,), strict=strict)
        baseline = torch.export.export(plain, (x,), strict=strict)
    saves = _saves(program)
    assert len(saves) == 4 and set(saves) == {""}, f"linear_forward save arguments: {saves}"
    linears = [n for n in baseline.graph_module.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == len(saves), f"nn.Linear's export: {len(linears)} aten.linear for {len(saves)} layers"
    # Nothing but A is read from any operator (the graph names the [0] placeholder output, reads it nowhere).
    for node in program.graph_module.graph.nodes:
        if node.target is torch.ops.manualbp.linear_forward.default:
            used = {user.args[1] for user in node.users if user.users}
            assert used == {0}, f"{node}: outputs used {used}"


# --------------------------------------------------------------------------------------
# The saved program runs without manualbp
# --------------------------------------------------------------------------------------

_LOAD_AND_RUN = """
import sys
sys.modules["manualbp"] = None  # any import of manualbp now raises ImportError: it cannot be needed silently
import torch
program = torch.export.load(sys.argv[1])
io = torch.load(sys.argv[2])
for x, expected in zip(io["inputs"], io["outputs"]):
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)
loaded = sorted(name for name in sys.modules if name.startswith("manualbp."))
assert not loaded, f"manualbp was imported: {loaded}"
print("ran", len(io["inputs"]), "inputs without manualbp")
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_program_runs_in_a_process_without_manualbp(backend, tmp_path):
    require(backend)
    model = with_mlp(backend).eval()
    program = torch.export.export(model, (torch.randn(2, 5, 8),),
                                  dynamic_shapes=({0: Dim("batch"), 1: Dim("sequence")},)).run_decompositions()
    torch.export.save(program, tmp_path / "model.pt2")
    inputs = [torch.randn(shape) for shape in [(1, 1, 8), (4, 9, 8)]]
    with torch.no_grad():
        outputs = [program.module()(x) for x in inputs]
        # The file holds what the reference backend computes (the decomposition), the same program either backend.
        for x, output in zip(inputs, outputs):
            torch.testing.assert_close(output, with_mlp("reference")(x), msg=lambda m: f"saved program: {m}")
    torch.save({"inputs": inputs, "outputs": outputs}, tmp_path / "io.pt")
    # From a directory without manualbp, and with manualbp made unimportable inside the process.
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(tmp_path / "model.pt2"), str(tmp_path / "io.pt")],
                            capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=300)
    assert result.returncode == 0, f"fresh process failed:\n{result.stdout}\n{result.stderr}"
    assert "without manualbp" in result.stdout


# --------------------------------------------------------------------------------------
# ONNX: torch.onnx.export(dynamo=True), checked in onnxruntime
# --------------------------------------------------------------------------------------


def _onnx_packages():
    for package in ("onnx", "onnxscript", "onnxruntime"):
        optional_import(package, f"ONNX export tests need {package} (pip install onnx onnxscript onnxruntime)")
    import onnxruntime
    return onnxruntime


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_export_runs_in_onnxruntime(backend, dtype, tmp_path):
    """torch.onnx.export(model, args, dynamo=True) with a dynamic batch axis, nothing special passed: the ONNX
    graph holds standard operators only, and onnxruntime's output matches PyTorch's at other batch sizes
    (float32 within 1e-5; float16 by the rule of tests/checks.py: ONNX Runtime's error against float64 at most
    twice PyTorch's own, plus 4 ulps)."""
    require(backend)
    onnxruntime = _onnx_packages()
    model = three_layers(backend, dtype).eval()
    example = torch.randn(3, 8, dtype=dtype)
    exported = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: Dim("batch")},), verbose=False)
    domains = {node.domain for node in exported.model_proto.graph.node}
    assert domains <= {""}, f"ONNX node domains: {domains} (a custom domain would need manualbp in the runtime)"
    path = tmp_path / "model.onnx"
    exported.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    for batch in (1, 5, 17):
        x = torch.randn(batch, 8, dtype=dtype)
        (result,) = session.run(None, {input_name: x.numpy()})
        result = torch.from_numpy(result)
        with torch.no_grad():
            expected = model(x)
            if dtype == torch.float32:
                torch.testing.assert_close(result, expected, rtol=0, atol=1e-5,
                                           msg=lambda m: f"onnxruntime, batch {batch}: {m}")
            else:
                exact = torch_twin(model).double()(x.double())
                assert_close_to_float64(f"onnxruntime float16, batch {batch}", result, expected, exact)


# --------------------------------------------------------------------------------------
# The legacy tracer: torch.onnx.export(dynamo=False), torch.jit.trace; torch.jit.script
# --------------------------------------------------------------------------------------


def every_activation(backend: str) -> nn.Sequential:
    """A layer per activation (leaky_relu with a negative slope too) and an MLP: every forward path."""
    torch.manual_seed(6)
    layers = [manualbp.Linear(8, 8, activation=name, backend=backend) for name in manualbp.ACTIVATIONS]
    layers.append(manualbp.Linear(8, 8, activation="leaky_relu", negative_slope=-0.3, backend=backend))
    layers.append(manualbp.MLP([8, 12, 6], activation="gelu_tanh", last_activation="silu", backend=backend))
    return nn.Sequential(*layers)


def _traced_kinds(graph) -> list:
    return [node.kind() for node in graph.nodes() if node.kind().startswith("aten::")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_legacy_onnx_export_computes_the_model(backend, tmp_path):
    """torch.onnx.export(..., dynamo=False) traces: the graph holds Gemm and each activation's ONNX operators, the
    same operator list as nn.Linear's model, and onnxruntime's output matches the model's at other batch sizes."""
    require(backend)
    optional_import("onnx", "legacy ONNX export tests need onnx (pip install onnx)")
    onnxruntime = optional_import("onnxruntime", "legacy ONNX export tests need onnxruntime")
    import onnx

    model = every_activation(backend).train()  # parameters require grad: the layers' Functions are not traced
    twin = torch_twin(model)
    example = torch.randn(3, 8)
    paths = {}
    for label, module in (("manualbp", model), ("nn", twin)):
        paths[label] = str(tmp_path / f"{label}.onnx")
        torch.onnx.export(module, (example,), paths[label], dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    operators = {label: [node.op_type for node in onnx.load(path).graph.node] for label, path in paths.items()}
    assert operators["manualbp"] == operators["nn"], f"ONNX operators {operators['manualbp']}, nn {operators['nn']}"
    assert operators["manualbp"].count("Gemm") == 11, f"a Gemm per layer: {operators['manualbp']}"
    session = onnxruntime.InferenceSession(paths["manualbp"], providers=["CPUExecutionProvider"])
    for batch in (1, 5, 17):
        x = torch.randn(batch, 8)
        (result,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(result), model(x), rtol=0, atol=1e-5,
                                       msg=lambda m: f"onnxruntime, legacy export, batch {batch}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_trace_computes_the_model_on_other_inputs(backend):
    """torch.jit.trace records nn.Linear's aten ops (linear and the activation), passes its own check (the
    graph is the same on every invocation), and the trace computes the model at other shapes; its backward
    is aten autograd's, with the model's gradients."""
    require(backend, torch.float64)
    model = every_activation(backend).double().train()
    twin = torch_twin(model)
    traced = torch.jit.trace(model, (torch.randn(2, 5, 8, dtype=torch.float64),))
    twin_traced = torch.jit.trace(twin, (torch.randn(2, 5, 8, dtype=torch.float64),))
    kinds, twin_kinds = _traced_kinds(traced.inlined_graph), _traced_kinds(twin_traced.inlined_graph)
    assert kinds == twin_kinds, f"traced aten ops {kinds}, nn.Linear's {twin_kinds}"
    for shape in [(1, 1, 8), (3, 7, 8), (4, 8)]:
        x = torch.randn(shape, dtype=torch.float64)
        leaf, eager_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, expected = traced(leaf), model(eager_leaf)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"trace at {shape}: {m}")
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(leaf.grad, eager_leaf.grad, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"trace's dx at {shape}: {m}")


@pytest.mark.parametrize("model_kind", ["Linear", "MLP", "converted"])
def test_jit_script_is_a_clear_error(model_kind):
    """torch.jit.script cannot compile the layers' Python forward: an error naming the ways that work, before any
    compilation; the reverted model scripts and computes the same."""
    torch.manual_seed(7)
    if model_kind == "Linear":
        model = manualbp.Linear(8, 4, activation="gelu")
    elif model_kind == "MLP":
        model = manualbp.MLP([8, 6, 4])
    else:
        model = manualbp.convert(nn.Sequential(nn.Linear(8, 6), nn.SiLU(), nn.Linear(6, 4)))
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile manualbp.Linear") as caught:
        torch.jit.script(model)
    for way in ("torch.export.export", "dynamo=True", "torch.jit.trace", "manualbp.revert"):
        assert way in str(caught.value), f"the error names {way}"
    scripted = torch.jit.script(manualbp.revert(model, inplace=False))
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), msg=lambda m: f"scripted reverted {model_kind}: {m}")
