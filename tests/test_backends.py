"""Backend selection: argument, set_backend/use_backend, MANUALBP_BACKEND, auto; never a silent fallback."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import manualbp
from checks import operator_calls
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
    """Which backend ran fn: the backend argument of every manualbp operator it called."""
    with operator_calls() as calls:
        fn()
    return [args[-1] for _, args in calls]


def test_environment_is_read_once_at_import():
    """MANUALBP_BACKEND / _DELTA_PROLOGUE / _MLP_FUSION / _AUTOTUNE: read when manualbp is imported, then only
    manualbp.config changes the settings (a later os.environ change does nothing)."""
    result = _run(
        """
        import os, torch, manualbp
        print("settings", manualbp.config.get())
        os.environ["MANUALBP_BACKEND"] = "triton"
        print("after env change", manualbp.get_backend())
        manualbp.set_backend("triton")
        manualbp.set_backend(None)
        print("back to env", manualbp.get_backend())
        """,
        MANUALBP_BACKEND="reference", MANUALBP_DELTA_PROLOGUE="0", MANUALBP_MLP_FUSION="0", MANUALBP_AUTOTUNE="0",
        MANUALBP_TMA="0", MANUALBP_WARP_SPECIALIZE="0", MANUALBP_GRAD_WEIGHT_SPLIT="3",
    )
    assert result.returncode == 0, result.stderr
    assert ("settings Settings(backend='reference', delta_prologue=False, mlp_fusion=False, autotune=False, tma=False, "
            "warp_specialize=False, grad_weight_split=3)" in result.stdout), result.stdout
    defaults = _run("import manualbp; print('settings', manualbp.config.get())",
                    **{variable: None for variable in manualbp.config.ENVIRONMENT.values()})
    assert ("settings Settings(backend='auto', delta_prologue=True, mlp_fusion=True, autotune=True, tma=False, "
            "warp_specialize=False, grad_weight_split='auto')" in defaults.stdout), \
        f"the defaults: TMA and warp specialization opt-in\n{defaults.stdout}{defaults.stderr}"
    opted_in = _run("import manualbp; print('tma', manualbp.config.get().tma, manualbp.config.get().warp_specialize)",
                    MANUALBP_TMA="1", MANUALBP_WARP_SPECIALIZE="1")
    assert "tma True True" in opted_in.stdout, (
        f"MANUALBP_TMA=1 and MANUALBP_WARP_SPECIALIZE=1 turn both on\n{opted_in.stdout}{opted_in.stderr}")
    assert "after env change reference" in result.stdout, "a later os.environ change is not read"
    assert "back to env reference" in result.stdout, "set_backend(None) restores the environment's value"


def test_settings_override_and_bad_values():
    with manualbp.config.override(mlp_fusion=False, backend="reference"):
        assert manualbp.config.get().mlp_fusion is False and manualbp.get_backend() == "reference", "override"
    assert manualbp.config.get().mlp_fusion is True, "restored"
    with pytest.raises(TypeError, match="unknown manualbp setting"):
        manualbp.config.set(fusion=False)
    with pytest.raises(TypeError, match="must be True or False"):
        manualbp.config.set(mlp_fusion="no")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        manualbp.config.set(backend="gpu")


def test_precedence_argument_setting_environment(monkeypatch, device):
    x, w = torch.randn(3, 4, device=device), torch.randn(2, 4, device=device)
    manualbp.config.set(backend="reference")  # what MANUALBP_BACKEND=reference gives at import
    assert manualbp.get_backend() == "reference", "setting"
    assert _used_backend(monkeypatch, lambda: F.linear(x, w)) == ["reference"], "setting selects reference"
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


def test_bad_environment_value():
    result = _run(
        """
        import torch, manualbp
        print("imported")
        try:
            manualbp.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
        except ValueError as error:
            print("error:", error)
        """,
        MANUALBP_BACKEND="gpu",
    )
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout, "a bad value does not break the import"
    assert "error: unknown backend 'gpu' from the environment variable MANUALBP_BACKEND" in result.stdout, \
        result.stdout


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
