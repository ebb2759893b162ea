"""What the installed compiler gets wrong, and where: the one place manualbp asks.

Register-sourced wgmma (RS: the left operand from registers, as where δ = G ⊙ f'(Z) is formed in a backward
matmul's operand loads) is miscompiled on sm_90 by Triton before 3.8, and by any Triton whose ptxas for sm_90 is
older than 13.3: the K loop leaves RS wgmmas in flight across its back edge while the next iteration rewrites
their A registers, which the PTX ISA leaves undefined (triton-lang/triton issue 9433; fixed where Triton copies
the operand before each RS wgmma, PR 9514, and ptxas 13.3 places the copies after the waits). The rule is from
sm_90 compiles of benchmarks/tma_tile_repro.py counted by its rs_operand_overwrites (docs/kernels.md, "The
excluded tile"): Triton 3.6.0 and 3.7.1 with ptxas 12.8 and 13.4, 3.8.0 with 12.9, 3.9.0 with 12.8 and 12.9
rewrite; 3.8.0 with 13.3 and 13.4, 3.9.0 with 13.4 do not.

Where rs_operand_hazard names a reason, no launch forms δ in an MMA's operand loads: the dense layer stores δ by
its elementwise pass first (dense.linear_backward), the gated layer forms δ_g, δ_u elementwise (gated.gated_backward);
the matmuls then read both operands from shared memory (SS).
"""

from __future__ import annotations

import functools
import re
import subprocess

import torch
import triton

ISSUE = "triton-lang/triton issue 9433"
FIXED_TRITON = (3, 8)  # the first Triton whose loops copy the RS operand before each wgmma
FIXED_PTXAS = (13, 3)  # the first ptxas that keeps those copies after the waits


def triton_version() -> tuple:
    """(major, minor) of the installed Triton."""
    return tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])


@functools.lru_cache(maxsize=1)
def sm90_ptxas_version():
    """(major, minor) of the ptxas this Triton runs for sm_90 (Triton 3.9 runs its `ptxas-blackwell`, 3.6-3.8 their
    `ptxas`; TRITON_PTXAS_PATH and TRITON_PTXAS_BLACKWELL_PATH choose others), or None where it cannot be told."""
    try:
        from triton.backends.nvidia import compiler

        out = subprocess.run([compiler.get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout
    except Exception:  # noqa: BLE001 - no NVIDIA backend or ptxas here, or Triton moved the function
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def rs_toolchain_hazard(triton_at: tuple, ptxas) -> str | None:
    """Why Triton triton_at with ptxas (major, minor) for sm_90 (None: unknown) may rewrite the A registers of RS
    wgmmas in flight, or None where it does not."""
    version = ".".join(map(str, triton_at))
    if tuple(triton_at) < FIXED_TRITON:
        return f"Triton {version} (< 3.8: rewrites with every ptxas tried), {ISSUE}"
    if ptxas is None:
        return f"Triton {version} with a ptxas for sm_90 whose version cannot be told, {ISSUE}"
    if tuple(ptxas) < FIXED_PTXAS:
        return f"Triton {version} with ptxas {ptxas[0]}.{ptxas[1]} for sm_90 (< 13.3), {ISSUE}"
    return None


def rs_hazard() -> str | None:
    """rs_toolchain_hazard for the installed Triton and its ptxas for sm_90, whatever the device."""
    return rs_toolchain_hazard(triton_version(), sm90_ptxas_version())


@functools.lru_cache(maxsize=None)
def _hazard_on(device: torch.device) -> str | None:
    if device.type != "cuda" or _interpreted() or torch.version.hip is not None:
        return None  # the interpreter, the CPU and ROCm run no wgmma (ROCm's gfx9 would read as 9.x)
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:  # wgmma is sm_90's; sm_80 has mma.sync, sm_100 tcgen05
        return None
    reason = rs_hazard()
    return f"sm_{major}{minor}: {reason}" if reason else None


def rs_operand_hazard(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why launches of dtype data on device (a tensor's: a CUDA device with its index) must not take an MMA's left
    operand from registers (RS wgmma), or None: a CUDA device of compute capability 9.x, compiled (not Triton's
    interpreter), on a toolchain rs_hazard names, for data whose tl.dot compiles to wgmma there: 16-bit, and float32
    where PyTorch's settings allow TF32 (dense.tf32_allowed; IEEE float32 runs FMAs, float64 the DMMA of mma.sync).
    Cached per device: a warm call is a dtype test and a cache lookup (every backward asks)."""
    if dtype is torch.float64:
        return None
    reason = _hazard_on(device)
    if reason is None or dtype is not torch.float32:
        return reason
    from . import dense

    return reason if dense.tf32_allowed() else None


def _interpreted() -> bool:
    from . import dense

    return dense.is_interpreted()
