"""Special values as nn.Linear + the PyTorch activation gives them: NaN, ±inf, ±0, overflow, subnormals.

One matrix: activation × (backend, dtype) × entry point (functional.linear, Linear, MLP with
and without recompute, the fused and the per-layer MLP backward) × where the special values
sit (the pre-activation Z, the incoming gradient G, the input, the weight, the bias).

Each case is compared with PyTorch on the same inputs, in the same dtype, on the same device:

- the non-finite pattern exactly: NaN where PyTorch has NaN (never a finite number from a
  NaN), +inf and -inf where it has them;
- identity and relu (PyTorch's result is a select): bitwise
  for every output that is elementwise in the cases built so (the forward A, and ∂C/∂X
  where one product makes each entry); the sign of zero too on the reference backend.
  On the triton backend zeros are compared by value: the sign of a zero that a matmul
  sums (Z = X Wᵀ + b, ∂C/∂X = δ W) is the matmul's own, and the tiled kernel, which
  pads K with +0.0 terms, gives +0.0 where PyTorch's CPU BLAS keeps -0.0;
- everything else on the finite entries by the rule of tests/checks.py (error against
  PyTorch in float64 at most twice PyTorch's own, plus a few ulps).

One PyTorch value is not taken as the target: PyTorch's CPU gelu in float32 and bfloat16
evaluates erf with a vectorised approximation that is NaN at +inf, so there gelu(+inf)
is NaN, where its float64 and float16 CPU kernels and its CUDA kernel give +inf (the
formula z/2 (1 + erf(z/√2)) at z = +inf). The Triton kernels run the same code on the
GPU and (interpreted) on the CPU and follow CUDA; so for the triton backend on a CPU,
the expected gelu(+inf) is +inf (``pytorch_gelu_like_cuda``). The reference backend
calls PyTorch's gelu and is compared with it unchanged.

The "z" and "grad" cases use one input and one output feature with weight 1 and bias -0.0,
so that Z = X exactly (x + -0.0 = x, signs of zero included) and ∂C/∂X = δ exactly: what
reaches f and f' is the chosen special value itself, on both backends, and what comes
back is δ = G ⊙ f'(Z) itself.
"""

from __future__ import annotations

import math

import pytest
import torch

import manualbp
from checks import assert_close_to_float64, torch_activation

NAN, INF = float("nan"), float("inf")

# The Triton interpreter evaluates in numpy, which warns at every inf - inf, 0 * inf and overflow: here on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:overflow encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:Using backward\\(\\) with create_graph=True:UserWarning",  # the create_graph case: the cycle is harmless here
)

BACKEND_DTYPES = [
    ("reference", torch.float64), ("reference", torch.float32), ("reference", torch.float16),
    ("reference", torch.bfloat16), ("triton", torch.float64), ("triton", torch.float32),
    ("triton", torch.float16), ("triton", torch.bfloat16),
]
# PyTorch's result is a select here: equal bit for bit, not just close. (leaky_relu's negative side
# is a product whose rounding in half precision depends on the precision the slope is held in.)
EXACT = ("identity", "relu")
# Where e^|z| overflows (and erf saturates) in the dtype the activation is computed in.
OVERFLOW = {torch.float64: 710.0, torch.float32: 88.0, torch.bfloat16: 88.0, torch.float16: 11.0}


def special_z(dtype: torch.dtype) -> list:
    """Pre-activations: NaN, ±inf, ±0, each side of the exp overflow, subnormals, ordinary values."""
    big = OVERFLOW[dtype]
    subnormal = torch.finfo(dtype).smallest_normal / 4
    return [NAN, INF, -INF, 0.0, -0.0, big, -big, big + 1, -(big + 1), subnormal, -subnormal, 1.0, -1.0, 0.5, -3.0]


def special_grad(dtype: torch.dtype) -> list:
    """Incoming gradients: NaN, ±inf, ±0, a subnormal, ordinary values."""
    return [NAN, INF, -INF, 0.0, -0.0, torch.finfo(dtype).smallest_normal / 4, 1.0, -2.5]


