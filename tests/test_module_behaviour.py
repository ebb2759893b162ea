"""Everyday nn.Module behaviour of manualbp.Linear and manualbp.MLP, next to nn.Linear's.

copy.deepcopy, pickle, torch.save/torch.load, .to(dtype), .half(), gradient
accumulation, zero_grad, eval/no_grad/inference_mode (nothing saved, no Z computed).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import manualbp
from checks import operator_calls
from manualbp import backends

RTOL, ATOL = 1e-10, 1e-12  # float64
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def models():
    """(name, manualbp model, the same model in plain PyTorch), float64, same weights."""
    torch.manual_seed(0)
    linear = manualbp.Linear(5, 4, activation="tanh", dtype=torch.float64)
    linear_ref = nn.Sequential(nn.Linear(5, 4, dtype=torch.float64), nn.Tanh())
    linear_ref[0].load_state_dict(linear.state_dict())
    mlp = manualbp.MLP([5, 6, 4], activation="gelu", recompute=True, dtype=torch.float64)
    mlp_ref = nn.Sequential(nn.Linear(5, 6, dtype=torch.float64), nn.GELU(), nn.Linear(6, 4, dtype=torch.float64))
    mlp_ref.load_state_dict(mlp.state_dict())
    return [("Linear", linear, linear_ref), ("MLP", mlp, mlp_ref)]


MODEL_NAMES = ["Linear", "MLP"]


def get(name):
    return next((m, ref) for n, m, ref in models() if n == name)


def x64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_deepcopy_pickle_and_torch_save(name):
    model, _ = get(name)
    x = x64(3, 5)
    expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "torch.save/load": torch.load(buffer, weights_only=False),  # a whole module, not a state_dict
    }
    for how, other in copies.items():
        assert type(other) is type(model), how
        assert repr(other) == repr(model), f"{how}: activation, backend and sizes survive"
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0, msg=lambda m: f"{how}: output\n{m}")
        for (key, p), q in zip(other.named_parameters(), model.parameters()):
            assert p is not q and p.data_ptr() != q.data_ptr(), f"{how}: {key} must be a copy"
        with torch.no_grad():
            next(other.parameters()).add_(1.0)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0, msg=lambda m: f"{how}: the original changed")
    # A state_dict survives torch.save/torch.load with weights_only=True (the safe default).
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = get(name)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_to_dtype_device_and_half(name):
    model, reference = get(name)
    x = x64(3, 5).to(DEVICE)
    assert model.to(DEVICE, torch.float32) is model
    reference.to(DEVICE, torch.float32)
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE.type for p in model.parameters()), ".to()"
    out = model(x.float())
    assert out.dtype == torch.float32 and out.device.type == DEVICE.type
    torch.testing.assert_close(out, reference(x.float()), rtol=1e-5, atol=1e-6)
    model.half()
    reference.half()
    assert all(p.dtype == torch.float16 for p in model.parameters()), ".half()"
    if backends.resolve(None, DEVICE, torch.float16) == "reference":
        try:
            torch.mm(torch.ones(2, 2, dtype=torch.float16, device=DEVICE), torch.ones(2, 2, dtype=torch.float16,
                                                                                     device=DEVICE))
        except RuntimeError as error:
            pytest.skip(f"this PyTorch has no float16 matmul on {DEVICE}: {error}")
    x16 = x.half().requires_grad_(True)
    out = model(x16)
    assert out.dtype == torch.float16
    # One rounding of each result to float16, as PyTorch's float16 layers do.
    torch.testing.assert_close(out, reference(x.half()), rtol=4e-3, atol=4e-3)
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float16 for p in model.parameters()), "float16 gradients"
    with pytest.raises(TypeError, match="dtype"):
        model(x.float())  # mixing dtypes is an error, as for nn.Linear


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradient_accumulation_and_zero_grad(name):
    model, reference = get(name)
    xs = [x64(3, 5), x64(2, 5), x64(4, 5)]
    for m in (model, reference):
        for x in xs:  # three backward calls without zero_grad: the gradients add up
            m(x).square().sum().backward()
    for (key, p), q in zip(model.named_parameters(), reference.parameters()):
        kind = "dw" if key.endswith("weight") else "db"
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"accumulated {kind} {key}\n{m}")
    # ... and equal the gradient of the summed loss.
    single, _ = get(name)
    sum(single(x).square().sum() for x in xs).backward()
    for (key, p), q in zip(model.named_parameters(), single.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL, msg=lambda m: f"summed loss {key}\n{m}")

    model.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters()), "zero_grad(set_to_none=False)"
    model(xs[0]).sum().backward()
    fresh, _ = get(name)
    fresh(xs[0]).sum().backward()
    for p, q in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=ATOL)
    model.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters()), "zero_grad(set_to_none=True)"


@pytest.fixture
def forward_calls():
    """Records the save argument of every layer forward (manualbp::linear_forward): "" for A only,
    "z" or "f_prime" for one more [M, N] tensor kept for the backward."""
    class Saves:
        def __init__(self, calls):
            self.calls = calls

        def values(self):
            return [args[5] for name, args in self.calls if name == "linear_forward"]

        def __iter__(self):
            return iter(self.values())

        def __bool__(self):
            return bool(self.values())

        def __repr__(self):
            return repr(self.values())

        def clear(self):
            self.calls.clear()

    with operator_calls() as calls:
        yield Saves(calls)


def count_saved(model, x):
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, count


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_no_grad_and_inference_mode_save_nothing(name, forward_calls):
    model, _ = get(name)  # tanh (saves A) and gelu (needs Z): Z only when a backward can follow
    x = x64(3, 5)
    out_train, saved = count_saved(model, x)
    assert saved > 0 and out_train.requires_grad, "a training forward saves for backward"
    if name == "MLP":
        assert any(forward_calls), "the GELU MLP (recompute=True) keeps Z for its backward"
    model.eval()
    out_eval, _ = count_saved(model, x)
    torch.testing.assert_close(out_eval, out_train, rtol=0, atol=0, msg=lambda m: f"eval() changes nothing\n{m}")
    forward_calls.clear()
    for label, context in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        with context():
            out, saved = count_saved(model, x)
        assert saved == 0, f"{label}: {saved} tensors saved for a backward that cannot happen"
        assert not out.requires_grad and out.grad_fn is None, f"{label}: output has a graph"
        assert forward_calls and not any(forward_calls), f"{label}: Z or f'(Z) was computed (save={forward_calls})"
        torch.testing.assert_close(out, out_train.detach(), rtol=0, atol=0, msg=lambda m: f"{label}: output\n{m}")
        forward_calls.clear()
    # Parameters that do not require grad, input neither: the same, without no_grad.
    for p in model.parameters():
        p.requires_grad_(False)
    out, saved = count_saved(model, x)
    assert saved == 0 and not out.requires_grad, "frozen model: nothing saved"
