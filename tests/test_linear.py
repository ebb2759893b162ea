"""manualbp.functional.linear against autograd: gradcheck, gradgradcheck and nn.Linear agreement."""

import pytest
import torch

import manualbp
from manualbp import functional as F

from checks import compare_with_pytorch, run_and_grad, torch_dense

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)

BACKENDS = ["triton", "reference"]
ACTIVATIONS = list(manualbp.ACTIVATIONS)

# (leading dims of the input, in_features K, out_features N): odd sizes, 1-D, 3-D,
# empty batch, the smallest layer, sizes just past the interpreter's 32-wide tiles,
# no input features, no output features.
SHAPES = [
    ((7,), 5, 3),
    ((), 5, 3),
    ((2, 3), 5, 4),
    ((0,), 5, 3),
    ((1,), 1, 1),
    ((33,), 37, 35),
    ((5,), 0, 3),
    ((4,), 6, 0),
]


def _make(lead, k, n, dtype, bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    weight = (torch.randn(n, k, generator=g, dtype=torch.float64) / max(k, 1) ** 0.5).to(dtype=dtype, device=device)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) if bias else None
    grad_out = torch.randn(*lead, n, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    return x, weight, b, grad_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck(activation, bias, backend, device):
    x, weight, b, _ = _make((4,), 5, 3, torch.float64, bias, device=device)
    inputs = [t.requires_grad_(True) for t in (x, weight, b) if t is not None]

    def fn(*args):
        x, w = args[0], args[1]
        return F.linear(x, w, args[2] if bias else None, activation, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs), f"gradcheck {activation} {backend}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck(activation, bias, backend, device):
    x, weight, b, _ = _make((3,), 4, 3, torch.float64, bias, seed=1, device=device)
    inputs = [t.requires_grad_(True) for t in (x, weight, b) if t is not None]

    def fn(*args):
        return F.linear(args[0], args[1], args[2] if bias else None, activation, backend=backend)

    assert torch.autograd.gradgradcheck(fn, inputs), f"gradgradcheck {activation} {backend}"


@pytest.mark.parametrize("slope", [0.2, -0.3, 0.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_leaky_relu_slopes_gradcheck(slope, backend, device):
    """Slopes >= 0 save A, a negative slope saves Z: both must be right."""
    x, weight, b, _ = _make((6,), 4, 5, torch.float64, seed=2, device=device)
    inputs = [t.requires_grad_(True) for t in (x, weight, b)]
    fn = lambda x, w, b: F.linear(x, w, b, "leaky_relu", negative_slope=slope, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs), f"gradcheck leaky_relu slope={slope} {backend}"
    grad_out = torch.ones(6, 5, dtype=torch.float64, device=device)
    ours = run_and_grad(fn, x.detach(), weight.detach(), b.detach(), grad_out)
    theirs = run_and_grad(lambda x, w, b: torch_dense(x, w, b, "leaky_relu", slope), x.detach(), weight.detach(),
                          b.detach(), grad_out)
    for label, o, t in zip(("out", "dx", "dw", "db"), ours, theirs):
        torch.testing.assert_close(o, t, rtol=1e-12, atol=1e-12, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}->{s[2]}")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_pytorch_float32(activation, backend, shape, device):
    lead, k, n = shape
    x, weight, b, grad_out = _make(lead, k, n, torch.float32, device=device)
    out, *_ = compare_with_pytorch(x, weight, b, activation, grad_out, backend)
    assert out.shape == (*lead, n), "out shape"


def _half_dtypes():
    # The interpreter cannot compute in bfloat16; CUDA covers both.
    return [torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.float16]


@pytest.mark.parametrize("dtype", _half_dtypes(), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_pytorch_half(activation, backend, dtype, device):
    x, weight, b, grad_out = _make((37,), 40, 36, dtype, device=device)
    compare_with_pytorch(x, weight, b, activation, grad_out, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_reference_on_cpu(backend):
    """bfloat16 on the CPU: the reference backend computes it; triton must refuse it in the interpreter."""
    x, weight, b, grad_out = _make((9,), 8, 7, torch.bfloat16)
    if backend == "triton" and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="bfloat16"):
            F.linear(x, weight, b, "gelu", backend="triton")
        return_value = F.linear(x, weight, b, "gelu", backend="auto")  # auto picks reference
        assert return_value.dtype == torch.bfloat16, "auto on bf16 CPU tensors runs (reference)"
    else:
        compare_with_pytorch(x, weight, b, "gelu", grad_out, "reference")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "sigmoid", "identity"])
def test_non_contiguous_input_and_grad(activation, backend, device):
    """Transposed and sliced inputs, weight and grad_output: handled through strides."""
    g = torch.Generator().manual_seed(3)
    x_store = torch.randn(9, 11, generator=g).to(device)  # x = x_store.t(): [11, 9], transposed
    w_store = torch.randn(14, 9, generator=g).to(device)  # weight = w_store[::2]: [7, 9], row stride 18
    b_store = torch.randn(14, generator=g).to(device)  # bias = b_store[::2]
    grad_store = torch.randn(7, 11, generator=g).to(device)  # grad = grad_store.t()

    def view(fn):
        return lambda xs, ws, bs: fn(xs.t(), ws[::2], bs[::2])

    ours = run_and_grad(view(lambda x, w, b: F.linear(x, w, b, activation, backend=backend)),
                        x_store, w_store, b_store, grad_store.t())
    theirs = run_and_grad(view(lambda x, w, b: torch_dense(x.double(), w.double(), b.double(), activation)),
                          x_store, w_store, b_store, grad_store.t().double())
    for label, o, t in zip(("out", "dx", "dw", "db"), ours, theirs):
        torch.testing.assert_close(o.double(), t.double(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_stride_zero_grad_output(activation, backend, device):
    """y.sum().backward() hands the backward an expanded (stride 0) gradient."""
    x, weight, b, _ = _make((2, 5), 6, 4, torch.float64, device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, b)]
    F.linear(*leaves, activation, backend=backend).sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (x, weight, b)]
    torch_dense(*ref, activation).sum().backward()
    for label, o, t in zip(("dx", "dw", "db"), leaves, ref):
        torch.testing.assert_close(o.grad, t.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_gives_zero_parameter_grads(backend, device):
    x = torch.empty(0, 5, device=device, requires_grad=True)
    layer = manualbp.Linear(5, 3, activation="gelu", backend=backend, device=device)
    out = layer(x)
    assert out.shape == (0, 3), "out shape"
    out.sum().backward()
    assert x.grad.shape == (0, 5), "dx shape"
    assert torch.equal(layer.weight.grad, torch.zeros(3, 5, device=device)), "dw is zero for an empty batch"
    assert torch.equal(layer.bias.grad, torch.zeros(3, device=device)), "db is zero for an empty batch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_input_without_grad(backend, device):
    x, weight, b, grad_out = _make((6,), 5, 4, torch.float64, device=device)
    # Frozen weight and bias: only dx.
    xl = x.clone().requires_grad_(True)
    F.linear(xl, weight, b, "tanh", backend=backend).backward(grad_out)
    xr = x.clone().requires_grad_(True)
    torch_dense(xr, weight, b, "tanh").backward(grad_out)
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"dx: {m}")
    # Input without grad, bias frozen: only dw.
    wl = weight.clone().requires_grad_(True)
    F.linear(x, wl, b, "tanh", backend=backend).backward(grad_out)
    wr = weight.clone().requires_grad_(True)
    torch_dense(x, wr, b, "tanh").backward(grad_out)
    torch.testing.assert_close(wl.grad, wr.grad, rtol=1e-12, atol=1e-12, msg=lambda m: f"dw: {m}")


def test_needs_input_grad_skips_work(monkeypatch, device):
    """The triton backward launches only the matmuls that are needed, and no δ pass beside them, except where a
    frozen weight keeps Z for f' (for a double backward, see manualbp/function.py): then a δ pass from Z."""
    dense = manualbp.backends.kernels()
    calls = []
    real_launch, real_delta = dense._launch_matmul, dense.delta_and_bias_grad

    def launch(a, b, out, **kwargs):  # the shapes of the product's factors, a given transposed or not
        calls.append((tuple(a.shape)[::-1] if kwargs.get("a_transposed") else tuple(a.shape),
                      tuple(b.shape)[::-1] if kwargs.get("b_transposed") else tuple(b.shape)))
        return real_launch(a, b, out, **kwargs)

    def delta_pass(*args, **kwargs):
        calls.append("delta pass")
        return real_delta(*args, **kwargs)

    monkeypatch.setattr(dense, "_launch_matmul", launch)
    monkeypatch.setattr(dense, "delta_and_bias_grad", delta_pass)
    x, weight, b, grad_out = _make((6,), 5, 4, torch.float32, device=device)

    def run(x_grad, w_grad, b_grad, activation="gelu"):
        leaves = [x.clone().requires_grad_(x_grad), weight.clone().requires_grad_(w_grad),
                  b.clone().requires_grad_(b_grad)]
        out = F.linear(*leaves, activation, backend="triton")
        calls.clear()
        out.backward(grad_out)
        return list(calls)

    assert run(True, False, False, "tanh") == [((6, 4), (4, 5))], "frozen weight, f' from A: only dx = delta W"
    assert run(True, False, False) == ["delta pass", ((6, 4), (4, 5))], "frozen weight, gelu: δ from Z, dx = delta W"
    assert run(False, True, False) == [((4, 6), (6, 5))], "input without grad: only dw = delta^T x"
    assert run(False, False, True) == ["delta pass"], "bias only: no matmul, one reading pass for db"
    assert run(True, True, True) == [((6, 4), (4, 5)), ((4, 6), (6, 5))], "all three: two matmuls, db from dw's"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_inference_save_nothing(backend, device):
    layer = manualbp.Linear(5, 4, activation="gelu", backend=backend, device=device)
    x = torch.randn(3, 5, device=device, requires_grad=True)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            out = layer(x)
        assert out.grad_fn is None and not out.requires_grad, "no_grad: no graph"
        with torch.inference_mode():
            out = layer(x)
        assert out.is_inference(), "inference_mode output"
    assert packed == [], "nothing saved for backward without grad"
    # With grad: beyond references to x and the parameters, only Z [3, 4] is kept, as nn.Linear + nn.GELU does.
    def activation_bytes(module):
        return manualbp.saved_bytes(module, x, count_inputs=False)

    eager = torch.nn.Sequential(torch.nn.Linear(5, 4, device=device), torch.nn.GELU())
    eager[0].weight, eager[0].bias = layer.weight, layer.bias
    assert activation_bytes(layer) == 3 * 4 * 4, "with grad: Z [3, 4] float32 saved, nothing else new"
    assert activation_bytes(layer) == activation_bytes(eager), "saved bytes equal nn.Linear + nn.GELU"


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_accumulate_like_nn_linear(backend, device):
    torch.manual_seed(0)
    ours = manualbp.Linear(4, 3, activation="relu", backend=backend, device=device, dtype=torch.float64)
    ref = torch.nn.Linear(4, 3, device=device, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    for step in range(3):
        x = torch.randn(5, 4, device=device, dtype=torch.float64)
        ours(x).square().sum().backward()
        torch.relu(ref(x)).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, msg=lambda m: f"dw accumulated: {m}")
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, msg=lambda m: f"db accumulated: {m}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_forward_is_bitwise_pytorch(activation):
    """The reference forward is addmm + PyTorch's own activation: bitwise nn.Linear + activation."""
    x, weight, b, _ = _make((2, 9), 13, 11, torch.float32)
    ours = F.linear(x, weight, b, activation, backend="reference")
    theirs = torch_dense(x.reshape(18, 13), weight, b, activation).reshape(2, 9, 11)
    assert torch.equal(ours, theirs), f"out [{activation}] bitwise"


@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_saves_what_nn_linear_saves(activation, backend, device):
    """With a frozen weight nn.Linear keeps no copy of x for ∂C/∂W; neither does manualbp."""
    x = torch.randn(6, 5, device=device, requires_grad=True)
    layer = manualbp.Linear(5, 4, activation=activation, backend=backend, device=device).requires_grad_(False)
    eager = torch.nn.Sequential(torch.nn.Linear(5, 4, device=device).requires_grad_(False))
    if activation != "identity":
        eager.append(torch.nn.GELU() if activation == "gelu" else torch.nn.ReLU())
    eager[0].load_state_dict(layer.state_dict())
    # x is a non-leaf here, as in a real network, so that keeping it would cost memory.
    h = x * 1.0
    ours, theirs = manualbp.saved_bytes(layer, h), manualbp.saved_bytes(eager, h)
    assert ours == theirs, f"saved bytes with a frozen weight: {ours} vs nn.Linear's {theirs}"
    (ours_dx,) = torch.autograd.grad(layer(h).sum(), x, retain_graph=True)
    (theirs_dx,) = torch.autograd.grad(eager(h).sum(), x)
    torch.testing.assert_close(ours_dx, theirs_dx, msg=lambda m: f"dx with a frozen weight: {m}")


@pytest.mark.parametrize("activation", ["identity", "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_with_frozen_weight_from_output(activation, backend, device):
    """x not kept: f' comes from the output A, which the graph connects to x."""
    x, weight, b, _ = _make((3,), 4, 3, torch.float64, seed=4, device=device)
    x.requires_grad_(True)
    fn = lambda x: F.linear(x, weight, b, activation, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,)), f"gradgradcheck frozen weight {activation} {backend}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_backward_has_no_delta_pass(activation, monkeypatch, device):
    """On the Triton backend a layer's backward forms δ inside its two matmuls (f' from A or from the
    f'(Z) its forward wrote): no elementwise pass over [M, N]. MANUALBP_DELTA_PROLOGUE=0 brings the
    pass back, for A/B timing; both give the same gradients."""
    dense = manualbp.backends.kernels()
    passes = []
    real_delta = dense.delta_and_bias_grad
    monkeypatch.setattr(dense, "delta_and_bias_grad", lambda *a, **k: passes.append(1) or real_delta(*a, **k))
    x, weight, b, grad_out = _make((2, 35), 33, 37, torch.float64, device=device)
    results = {}
    for prologue in ("1", "0"):
        passes.clear()
        with manualbp.config.override(delta_prologue=prologue == "1"):
            results[prologue] = run_and_grad(lambda *t: F.linear(*t, activation, backend="triton"), x, weight, b,
                                             grad_out)
        expected = [] if prologue == "1" else [1]
        assert passes == expected, f"[{activation}] delta_prologue={prologue == '1'}: δ passes {passes}"
    for label, ours, other in zip(("out", "dx", "dw", "db"), results["1"], results["0"]):
        torch.testing.assert_close(ours, other, rtol=1e-12, atol=1e-12, msg=lambda m: f"{label} [{activation}]: {m}")


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("activation,slope", [("gelu", None), ("silu", None), ("relu", None), ("leaky_relu", -0.3)])
def test_what_each_backend_keeps_for_f_prime(activation, slope, frozen, device):
    """reference keeps Z (PyTorch's fused kernels take Z), triton keeps f'(Z) (one multiply in the backward)
    except where f' is a select on Z (leaky_relu < 0) or the weight is frozen (Z, for a double backward); both
    keep A where f' comes from it. Same bytes."""
    x, weight, b, _ = _make((4,), 5, 3, torch.float64, device=device)
    weight.requires_grad_(not frozen)
    options = {} if slope is None else {"negative_slope": slope}
    act = manualbp.get_activation(activation, **options)
    z = torch.nn.functional.linear(x, weight, b)
    kept = {}
    for backend in BACKENDS:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = F.linear(x.requires_grad_(True), weight, b, act, backend=backend)
        big = [t for t in saved if t.shape == (4, 3)]
        assert len(big) == 1, f"[{activation} {backend}] one [M, N] tensor kept, got {len(big)}"
        kept[backend] = big[0].detach()
        if act.saves_output:
            assert torch.equal(kept[backend], out.detach()), f"[{activation} {backend}] keeps A"
    if not act.saves_output:
        torch.testing.assert_close(kept["reference"], z, rtol=0, atol=0, msg=lambda m: f"reference keeps Z: {m}")
        expected = z if activation == "leaky_relu" or frozen else act.f_grad(z)
        torch.testing.assert_close(kept["triton"], expected, rtol=1e-12, atol=1e-13,
                                   msg=lambda m: f"triton keeps Z or f'(Z) [{activation}, frozen={frozen}]: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_input_adds_no_view_nodes(backend, device):
    """A 2-D input goes to the Function as it is: the graph holds the layer's node and nothing around it
    (each reshape would add a node to every forward and backward); other shapes are flattened and restored."""
    x, weight, b, _ = _make((6,), 5, 4, torch.float64, device=device)
    out = F.linear(x.requires_grad_(True), weight, b, "relu", backend=backend)
    assert type(out.grad_fn).__name__ == "LinearFunctionBackward", f"2-D: {type(out.grad_fn).__name__}"
    assert out.grad_fn.next_functions[0][0].variable is x, "2-D: the node's input is x itself"
    x3, _, _, _ = _make((2, 3), 5, 4, torch.float64, device=device)
    out3 = F.linear(x3.requires_grad_(True), weight, b, "relu", backend=backend)
    assert out3.shape == (2, 3, 4) and type(out3.grad_fn).__name__.startswith(("View", "Reshape", "Unsafe")), (
        f"3-D: flattened and restored, got {type(out3.grad_fn).__name__}"
    )
    mlp = manualbp.MLP([5, 7, 4], backend=backend, dtype=torch.float64, device=device)
    assert type(mlp(x).grad_fn).__name__ == "MLPFunctionBackward", "MLP, 2-D: no view node"


@pytest.mark.parametrize("activation", ["gelu", "relu", "leaky_relu", "tanh"])
def test_either_backend_takes_either_saved_kind(activation, device):
    """manualbp::linear_backward is told what it gets (A, Z or f'(Z)); each backend gives the same gradients
    from each."""
    act = manualbp.get_activation(activation)
    x, weight, _, grad_a = _make((9,), 7, 5, torch.float64, device=device)
    z = torch.nn.functional.linear(x, weight)
    delta = grad_a * act.f_grad(z)
    expected = (delta @ weight, delta.t() @ x, delta.sum(0))
    kinds = {"z": z, "f_prime": act.f_grad(z)}
    if act.saves_output:
        kinds["a"] = act.f(z)
    for backend in BACKENDS:
        for kind, saved in kinds.items():
            grads = torch.ops.manualbp.linear_backward(grad_a, x, weight, saved, activation, 0.01, kind,
                                                       [True, True, True], backend)
            for label, ours, exact in zip(("dx", "dw", "db"), grads, expected):
                torch.testing.assert_close(ours, exact, rtol=1e-12, atol=1e-12,
                                           msg=lambda m: f"{label} [{activation}, {backend}, saved {kind}]: {m}")
    with pytest.raises(ValueError, match="saved_kind must be one of"):
        torch.ops.manualbp.linear_backward(grad_a, x, weight, z, activation, 0.01, "output", [True, True, True],
                                           "reference")
