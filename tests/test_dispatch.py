"""How manualbp's Functions reach their operators: straight to the implementation in plain eager
code (ops.dispatch_free: ops.direct), through torch's dispatcher everywhere else (ops.dispatched), with the
same results."""

import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import manualbp
from manualbp import function, mlp_function, ops
from manualbp.function import LinearFunction
from manualbp.mlp_function import MLPFunction

from checks import operator_calls

BACKENDS = ["reference", "triton"]


class _PassThrough(TorchDispatchMode):
    """A dispatch mode that changes nothing: with it active every operator call goes through the dispatcher."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _train_step(model, x, grad_out):
    for p in model.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    out = model(x)
    out.backward(grad_out)
    return out.detach(), x.grad, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear-gelu", "linear-relu", "linear-identity", "mlp", "mlp-recompute"])
def test_direct_and_dispatched_calls_agree_bitwise(kind, backend, device):
    torch.manual_seed(0)
    if kind.startswith("linear"):
        model = manualbp.Linear(7, 5, activation=kind.split("-")[1], dtype=torch.float64, backend=backend,
                                device=device)
    else:
        model = manualbp.MLP([7, 6, 5], activation="gelu", recompute=kind == "mlp-recompute", dtype=torch.float64,
                             backend=backend, device=device)
    x = torch.randn(3, 7, dtype=torch.float64, device=device)
    grad_out = torch.randn(3, 5, dtype=torch.float64, device=device)
    direct = _train_step(model, x, grad_out)
    with _PassThrough():
        dispatched = _train_step(model, x, grad_out)
    assert torch.equal(direct[0], dispatched[0]), "a"
    assert torch.equal(direct[1], dispatched[1]), "dx"
    for index, (ours, theirs) in enumerate(zip(direct[2], dispatched[2])):
        assert torch.equal(ours, theirs), f"parameter {index} (dw, db)"


def test_plain_eager_skips_the_dispatcher_and_modes_do_not():
    layer = manualbp.Linear(4, 3, activation="gelu", backend="reference")
    x = torch.randn(2, 4, requires_grad=True)
    with operator_calls() as calls:  # a dispatch mode: the operators are seen
        layer(x).sum().backward()
    names = [str(call) for call in calls]
    assert any("linear_forward" in name for name in names), f"forward through the dispatcher: {names}"
    assert any("linear_backward" in name for name in names), f"backward through the dispatcher: {names}"

    plain = torch.randn(2, 4)
    args = (plain, layer.weight, layer.bias)
    assert ops.dispatch_free(args), "plain CPU tensors, nothing active"
    assert not ops.dispatch_free((plain.to("meta"),) + args[1:]), "meta"
    with torch.device("cpu"):  # a TorchFunctionMode
        assert not ops.dispatch_free(args), "function mode (default-device context)"
    with torch.autograd.forward_ad.dual_level():
        assert not ops.dispatch_free(args), "forward-mode level"
    with torch.profiler.profile():
        assert not ops.dispatch_free(args), "profiler: the operators must show in the trace"
    seen = []
    torch.func.vmap(lambda row: seen.append(ops.dispatch_free((row,) + args[1:])) or row)(plain)
    assert seen == [False], "inside torch.func.vmap"
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(plain)
        assert not ops.dispatch_free((fake,) + args[1:]), "fake tensor"


def _refuse(*args, **kwargs):
    raise AssertionError("plain eager code took the dispatched route")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_plain_eager_takes_the_direct_route(kind, monkeypatch):
    """Forward and backward of a plain CPU layer call ops.direct only: the saving cannot silently vanish."""
    for name in ("linear_forward", "linear_backward", "activation_forward", "delta", "matmul",
                 "matmul_times_activation_grad"):
        monkeypatch.setattr(ops.dispatched, name, _refuse)
    torch.manual_seed(0)
    model = (manualbp.Linear(5, 4, activation="gelu", backend="reference") if kind == "linear"
             else manualbp.MLP([5, 4, 3], activation="gelu", backend="reference"))
    x = torch.randn(3, 5, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model.weight.grad is not None if kind == "linear" else x.grad is not None, "dx"


def _as_subclass(t):
    return t.as_subclass(_Marked)


class _Marked(torch.Tensor):
    """A tensor subclass without behaviour of its own: only its type differs from a plain tensor."""


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_backward_checks_what_saved_tensor_hooks_return(kind, monkeypatch):
    """A saved-tensor hook may hand back another kind of tensor than was saved: the backward then takes the
    dispatcher (it rechecks every saved tensor), and the gradients are the same as without the hook."""
    if ops._top_saved_hooks is not None:
        assert ops.saved_unchanged(), "no hooks: saved tensors come back as saved"
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert not ops.saved_unchanged(), "inside saved_tensors_hooks"
    torch.manual_seed(0)
    model = (manualbp.Linear(5, 4, activation="gelu", dtype=torch.float64, backend="reference")
             if kind == "linear" else manualbp.MLP([5, 4, 3], activation="gelu", dtype=torch.float64,
                                                   backend="reference"))
    x = torch.randn(3, 5, dtype=torch.float64)
    plain = _train_step(model, x, torch.ones(3, 4 if kind == "linear" else 3, dtype=torch.float64))
    dispatched = []
    original = ops.dispatched.linear_backward

    def counting(*args):
        dispatched.append(args)
        return original(*args)

    monkeypatch.setattr(ops.dispatched, "linear_backward", counting)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, _as_subclass):
        hooked = _train_step(model, x, torch.ones(3, 4 if kind == "linear" else 3, dtype=torch.float64))
    assert dispatched, "the backward of a hooked layer went through the dispatcher"
    assert torch.equal(plain[1], hooked[1].as_subclass(torch.Tensor)), "dx"
    for index, (ours, theirs) in enumerate(zip(plain[2], hooked[2])):
        assert torch.equal(ours, theirs.as_subclass(torch.Tensor)), f"parameter {index} (dw, db)"


def test_profiler_shows_the_operators():
    layer = manualbp.Linear(4, 3, activation="gelu", backend="reference")
    x = torch.randn(2, 4, requires_grad=True)
    with torch.profiler.profile() as profile:
        layer(x).sum().backward()
    names = {event.name for event in profile.events()}
    assert "manualbp::linear_forward" in names and "manualbp::linear_backward" in names, sorted(names)[:40]


@pytest.mark.parametrize("cls", [LinearFunction, MLPFunction])
def test_forwards_take_no_defaults(cls):
    """function.apply skips Function.apply's binding of default arguments: there must be none to bind."""
    parameters = inspect.signature(cls.forward).parameters.values()
    assert all(p.default is inspect.Parameter.empty for p in parameters), f"{cls.__name__}.forward has defaults"
    assert mlp_function.mlp_function() is MLPFunction and function.linear_function() is LinearFunction
