"""Test setup: run the Triton kernels through Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before manualbp's kernels are created, so it is set
here, before any test module imports manualbp. On a CUDA machine nothing is set
and the same tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import manualbp  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_settings():
    """Each test starts and ends with the manualbp settings it found."""
    with manualbp.config.override():
        yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
