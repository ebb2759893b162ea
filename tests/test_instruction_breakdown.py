"""benchmarks/count_instructions.py --breakdown: the step by layer of the call chain (its rows' arithmetic, and its
child's recording and replays, run natively: outside valgrind the counter's client requests do nothing)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import manualbp

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "count_instructions.py"


def _counter():
    spec = importlib.util.spec_from_file_location("count_instructions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_layers_add_up_to_the_step():
    """Each layer's row is its replays less the layer's below: the rows other than the step add up to the step,
    on the triton path (five layers) and on the reference path (three: no launchers, no launch.run)."""
    rows = dict(_counter().BREAKDOWN_ROWS)
    triton = {"step": 1000, "forward": 400, "ops forward": 300, "ops backward": 450, "launchers": 600,
              "launch.run": 250}
    reference = {"step": 1000, "forward": 400, "ops forward": 300, "ops backward": 450}
    for name, counted, layers in (("triton", triton, [r for r in rows if not r.startswith("step")]),
                                  ("reference", reference, [r for r in rows if not r.startswith(("step", "launch"))])):
        values = {row: rows[row](counted) for row in layers}
        assert sum(values.values()) == counted["step"], f"{name}: {values} add up to the step"
        assert all(value >= 0 for value in values.values()), f"{name}: no layer negative: {values}"


@pytest.mark.parametrize("problem, recorded", [("linear", "ops=2,launchers=2,launch=3"),
                                               ("mlp", "ops=10,launchers=10,launch=10")])
def test_the_breakdown_child_records_and_replays_each_layer(problem, recorded, tmp_path):
    """The child records one step's calls of each layer's entry on the stubbed triton path (a Linear: forward and
    backward operators, two launchers, three launches; the MLP's fused backward: ten of each) and counts the
    step, its forward and each layer's replays."""
    if (shutil.which("cc") or shutil.which("gcc")) is None:
        pytest.skip("no C compiler to build the valgrind helper")
    if not pathlib.Path("/usr/include/valgrind/callgrind.h").exists():
        pytest.skip("valgrind's callgrind.h is not installed")
    reason = manualbp.backends.interpreter_numpy_reason()
    if reason:  # the stubbed triton path takes CPU tensors through the interpreter's kernels
        pytest.skip(reason)
    helper = _counter().build_helper(str(tmp_path))
    result = subprocess.run([sys.executable, str(SCRIPT), "--child", helper, "breakdown", problem, "manualbp-triton",
                             "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{problem}: child failed:\n{result.stderr[-2000:]}"
    lines = result.stderr.splitlines()
    assert "counted step,forward,ops forward,ops backward,launchers,launch.run" in lines, \
        f"{problem}: the cases counted, in order: {lines[-5:]}"
    assert f"calls {recorded}" in lines, f"{problem}: the calls recorded a step: {lines[-5:]}"


@pytest.mark.parametrize("problem, recorded", [("linear", "ops=2,launchers=2,launch=4"),
                                               ("gated", "ops=4,launchers=4,launch=7")])
def test_the_rs_hazard_option_counts_the_gpu_machines_plans(problem, recorded, tmp_path):
    """--rs-hazard (its environment variable, as the script hands it to its children): the stubbed triton path with
    toolchain.rs_operand_hazard naming a reason, as on sm_90 with Triton 3.6. A relu Linear's step then launches
    four kernels (the forward, the δ pass, ∂C/∂X, ∂C/∂W; three with δ in the loads); a GatedMLP's seven: its
    forward, down_proj's three, and the gated backward's three (δ_g, δ_u stored once, then ∂C/∂X and ∂C/∂W reading
    them; two with δ_g, δ_u in the loads)."""
    if (shutil.which("cc") or shutil.which("gcc")) is None:
        pytest.skip("no C compiler to build the valgrind helper")
    if not pathlib.Path("/usr/include/valgrind/callgrind.h").exists():
        pytest.skip("valgrind's callgrind.h is not installed")
    reason = manualbp.backends.interpreter_numpy_reason()
    if reason:
        pytest.skip(reason)
    counter = _counter()
    helper = counter.build_helper(str(tmp_path))
    env = dict(os.environ, **{counter.RS_HAZARD_ENV: "1"})
    result = subprocess.run([sys.executable, str(SCRIPT), "--child", helper, "breakdown", problem, "manualbp-triton",
                             "2"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{problem}: child failed:\n{result.stderr[-2000:]}"
    lines = result.stderr.splitlines()
    assert f"calls {recorded}" in lines, f"{problem} with the hazard: the calls recorded a step: {lines[-5:]}"