def _ordinary(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def make_case(where: str, dtype: torch.dtype, device, layers: int):
    """(x [M, K], weights, biases, grad [M, N]) with the special values at ``where``.

    "z": Z = X holds every special value (one feature, weight 1, bias -0.0); G ordinary.
    "grad": Z crosses 0 (ordinary values and ±0), G holds every special value, each with each Z.
    "input" / "weight" / "bias": ordinary values, a few entries of that tensor NaN, ±inf, subnormal.
    A stack (layers = 2) repeats the one-feature layer, or draws an ordinary second layer.
    """
    def t(values):
        return torch.tensor(values, dtype=dtype, device=device)

    if where in ("z", "grad"):
        if where == "z":
            zs = special_z(dtype)
            grads = [1.5, -0.75, 2.0] * math.ceil(len(zs) / 3)
            grads = grads[:len(zs)]
        else:
            z_values = [-2.0, -0.5, -0.0, 0.0, 0.5, 2.0]
            grad_values = special_grad(dtype)
            zs = [z for z in z_values for _ in grad_values]
            grads = [g for _ in z_values for g in grad_values]
        x = t(zs)[:, None]
        weights = [t([[1.0]]) for _ in range(layers)]
        biases = [t([-0.0]) for _ in range(layers)]
        return x, weights, biases, t(grads)[:, None]

    sizes = [4, 3, 2][: layers + 1]  # one layer 4 -> 3, or a stack 4 -> 3 -> 2
    x = _ordinary((5, sizes[0]), dtype, 0).to(device)
    weights = [_ordinary((sizes[i + 1], sizes[i]), dtype, 1 + i).to(device) for i in range(layers)]
    biases = [_ordinary((sizes[i + 1],), dtype, 10 + i).to(device) for i in range(layers)]
    grad = _ordinary((5, sizes[-1]), dtype, 20).to(device)
    subnormal = torch.finfo(dtype).smallest_normal / 4
    if where == "input":
        x[0, 1], x[2, 0], x[3, 3], x[4, 2] = NAN, INF, -INF, subnormal
    elif where == "weight":
        weights[0][0, 1], weights[0][1, 0], weights[0][2, 2] = NAN, INF, -INF
    elif where == "bias":
        biases[0][0], biases[0][1], biases[0][2] = NAN, -INF, subnormal
    else:
        raise AssertionError(where)
    return x, weights, biases, grad


def pytorch_gelu_like_cuda(z: torch.Tensor) -> torch.Tensor:
    """PyTorch's gelu, with +inf where its CPU float32/bfloat16 kernel gives NaN at z = +inf (see the top)."""
    return torch.where(z == INF, z, torch.nn.functional.gelu(z))


def torch_stack(x, weights, biases, activation, gelu_like_cuda=False):
    """The baseline: nn.functional.linear + the PyTorch activation, layer by layer -> (out, weights, biases)."""
    h = x
    for weight, bias in zip(weights, biases):
        z = torch.nn.functional.linear(h, weight, bias)
        h = pytorch_gelu_like_cuda(z) if gelu_like_cuda and activation == "gelu" else torch_activation(activation, z)
    return h, weights, biases


def run(fn, x, weights, biases, grad, create_graph=False):
    """(out, dx, [dw...], [db...]) of fn(x, weights, biases), backward with grad; all detached.

    fn returns (out, the weight tensors, the bias tensors) whose .grad to read (a module's parameters).
    """
    x = x.detach().clone().requires_grad_(True)
    weights = [w.detach().clone().requires_grad_(True) for w in weights]
    biases = [b.detach().clone().requires_grad_(True) for b in biases]
    out, weights, biases = fn(x, weights, biases)
    out.backward(grad, create_graph=create_graph)
    detach = lambda t: t.detach() if t is not None else None  # noqa: E731
    return out.detach(), detach(x.grad), [detach(w.grad) for w in weights], [detach(b.grad) for b in biases]


def assert_like_pytorch(label: str, ours, theirs, exact64, bitwise: bool, zero_sign: bool = True) -> None:
    """Non-finite pattern exactly; then bitwise (sign of zero too unless not zero_sign), or close on the finite entries."""
    assert ours is not None, f"{label}: gradient missing"
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (
        f"{label}: {tuple(ours.shape)} {ours.dtype}, expected {tuple(theirs.shape)} {theirs.dtype}"
    )
    ours, theirs, exact64 = ours.cpu(), theirs.cpu(), exact64.cpu()
    for name, mask in (("NaN", torch.isnan), ("+inf", lambda v: v == INF), ("-inf", lambda v: v == -INF)):
        if not torch.equal(mask(ours), mask(theirs)):
            where = (mask(ours) != mask(theirs)).nonzero().tolist()
            raise AssertionError(
                f"{label}: {name} pattern differs from PyTorch's at {where}: ours {ours[tuple(zip(*where))].tolist()}, "
                f"PyTorch {theirs[tuple(zip(*where))].tolist()}"
            )
    finite = torch.isfinite(theirs)
    if bitwise:
        # Same value and same sign of zero: compare the bits (NaN payloads and signs are not compared).
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
        differ = (ours.view(as_int) != theirs.view(as_int)) & finite
        if not zero_sign:
            differ &= ours != theirs  # +0.0 == -0.0
        assert not differ.any(), (
            f"{label}: not bitwise PyTorch's at {differ.nonzero().tolist()}: ours {ours[differ].tolist()}, "
            f"PyTorch {theirs[differ].tolist()}"
        )
        return
    # Entries that are finite here but overflow in float64 arithmetic (or the reverse) have no float64 yardstick.
    mask = finite & torch.isfinite(exact64)
    assert_close_to_float64(label, ours[mask], theirs[mask], exact64[mask])


# Entry points: (name, layers, MANUALBP_MLP_FUSION, recompute). The fused/per-layer MLP backward
# differ on the triton backend only (the reference has one per-layer backward). "create_graph" is
# functional.linear's backward with create_graph=True (for a double backward): differentiable
# torch ops and the formulas of manualbp/activations.py instead of the kernels.
PATHS = [
    ("functional", 1, None, None),
    ("create_graph", 1, None, None),
    ("Linear", 1, None, None),
    ("MLP", 2, "1", False),
    ("MLP", 2, "1", True),
    ("MLP-per-layer", 2, "0", False),
    ("MLP-per-layer", 2, "0", True),
]
WHERE = ("z", "grad", "input", "weight", "bias")


def _path_id(path):
    name, _, _, recompute = path
    return name if recompute is None else f"{name}-recompute{int(recompute)}"


def _load(layers, weights, biases):
    """Copy the case's parameters into the layers; -> (their weights, their biases), whose .grad the test reads."""
    with torch.no_grad():
        for layer, weight, bias in zip(layers, weights, biases):
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
    return [layer.weight for layer in layers], [layer.bias for layer in layers]


def manualbp_fn(path, activation: str, backend: str):
    """fn(x, weights, biases) for one entry point."""
    name, layers, _, recompute = path

    def functional(x, weights, biases):
        return manualbp.functional.linear(x, weights[0], biases[0], activation, backend=backend), weights, biases

    def module(x, weights, biases):
        layer = manualbp.Linear(weights[0].shape[1], weights[0].shape[0], bias=True, activation=activation,
                                dtype=x.dtype, device=x.device, backend=backend)
        weights, biases = _load([layer], weights, biases)
        return layer(x), weights, biases

    def stack(x, weights, biases):
        sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights]
        mlp = manualbp.MLP(sizes, activation=activation, last_activation=activation, recompute=recompute,
                           dtype=x.dtype, device=x.device, backend=backend)
        weights, biases = _load(mlp.layers, weights, biases)
        return mlp(x), weights, biases

    return {"functional": functional, "create_graph": functional, "Linear": module}.get(name, stack)


