"""manualbp.MLP: one autograd node over a stack of dense layers.

Checked against an nn.Sequential of nn.Linear and PyTorch activation modules
built here by hand (not with MLP.to_sequential), in float64; the Triton backend
runs through the interpreter on the CPU, so its shapes stay small.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manualbp
from manualbp import backends

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)

TORCH_ACTIVATIONS = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
}

# float64: the same sums in another order differ by a few ulps.
RTOL, ATOL = 1e-10, 1e-12
# The GPU where there is one (compiled kernels), else the CPU (the kernels through the interpreter).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require(backend: str, dtype=torch.float64, device=DEVICE) -> None:
    if backend == "triton":
        reason = backends.triton_unavailable_reason(device, dtype)
        if reason is not None:
            pytest.skip(f"triton backend unavailable: {reason}")


def activation(name: str):
    return manualbp.get_activation(name, negative_slope=0.2) if name == "leaky_relu" else name


def torch_sequential(sizes, hidden: str, last: str, bias=True, dtype=torch.float64, device=DEVICE) -> nn.Sequential:
    """nn.Sequential(Linear, act, Linear, act, ..., Linear[, last act]): the eager PyTorch MLP."""
    modules = []
    for index in range(len(sizes) - 1):
        modules.append(nn.Linear(sizes[index], sizes[index + 1], bias=bias, dtype=dtype, device=device))
        if index < len(sizes) - 2:
            modules.append(TORCH_ACTIVATIONS[hidden]())
        elif last != "identity":
            modules.append(TORCH_ACTIVATIONS[last]())
    return nn.Sequential(*modules)


def run(model, x, grad_output):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.backward(grad_output)
    return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}


def assert_same_training_step(mlp, sequential, x, label):
    grad_output = torch.randn(*x.shape[:-1], mlp.sizes[-1], dtype=x.dtype, device=x.device)
    out, dx, grads = run(mlp, x, grad_output)
    out_ref, dx_ref, grads_ref = run(sequential, x, grad_output)
    torch.testing.assert_close(out, out_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{label}: output\n{m}")
    torch.testing.assert_close(dx, dx_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{label}: dx\n{m}")
    assert set(grads) == set(grads_ref), f"{label}: parameter names {sorted(grads)} vs {sorted(grads_ref)}"
    for name in grads:
        kind = "dw" if name.endswith("weight") else "db"
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"{label}: {kind} of {name}\n{m}")


ACTIVATION_PAIRS = [("gelu", "identity"), ("relu", "sigmoid"), ("silu", "tanh"), ("leaky_relu", "gelu_tanh"),
                    ("identity", "relu")]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("hidden,last", ACTIVATION_PAIRS)
def test_mlp_matches_torch_sequential(backend, recompute, hidden, last):
    require(backend)
    sizes = [5, 7, 6, 3]
    torch.manual_seed(0)
    mlp = manualbp.MLP(sizes, activation=activation(hidden), last_activation=activation(last), recompute=recompute,
                       dtype=torch.float64, device=DEVICE, backend=backend)
    sequential = torch_sequential(sizes, hidden, last)
    sequential.load_state_dict(mlp.state_dict())  # the same keys: 0.weight, 0.bias, 2.weight, ...
    x = torch.randn(2, 4, sizes[0], dtype=torch.float64, device=DEVICE)  # leading dimensions are flattened and restored
    assert_same_training_step(mlp, sequential, x, f"{backend} {hidden}/{last} recompute={recompute}")


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("hidden,last", ACTIVATION_PAIRS)
def test_reference_mlp_is_bitwise_eager(recompute, hidden, last):
    """float32 on the CPU: the reference MLP runs eager's kernels in eager's order (a recomputed A is
    f of the kept Z, as the forward's was), so output and every gradient are bitwise nn.Sequential's."""
    sizes = [9, 17, 13, 5]
    torch.manual_seed(0)
    mlp = manualbp.MLP(sizes, activation=activation(hidden), last_activation=activation(last), recompute=recompute,
                       backend="reference")
    sequential = torch_sequential(sizes, hidden, last, dtype=torch.float32, device="cpu")
    sequential.load_state_dict(mlp.state_dict())
    x = torch.randn(11, sizes[0])
    grad_output = torch.randn(11, sizes[-1])
    out, dx, grads = run(mlp, x, grad_output)
    out_ref, dx_ref, grads_ref = run(sequential, x, grad_output)
    assert torch.equal(out, out_ref), f"out [{hidden}/{last}] bitwise"
    assert torch.equal(dx, dx_ref), f"dx [{hidden}/{last}] bitwise"
    for name in grads:
        kind = "dw" if name.endswith("weight") else "db"
        assert torch.equal(grads[name], grads_ref[name]), f"{kind} of {name} [{hidden}/{last}] bitwise"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mlp_without_bias_single_layer_and_frozen_layers(backend):
    require(backend)
    torch.manual_seed(1)
    one = manualbp.MLP([4, 3], last_activation="tanh", bias=False, dtype=torch.float64, device=DEVICE,
                       backend=backend)
    assert [name for name, _ in one.named_parameters()] == ["0.weight"]
    sequential = torch_sequential([4, 3], "gelu", "tanh", bias=False)
    sequential.load_state_dict(one.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64, device=DEVICE)
    assert_same_training_step(one, sequential, x, f"{backend} one layer, no bias")

    # Frozen first layer and an input without grad: only the last layer gets gradients, and they are right.
    mlp = manualbp.MLP([4, 6, 5, 2], activation="gelu", recompute=True, dtype=torch.float64, device=DEVICE,
                       backend=backend)
    sequential = torch_sequential([4, 6, 5, 2], "gelu", "identity")
    sequential.load_state_dict(mlp.state_dict())
    for p in (*mlp.layers[0].parameters(), *sequential[0].parameters()):
        p.requires_grad_(False)
    x = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    grad_output = torch.randn(3, 2, dtype=torch.float64, device=DEVICE)
    mlp(x).backward(grad_output)
    sequential(x).backward(grad_output)
    for (name, p), (_, q) in zip(mlp.named_parameters(), sequential.named_parameters()):
        if name.startswith("0."):
            assert p.grad is None, f"frozen {name} got a gradient"
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"{backend} {name}\n{m}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_recompute_gives_the_same_gradients(backend):
    require(backend, torch.float32)
    torch.manual_seed(2)
    keep = manualbp.MLP([8, 16, 16, 4], activation="gelu", last_activation="silu", device=DEVICE, backend=backend)
    again = manualbp.MLP([8, 16, 16, 4], activation="gelu", last_activation="silu", recompute=True, device=DEVICE,
                         backend=backend)
    again.load_state_dict(keep.state_dict())
    x = torch.randn(6, 8, device=DEVICE)
    grad_output = torch.randn(6, 4, device=DEVICE)
    out, dx, grads = run(keep, x, grad_output)
    out2, dx2, grads2 = run(again, x, grad_output)
    assert torch.equal(out, out2), "output: recompute changes only the backward"
    # float32: the stored Z is the forward's Z exactly and both backends recompute A with
    # the same f as their forward, so recompute gives bitwise the same gradients.
    tolerance = dict(rtol=0, atol=0)
    torch.testing.assert_close(dx2, dx, **tolerance, msg=lambda m: f"dx\n{m}")
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], **tolerance, msg=lambda m: f"{name}\n{m}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_mlp_double_backward(backend, recompute):
    require(backend)
    torch.manual_seed(3)
    mlp = manualbp.MLP([3, 4, 2], activation="gelu", last_activation="tanh", recompute=recompute,
                       dtype=torch.float64, device=DEVICE, backend=backend)
    layers = mlp.layers
    activations = [layer.activation for layer in layers]

    def f(x, w0, b0, w1, b1):
        return manualbp.mlp.mlp(x, [w0, w1], [b0, b1], activations, recompute=recompute, backend=backend)

    inputs = [torch.randn(2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)]
    inputs += [p.detach().clone().requires_grad_(True) for p in (layers[0].weight, layers[0].bias,
                                                                  layers[1].weight, layers[1].bias)]
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_saved_bytes_against_torch_sequential(backend):
    require(backend, torch.float32)
    sizes = [16, 64, 64, 16] if backend == "triton" else [64, 256, 256, 64]
    rows = 64 if backend == "triton" else 512
    torch.manual_seed(4)
    x = torch.randn(rows, sizes[0], device=DEVICE, requires_grad=True)
    eager = manualbp.saved_bytes(torch_sequential(sizes, "gelu", "identity", dtype=torch.float32), x)
    keep = manualbp.saved_bytes(manualbp.MLP(sizes, activation="gelu", device=DEVICE, backend=backend), x)
    recompute = manualbp.saved_bytes(manualbp.MLP(sizes, activation="gelu", recompute=True, device=DEVICE, backend=backend), x)
    # eager keeps X, then per hidden layer Z (for GELU's backward) and A (the next Linear's input);
    # recompute=True keeps X and each hidden Z. Exact counts: a saved tensor that escaped the
    # saved-tensor hooks (stored on ctx) would show up here as missing bytes.
    element = x.element_size()
    hidden = sum(sizes[1:-1])
    assert eager == element * rows * (sizes[0] + 2 * hidden), f"the measurement itself: eager saved {eager} bytes"
    assert keep == eager, f"recompute=False saved {keep} bytes, eager {eager}"
    assert recompute == element * rows * (sizes[0] + hidden), f"recompute=True saved {recompute} bytes"
    assert recompute <= 0.6 * eager, f"recompute=True saved {recompute / eager:.3f} x eager's {eager} bytes"

    # Without recompute, the same as eager for any activation; with it, never more.
    for activation in ("relu", "tanh", "silu", "identity"):
        eager = manualbp.saved_bytes(torch_sequential(sizes, activation, "identity", dtype=torch.float32), x)
        keep = manualbp.saved_bytes(manualbp.MLP(sizes, activation=activation, device=DEVICE, backend=backend), x)
        again = manualbp.saved_bytes(manualbp.MLP(sizes, activation=activation, recompute=True, device=DEVICE, backend=backend),
                            x)
        assert keep == eager, f"{activation}: recompute=False saved {keep} bytes, eager {eager}"
        assert again <= eager, f"{activation}: recompute=True saved {again} bytes, more than eager's {eager}"


def test_state_dict_round_trip_with_torch_sequential():
    sizes = [5, 8, 8, 2]
    # Same seed, same construction order: the same initial weights as the nn.Sequential.
    torch.manual_seed(5)
    mlp = manualbp.MLP(sizes, activation="silu", last_activation="sigmoid", dtype=torch.float64)
    torch.manual_seed(5)
    sequential = torch_sequential(sizes, "silu", "sigmoid", device="cpu")
    assert list(mlp.state_dict()) == list(sequential.state_dict()), "state_dict keys"
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, sequential.state_dict()[key]), f"initial {key}"

    # nn.Sequential -> MLP and MLP -> nn.Sequential, strict loads.
    trained = torch_sequential(sizes, "silu", "sigmoid", device="cpu")
    mlp.load_state_dict(trained.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), trained(x), rtol=RTOL, atol=ATOL)
    target = torch_sequential(sizes, "silu", "sigmoid", device="cpu")
    target.load_state_dict(mlp.state_dict())
    for key, value in target.state_dict().items():
        assert torch.equal(value, trained.state_dict()[key]), f"{key} after the round trip"

    # to_sequential: plain PyTorch modules, copies of the parameters, same outputs and keys.
    converted = mlp.to_sequential()
    assert [type(m) for m in converted] == [type(m) for m in trained], "to_sequential's modules"
    assert all(type(m) is nn.Linear for m in converted if isinstance(m, nn.Linear)), "to_sequential: plain nn.Linear"
    torch.testing.assert_close(converted(x), mlp(x), rtol=RTOL, atol=ATOL)
    with torch.no_grad():
        converted[0].weight.add_(1.0)
    assert not torch.equal(converted[0].weight, mlp.layers[0].weight), "to_sequential must copy the parameters"


def test_mlp_structure_and_repr():
    mlp = manualbp.MLP([3, 4, 5, 2], activation="relu", last_activation="tanh", recompute=True, backend="reference")
    assert mlp.sizes == (3, 4, 5, 2)
    assert [layer.activation.name for layer in mlp.layers] == ["relu", "relu", "tanh"]
    assert [(layer.in_features, layer.out_features) for layer in mlp.layers] == [(3, 4), (4, 5), (5, 2)]
    assert all(isinstance(layer, manualbp.Linear) for layer in mlp.layers)
    assert "recompute=True" in repr(mlp) and "backend='reference'" in repr(mlp)
    leaky = manualbp.MLP([3, 4, 2], activation=manualbp.get_activation("leaky_relu", negative_slope=0.3))
    assert leaky.layers[0].activation.negative_slope == 0.3


def test_mlp_bad_arguments():
    with pytest.raises(ValueError, match="at least"):
        manualbp.MLP([4])
    with pytest.raises(ValueError, match="non-negative integers"):
        manualbp.MLP([4, -1, 2])
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        manualbp.MLP([4, 3, 2], activation="swish")
    with pytest.raises(ValueError, match="unknown backend"):
        manualbp.MLP([4, 2], backend="cuda")
    mlp = manualbp.MLP([4, 3, 2], backend="reference")
    with pytest.raises(ValueError, match="last dimension is 5"):
        mlp(torch.randn(2, 5))
    with pytest.raises(TypeError, match="dtype"):
        mlp(torch.randn(2, 4, dtype=torch.float64))
    mlp.layers[1].weight = nn.Parameter(torch.randn(2, 7))  # no longer fits layer 0's output
    with pytest.raises(ValueError, match="layer 1: weight must have shape"):
        mlp(torch.randn(2, 4))
    with pytest.raises(ValueError, match="one weight, one bias"):
        manualbp.mlp.mlp(torch.randn(2, 4), [torch.randn(3, 4)], [], ["relu"])


@pytest.mark.parametrize("fusion", [True, False], ids=["fused", "mlp_fusion=False"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("needs", ["all", "bias-only-below", "frozen-middle"])
def test_triton_backward_fuses_each_lower_delta_into_a_matmul(recompute, needs, fusion, monkeypatch):
    """On the Triton kernels only the top layer's δ is a separate elementwise pass; every lower δ
    (and its ∂C/∂b) comes out of the epilogue of the matmul δₗ Wₗ. Gradients equal nn.Sequential's,
    and so do those of the per-layer path that the setting mlp_fusion=False selects."""
    require("triton", torch.float64)
    manualbp.config.set(mlp_fusion=fusion)  # restored after the test (conftest)
    dense = backends.kernels()
    calls = {"delta": 0, "fused": 0}
    real_delta, real_fused = dense.delta_and_bias_grad, dense.matmul_times_activation_grad

    def count(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dense, "delta_and_bias_grad", count("delta", real_delta))
    monkeypatch.setattr(dense, "matmul_times_activation_grad", count("fused", real_fused))
    torch.manual_seed(7)
    sizes = [5, 9, 7, 6, 3]
    mlp = manualbp.MLP(sizes, activation="silu", last_activation="sigmoid", recompute=recompute,
                       dtype=torch.float64, device=DEVICE, backend="triton")
    mlp.layers[1].activation = manualbp.get_activation("identity")  # an identity layer inside the stack
    sequential = mlp.to_sequential()
    if needs == "bias-only-below":
        for model in (mlp, sequential):
            model.get_submodule("0").weight.requires_grad_(False)
    if needs == "frozen-middle":
        for model in (mlp, sequential):
            model.get_submodule("2").requires_grad_(False)
    x = torch.randn(11, 5, dtype=torch.float64, device=DEVICE)
    grad_output = torch.randn(11, 3, dtype=torch.float64, device=DEVICE)
    out, dx, grads = run(mlp, x, grad_output)
    out_ref, dx_ref, grads_ref = run(sequential, x, grad_output)
    layers = len(sizes) - 1  # in every case each layer below the top needs its δ (for a dW, a db or dx)
    # Per layer (MANUALBP_MLP_FUSION=0): a δ pass where f' comes from Z and is not a select (the two silu
    # layers, and the sigmoid under recompute); the identity layer and the sigmoid from A form δ in their matmuls.
    expected = {"delta": 1, "fused": layers - 1} if fusion else {"delta": 3 if recompute else 2, "fused": 0}
    assert calls == expected, f"δ passes {calls}, expected {expected}"
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"dx: {m}")
    for name in grads:
        if grads_ref[name] is None:
            assert grads[name] is None, f"{name}: frozen, no gradient"
            continue
        kind = "dw" if name.endswith("weight") else "db"
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{kind} {name}: {m}")
