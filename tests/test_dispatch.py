"""How manualbp's Functions reach their operators: straight to the implementation in plain eager
code (ops._dispatch_free), through torch's dispatcher everywhere else, with the same results."""

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
def test_direct_and_dispatched_calls_agree_bitwise(kind, backend):
    torch.manual_seed(0)
    if kind.startswith("linear"):
        model = manualbp.Linear(7, 5, activation=kind.split("-")[1], dtype=torch.float64, backend=backend)
    else:
        model = manualbp.MLP([7, 6, 5], activation="gelu", recompute=kind == "mlp-recompute", dtype=torch.float64,
                             backend=backend)
    x, grad_out = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
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
    args = (plain, layer.weight, layer.bias, "gelu", 0.0, "z", "reference")
    assert ops._dispatch_free(args), "plain CPU tensors, nothing active"
    assert not ops._dispatch_free((plain.to("meta"),) + args[1:]), "meta"
    with torch.device("cpu"):  # a TorchFunctionMode
        assert not ops._dispatch_free(args), "function mode (default-device context)"
    with torch.autograd.forward_ad.dual_level():
        assert not ops._dispatch_free(args), "forward-mode level"
    with torch.profiler.profile():
        assert not ops._dispatch_free(args), "profiler: the operators must show in the trace"
    seen = []
    torch.func.vmap(lambda row: seen.append(ops._dispatch_free((row,) + args[1:])) or row)(plain)
    assert seen == [False], "inside torch.func.vmap"
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(plain)
        assert not ops._dispatch_free((fake,) + args[1:]), "fake tensor"


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
