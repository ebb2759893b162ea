"""Activation checkpointing: torch.utils.checkpoint.checkpoint(..., use_reentrant=False) around manualbp layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import manualbp
from checks import operator_calls
from manualbp import backends


# The GPU where there is one (compiled kernels), else the CPU (the kernels through the interpreter).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def require(backend: str, dtype=torch.float64) -> None:
    if backend == "triton":
        reason = backends.triton_unavailable_reason(DEVICE, dtype)
        if reason is not None:
            pytest.skip(f"triton backend unavailable: {reason}")


class Net(nn.Module):
    def __init__(self, backend, recompute, use_checkpoint):
        super().__init__()
        self.block = nn.Sequential(manualbp.Linear(6, 8, activation="silu", backend=backend),
                                   manualbp.Linear(8, 8, activation="relu", backend=backend))
        self.mlp = manualbp.MLP([8, 8, 8, 3], activation="gelu", recompute=recompute, backend=backend)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        if self.use_checkpoint:
            h = checkpoint(self.block, x, use_reentrant=False)
            return checkpoint(self.mlp, h, use_reentrant=False)
        return self.mlp(self.block(x))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_checkpoint_gives_the_same_gradients(backend, recompute, monkeypatch):
    require(backend)
    torch.manual_seed(0)
    plain = Net(backend, recompute, use_checkpoint=False).double().to(DEVICE)
    checkpointed = Net(backend, recompute, use_checkpoint=True).double().to(DEVICE)
    checkpointed.load_state_dict(plain.state_dict())

    x = torch.randn(2, 3, 6, dtype=torch.float64, device=DEVICE)
    grad_output = torch.randn(2, 3, 3, dtype=torch.float64, device=DEVICE)
    results = []
    for model in (plain, checkpointed):
        x_ = x.clone().requires_grad_(True)
        with operator_calls() as calls:
            out = model(x_)
            out.backward(grad_output)
        forwards = [name for name, _ in calls if name == "linear_forward"]
        results.append((out.detach(), x_.grad, {n: p.grad for n, p in model.named_parameters()}, len(forwards)))
    (out, dx, grads, calls), (out_c, dx_c, grads_c, calls_c) = results
    assert calls == 5 and calls_c == 10, f"layer forwards: {calls} plain, {calls_c} checkpointed (recomputed once)"
    # The recomputation repeats the same deterministic forward: identical results.
    torch.testing.assert_close(out_c, out, rtol=0, atol=0, msg=lambda m: f"output\n{m}")
    torch.testing.assert_close(dx_c, dx, rtol=0, atol=0, msg=lambda m: f"dx\n{m}")
    for name, grad in grads.items():
        kind = "dw" if name.endswith("weight") else "db"
        torch.testing.assert_close(grads_c[name], grad, rtol=0, atol=0, msg=lambda m: f"{kind} of {name}\n{m}")


def test_checkpoint_keeps_only_its_input():
    # Our layers save through save_for_backward, so checkpoint's hooks get all of it: outside
    # the region only its input is left, where the plain forward keeps every A and Z.
    torch.manual_seed(1)
    mlp = manualbp.MLP([8, 16, 16, 4], activation="gelu", backend="reference")
    x = torch.randn(32, 8, requires_grad=True)
    parameters = {p.data_ptr() for p in mlp.parameters()}

    def kept_by(run):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            out = run()
        # Without the parameters, and without the zero-element placeholder that non-reentrant checkpoint saves
        # beside its inputs in some torch releases (2.11): it holds no activation memory.
        return out, [t for t in packed if t.data_ptr() not in parameters and t.numel() > 0]

    _, plain = kept_by(lambda: mlp(x))
    out, checkpointed = kept_by(lambda: checkpoint(mlp, x, use_reentrant=False))
    assert len(plain) == 5, f"plain forward kept {[tuple(t.shape) for t in plain]}: expected X, A and Z of 2 layers"
    assert [t.data_ptr() for t in checkpointed] == [x.data_ptr()], \
        f"checkpoint kept {[tuple(t.shape) for t in checkpointed]}, expected only the input"
    out.sum().backward()
    assert all(p.grad is not None for p in mlp.parameters())
