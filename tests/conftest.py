"""Test setup: run the Triton kernels through Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before manualbp's kernels are created, so it is set
here, before any test module imports manualbp. On a CUDA machine nothing is set
and the same tests run the compiled kernels.

The interpreter's ``tl.dot`` then sums its K products in a fixed order
(tests/fixed_order_dot.py), not in the host BLAS's, which differs by CPU: the
tests that assert bits of a dot's result hold on every x86 machine. And the interpreter
patches ``triton.language`` once per launch, not again at every device function call
(tests/interpreter_patch_once.py: the same results in about half the time).
"""

import os
import sys

import torch

import deep_stack
import fixed_order_dot
import interpreter_patch_once

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    fixed_order_dot.install()
    interpreter_patch_once.install()

import pytest  # noqa: E402

import manualbp  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """pytest's test loop (the hook's other implementations: pytest's own, or a plugin's such as pytest-xdist's)
    called by deep_stack: without it Python maps and unmaps frame-stack chunks on most calls of the interpreter's
    kernels (tests/deep_stack.py)."""
    others = session.config.pluginmanager.subset_hook_caller("pytest_runtestloop", remove_plugins=[sys.modules[__name__]])
    return deep_stack.call(others, session=session)


@pytest.fixture(autouse=True)
def _restore_settings():
    """Each test starts and ends with the manualbp settings it found."""
    with manualbp.config.override():
        yield


@pytest.fixture(autouse=True)
def _fresh_launch_plans():
    """Each test starts with no launch plan (triton_kernels/launch.py): a test that stubs a kernel, the autotuner or
    the fixed tiles must not find a plan another test built with the real ones. (A plan is built by the key's first
    launch, which is an ordinary launch: starting afresh costs nothing more.)"""
    launch = sys.modules.get(f"{manualbp.__name__}.triton_kernels.launch")
    if launch is not None:
        launch.PLANS.clear()
    yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_runtest_logreport(report):
    """With MANUALBP_FAILURE_LOG=PATH, each failure's traceback is appended to PATH the moment it is reported
    (with pytest-xdist, by the controller), so that a run stopped at a time limit, before pytest's own summary,
    still says which tests failed and why (benchmarks/gpu_check.sh sets it on a GPU machine)."""
    path = os.environ.get("MANUALBP_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"=== FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
