"""manualbp's settings, in one place.

    backend         'auto' | 'triton' | 'reference'   MANUALBP_BACKEND          (default 'auto')
    delta_prologue  bool   δ formed in the backward matmuls' operand loads      MANUALBP_DELTA_PROLOGUE=0 turns off
                           (in_features up to triton_kernels/dense.py's PROLOGUE_MAX_K; a δ pass above it,
                           measured there; the gated layer's δ_g, δ_u likewise; a preference: a δ pass wherever
                           triton_kernels/toolchain.py's rs_operand_hazard says the toolchain miscompiles it,
                           sm_90 with Triton < 3.8)
    mlp_fusion      bool   MLP backward: δ of the layer below in a matmul's epilogue   MANUALBP_MLP_FUSION=0 turns off
    autotune        bool   GPU matmuls autotune their tile                      MANUALBP_AUTOTUNE=0 turns off
    tma             bool   the autotuner may pick the TMA + persistent matmul configs (sm_90+)   MANUALBP_TMA=1 turns on
                           (off by default: on an H200 one TMA tile gave wrong products with the prologue, now
                           not offered there, and the others are unchecked at full size; see docs/performance.md)
    warp_specialize bool   with tma, also the warp-specialized TMA configs        MANUALBP_WARP_SPECIALIZE=1 turns on
                           (Triton >= 3.6 on sm_90: a producer warpgroup for the loads, two for the MMAs,
                           docs/kernels.md; off by default: compiled for sm_90 offline, never run on a GPU)
    grad_weight_split  'auto' | int >= 1   the ∂C/∂W matmul split into that many parts of the batch rows (split-K),
                           and every plain product (dense.matmul: the MLP's ∂C/∂W) into parts of its reduction
                           ('auto': by the shape and the GPU's SM count, triton_kernels/dense.py's grad_weight_splits;
                           1: never; at most one per chunk of rows, docs/kernels.md)   MANUALBP_GRAD_WEIGHT_SPLIT

The environment is read once, when manualbp is imported; afterwards only
:func:`set` and :func:`override` change a setting. A bad MANUALBP_BACKEND is
reported (naming the variable) when the backend is first needed, not at import.
The switches off are for measuring what the fusions buy (benchmarks/), not for users; tma is off until
its configs have been checked on a GPU (benchmarks/gpu_check.sh turns it on for one benchmark step), and
warp_specialize likewise (gpu_check.sh turns both on for that step).
Compiled graphs (torch.compile, torch.export) bake in the settings they were traced with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator

BACKENDS = ("auto", "triton", "reference")
ENVIRONMENT = {
    "backend": "MANUALBP_BACKEND",
    "delta_prologue": "MANUALBP_DELTA_PROLOGUE",
    "mlp_fusion": "MANUALBP_MLP_FUSION",
    "autotune": "MANUALBP_AUTOTUNE",
    "tma": "MANUALBP_TMA",
    "warp_specialize": "MANUALBP_WARP_SPECIALIZE",
    "grad_weight_split": "MANUALBP_GRAD_WEIGHT_SPLIT",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    delta_prologue: bool = True
    mlp_fusion: bool = True
    autotune: bool = True
    tma: bool = False  # opt-in until a GPU run has checked the TMA configs' results (config docstring)
    warp_specialize: bool = False  # opt-in until a GPU run has checked them (config docstring)
    grad_weight_split: object = "auto"  # "auto" or an int >= 1 (check_split)


def check_backend(name, source: str) -> str:
    """name if it is one of BACKENDS, else a ValueError naming where it came from."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {source}; expected one of: {', '.join(BACKENDS)}")
    return name


def check_flag(value, argument: str, hint: str = "") -> bool:
    """value if it is True or False, else a TypeError naming the argument (a truthy string is not a flag)."""
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be True or False, got {value!r}{hint}")
    return value


def check_split(value, source: str):
    """value if it is "auto" or an int >= 1 (not a bool), else a ValueError naming where it came from."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"grad_weight_split from {source} must be 'auto' or an int >= 1 (1: no split), got {value!r}")


def _from_environment() -> Settings:
    values = {}
    backend = os.environ.get(ENVIRONMENT["backend"], "").strip().lower()
    if backend:
        values["backend"] = backend  # checked when first read (see backend())
    for field in ("delta_prologue", "mlp_fusion", "autotune", "tma", "warp_specialize"):
        default = "1" if getattr(Settings, field) else "0"
        values[field] = os.environ.get(ENVIRONMENT[field], default).strip() != "0"
    split = os.environ.get(ENVIRONMENT["grad_weight_split"], "auto").strip().lower()
    values["grad_weight_split"] = int(split) if split.isdigit() else split  # checked when first read
    return Settings(**values)


_AT_IMPORT = _from_environment()
_current = _AT_IMPORT


def get() -> Settings:
    """The settings now in force."""
    return _current


def backend() -> str:
    """The backend asked for: 'auto', 'triton' or 'reference' (a bad MANUALBP_BACKEND raises here)."""
    # set() and override() check their values, so a bad name can only have come from the environment.
    return check_backend(_current.backend, "the environment variable MANUALBP_BACKEND")


def grad_weight_split():
    """The split-K setting: 'auto' or an int >= 1 (a bad MANUALBP_GRAD_WEIGHT_SPLIT raises here)."""
    return check_split(_current.grad_weight_split, "the environment variable MANUALBP_GRAD_WEIGHT_SPLIT")


def _checked(changes: dict) -> dict:
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(frozenset(changes) - fields)
    if unknown:
        raise TypeError(f"unknown manualbp setting(s) {unknown}; expected some of {sorted(fields)}")
    for name, value in changes.items():
        if name == "backend":
            check_backend(value, "manualbp.config")
        elif name == "grad_weight_split":
            check_split(value, "manualbp.config")
        else:
            check_flag(value, f"manualbp setting {name!r}")
    return changes


def set(**changes) -> None:  # noqa: A001 - manualbp.config.set(backend=...) reads as intended
    """Change settings for the rest of the process: ``manualbp.config.set(backend='reference')``."""
    global _current
    _current = dataclasses.replace(_current, **_checked(changes))


def restore(*names: str) -> None:
    """Back to what the environment said at import: the named settings, or all of them."""
    global _current
    names = names or tuple(f.name for f in dataclasses.fields(Settings))
    _checked({name: getattr(_AT_IMPORT, name) for name in names if name not in ("backend", "grad_weight_split")})
    _current = dataclasses.replace(_current, **{name: getattr(_AT_IMPORT, name) for name in names})


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """``with manualbp.config.override(mlp_fusion=False): ...``: settings for the block, then restored."""
    global _current
    previous = _current
    _current = dataclasses.replace(_current, **_checked(changes))
    try:
        yield _current
    finally:
        _current = previous
