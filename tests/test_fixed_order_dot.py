"""The interpreter's ``tl.dot`` sums in a fixed order in these tests (tests/fixed_order_dot.py), whatever the CPU.

The bitwise tests of the kernels (the same ∂C/∂b on every tile, say) compare bits that come out of ``tl.dot``. In
Triton's interpreter those bits were the host BLAS's: on an AMD EPYC machine, where NumPy's OpenBLAS runs its
Haswell kernels, ``test_bias_grad_is_bitwise_equal_on_every_tile[leaky_relu-z-fp16]`` failed; with its SkylakeX
kernels it passed. These tests check that the order is fixed, and against what.
"""

import os

import numpy as np
import pytest
import torch

import fixed_order_dot

interpreted = os.environ.get("TRITON_INTERPRET") == "1"


def _sequential(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b by the definition, one float32 scalar at a time: ((0 + a0 b0) + a1 b1) + ..., each step rounded."""
    M, K = a.shape
    N = b.shape[1]
    out = np.zeros((M, N), dtype=np.float32)
    for i in range(M):
        for j in range(N):
            total = np.float32(0)
            for k in range(K):
                total = np.float32(total + np.float32(np.float32(a[i, k]) * np.float32(b[k, j])))
            out[i, j] = total
    return out


def _operands(dtype, M=16, N=16, K=32):
    """Operands whose sum depends on its order: magnitudes spread over 2^-12 .. 2^12, both signs."""
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((M, K)) * 2.0 ** rng.integers(-12, 13, (M, K))).astype(dtype)
    b = (rng.standard_normal((K, N)) * 2.0 ** rng.integers(-12, 13, (K, N))).astype(dtype)
    return a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
def test_fixed_order_matmul_is_the_sequential_sum(dtype):
    a, b = _operands(dtype)
    expected = _sequential(a, b)
    ours = fixed_order_dot.fixed_order_matmul(a, b, dtype=np.float32)
    assert ours.dtype == np.float32, "the dtype asked for"
    assert np.array_equal(ours, expected), f"{np.dtype(dtype).name}: bitwise the sum k = 0, 1, ..., K - 1"
    # The order matters for these operands (else the assertion above could not tell orders apart): summed the
    # other way round, some entries differ.
    backwards = fixed_order_dot.fixed_order_matmul(a[:, ::-1], b[::-1, :], dtype=np.float32)
    assert not np.array_equal(backwards, ours), "operands whose sum depends on its order"


def test_fixed_order_matmul_batches_and_rejects_bad_shapes():
    a, b = _operands(np.float32)
    batched = fixed_order_dot.fixed_order_matmul(np.stack([a, -a]), np.stack([b, b]))
    assert np.array_equal(batched[0], _sequential(a, b)), "batch 0 as unbatched"
    assert np.array_equal(batched[1], _sequential(-a, b)), "batch 1 as unbatched"
    with pytest.raises(ValueError, match="do not multiply"):
        fixed_order_dot.fixed_order_matmul(a, a)


@pytest.mark.skipif(not interpreted, reason="on a GPU tl.dot is compiled: its order is the kernel's, not the host's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interpreter_dot_sums_in_a_fixed_order(dtype):
    """A kernel's tl.dot, run by the interpreter, is bitwise the sequential sum (float32 accumulator)."""
    import triton
    import triton.language as tl

    assert fixed_order_dot.installed(), "tests/conftest.py put fixed_order_matmul under Triton's interpreter"

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
        rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])  # [M, K], row-major
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])  # [K, N], row-major
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, input_precision="ieee"))

    a, b = _operands(torch.empty((), dtype=dtype).numpy().dtype)
    out = torch.empty(16, 16, dtype=torch.float32)
    dot_kernel[(1,)](torch.from_numpy(a), torch.from_numpy(b), out, M=16, N=16, K=32)
    assert np.array_equal(out.numpy(), _sequential(a, b)), f"{dtype}: tl.dot bitwise the sum k = 0, 1, ..., K - 1"
