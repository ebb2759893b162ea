"""Backend selection: argument, set_backend/use_backend, MANUALBP_BACKEND, auto; never a silent fallback."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import manualbp
from manualbp import backends
from manualbp import functional as F

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)


def _run(code: str, **env_changes) -> subprocess.CompletedProcess:
    """Run a fresh Python with the given environment changes (None removes a variable)."""
    env = dict(os.environ)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def _used_backend(monkeypatch, fn):
    """Which backend ran fn: records the name that reached function.forward."""
    seen = []
    real = manualbp.function.forward

    def spy(backend, *args, **kwargs):
        seen.append(backend)
        return real(backend, *args, **kwargs)

    monkeypatch.setattr(manualbp.function, "forward", spy)
    monkeypatch.setattr(manualbp.functional, "forward", spy)
    fn()
    return seen


def test_precedence_argument_setting_environment(monkeypatch, device):
    x, w = torch.randn(3, 4, device=device), torch.randn(2, 4, device=device)
    monkeypatch.setenv("MANUALBP_BACKEND", "reference")
    manualbp.set_backend(None)
    assert manualbp.get_backend() == "reference", "environment variable"
    assert _used_backend(monkeypatch, lambda: F.linear(x, w)) == ["reference"], "env selects reference"
    manualbp.set_backend("triton")
    assert _used_backend(monkeypatch, lambda: F.linear(x, w)) == ["triton"], "set_backend beats env"
    with manualbp.use_backend("reference"):
        assert _used_backend(monkeypatch, lambda: F.linear(x, w)) == ["reference"], "use_backend block"
    assert manualbp.get_backend() == "triton", "use_backend restores"
    assert _used_backend(monkeypatch, lambda: F.linear(x, w, backend="reference")) == ["reference"], "argument wins"


def test_auto_picks_triton_where_it_runs(monkeypatch, device):
    manualbp.set_backend("auto")
    x, w = torch.randn(3, 4, device=device), torch.randn(2, 4, device=device)
    assert _used_backend(monkeypatch, lambda: F.linear(x, w)) == ["triton"], "auto -> triton (GPU or interpreter)"


def test_bad_environment_value(monkeypatch):
    monkeypatch.setenv("MANUALBP_BACKEND", "gpu")
    manualbp.set_backend(None)
    with pytest.raises(ValueError, match="MANUALBP_BACKEND"):
        F.linear(torch.randn(2, 3), torch.randn(4, 3))


def test_tensors_triton_never_runs():
    assert backends.triton_unavailable_reason(torch.device("meta"), torch.float32) is not None, "meta device"
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here"):
        backends.resolve("triton", torch.device("mps"), torch.float32)
    assert backends.resolve("auto", torch.device("mps"), torch.float32) == "reference", "auto falls to reference"


def test_cpu_without_interpreter_is_a_clear_error():
    """In a process without TRITON_INTERPRET, CPU tensors cannot use triton: auto uses reference, triton raises."""
    result = _run(
        """
        import torch, manualbp
        from manualbp import functional as F
        x, w = torch.randn(3, 4), torch.randn(2, 4)
        out = F.linear(x, w, backend="auto")
        print("auto ok", tuple(out.shape))
        try:
            F.linear(x, w, backend="triton")
        except RuntimeError as error:
            print("triton error:", error)
        """,
        TRITON_INTERPRET=None,
        MANUALBP_BACKEND=None,
        CUDA_VISIBLE_DEVICES="",
    )
    assert result.returncode == 0, result.stderr
    assert "auto ok (3, 2)" in result.stdout, "auto runs the reference backend"
    assert "triton error:" in result.stdout and "TRITON_INTERPRET=1" in result.stdout, (
        f"the error says how to run triton on CPU tensors: {result.stdout}"
    )


def test_import_without_triton():
    """import manualbp works where Triton is not installed; reference runs; triton says what to install."""
    result = _run(
        """
        import sys
        # As if not installed: `import triton` raises ImportError and importlib.util.find_spec("triton")
        # returns None (torch >= 2.14 asks find_spec at import; a finder that raised there would break torch).
        sys.modules["triton"] = None
        import torch, manualbp
        from manualbp import functional as F
        layer = manualbp.Linear(4, 2, activation="gelu")
        out = layer(torch.randn(3, 4, requires_grad=True))
        out.sum().backward()
        print("reference ok", layer.weight.grad.shape)
        try:
            F.linear(torch.randn(3, 4), layer.weight, backend="triton")
        except RuntimeError as error:
            print("triton error:", error)
        print("triton imported:", any(sys.modules.get(name) is not None for name in sys.modules
                                      if name == "triton" or name.startswith("triton.")))
        """,
        TRITON_INTERPRET="1",
        MANUALBP_BACKEND=None,
    )
    assert result.returncode == 0, result.stderr
    assert "reference ok torch.Size([2, 4])" in result.stdout, result.stdout
    assert "triton error:" in result.stdout and "pip install triton" in result.stdout, result.stdout
    assert "triton imported: False" in result.stdout, "nothing imported triton"
