"""Backend choice: which implementation runs the equations.

``triton``     the Triton kernels: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1
               was set before the kernels were first used (Triton's CPU interpreter).
``reference``  plain PyTorch (manualbp/reference.py): any device, no Triton needed.
``auto``       (default) triton where it can run these tensors, reference otherwise.

The choice comes from, in order: the ``backend=`` argument of
``manualbp.functional.linear``, :func:`set_backend` / :func:`use_backend`, the
environment variable ``MANUALBP_BACKEND``, and finally ``auto``. Asking for
``triton`` where it cannot run raises; it never falls back silently.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "MANUALBP_BACKEND"

_setting: Optional[str] = None  # set_backend(); None defers to the environment


def check_backend(name: Optional[str], source: str) -> Optional[str]:
    """name, if it is None (the global setting) or one of BACKENDS; else a ValueError naming source."""
    return None if name is None else _check_name(name, source)


def _check_name(name, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {source}; expected one of: {', '.join(BACKENDS)}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Choose the backend for every layer: 'auto', 'triton' or 'reference' (None: back to MANUALBP_BACKEND/auto)."""
    global _setting
    _setting = None if name is None else _check_name(name, "set_backend()")


def get_backend() -> str:
    """The backend currently asked for: 'auto', 'triton' or 'reference'."""
    if _setting is not None:
        return _setting
    env = os.environ.get(ENV_VAR)
    if env is None or env.strip() == "":
        return "auto"
    return _check_name(env.strip().lower(), f"the environment variable {ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """``with use_backend('reference'): ...`` sets the backend for the block, then restores it."""
    global _setting
    previous = _setting
    set_backend(name)
    try:
        yield
    finally:
        _setting = previous


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as error:  # ImportError, or a broken install
        return f"Triton cannot be imported ({type(error).__name__}: {error}); install it with `pip install triton` (Linux)"
    return None


def kernels():
    """The Triton kernels module, imported on first use (never at ``import manualbp``)."""
    from .triton_kernels import dense

    return dense


def _interpreting() -> bool:
    # Once the kernels exist, what counts is how they were created; before, the variable.
    import sys

    dense = sys.modules.get(f"{__package__}.triton_kernels.dense")
    if dense is not None:
        return dense.is_interpreted()
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton kernels cannot run tensors of this device and dtype, or None if they can."""
    reason = _triton_import_error()
    if reason is not None:
        return reason
    interpreting = _interpreting()
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA tensors were given but torch.cuda is not available"
    elif device.type == "cpu":
        if not interpreting:
            return (
                "the Triton kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter: "
                "set TRITON_INTERPRET=1 in the environment before manualbp's kernels are first used"
            )
    else:
        return f"the Triton kernels do not run on {device.type!r} tensors (CUDA, or CPU with TRITON_INTERPRET=1)"
    if interpreting and dtype == torch.bfloat16:
        return "Triton's CPU interpreter (TRITON_INTERPRET=1) cannot compute in bfloat16"
    return None


def resolve(requested: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run: 'triton' or 'reference'. Raises if 'triton' is asked for and cannot run."""
    name = get_backend() if requested is None else _check_name(requested, "the backend= argument")
    if name == "reference":
        return "reference"
    reason = triton_unavailable_reason(device, dtype)
    if name == "triton":
        if reason is not None:
            raise RuntimeError(f"backend 'triton' cannot run here: {reason}. Use backend='reference' or 'auto'.")
        return "triton"
    return "reference" if reason is not None else "triton"
