"""Activations f and their derivatives f' in Triton, side by side.

The same names and formulas as ``manualbp/activations.py`` (the reference):
``f(z)``, ``f_grad(z)`` and, where f' can be read off the output,
``f_grad_from_output(a)``; and ``delta(grad_a, z)`` / ``delta_from_output(grad_a, a)``,
δ = G ⊙ f'(Z) as PyTorch's backward forms it: a select for relu and leaky_relu (for relu, an inf or NaN G
where z <= 0 gives 0, not inf * 0), for tanh and sigmoid from a the operations of PyTorch's CUDA kernels (each
rounded to 16 bits for 16-bit data: _rounded), the product G f' otherwise. The kernels call the dispatchers at the bottom with
the activation's number as a compile-time constant, so each kernel is compiled
for exactly one activation and no branch survives.

Every function works on the kernel's compute dtype: float32 for
float16/bfloat16/float32 data and float64 for float64 data.
"""

import triton
import triton.language as tl

from ..activations import kernel_id

# Numbers of the activations, from the activation catalogue (manualbp/activations.py).
IDENTITY = tl.constexpr(kernel_id("identity"))
RELU = tl.constexpr(kernel_id("relu"))
LEAKY_RELU = tl.constexpr(kernel_id("leaky_relu"))
GELU = tl.constexpr(kernel_id("gelu"))
GELU_TANH = tl.constexpr(kernel_id("gelu_tanh"))
SILU = tl.constexpr(kernel_id("silu"))
SIGMOID = tl.constexpr(kernel_id("sigmoid"))
TANH = tl.constexpr(kernel_id("tanh"))

_SQRT_1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2 pi)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(x):
    # Accurate to a few ulp everywhere and free of overflow (no exp of a positive
    # number): a continued fraction near 0, where 1 - e^{-2|x|} would cancel,
    # and (1 - t) / (1 + t), t = e^{-2|x|}, elsewhere.
    x2 = x * x
    near_zero = x / (1.0 + x2 / (3.0 + x2 / (5.0 + x2 / (7.0 + x2 / (9.0 + x2 / (11.0 + x2 / (13.0 + x2 / 15.0)))))))
    t = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - t) / (1.0 + t)
    far = tl.where(x < 0, -magnitude, magnitude)
    return tl.where(tl.abs(x) < 0.625, near_zero, far)


@triton.jit
def _sigmoid(x):
    # exp(-x) may overflow to inf for very negative x, giving exactly 0.
    return 1.0 / (1.0 + tl.exp(-x))


# relu: f(z) = max(z, 0), f'(z) = 0 where z <= 0, else 1. As PyTorch: NaN in, NaN out, relu(-0.0) = -0.0,
# and f'(NaN) = 1 (threshold_backward passes G through wherever z <= 0 is false).
@triton.jit
def relu(z):
    return tl.where(z < 0, 0.0, z)


@triton.jit
def relu_grad(z):
    return tl.where(z <= 0, 0.0, 1.0)


@triton.jit
def relu_delta(grad_a, z):
    # A select, as PyTorch's threshold_backward: G * 0 would turn an inf or NaN G into NaN.
    return tl.where(z <= 0, tl.zeros_like(grad_a), grad_a)


@triton.jit
def relu_delta_packed(grad_a, z):
    # relu_delta's bits for 16-bit G and z, two lanes per instruction (compiled CUDA only: inline PTX; bf16x2
    # comparisons need sm_90). A comparison writes 0xFFFF in each lane where z > 0 or z is NaN ("gtu": not z <= 0),
    # else 0, and G's bits are ANDed with it: G or +0.0. The select above compiles to five instructions per pair.
    if grad_a.dtype == tl.bfloat16:
        delta = tl.inline_asm_elementwise(
            "{ .reg .b32 m, zero; mov.b32 zero, 0; set.gtu.u32.bf16x2 m, $2, zero; and.b32 $0, $1, m; }",
            "=r,r,r", [grad_a, z], dtype=grad_a.dtype, is_pure=True, pack=2)
    else:
        delta = tl.inline_asm_elementwise(
            "{ .reg .b32 m, zero; mov.b32 zero, 0; set.gtu.u32.f16x2 m, $2, zero; and.b32 $0, $1, m; }",
            "=r,r,r", [grad_a, z], dtype=grad_a.dtype, is_pure=True, pack=2)
    return delta


