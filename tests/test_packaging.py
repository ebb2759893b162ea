"""Installation: the kernels are manualbp's own, whatever else is called `triton_kernels`."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.stacks  # in the subset CI runs on the pinned stacks (pyproject.toml)


def test_foreign_triton_kernels_package_does_not_shadow(tmp_path):
    """A different `triton_kernels` first on sys.path (like Triton's own kernel library) stays separate."""
    foreign = tmp_path / "triton_kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("FOREIGN = True\n")
    (foreign / "dense.py").write_text("raise ImportError('the foreign triton_kernels.dense was imported')\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch, manualbp, triton_kernels
        from manualbp import functional as F
        x, w = torch.randn(3, 4, requires_grad=True), torch.randn(2, 4, requires_grad=True)
        F.linear(x, w, None, "relu", backend="triton").sum().backward()
        dense = manualbp.backends.kernels()
        print("foreign:", triton_kernels.__file__)
        print("ours:", dense.__name__, dense.__file__)
        """
    )
    reason = __import__("manualbp").backends.interpreter_numpy_reason()
    if reason is not None:  # the subprocess runs the kernels through the interpreter
        pytest.skip(reason)
    env = dict(os.environ, TRITON_INTERPRET="1")
    if not __import__("torch").cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert lines["foreign"].startswith(str(tmp_path)), "the foreign package is importable as triton_kernels"
    name, path = lines["ours"].split(" ", 1)
    assert name == "manualbp.triton_kernels.dense", f"manualbp's kernels module: {name}"
    assert not path.startswith(str(tmp_path)), f"manualbp's kernels come from its own install: {path}"


def test_kernels_are_a_subpackage_of_manualbp():
    import manualbp.triton_kernels as kernels

    assert kernels.__name__ == "manualbp.triton_kernels", "installed as a subpackage"


def test_wheel_installs_the_kernels_under_manualbp_only(tmp_path):
    """A built wheel holds manualbp/triton_kernels/..., and no top-level triton_kernels package."""
    import importlib.util
    import pathlib
    import zipfile

    import pytest

    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: cannot build a wheel without network access")
    import setuptools

    setuptools_version = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    if setuptools_version < (70, 1) and importlib.util.find_spec("wheel") is None:
        # --no-build-isolation builds with this venv's setuptools, whose bdist_wheel needs the wheel package.
        pytest.skip(f"setuptools {setuptools.__version__} without the wheel package cannot build a wheel offline")
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(root)], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("manualbp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "manualbp/triton_kernels/dense.py" in names, "the kernels are in the wheel, under manualbp"
    assert "manualbp/triton_kernels/activations.py" in names, "the Triton activations are in the wheel"
    assert not [n for n in names if n.startswith("triton_kernels/")], "no top-level triton_kernels package"
    assert "manualbp/derivation/layouts.py" in names, "the teaching code (python -m manualbp explain) is in the wheel"
    assert "manualbp/derivation/explain.py" in names, "explain is in the wheel"


def test_runtime_does_not_import_the_derivation_subpackage():
    """manualbp.derivation is teaching code: the runtime (manualbp/*.py but the CLI, the kernels) never imports it."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    runtime = [p for p in (root / "manualbp").glob("*.py") if p.name != "__main__.py"] + list((root / "triton_kernels").glob("*.py"))
    assert runtime, "the runtime's modules are found"
    for path in runtime:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [f"{'.' * node.level}{node.module or ''}"] + [a.name for a in node.names]
            assert not any("derivation" in n or n in ("layouts", "explain") for n in names), f"{path.name} imports {names}"
    code = "import sys, manualbp, manualbp.functional; print(sorted(m for m in sys.modules if 'derivation' in m))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "[]", f"import manualbp loads no derivation module: {result}"
