"""The interpreter patches triton.language once per launch in these tests (tests/interpreter_patch_once.py), and
the kernels compute the same bits as under the interpreter as released."""

import json
import os
import subprocess
import sys

import pytest
import torch

import interpreter_patch_once
import manualbp

interpreted = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not interpreted, reason="on a GPU the kernels are compiled, not interpreted")
patching_once = pytest.mark.skipif(os.environ.get("MANUALBP_TEST_FULL_INTERPRETER") == "1",
                                   reason="MANUALBP_TEST_FULL_INTERPRETER=1: the interpreter as released")

# A layer's forward and backward in the interpreter (float64, every launch role a layer has: forward with its
# epilogue, ∂C/∂X with δ in the loads and the δ store, ∂C/∂W with ∂C/∂b), printed as the bits of every result.
_LAYER = """
import json, os, sys
sys.path.insert(0, {tests!r})
os.environ["TRITON_INTERPRET"] = "1"
import fixed_order_dot, interpreter_patch_once
fixed_order_dot.install()
print("patch_once", interpreter_patch_once.install(), file=sys.stderr)
import torch, manualbp
g = torch.Generator().manual_seed(7)
x = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
weight = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
grad_a = torch.randn(5, 6, generator=g, dtype=torch.float64)
a = manualbp.functional.linear(x, weight, bias, "gelu", backend="triton")
a.backward(grad_a)
print(json.dumps({{name: t.detach().view(torch.int64).flatten().tolist()
                  for name, t in (("a", a), ("grad_x", x.grad), ("grad_weight", weight.grad),
                                  ("grad_bias", bias.grad))}}))
"""


def _run_layer(full_interpreter: bool) -> tuple:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MANUALBP_")}
    if full_interpreter:
        env["MANUALBP_TEST_FULL_INTERPRETER"] = "1"
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", _LAYER.format(tests=tests)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"the layer ran (full_interpreter={full_interpreter}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@needs_interpreter
@patching_once
def test_the_tests_run_the_interpreter_patching_once():
    assert interpreter_patch_once.installed(), "tests/conftest.py installed interpreter_patch_once"


@needs_interpreter
def test_patching_once_gives_the_released_interpreters_bits():
    ours, ours_log = _run_layer(full_interpreter=False)
    released, released_log = _run_layer(full_interpreter=True)
    assert "patch_once True" in ours_log, f"patched once in the first run: {ours_log[-500:]}"
    assert "patch_once False" in released_log, f"MANUALBP_TEST_FULL_INTERPRETER=1 leaves it: {released_log[-500:]}"
    assert ours.keys() == released.keys(), "the same results"
    for name in ours:
        assert ours[name] == released[name], f"{name}: bitwise the same with and without patching once"


@needs_interpreter
@patching_once
def test_a_device_function_call_in_a_launch_walks_the_language_no_more(monkeypatch):
    """A launch with nested device function calls walks triton.language's members as often as one without."""
    from triton.runtime import interpreter

    walks = []
    real = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin",
                        lambda module, *args: walks.append(getattr(module, "__name__", "")) or real(module, *args))
    x = torch.randn(3, 4, dtype=torch.float64)
    weight = torch.randn(2, 4, dtype=torch.float64)
    manualbp.functional.linear(x, weight, None, "gelu", backend="triton")  # warm: plans built
    walks.clear()
    manualbp.functional.linear(x, weight, None, "gelu", backend="triton")  # one forward launch
    # The launch patches triton.language; a device function whose module also holds triton.language.core patches
    # that once more (with triton.language beside it). As released: a walk of triton.language per device function
    # call, 26 in this launch (Triton 3.9).
    assert "triton.language" in walks, "the launch itself patches triton.language"
    assert walks.count("triton.language") <= 2, f"triton.language walked once or twice a launch, not per device " \
                                                f"function call: {walks}"
