"""Backend choice: which implementation runs the equations.

``triton``     the Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1
               was set before the kernels were first used (Triton's CPU interpreter).
``reference``  plain PyTorch (manualbp/reference.py): any device, no Triton needed.
``auto``       (default) triton where it can run these tensors, reference otherwise.

The choice comes from, in order: the ``backend=`` argument of a layer or of
``manualbp.functional.linear``, :func:`set_backend` / :func:`use_backend` (the
``backend`` setting of ``manualbp.config``), the environment variable
``MANUALBP_BACKEND`` read at import, and finally ``auto``. It is made once per
call, by :func:`resolve`, before the operators run; asking for ``triton`` where
it cannot run raises, it never falls back silently. Meta tensors take any
backend (no kernel runs on them); DTensors and fake tensors are judged by their
device and dtype, like any tensor (the operators run on the local shards).
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Iterator, Optional

import torch

from . import config

BACKENDS = config.BACKENDS


def check_backend(name: Optional[str], source: str) -> Optional[str]:
    """name, if it is None (the global setting) or one of BACKENDS; else a ValueError naming source."""
    return None if name is None else config.check_backend(name, source)


def set_backend(name: Optional[str]) -> None:
    """Choose the backend for every layer: 'auto', 'triton' or 'reference' (None: back to MANUALBP_BACKEND/auto)."""
    if name is None:
        config.restore("backend")
    else:
        config.set(backend=check_backend(name, "set_backend()"))


def get_backend() -> str:
    """The backend currently asked for: 'auto', 'triton' or 'reference'."""
    return config.backend()


def use_backend(name: str) -> "Iterator[config.Settings]":
    """``with use_backend('reference'): ...`` sets the backend for the block, then restores it."""
    return config.override(backend=config.check_backend(name, "use_backend()"))


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as error:  # ImportError, or a broken install
        return f"Triton cannot be imported ({type(error).__name__}: {error}); install it with `pip install triton` (Linux)"
    return None


def interpreter_numpy_reason() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run with the installed numpy, or None: the interpreters of Triton
    before 3.8 convert one-element arrays with int(), which numpy 2.4 made a TypeError (every kernel fails with
    "only 0-dimensional arrays can be converted to Python scalars")."""
    try:
        import numpy
        import triton
    except Exception:  # no Triton: _triton_import_error says so
        return None

    def release(version: str) -> tuple:
        return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())

    if release(triton.__version__) < (3, 8) and release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter cannot run with numpy {numpy.__version__} (numpy 2.4 "
                f"and newer need Triton 3.8 or newer there): install numpy<2.4 or a newer Triton")
    return None


def kernels():
    """The Triton kernels module, imported on first use (never at ``import manualbp``)."""
    dense = sys.modules.get(_DENSE)  # a dict lookup: an import statement here cost every call ~7k instructions
    if dense is None:
        dense = importlib.import_module(_DENSE)
    return dense


_DENSE = f"{__package__}.triton_kernels.dense"


def _interpreting() -> bool:
    # Once the kernels exist, what counts is how they were created; before, the variable.
    dense = sys.modules.get(_DENSE)
    if dense is not None:
        return dense.is_interpreted()
    # os.environ.get("TRITON_INTERPRET") == "1", read on every call until the kernels exist; without the
    # KeyError os.environ raises and catches inside for an unset variable (CPython's mapping, where it has one).
    if _ENVIRONMENT is None:
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return _ENVIRONMENT.get(_INTERPRET_KEY) == _INTERPRET_ON


_ENVIRONMENT = getattr(os.environ, "_data", None)  # CPython's os.environ: encoded keys -> encoded values
if _ENVIRONMENT is not None and hasattr(os.environ, "encodekey") and hasattr(os.environ, "encodevalue"):
    _INTERPRET_KEY, _INTERPRET_ON = os.environ.encodekey("TRITON_INTERPRET"), os.environ.encodevalue("1")
else:
    _ENVIRONMENT = None


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton kernels cannot run tensors of this device and dtype, or None if they can."""
    return _unavailable_reason(device.type, dtype, _interpreting())


@functools.lru_cache(maxsize=None)
def _device_reason(device: torch.device, dtype: torch.dtype, interpreting: bool) -> Optional[str]:
    # resolve()'s question on every call, keyed by the device itself: device.type costs more than the lookup.
    return _META if device.type == "meta" else _unavailable_reason(device.type, dtype, interpreting)


_META = "meta tensors: shapes only, nothing runs"


@functools.lru_cache(maxsize=None)
def _unavailable_reason(device_type: str, dtype: torch.dtype, interpreting: bool) -> Optional[str]:
    # Cached: resolve() asks on every call under 'auto'. What the answer depends on beyond the
    # arguments (Triton importable, CUDA present) does not change within a process.
    reason = _triton_import_error()
    if reason is not None:
        return reason
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA tensors were given but torch.cuda is not available"
    elif device_type == "cpu":
        if not interpreting:
            return (
                "the Triton kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter: "
                "set TRITON_INTERPRET=1 in the environment before manualbp's kernels are first used"
            )
    else:
        return f"the Triton kernels do not run on {device_type!r} tensors (CUDA, or CPU with TRITON_INTERPRET=1)"
    if interpreting and device_type == "cpu":
        reason = interpreter_numpy_reason()
        if reason is not None:
            return reason
    if interpreting and dtype == torch.bfloat16:
        return "Triton's CPU interpreter (TRITON_INTERPRET=1) cannot compute in bfloat16"
    return None


@torch.compiler.assume_constant_result
def resolve(requested: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run: 'triton' or 'reference'. Raises if 'triton' is asked for and cannot run.

    Evaluated once when torch.compile / torch.export trace a call: the graph keeps the answer.
    """
    name = config.get().backend if requested is None else config.check_backend(requested, "the backend= argument")
    if name not in BACKENDS:
        config.backend()  # only from MANUALBP_BACKEND (settings are checked when set): raises, naming it
    if name == "reference":
        return "reference"
    dense = sys.modules.get(_DENSE)  # _interpreting(), without its call: every layer call asks
    reason = _device_reason(device, dtype, dense.is_interpreted() if dense is not None else _interpreting())
    if reason is _META:
        return "triton" if name == "triton" else "reference"  # shapes only: nothing runs
    if name == "triton":
        if reason is not None:
            raise RuntimeError(f"backend 'triton' cannot run here: {reason}. Use backend='reference' or 'auto'.")
        return "triton"
    return "reference" if reason is not None else "triton"