# The reference backend has one MLP backward (per layer), so MANUALBP_MLP_FUSION=0 is a triton case only.
# functional.linear and the fused MLP are in the subset CI runs on every stack (pyproject.toml, "stacks").
CASES = [
    pytest.param(backend, dtype, path, id=f"{backend}-{str(dtype)[6:]}-{_path_id(path)}",
                 marks=[pytest.mark.stacks] if path in (PATHS[0], PATHS[3]) else [])
    for backend, dtype in BACKEND_DTYPES
    for path in PATHS
    if not (backend == "reference" and path[2] == "0")
]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("backend,dtype,path", CASES)
@pytest.mark.parametrize("activation", manualbp.ACTIVATIONS)
def test_special_values_like_pytorch(activation, backend, dtype, path, where, device, monkeypatch):
    name, layers, fusion, recompute = path
    if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("the Triton interpreter cannot compute bfloat16")
    if fusion is not None:
        monkeypatch.setenv("MANUALBP_MLP_FUSION", fusion)
    x, weights, biases, grad = make_case(where, dtype, device, layers)

    ours = run(manualbp_fn(path, activation, backend), x, weights, biases, grad, create_graph=name == "create_graph")
    on_cpu_triton = backend == "triton" and device.type == "cpu"
    baseline = lambda x, w, b: torch_stack(x, w, b, activation, gelu_like_cuda=on_cpu_triton)  # noqa: E731
    theirs = run(baseline, x, weights, biases, grad)
    to64 = lambda ts: [t.double() for t in ts]  # noqa: E731
    exact = run(baseline, x.double(), to64(weights), to64(biases), grad.double())

    tag = f"[{activation}, {backend}, {str(dtype)[6:]}, {_path_id(path)}, special {where}]"
    # One feature in and out: A and ∂C/∂X are elementwise (∂C/∂X = δ · 1), so bitwise where f is exact.
    elementwise = where in ("z", "grad")
    bitwise = activation in EXACT and elementwise
    zero_sign = backend == "reference"  # see the top: a matmul's zero sum is +0.0 in the Triton kernels
    assert_like_pytorch(f"out {tag}", ours[0], theirs[0], exact[0], bitwise, zero_sign)
    assert_like_pytorch(f"dx {tag}", ours[1], theirs[1], exact[1], bitwise, zero_sign)
    for index in range(layers):
        assert_like_pytorch(f"dw{index} {tag}", ours[2][index], theirs[2][index], exact[2][index], False)
        assert_like_pytorch(f"db{index} {tag}", ours[3][index], theirs[3][index], exact[3][index], False)