# leaky_relu: f(z) = z if z > 0 else s z, f'(z) = 1 if z > 0 else s
# (s is a compile-time constant, splat in the compute dtype so float64 keeps all its digits)
@triton.jit
def leaky_relu(z, NEGATIVE_SLOPE: tl.constexpr):
    return tl.where(z > 0, z, z * tl.full(z.shape, NEGATIVE_SLOPE, z.dtype))


@triton.jit
def leaky_relu_grad(z, NEGATIVE_SLOPE: tl.constexpr):
    return tl.where(z > 0, tl.full(z.shape, 1.0, z.dtype), tl.full(z.shape, NEGATIVE_SLOPE, z.dtype))


@triton.jit
def leaky_relu_delta(grad_a, z, NEGATIVE_SLOPE: tl.constexpr):
    # PyTorch's leaky_relu_backward, G where z > 0, else G s: G times a selected 1 or s, which is G itself where
    # z > 0 (inf and NaN included). Fewer instructions than the select between G and G s when G is widened from
    # 16 bits (the 16-bit results packed two at a time; dX prologue 128x256x64: 336 -> 315 loop instructions).
    return grad_a * tl.where(z > 0, tl.full(grad_a.shape, 1.0, grad_a.dtype),
                             tl.full(grad_a.shape, NEGATIVE_SLOPE, grad_a.dtype))


@triton.jit
def leaky_relu_delta_packed(grad_a, scaled, z):
    # leaky_relu_delta's bits for 16-bit G and z, given scaled = G s rounded to G's dtype (from float32, as
    # leaky_relu_backward), two lanes per instruction (compiled CUDA only, as relu_delta_packed): a comparison
    # writes 0xFFFF in each lane where z > 0 (false for NaN), else 0, and one LOP3 takes G's bits there and
    # scaled's elsewhere (LUT 0xE4: (m & G) | (~m & scaled)).
    if grad_a.dtype == tl.bfloat16:
        delta = tl.inline_asm_elementwise(
            "{ .reg .b32 m, zero; mov.b32 zero, 0; set.gt.u32.bf16x2 m, $3, zero; lop3.b32 $0, $1, $2, m, 0xE4; }",
            "=r,r,r,r", [grad_a, scaled, z], dtype=grad_a.dtype, is_pure=True, pack=2)
    else:
        delta = tl.inline_asm_elementwise(
            "{ .reg .b32 m, zero; mov.b32 zero, 0; set.gt.u32.f16x2 m, $3, zero; lop3.b32 $0, $1, $2, m, 0xE4; }",
            "=r,r,r,r", [grad_a, scaled, z], dtype=grad_a.dtype, is_pure=True, pack=2)
    return delta


# gelu (exact): f(z) = z Phi(z), f'(z) = Phi(z) + z phi(z)
@triton.jit
def gelu(z):
    return z * 0.5 * (1.0 + tl.math.erf(z * _SQRT_1_2))


@triton.jit
def gelu_grad(z):
    cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT_1_2))
    pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    return cdf + z * pdf


# gelu_tanh: f(z) = z/2 (1 + tanh u), u = sqrt(2/pi) (z + c z^3)
#            f'(z) = (1 + tanh u)/2 + z/2 (1 - tanh^2 u) sqrt(2/pi) (1 + 3c z^2)
@triton.jit
def gelu_tanh(z):
    u = _SQRT_2_PI * (z + _GELU_TANH_C * z * z * z)
    return 0.5 * z * (1.0 + _tanh(u))


