"""The examples run, with tiny settings, so that they cannot rot (docs/usage.md's snippets: tests/test_docs.py).

Each example runs as a user would run it: ``python examples/NAME.py ...`` in a
subprocess, in a temporary directory. Their optional packages (scikit-learn, tqdm,
matplotlib, transformers) are in the `test` extra as well as the `examples` one, so
CI runs every test here; one skips only where a package is missing, and says which.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

import manualbp

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = ("train_digits.py", "seed_network.py", "convert_model.py")
INSTALL_HINT = 'pip install -e ".[examples]"'
TIMEOUT = 300  # seconds per example run; they take a few on a quiet 2-core machine


def example_env(interpret: bool = False) -> dict:
    """The environment of an example run: the user's, without the test suite's own settings.

    tests/conftest.py sets TRITON_INTERPRET=1 for this process; an example inheriting it
    would run every kernel in the interpreter. Only the runs that mean to do so keep it.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MANUALBP_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_example(script: str, *args: str, cwd, env=None) -> subprocess.CompletedProcess:
    """``python examples/SCRIPT ARGS...`` in ``cwd``, as a user would run it."""
    command = [sys.executable, str(EXAMPLES / script), *args]
    return subprocess.run(command, cwd=cwd, env=env or example_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def require_packages(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed; the example tests need the test extra: "
                    f'pip install -e ".[test]"')


def require_models(*names: str) -> None:
    """Skips, saying why, where a transformers model class the example builds does not import on this stack (an
    installed torchao that needs a newer torch breaks transformers' model imports: seen with torch 2.7)."""
    require_packages("transformers")
    import transformers

    for name in names:
        try:
            getattr(transformers, name)
        except ImportError as error:
            pytest.skip(f"transformers.{name} does not import on this stack ({type(error).__name__}: {error})")


def require_triton() -> None:
    # The examples' --backend triton switches the interpreter on for CPU tensors; Triton itself must be there.
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (it has Linux wheels only); the reference backend is tested instead")
    reason = manualbp.backends.interpreter_numpy_reason()
    if reason is not None:  # the examples would say so and exit (seen on the GPU machines' torch 2.11 image)
        pytest.skip(reason)


def number_after(label: str, text: str) -> float:
    """The number printed right after ``label`` in ``text``."""
    match = re.search(re.escape(label) + r"\s*([-+0-9.eE]+|nan|inf)", text)
    assert match, f"the output shows {label!r}:\n{text}"
    return float(match.group(1))


def assert_ok(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, (f"{what}: exit status {result.returncode}\n--- stdout\n{result.stdout}"
                                    f"\n--- stderr\n{result.stderr}")


def load_parser(script: str) -> argparse.ArgumentParser:
    """The example's argument parser, from the module itself (importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location(f"example_{script[:-3]}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


# --------------------------------------------------------------------------------------
# --help
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_option(script, tmp_path):
    result = run_example(script, "--help", cwd=tmp_path)
    assert_ok(result, f"{script} --help")
    assert result.stdout.startswith(f"usage: {script}"), "--help prints the usage"
    assert "exit status" in result.stdout, "--help lists the exit statuses"
    for action in load_parser(script)._actions:
        for option in action.option_strings:
            assert option in result.stdout, f"--help of {script} shows {option}"
        assert action.help and action.help.strip(), f"{script}: {action.option_strings} has a help text"


# --------------------------------------------------------------------------------------
# train_digits.py
# --------------------------------------------------------------------------------------


def test_train_digits_trains_both_models_and_plots(tmp_path):
    require_packages("sklearn", "tqdm", "matplotlib")
    plot = tmp_path / "curves.png"
    result = run_example("train_digits.py", "--epochs", "2", "--hidden", "32", "--batch-size", "64",
                         "--plot", str(plot), cwd=tmp_path)
    assert_ok(result, "train_digits.py")
    out = result.stdout
    assert "identical initial parameters: yes" in out, "both models start from the same parameters"
    assert "manualbp backend: reference" in out, "on the CPU without TRITON_INTERPRET, auto runs the reference"
    torch_accuracy = number_after("nn.Linear: test accuracy", out)
    manual_accuracy = number_after("manualbp: test accuracy", out)
    # Two epochs of a small MLP: far above chance (10%), and the same for both models.
    assert torch_accuracy > 50 and manual_accuracy > 50, f"test accuracies {torch_accuracy}%, {manual_accuracy}%"
    assert abs(torch_accuracy - manual_accuracy) <= 1.0, "the two models classify the test set alike"
    difference = number_after("max |loss(nn.Linear) - loss(manualbp)| =", out)
    assert difference < 1e-4, f"float32 loss curves agree: max difference {difference}"
    assert number_after("trained parameters: max |nn.Linear - manualbp| =", out) < 1e-4
    assert f"plot: {plot}" in out, "the plot's path is printed"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the plot is a PNG file"
    assert "epoch" in result.stderr and "100%" in result.stderr, "tqdm progress bars are shown on stderr"


def test_train_digits_runs_the_triton_kernels_in_the_interpreter(tmp_path):
    require_packages("sklearn")
    require_triton()
    result = run_example("train_digits.py", "--backend", "triton", "--epochs", "1", "--hidden", "8",
                         "--batch-size", "512", "--no-plot", "--quiet", cwd=tmp_path)
    assert_ok(result, "train_digits.py --backend triton")
    assert "manualbp backend: triton" in result.stdout, "the Triton kernels ran (through the interpreter)"
    assert number_after("max |loss(nn.Linear) - loss(manualbp)| =", result.stdout) < 1e-5
    assert not list(tmp_path.glob("*.png")), "--no-plot writes no plot"
    assert "epoch" not in result.stderr, "--quiet shows no progress bars"


# --------------------------------------------------------------------------------------
# seed_network.py
# --------------------------------------------------------------------------------------


def test_seed_network_gradients_agree_three_ways(tmp_path):
    result = run_example("seed_network.py", "--epochs", "3", "--samples", "8", "--sample", "5", cwd=tmp_path)
    assert_ok(result, "seed_network.py")
    out = result.stdout
    assert "sizes [4, 6, 5, 3] (L = 3 layers)" in out
    start, end = (float(v) for v in re.search(r"mean cost C_D ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert end < start, f"SGD lowers the mean cost: {start} -> {end}"
    assert "largest absolute differences" in out, "the table of differences is printed"
    table = out.split("largest absolute differences", 1)[1]
    for l in (1, 2, 3):
        for name in (f"dC/dW^({l})", f"dC/db^({l})"):
            row = re.search(re.escape(name) + r"\s+\[[0-9,]+\]\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", table)
            assert row, f"the table has a row for {name}"
            value, *differences = (float(v) for v in row.groups())
            assert value > 0, f"{name} is not all zeros"
            assert max(differences) <= 1e-10, f"{name}: numpy, manualbp and autograd agree: {differences}"
    for name in ("numpy", "manualbp", "autograd"):
        assert f"{name}: [[" in out, f"the {name} values are printed"
    assert number_after("largest difference:", out) <= 1e-10


def test_seed_network_with_the_triton_kernels(tmp_path):
    require_triton()
    result = run_example("seed_network.py", "--backend", "triton", "--sizes", "3,4,2", "--epochs", "1",
                         "--samples", "2", "--no-values", cwd=tmp_path)
    assert_ok(result, "seed_network.py --backend triton")
    assert "manualbp backend: triton" in result.stdout
    assert number_after("largest difference:", result.stdout) <= 1e-10
    assert "numpy: [[" not in result.stdout, "--no-values prints only the table"


# --------------------------------------------------------------------------------------
# convert_model.py
# --------------------------------------------------------------------------------------


def test_convert_model_reports_and_trains_alike(tmp_path):
    require_models("CTRLLMHeadModel")
    result = run_example("convert_model.py", "--steps", "2", "--hidden-size", "16", "--layers", "1",
                         "--batch-size", "2", cwd=tmp_path)
    assert_ok(result, "convert_model.py")
    out = result.stdout
    assert "CTRLLMHeadModel" in out
    assert re.search(r"manualbp\.convert: \d+ replaced", out), "the ConversionReport is printed"
    assert "-> manualbp.Linear(relu)" in out, "the feed-forward ReLU is fused into its Linear"
    assert re.search(r"nn\.Linear before: \d+; after: 0;", out), "no nn.Linear is left"
    assert "tied weights kept: lm_head.weight is transformer.w.weight: True" in out
    steps = re.findall(r"^\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+(\S+)$", out, flags=re.M)
    assert [int(s[0]) for s in steps] == [1, 2], f"one loss line per step:\n{out}"
    for _, original, converted, _ in steps:
        assert abs(float(original) - float(converted)) <= 1e-9, f"float64 losses agree: {original} vs {converted}"
    assert number_after("max |loss difference| =", out) <= 1e-9
    assert re.search(r"manualbp\.revert: \d+ reverted, 0 left alone; manualbp modules left: 0; "
                     r"state_dict keys of the original: True;", out), "revert back to plain PyTorch"
    assert number_after("|loss (converted) - loss (reverted)| on a new batch =", out) <= 1e-9
    if all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime")):
        assert "ONNX: torch.onnx.export(dynamo=True) of the trained model" in out, "exported to ONNX"
        assert number_after("|logits (PyTorch) - logits (onnxruntime)| at batch sizes 1 and 4 =", out) <= 1e-9
    else:
        assert "ONNX export skipped:" in out, "says why there is no ONNX check"


def test_convert_model_llama_gated_mlp(tmp_path):
    require_models("LlamaForCausalLM")
    result = run_example("convert_model.py", "--model", "llama", "--steps", "2", "--hidden-size", "16",
                         "--layers", "1", "--batch-size", "2", cwd=tmp_path)
    assert_ok(result, "convert_model.py --model llama")
    out = result.stdout
    assert "LlamaForCausalLM" in out
    assert "replaced model.layers.0.mlp (LlamaMLP + model.layers.0.mlp.act_fn (now Fused)) -> " \
           "manualbp.GatedMLP(silu) [pattern: gated MLP]" in out, f"the gated MLP is fused:\n{out}"
    assert re.search(r"nn\.Linear before: \d+; after: 0;", out), "no nn.Linear is left"
    steps = re.findall(r"^\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+(\S+)$", out, flags=re.M)
    assert [int(s[0]) for s in steps] == [1, 2], f"one loss line per step:\n{out}"
    assert number_after("max |loss difference| =", out) <= 1e-9
    assert re.search(r"manualbp\.revert: \d+ reverted, 0 left alone; manualbp modules left: 0; "
                     r"state_dict keys of the original: True;", out), "revert back to plain PyTorch"


# --------------------------------------------------------------------------------------
# A missing optional package: a clear message and exit status 3, not a traceback
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("script, blocked, pip_name", [
    ("train_digits.py", "sklearn", "scikit-learn"),
    ("train_digits.py", "matplotlib", "matplotlib"),
    ("convert_model.py", "transformers", "transformers"),
])
def test_missing_optional_package_says_what_to_install(script, blocked, pip_name, tmp_path):
    # sys.modules[name] = None makes `import name` fail, as if the package were not installed.
    runner = (f"import runpy, sys; sys.modules[{blocked!r}] = None; sys.argv = [{script!r}]; "
              f"runpy.run_path({str(EXAMPLES / script)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", runner], cwd=tmp_path, env=example_env(),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 3, f"exit status 3 for a missing package, got {result.returncode}: {result.stderr}"
    assert "Traceback" not in result.stderr, f"a message, not a traceback:\n{result.stderr}"
    assert pip_name in result.stderr and INSTALL_HINT in result.stderr, f"says what to install:\n{result.stderr}"
    assert not list(tmp_path.iterdir()), "nothing was written"


# --------------------------------------------------------------------------------------
# docs/usage.md and pyproject.toml
# --------------------------------------------------------------------------------------


def _python_blocks(path: pathlib.Path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


USAGE = ROOT / "docs" / "usage.md"


# docs/usage.md's Python blocks run in tests/test_docs.py.


def test_usage_names_every_example_and_activation():
    import manualbp

    text = USAGE.read_text()
    for script in SCRIPTS:
        assert f"examples/{script}" in text, f"docs/usage.md shows how to run {script}"
    for name in manualbp.ACTIVATIONS:
        assert f"| `{name}` |" in text, f"docs/usage.md's activation table lists {name}"


def test_optional_dependencies_are_extras():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {name: [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs]
             for name, reqs in project["optional-dependencies"].items()}
    heavy = {"scikit-learn", "matplotlib", "tqdm", "transformers"}
    assert heavy <= set(names["examples"]), f"the examples extra holds {heavy}: {names['examples']}"
    test_extra = set(project["optional-dependencies"]["test"])
    assert heavy <= set(names["test"]) or "manualbp[examples]" in test_extra, (
        "the test extra installs what the example tests run (directly or as manualbp[examples])"
    )
    core = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in project["dependencies"]}
    assert not heavy & core, f"no example package is a core dependency: {core}"
