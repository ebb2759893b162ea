"""Shared test helpers: the tolerance rule and the PyTorch baseline.

Tolerance rule: compute the same thing three ways -- manualbp in the test dtype,
PyTorch (nn.functional.linear + the activation) in the test dtype, and PyTorch
in float64 from the same inputs. manualbp passes when its largest error against
float64 is at most twice PyTorch's own largest error, plus a few units in the
last place of the result's magnitude (for results PyTorch happens to get exact).
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import torch.utils._python_dispatch
import torch.nn.functional as TF

import manualbp


def torch_activation(name: str, z: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    """The PyTorch activation module that manualbp's `name` must reproduce (from the activation catalogue;
    tests/test_activations.py checks the catalogue's modules against PyTorch's classes, written out)."""
    options = {"negative_slope": negative_slope} if name == "leaky_relu" else {}
    return manualbp.activations.torch_module(manualbp.get_activation(name, **options))(z)


def torch_dense(x, weight, bias, activation: str, negative_slope: float = 0.01):
    """The baseline: nn.functional.linear followed by the PyTorch activation."""
    return torch_activation(activation, TF.linear(x, weight, bias), negative_slope)


def run_and_grad(fn, x, weight, bias, grad_out):
    """out = fn(x, weight, bias); backward with grad_out -> (out, dx, dw, db), all detached."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, weight, bias)]
    out = fn(*leaves)
    out.backward(grad_out)
    grads = [t.grad if t is not None else None for t in leaves]
    return (out.detach(), *grads)


def assert_close_to_float64(name: str, ours, theirs, exact, factor: float = 2.0, ulps: float = None):
    """max|ours - exact| <= factor * max|theirs - exact| + ulps * eps(dtype) * max(1, max|exact|).

    For float64 "exact" is PyTorch's own float64 result, so PyTorch's error is 0 by
    construction and only the ulps term is left: there it must cover two different,
    equally valid float64 evaluations (a different formula for f', a different
    summation order over up to ~40 terms), hence 64 ulps of the result's scale for
    float64 and 4 for the lower precisions, where PyTorch's measured error dominates.
    """
    if ulps is None:
        ulps = 64.0 if ours is not None and ours.dtype == torch.float64 else 4.0
    if exact is None:
        assert ours is None, f"{name}: expected no gradient, got one"
        return
    assert ours is not None, f"{name}: gradient missing"
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(exact.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype}, expected {theirs.dtype}"
    if exact.numel() == 0:
        return
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err_ours = (ours.double() - exact).abs().max().item()
    err_theirs = (theirs.double() - exact).abs().max().item()
    scale = max(1.0, exact.abs().max().item())
    bound = factor * err_theirs + ulps * torch.finfo(ours.dtype).eps * scale
    assert err_ours <= bound, (
        f"{name}: max error {err_ours:.3e} vs float64, PyTorch's is {err_theirs:.3e}; bound {bound:.3e}"
    )


def compare_with_pytorch(x, weight, bias, activation, grad_out, backend, negative_slope=0.01):
    """manualbp vs PyTorch in the inputs' dtype, both judged against PyTorch in float64."""
    opts = {"negative_slope": negative_slope} if activation == "leaky_relu" else {}

    def ours_fn(x, w, b):
        return manualbp.functional.linear(x, w, b, activation, backend=backend, **opts)

    def theirs_fn(x, w, b):
        return torch_dense(x, w, b, activation, negative_slope)

    ours = run_and_grad(ours_fn, x, weight, bias, grad_out)
    theirs = run_and_grad(theirs_fn, x, weight, bias, grad_out)
    to64 = [t.double() if t is not None else None for t in (x, weight, bias, grad_out)]
    exact = run_and_grad(theirs_fn, *to64[:3], to64[3])
    for label, o, t, e in zip(("out", "dx", "dw", "db"), ours, theirs, exact):
        assert_close_to_float64(f"{label} [{activation}, {backend}, {x.dtype}]", o, t, e)
    return ours


class _OperatorLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "manualbp":
            self.calls.append((func._opname, args))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def operator_calls():
    """Every torch.ops.manualbp operator that runs inside the block (backward included), in order:
    a list of (name, args); an operator's ``backend`` argument is its last."""
    log = _OperatorLog()
    with log:
        yield log.calls


# Submodules whose import is where a package meets torch (transformers imports its models lazily).
_PROBES = {"transformers": "transformers.modeling_utils"}


class LaunchRecorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` appends (name, kwargs) to ``launched``."""

    def __init__(self, name: str, launched: list):
        self.name, self.launched = name, launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((self.name, kwargs))


def skip_where_rs_operands_miscompiled(device, dtype) -> None:
    """Skips a test that forces δ formed in a matmul's operand loads (an RS wgmma) where this toolchain miscompiles
    it (manualbp.triton_kernels.toolchain.rs_operand_hazard: sm_90 with Triton < 3.8 or ptxas < 13.3, triton-lang/
    triton issue 9433): its result is a race there, and the layers never launch it (docs/kernels.md)."""
    from manualbp.triton_kernels import toolchain

    hazard = toolchain.rs_operand_hazard(torch.device(device), dtype)
    if hazard:
        pytest.skip(f"δ in the loads is an RS wgmma, miscompiled on this toolchain ({hazard}); not launched by the "
                    f"layers here")


def optional_import(name: str, reason: str, module_level: bool = False):
    """The module, or a skip naming why not: missing (reason), or installed but failing to import on this
    stack (e.g. the newest transformers on torch 2.7: pytest.importorskip lets that ImportError through)."""
    try:
        module = importlib.import_module(name)
        if name in _PROBES:
            importlib.import_module(_PROBES[name])
        return module
    except ImportError as error:
        missing = isinstance(error, ModuleNotFoundError) and error.name is not None and name.startswith(error.name)
        pytest.skip(reason if missing else f"{name} does not import on this stack ({type(error).__name__}: {error})",
                    allow_module_level=module_level)