@triton.jit
def gelu_tanh_grad(z):
    u = _SQRT_2_PI * (z + _GELU_TANH_C * z * z * z)
    t = _tanh(u)
    du_dz = _SQRT_2_PI * (1.0 + 3.0 * _GELU_TANH_C * z * z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du_dz


# silu: f(z) = z sigma(z), f'(z) = sigma(z) (1 + z (1 - sigma(z)))
@triton.jit
def silu(z):
    return z * _sigmoid(z)


@triton.jit
def silu_grad(z):
    s = _sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


# sigmoid: f(z) = 1 / (1 + e^-z), f'(z) = f(z) (1 - f(z))
@triton.jit
def sigmoid(z):
    return _sigmoid(z)


@triton.jit
def sigmoid_grad(z):
    s = _sigmoid(z)
    return s * (1.0 - s)


@triton.jit
def sigmoid_grad_from_output(a):
    return a * (1.0 - a)


@triton.jit
def sigmoid_delta_from_output(grad_a, a, ROUND_TO: tl.constexpr):
    # PyTorch's sigmoid_backward, (G (1 - a)) a, each operation rounded to ROUND_TO (see _rounded)
    return _rounded(_rounded(grad_a * _rounded(1.0 - a, ROUND_TO), ROUND_TO) * a, ROUND_TO)


# tanh: f(z) = tanh z, f'(z) = 1 - tanh^2 z
@triton.jit
def tanh(z):
    return _tanh(z)


@triton.jit
def tanh_grad(z):
    t = _tanh(z)
    return 1.0 - t * t


@triton.jit
def tanh_grad_from_output(a):
    return 1.0 - a * a


@triton.jit
def tanh_delta_from_output(grad_a, a, ROUND_TO: tl.constexpr):
    # PyTorch's tanh_backward, G (1 - a a), each operation rounded to ROUND_TO (see _rounded)
    return _rounded(grad_a * _rounded(1.0 - _rounded(a * a, ROUND_TO), ROUND_TO), ROUND_TO)


@triton.jit
def _rounded(x, ROUND_TO: tl.constexpr):
    """x rounded to ROUND_TO, kept in x's dtype. PyTorch's CUDA tanh_backward and sigmoid_backward compute 16-bit
    data in c10::Half / c10::BFloat16 arithmetic: each operation in float32, then rounded to 16 bits (three
    roundings, not one; its CPU kernels round once). For 16-bit operands every one of those float32 operations is
    exact, so this gives the bits of the 16-bit instructions (delta_from_output_packed). A no-op where ROUND_TO
    is x's own dtype (float32 and float64 data, and the MLP epilogue's unrounded float32 G)."""
    if ROUND_TO != x.dtype:
        x = x.to(ROUND_TO).to(x.dtype)
    return x


@triton.jit
def delta_from_output_packed(grad_a, a, ACTIVATION: tl.constexpr):
    """tanh's and sigmoid's delta_from_output for 16-bit G and a rounded to their dtype, two lanes per instruction
    (compiled CUDA only, inline PTX as relu_delta_packed): the same three operations, each rounded to nearest
    even, as 16-bit instructions (an explicit .rn is never fused into an FMA). 3 instructions a pair instead of 9
    (two widenings of each operand, two FFMA, two FMUL, one pack)."""
    # (1, 1) as bf16x2 is 0x3F803F80, as f16x2 0x3C003C00
    if ACTIVATION == TANH and grad_a.dtype == tl.bfloat16:  # G (1 - a a)
        asm: tl.constexpr = ("{ .reg .b32 t, one; mov.b32 one, 0x3F803F80; mul.rn.bf16x2 t, $2, $2; "
                             "sub.rn.bf16x2 t, one, t; mul.rn.bf16x2 $0, $1, t; }")
    elif ACTIVATION == TANH:
        asm: tl.constexpr = ("{ .reg .b32 t, one; mov.b32 one, 0x3C003C00; mul.rn.f16x2 t, $2, $2; "
                             "sub.rn.f16x2 t, one, t; mul.rn.f16x2 $0, $1, t; }")
    elif grad_a.dtype == tl.bfloat16:  # sigmoid: (G (1 - a)) a
        asm: tl.constexpr = ("{ .reg .b32 t, one; mov.b32 one, 0x3F803F80; sub.rn.bf16x2 t, one, $2; "
                             "mul.rn.bf16x2 t, $1, t; mul.rn.bf16x2 $0, t, $2; }")
    else:
        asm: tl.constexpr = ("{ .reg .b32 t, one; mov.b32 one, 0x3C003C00; sub.rn.f16x2 t, one, $2; "
                             "mul.rn.f16x2 t, $1, t; mul.rn.f16x2 $0, t, $2; }")
    return tl.inline_asm_elementwise(asm, "=r,r,r", [grad_a, a], dtype=grad_a.dtype, is_pure=True, pack=2)


# Dispatchers: ACTIVATION is a compile-time constant, so only one branch is compiled.
@triton.jit
def delta(grad_a, z, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr):
    """δ = G ⊙ f'(z)."""
    if ACTIVATION == RELU:
        return relu_delta(grad_a, z)
    elif ACTIVATION == LEAKY_RELU:
        return leaky_relu_delta(grad_a, z, NEGATIVE_SLOPE)
    elif ACTIVATION == IDENTITY:
        return grad_a
    else:
        return grad_a * f_grad(z, ACTIVATION, NEGATIVE_SLOPE)


@triton.jit
def delta_from_output(grad_a, a, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr, ROUND_TO: tl.constexpr):
    """δ = G ⊙ f'(z) from a = f(z); only where f_grad_from_output is defined. ROUND_TO: the dtype of the stored G
    and a, whose rounding tanh and sigmoid apply after each operation as PyTorch's CUDA kernels (_rounded)."""
    if ACTIVATION == RELU or ACTIVATION == LEAKY_RELU or ACTIVATION == IDENTITY:
        # The same selects on a as on z: a > 0 exactly when z > 0 (s >= 0), and a is NaN exactly when z is.
        return delta(grad_a, a, ACTIVATION, NEGATIVE_SLOPE)
    elif ACTIVATION == TANH:
        return tanh_delta_from_output(grad_a, a, ROUND_TO)
    elif ACTIVATION == SIGMOID:
        return sigmoid_delta_from_output(grad_a, a, ROUND_TO)
    else:
        return grad_a * f_grad_from_output(a, ACTIVATION, NEGATIVE_SLOPE)


@triton.jit
def f(z, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr):
    """a = f(z)."""
    if ACTIVATION == RELU:
        return relu(z)
    elif ACTIVATION == LEAKY_RELU:
        return leaky_relu(z, NEGATIVE_SLOPE)
    elif ACTIVATION == GELU:
        return gelu(z)
    elif ACTIVATION == GELU_TANH:
        return gelu_tanh(z)
    elif ACTIVATION == SILU:
        return silu(z)
    elif ACTIVATION == SIGMOID:
        return sigmoid(z)
    elif ACTIVATION == TANH:
        return tanh(z)
    else:
        return z


@triton.jit
def f_grad(z, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr):
    """f'(z)."""
    if ACTIVATION == RELU:
        return relu_grad(z)
    elif ACTIVATION == LEAKY_RELU:
        return leaky_relu_grad(z, NEGATIVE_SLOPE)
    elif ACTIVATION == GELU:
        return gelu_grad(z)
    elif ACTIVATION == GELU_TANH:
        return gelu_tanh_grad(z)
    elif ACTIVATION == SILU:
        return silu_grad(z)
    elif ACTIVATION == SIGMOID:
        return sigmoid_grad(z)
    elif ACTIVATION == TANH:
        return tanh_grad(z)
    else:
        return tl.full(z.shape, 1.0, z.dtype)


@triton.jit
def f_grad_from_output(a, ACTIVATION: tl.constexpr, NEGATIVE_SLOPE: tl.constexpr):
    """f'(z) from a = f(z); only for identity, relu, leaky_relu (s >= 0), sigmoid, tanh."""
    if ACTIVATION == RELU:
        return relu_grad(a)  # a > 0 exactly when z > 0
    elif ACTIVATION == LEAKY_RELU:
        return leaky_relu_grad(a, NEGATIVE_SLOPE)  # s >= 0: a > 0 exactly when z > 0
    elif ACTIVATION == SIGMOID:
        return sigmoid_grad_from_output(a)
    elif ACTIVATION == TANH:
        return tanh_grad_from_output(a)
    else:
        return tl.full(a.shape, 1.0, a.dtype)
