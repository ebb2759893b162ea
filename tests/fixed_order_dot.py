"""A fixed summation order for ``tl.dot`` in Triton's CPU interpreter.

The interpreter computes ``tl.dot(a, b, acc)`` as ``np.matmul(a, b) + acc``, so the order in which the K products
are added is the host BLAS's: OpenBLAS picks its kernels by CPU (Haswell/Zen kernels on AMD EPYC, SkylakeX on
recent Intel), and those sum in different orders. A test that asserts bits coming from ``tl.dot`` (the same ∂C/∂b
whichever tile the autotuner picks, say) would then pass or fail by the machine it runs on. On a GPU the order is
the kernel's own; in the interpreter, the tests fix it here:

    out[..., i, j] = (((0 + a[..., i, 0] b[..., 0, j]) + a[..., i, 1] b[..., 1, j]) + ...) + a[..., i, K-1] b[..., K-1, j]

in the result's dtype, k = 0, 1, ..., K - 1, each product rounded to that dtype before it is added. For 16-bit
operands summed in float32 (every half-precision dot of manualbp's kernels) the products are exact, so this is
also what a chain of fused multiply-adds in that order gives. The result depends on the operands alone, whatever
the CPU, its BLAS or the tile shapes around the dot.

:func:`install` puts it under the interpreter (tests/conftest.py calls it): the interpreter module's ``np`` becomes
a copy of numpy whose ``matmul`` is :func:`fixed_order_matmul`; every other numpy function stays numpy's own.
"""

from __future__ import annotations

import types

import numpy as np


def fixed_order_matmul(a: np.ndarray, b: np.ndarray, dtype=None) -> np.ndarray:
    """``a @ b`` ([..., M, K] @ [..., K, N] -> [..., M, N]) summed over k in increasing order, in ``dtype`` (by
    default numpy's result type of a and b), each product rounded to that dtype before it is added."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"fixed_order_matmul: shapes {a.shape} and {b.shape} do not multiply")
    dtype = np.result_type(a, b) if dtype is None else np.dtype(dtype)
    out = np.zeros(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), dtype=dtype)
    product = np.empty_like(out)
    for k in range(a.shape[-1]):
        # [..., M, 1] * [..., 1, N]: each product computed in dtype (exact for 16-bit operands in float32), then added
        np.multiply(a[..., :, k:k + 1], b[..., k:k + 1, :], out=product, dtype=dtype, casting="unsafe")
        out += product
    return out


def _numpy_with_fixed_order_matmul() -> types.ModuleType:
    module = types.ModuleType("numpy", "numpy, but matmul sums in a fixed order (tests/fixed_order_dot.py)")
    module.__dict__.update(np.__dict__)
    module.matmul = fixed_order_matmul
    return module


def install() -> bool:
    """Make Triton's interpreter compute ``tl.dot`` with :func:`fixed_order_matmul`. Returns whether it did: False
    when the interpreter's module has no ``np`` to replace (a Triton that computes its dots another way), which
    ``tests/test_kernels.py::test_interpreter_dot_sums_in_a_fixed_order`` then reports."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no Triton (macOS/Windows): nothing runs interpreted
        return False
    if getattr(interpreter, "np", None) is not np:
        return False
    interpreter.np = _numpy_with_fixed_order_matmul()
    return True


def installed() -> bool:
    """Whether Triton's interpreter computes ``tl.dot`` with :func:`fixed_order_matmul`."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    return getattr(getattr(interpreter, "np", None), "matmul", None) is fixed_order_matmul
