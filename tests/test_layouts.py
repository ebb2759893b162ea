"""Tests of manualbp.layouts and of docs/derivation.md, float64 throughout.

Every labelled equation of the document, (F1) ... (E12), is exercised by a test whose
``@covers`` names it, and ``test_every_doc_equation_is_exercised`` fails when the document
shows a label no test covers (or a test claims a label the document lacks).

The E tests code each error of the question's equations as written and assert that the
result is far from autograd's gradient (or that its factors do not conform), and that
the correction matches. Each one isolates a single mistake: the rest of the equation is
taken correct.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from manualbp.derivation import layouts as lo
from manualbp.derivation.layouts import DTYPE, Network, column, row

DOC = Path(__file__).resolve().parents[1] / "docs" / "derivation.md"

TOL = 1e-10  # float64 agreement, relative to the largest entry of the reference
LARGE = 0.1  # a wrong formula misses by at least this much, relative (here by 0.2 to N_L - 1, or does not conform)

COVERED: set[str] = set()


def covers(*labels: str):
    """Record that the decorated test exercises the document's equations ``labels``."""
    COVERED.update(labels)
    return lambda fn: fn


# Random networks: several depths (1 to 4 layers), widths and activations.
NETS = [
    ([3, 2], "sigmoid", 0),
    ([4, 5, 3], "sigmoid", 1),
    ([2, 6, 4, 3], "tanh", 2),
    ([3, 3, 3, 3], "gelu", 3),
    ([5, 4, 6, 2, 3], "silu", 4),
    ([4, 5, 3], "relu", 5),
    ([4, 5, 3], "leaky_relu", 6),
    ([3, 4, 2], "gelu_tanh", 7),
    ([2, 3, 2], "identity", 8),
]
NET_IDS = [f"{act}-{'x'.join(map(str, sizes))}" for sizes, act, _ in NETS]
DEEP_NETS = [(s, a, seed) for s, a, seed in NETS if len(s) >= 3]
DEEP_IDS = [f"{act}-{'x'.join(map(str, sizes))}" for sizes, act, _ in DEEP_NETS]

# For the errors: L >= 2, N_L >= 2, activations whose f' is nowhere 0 or 1.
ERR_NETS = [([3, 4, 2], "sigmoid", 11), ([2, 5, 3, 4], "tanh", 12), ([4, 3, 5, 3], "gelu", 13)]
# Equal widths: here the shapes do not catch a wrong index or order, the numbers must. How far
# a wrong formula then misses depends on how much f' varies between units (typically 0.3
# relative); sigmoid's f' (0 to 0.25) varies too little to make a clear example, so not here.
SQUARE_NETS = [([3, 3, 3], "tanh", 21), ([4, 4, 4, 4], "gelu", 22), ([4, 4, 4, 4], "silu", 23)]
ALL_ERR_NETS = ERR_NETS + SQUARE_NETS
ERR_IDS = [f"{act}-{'x'.join(map(str, sizes))}" for sizes, act, _ in ALL_ERR_NETS]
SQUARE_IDS = [f"{act}-{'x'.join(map(str, sizes))}" for sizes, act, _ in SQUARE_NETS]


def make(sizes, act, seed):
    net = Network.random(sizes, act, seed=seed)
    x, y = net.random_data(seed=seed + 100)
    return net, x, y


def rel_err(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """max |candidate - reference| / max |reference|; inf when the shapes differ."""
    if candidate.shape != reference.shape:
        return math.inf
    scale = reference.abs().max().item()
    assert scale > 1e-12, f"reference is all zeros, the comparison would mean nothing: {reference}"
    return (candidate - reference).abs().max().item() / scale


def mismatch(compute, reference: torch.Tensor) -> tuple[float, str]:
    """Relative error of compute() against ``reference`` and why it is wrong.

    Returns (inf, "does not conform: ...") when the factors' shapes do not conform
    (layouts.NonConformingError, or einsum's / matmul's RuntimeError on sizes; einsum's ValueError where it
    plans the contraction with opt_einsum, when that is installed), and
    (inf, "shape ...") when the result has the wrong shape.
    """
    try:
        candidate = compute()
    except lo.NonConformingError as e:
        return math.inf, f"does not conform: {e}"
    except (RuntimeError, ValueError) as e:
        if not re.search(r"size|shape|dimension|broadcast", str(e), re.IGNORECASE):
            raise  # a bug in the test, not a shape mismatch
        return math.inf, f"does not conform: {str(e).splitlines()[0]}"
    if candidate.shape != reference.shape:
        return math.inf, f"shape {list(candidate.shape)}, expected {list(reference.shape)}"
    return rel_err(candidate, reference), "values"


def assert_matches(candidate, reference, what: str) -> None:
    err = rel_err(candidate, reference)
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL} (shapes {list(candidate.shape)} vs {list(reference.shape)})"


def assert_wrong(compute, reference, what: str, expect_values: bool = False) -> None:
    """The as-written formula misses by a large amount; with ``expect_values`` it must conform and miss in value."""
    err, why = mismatch(compute, reference)
    assert err > LARGE, f"{what}: as written it should be wrong, but matches to {err:.3g} ({why})"
    if expect_values:
        assert why == "values", f"{what}: equal widths, so it should conform and be wrong in value; got {why}"


def fp(net: Network, z: torch.Tensor) -> torch.Tensor:
    return net.activation.f_grad(z)


# ---------------------------------------------------------------------------
# (F) The network


@covers("F1")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_F1_forward_matches_torch(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    fwd = lo.forward(net, x)
    a = x
    for l in range(1, net.L + 1):
        z = F.linear(a, net.W(l), net.b(l))
        assert_matches(fwd.z[l], z, f"(F1) z^({l}) = W a + b")
        a = net.activation.f(z)
        assert_matches(fwd.a[l], a, f"(F1) a^({l}) = f(z)")
    assert torch.equal(fwd.a[0], x), "(F1) a^(0) = x"
    assert sorted(fwd.z) == list(range(1, net.L + 1)), f"(F1) layers are 1..L, got {sorted(fwd.z)}"


@covers("F2", "F3")
@pytest.mark.parametrize("sizes,act,seed", NETS[:4], ids=NET_IDS[:4])
def test_F2_F3_cost_is_half_mse(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    a_L = lo.forward(net, x).a[net.L]
    C = lo.cost(a_L, y)
    assert_matches(C, 0.5 * F.mse_loss(a_L, y), "(F2) C = (1/N_L) sum 1/2 (a - y)^2")
    X, Y = net.random_data(n=5, seed=seed)
    A_L = lo.batched_forward(net, X).a[net.L]
    C_D = lo.batch_cost(A_L, Y, "mean")
    assert_matches(C_D, 0.5 * F.mse_loss(A_L, Y), "(F3) C_D = (1/N) sum_n C_n")
    per_sample = torch.stack([lo.cost(lo.forward(net, X[n]).a[net.L], Y[n]) for n in range(5)])
    assert_matches(C_D, per_sample.mean(), "(F3) C_D is the mean of the per-sample costs")
    assert_matches(lo.batch_cost(A_L, Y, "sum"), per_sample.sum(), "(F3) sum reduction")


# ---------------------------------------------------------------------------
# (R) Layouts and the rule; (J) the factors; (T) dz/dW


@covers("R1", "J1", "J2", "J3", "J4")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_R1_J_factors_are_the_jacobians(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    fwd = lo.forward(net, x)
    jac = torch.autograd.functional.jacobian
    L = net.L
    J3 = jac(lambda a: lo.cost(a, y), fwd.a[L])
    assert_matches(lo.jacobian_cost(fwd, y), row(J3), "(J3) dC/da^(L) is the row (1/N_L)(a - y)^T")
    for l in range(1, L + 1):
        J1 = jac(lambda a: net.W(l) @ a + net.b(l), fwd.a[l - 1])
        assert_matches(lo.jacobian_z_a(net, l), J1, f"(J1) dz^({l})/da^({l - 1}) = W^({l})")
        J2 = jac(net.activation.f, fwd.z[l])
        assert_matches(lo.jacobian_a_z(net, fwd, l), J2, f"(J2) da^({l})/dz^({l}) = diag(f')")
        v = torch.randn(sizes[l], dtype=DTYPE)
        assert_matches(lo.jacobian_a_z(net, fwd, l) @ v, fp(net, fwd.z[l]) * v, "(J2) diag(v) u = v * u")
        J4 = jac(lambda b: net.W(l) @ fwd.a[l - 1] + b, net.b(l))
        assert_matches(lo.jacobian_z_b(net, l), J4, f"(J4) dz^({l})/db^({l}) = I")


@covers("R2")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_R2_denominator_factors_are_transposed_jacobians(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    fwd = lo.forward(net, x)
    for l in range(1, net.L + 1):
        num = lo.chain_factors(net, fwd, y, ("b", l), "numerator")
        den = lo.chain_factors(net, fwd, y, ("b", l), "denominator")
        assert len(num) == len(den), "(R2) same factors in both layouts"
        for f_num, f_den in zip(num, reversed(den)):
            assert f_num.name == f_den.name, f"(R2) same derivative: {f_num.name} vs {f_den.name}"
            assert torch.equal(f_den.value, f_num.value.T), f"(R2) denominator {f_den.name} is the transposed Jacobian"
    # scalar by vector: a row in numerator, a column (the gradient) in denominator
    ref = lo.autograd_gradients(net, x, y)
    grad_x_den = lo.multiply_chain(lo.chain_factors(net, fwd, y, "x", "denominator"), "denominator")
    grad_x_num = lo.multiply_chain(lo.chain_factors(net, fwd, y, "x", "numerator"), "numerator")
    assert grad_x_den.shape == (sizes[0], 1), f"(R2) dC/dx is a column in denominator layout, got {list(grad_x_den.shape)}"
    assert grad_x_num.shape == (1, sizes[0]), f"(R1) dC/dx is a row in numerator layout, got {list(grad_x_num.shape)}"
    assert_matches(grad_x_den, ref.grad_x, "(R2) denominator dC/dx is the gradient")


@covers("R3", "R4")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_R3_R4_chains_equal_autograd(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    den = lo.denominator_gradients(net, x, y)
    num = lo.numerator_gradients(net, x, y)
    assert_matches(den.grad_x, ref.grad_x, "(R4) denominator dC/dx")
    assert_matches(num.grad_x, ref.grad_x.T, "(R3) numerator dC/dx")
    for l in range(0, net.L + 1):
        assert_matches(den.grad_a[l], ref.grad_a[l], f"(R4) denominator dC/da^({l})")
        assert_matches(num.grad_a[l], ref.grad_a[l].T, f"(R3) numerator dC/da^({l})")
    for l in range(1, net.L + 1):
        assert_matches(den.delta[l], ref.delta[l], f"(R4) denominator dC/dz^({l})")
        assert_matches(den.grad_weight[l], ref.grad_weight[l], f"(R4) denominator dC/dW^({l})")
        assert_matches(den.grad_bias[l], ref.grad_bias[l], f"(R4) denominator dC/db^({l})")
        assert_matches(num.delta[l], ref.delta[l].T, f"(R3) numerator dC/dz^({l})")
        assert_matches(num.grad_weight[l], ref.grad_weight[l].T, f"(R3) numerator dC/dW^({l})")
        assert_matches(num.grad_bias[l], ref.grad_bias[l].T, f"(R3) numerator dC/db^({l})")


@covers("R3")
@pytest.mark.parametrize("sizes,act,seed", NETS[:5], ids=NET_IDS[:5])
def test_R3_numerator_chain_is_the_jacobian_of_the_composition(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    jac_C_x = torch.autograd.functional.jacobian(lambda v: lo.cost(lo.forward(net, v).a[net.L], y), x)
    num = lo.numerator_gradients(net, x, y)
    assert_matches(num.grad_x, row(jac_C_x), "(R3) numerator dC/dx = Jacobian of x -> C")


@covers("R5")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_R5_numerator_is_transpose_of_denominator(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    den = lo.denominator_gradients(net, x, y)
    num = lo.numerator_gradients(net, x, y)
    back = num.transpose()
    assert back.layout == "denominator", f"(R5) transpose of numerator is denominator, got {back.layout}"
    assert_matches(back.grad_x, den.grad_x, "(R5) dC/dx")
    for l in range(1, net.L + 1):
        for name in ("delta", "grad_weight", "grad_bias", "grad_weight_tensor"):
            assert_matches(getattr(back, name)[l], getattr(den, name)[l], f"(R5) {name}[{l}] numerator^T = denominator")
        fwd = lo.forward(net, x)
        # (ABC)^T = C^T B^T A^T, factor by factor
        num_factors = lo.chain_factors(net, fwd, y, ("b", l), "numerator")
        den_factors = lo.chain_factors(net, fwd, y, ("b", l), "denominator")
        lhs = lo.multiply([f.value for f in num_factors]).T
        rhs = lo.multiply([f.value.T for f in reversed(num_factors)])
        assert_matches(lhs, rhs, f"(R5) (ABC)^T = C^T B^T A^T for dC/db^({l})")
        assert_matches(rhs, lo.multiply([f.value for f in den_factors]), f"(R5) ... which is the denominator chain for dC/db^({l})")


@covers("R3", "R4", "R5")
@pytest.mark.parametrize("layout", lo.LAYOUTS)
@pytest.mark.parametrize(
    "sizes,act,seed,conforming",
    [
        ([2, 3, 4], "sigmoid", 31, 1),
        ([2, 4, 3], "tanh", 32, 1),
        ([3, 3, 3], "sigmoid", 33, 24),
        ([3, 3, 3], "gelu", 34, 24),
        ([2, 3, 2], "tanh", 35, 2),
        ([3, 2, 3, 2], "tanh", 36, 24),
    ],
    ids=["distinct-widths-sigmoid", "distinct-widths-tanh", "equal-widths-sigmoid", "equal-widths-gelu", "2x3x2", "3x2x3x2"],
)
def test_R5_no_other_order_works(sizes, act, seed, conforming, layout):
    """Of all orders of the chain for dC/dx, only the layout's gives the gradient.

    With pairwise distinct widths only that order conforms; with equal widths the 4! orders
    that keep the vector dC/da^(L) at C's end conform, and all but one are wrong numbers.
    Widths that differ but repeat also let other orders conform (section 2): for [2,3,2] one
    more (diag(f'(z^(2))) (W^(1))^T diag(f'(z^(1))) (W^(2))^T dC/da^(2) in denominator layout),
    for [3,2,3,2] 23 more; every one of them is a wrong number.
    """
    net, x, y = make(sizes, act, seed)
    fwd = lo.forward(net, x)
    factors = [f.value for f in lo.chain_factors(net, fwd, y, "x", layout)]
    ref = lo.autograd_gradients(net, x, y).grad_x
    ref = ref if layout == "denominator" else ref.T
    n_conform, matches = 0, []
    for perm in itertools.permutations(range(len(factors))):
        err, why = mismatch(lambda: lo.multiply([factors[i] for i in perm]), ref)
        n_conform += why == "values"
        if err <= TOL:
            matches.append(perm)
    assert matches == [tuple(range(len(factors)))], f"({layout}) only the prescribed order may match, matched: {matches}"
    # the orders that conform but are not prescribed give wrong numbers
    assert n_conform == conforming, f"({layout}) expected {conforming} conforming orders, got {n_conform}"


@covers("R6")
@pytest.mark.parametrize("layout", lo.LAYOUTS)
@pytest.mark.parametrize("act,seed", [("tanh", 37), ("sigmoid", 38), ("gelu", 39)])
def test_R6_a_second_conforming_order_for_2x3x2_is_wrong(act, seed, layout):
    """For sizes [2,3,2] the order of (R6) conforms, has the gradient's shape, and is a wrong number."""
    net, x, y = make([2, 3, 2], act, seed)
    fwd = lo.forward(net, x)
    W1, D1, W2, D2, g = net.W(1), torch.diag(fp(net, fwd.z[1])), net.W(2), torch.diag(fp(net, fwd.z[2])), lo.grad_cost(fwd.a[2], y)
    ref = lo.autograd_gradients(net, x, y).grad_x
    if layout == "denominator":  # (W1)^T D1 (W2)^T D2 g, and the reorder D2 (W1)^T D1 (W2)^T g
        right, other, expected = [W1.T, D1, W2.T, D2, column(g)], [D2, W1.T, D1, W2.T, column(g)], ref
    else:  # its transpose: g^T D2 W2 D1 W1, and g^T W2 D1 W1 D2
        right, other, expected = [row(g), D2, W2, D1, W1], [row(g), W2, D1, W1, D2], ref.T
    assert_matches(lo.multiply(right), expected, f"(R6) {layout}: the prescribed order")
    assert_wrong(lambda: lo.multiply(other), expected, f"(R6) {layout}: the second conforming order", expect_values=True)


@covers("R7")
@pytest.mark.parametrize("layout", lo.LAYOUTS)
@pytest.mark.parametrize("sizes,conforming", [([1, 1], 6), ([1, 1, 1], 120), ([2, 1], 2), ([3, 2, 1], 2)])
def test_R7_one_by_one_factors_commute(sizes, conforming, layout):
    """Where the factors an order swaps are 1x1 it gives the same number (R7): all widths 1, or N_L = 1 at C's end."""
    net, x, y = make(sizes, "tanh", 40)
    fwd = lo.forward(net, x)
    factors = [f.value for f in lo.chain_factors(net, fwd, y, "x", layout)]
    ref = lo.autograd_gradients(net, x, y).grad_x
    ref = ref if layout == "denominator" else ref.T
    results = []
    for perm in itertools.permutations(range(len(factors))):
        err, why = mismatch(lambda: lo.multiply([factors[i] for i in perm]), ref)
        if why == "values":
            results.append((perm, err))
    assert len(results) == conforming, f"(R7) {sizes}: {conforming} conforming orders, got {len(results)}"
    assert all(err <= TOL for _, err in results), f"(R7) {sizes}: every conforming order is right (scalars commute): {results}"
    moved = [f for perm, _ in results for i, f in enumerate(factors) if perm[i] != i]
    assert all(f.numel() == 1 for f in moved), f"(R7) {sizes}: only 1x1 factors change place"


@covers("T1")
@pytest.mark.parametrize("sizes,act,seed", NETS[:5], ids=NET_IDS[:5])
def test_T1_dz_dW_is_third_order(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    fwd = lo.forward(net, x)
    for l in range(1, net.L + 1):
        J = torch.autograd.functional.jacobian(lambda W: W @ fwd.a[l - 1] + net.b(l), net.W(l))  # [i, j, k]
        T = lo.jacobian_z_W(net, fwd, l)  # [i, k, j]
        assert T.shape == (sizes[l], sizes[l - 1], sizes[l]), f"(T1) dz^({l})/dW^({l}) is [N_l, N_(l-1), N_l], got {list(T.shape)}"
        assert_matches(T.permute(0, 2, 1), J, f"(T1) dz_i/dW_jk = [i=j] a_k, layer {l}")


@covers("T2", "T3")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_T2_T3_trace_route(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    fwd = lo.forward(net, x)
    gen = torch.Generator().manual_seed(seed)
    for l in range(1, net.L + 1):
        G = lo.weight_gradient_from_delta(ref.delta[l], fwd.a[l - 1], "denominator")
        assert_matches(G, ref.grad_weight[l], f"(T2) dC/dW^({l}) = delta a^T")
        G_num = lo.weight_gradient_from_delta(ref.delta[l].T, fwd.a[l - 1], "numerator")
        assert_matches(G_num, G.T, f"(T3) numerator dC/dW^({l}) = a delta^T = G^T")
        # dC = tr(G^T dW): the directional derivative along a random dW, by central differences
        dW = torch.randn(net.W(l).shape, generator=gen, dtype=DTYPE)
        h = 1e-6

        def C_at(t):
            weight = list(net.weight)
            weight[l - 1] = weight[l - 1] + t * dW
            return lo.cost(lo.forward(Network(weight, net.bias, net.activation), x).a[net.L], y)

        dC = (C_at(h) - C_at(-h)) / (2 * h)
        tr = torch.trace(G.T @ dW)
        assert abs(dC - tr) <= 1e-7 * max(1.0, abs(tr.item())), f"(T2) dC = tr(G^T dW): finite difference {dC.item():.12g} vs {tr.item():.12g}"


@covers("T4")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_T4_contracting_dz_dW_gives_the_trace_result(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    for layout in lo.LAYOUTS:
        g = lo.chain_gradients(net, x, y, layout)
        for l in range(1, net.L + 1):
            assert_matches(g.grad_weight_tensor[l], g.grad_weight[l], f"(T4) {layout}: contraction = trace result, layer {l}")
            expected = ref.grad_weight[l] if layout == "denominator" else ref.grad_weight[l].T
            assert_matches(g.grad_weight_tensor[l], expected, f"(T4) {layout}: contraction = autograd, layer {l}")
    fwd = lo.forward(net, x)
    factors = lo.chain_factors(net, fwd, y, ("W", 1), "denominator")
    assert factors[0].value.dim() == 3, "(T4) dz/dW stands first in the denominator chain"
    factors = lo.chain_factors(net, fwd, y, ("W", 1), "numerator")
    assert factors[-1].value.dim() == 3, "(T4) dz/dW stands last in the numerator chain"


# ---------------------------------------------------------------------------
# (D) and (N): one sample


@covers("D1", "D2", "D3", "D4", "D5")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_D_recursion_equals_chains_and_autograd(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    rec = lo.delta_recursion(net, x, y, "denominator")
    chain = lo.denominator_gradients(net, x, y)
    ref = lo.autograd_gradients(net, x, y)
    fwd = lo.forward(net, x)
    L = net.L
    D1 = column(fp(net, fwd.z[L])) * column(lo.grad_cost(fwd.a[L], y))
    assert_matches(rec.delta[L], D1, "(D1) delta^(L) = f'(z^(L)) * (1/N_L)(a - y)")
    assert_matches(torch.diag(fp(net, fwd.z[L])) @ column(lo.grad_cost(fwd.a[L], y)), D1, "(D1) diag form = elementwise form")
    for l in range(L, 0, -1):
        assert_matches(rec.delta[l], chain.delta[l], f"(D1/D2) recursion = explicit chain, delta^({l})")
        assert_matches(rec.delta[l], ref.delta[l], f"(D1/D2) recursion = autograd, delta^({l})")
        if l < L:
            D2 = torch.diag(fp(net, fwd.z[l])) @ net.W(l + 1).T @ rec.delta[l + 1]
            assert_matches(rec.delta[l], D2, f"(D2) delta^({l}) = diag(f') W^T delta^({l + 1})")
        assert rec.grad_weight[l].shape == net.W(l).shape, f"(D3) dC/dW^({l}) has the shape of W"
        assert_matches(rec.grad_weight[l], rec.delta[l] @ row(fwd.a[l - 1]), f"(D3) dC/dW^({l}) = delta a^T")
        assert_matches(rec.grad_weight[l], ref.grad_weight[l], f"(D3) recursion = autograd, dC/dW^({l})")
        assert_matches(rec.grad_bias[l], ref.grad_bias[l], f"(D4) dC/db^({l}) = delta^({l})")
        assert_matches(rec.grad_a[l - 1], net.W(l).T @ rec.delta[l], f"(D5) dC/da^({l - 1}) = W^T delta")
        assert_matches(rec.grad_a[l - 1], ref.grad_a[l - 1], f"(D5) recursion = autograd, dC/da^({l - 1})")
    assert rec.grad_x.shape == (sizes[0], 1), "(D5) dC/dx is [N_0, 1]"
    assert_matches(rec.grad_x, ref.grad_x, "(D5) dC/dx")


@covers("N1", "N2", "N3", "N4", "N5")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_N_recursion_equals_chains_and_autograd(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    rec = lo.delta_recursion(net, x, y, "numerator")
    chain = lo.numerator_gradients(net, x, y)
    ref = lo.autograd_gradients(net, x, y)
    fwd = lo.forward(net, x)
    L = net.L
    N1 = row(lo.grad_cost(fwd.a[L], y)) @ torch.diag(fp(net, fwd.z[L]))
    assert_matches(rec.delta[L], N1, "(N1) delta^(L)^T = (1/N_L)(a - y)^T diag(f')")
    for l in range(L, 0, -1):
        assert rec.delta[l].shape == (1, sizes[l]), f"(N1/N2) delta^({l})^T is a row"
        assert_matches(rec.delta[l], chain.delta[l], f"(N1/N2) recursion = explicit chain, delta^({l})")
        assert_matches(rec.delta[l], ref.delta[l].T, f"(N1/N2) recursion = autograd^T, delta^({l})")
        if l < L:
            N2 = rec.delta[l + 1] @ net.W(l + 1) @ torch.diag(fp(net, fwd.z[l]))
            assert_matches(rec.delta[l], N2, f"(N2) delta^({l})^T = delta^({l + 1})^T W diag(f')")
        assert rec.grad_weight[l].shape == net.W(l).T.shape, f"(N3) dC/dW^({l}) has the shape of W^T"
        assert_matches(rec.grad_weight[l], column(fwd.a[l - 1]) @ rec.delta[l], f"(N3) dC/dW^({l}) = a delta^T")
        assert_matches(rec.grad_weight[l], ref.grad_weight[l].T, f"(N3) recursion = autograd^T, dC/dW^({l})")
        assert rec.grad_bias[l].shape == (1, sizes[l]), f"(N4) dC/db^({l}) is a row"
        assert_matches(rec.grad_bias[l], ref.grad_bias[l].T, f"(N4) dC/db^({l}) = delta^({l})^T")
        assert_matches(rec.grad_a[l - 1], rec.delta[l] @ net.W(l), f"(N5) dC/da^({l - 1}) = delta^T W")
    assert_matches(rec.grad_x, ref.grad_x.T, "(N5) dC/dx = delta^(1)^T W^(1)")


@covers("D6", "N6")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_D6_N6_full_chain_written_out(sizes, act, seed):
    """The explicit products of (D6) and (N6), built here from W and f' alone."""
    net, x, y = make(sizes, act, seed)
    fwd = lo.forward(net, x)
    ref = lo.autograd_gradients(net, x, y)
    L = net.L
    g = lo.grad_cost(fwd.a[L], y)
    D = {l: torch.diag(fp(net, fwd.z[l])) for l in range(1, L + 1)}
    den = [m for l in range(1, L + 1) for m in (net.W(l).T, D[l])] + [column(g)]
    num = [row(g)] + [m for l in range(L, 0, -1) for m in (D[l], net.W(l))]
    assert_matches(lo.multiply(den), ref.grad_x, "(D6) W1^T diag(f'1) ... WL^T diag(f'L) dC/da^(L)")
    assert_matches(lo.multiply(num), ref.grad_x.T, "(N6) dC/da^(L) diag(f'L) WL ... diag(f'1) W1")
    chain_den = [f.value for f in lo.chain_factors(net, fwd, y, "x", "denominator")]
    assert len(chain_den) == len(den) and all(torch.equal(a, b) for a, b in zip(chain_den, den)), "(D6) chain_factors builds (D6)"
    chain_num = [f.value for f in lo.chain_factors(net, fwd, y, "x", "numerator")]
    assert len(chain_num) == len(num) and all(torch.equal(a, b) for a, b in zip(chain_num, num)), "(N6) chain_factors builds (N6)"


# ---------------------------------------------------------------------------
# (B) a batch stored row-wise


@covers("B1")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_B1_batched_forward_rows_are_samples(sizes, act, seed):
    net, _, _ = make(sizes, act, seed)
    X, Y = net.random_data(n=4, seed=seed)
    fwd = lo.batched_forward(net, X)
    for n in range(4):
        one = lo.forward(net, X[n])
        for l in range(1, net.L + 1):
            assert_matches(fwd.z[l][n], one.z[l], f"(B1) row {n} of Z^({l}) is z^({l})_n^T")
            assert_matches(fwd.a[l][n], one.a[l], f"(B1) row {n} of A^({l}) is a^({l})_n^T")


@covers("B2", "B3", "B4", "B5", "B6")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_B_batched_rowwise_equals_autograd(sizes, act, seed, reduction):
    net, _, _ = make(sizes, act, seed)
    X, Y = net.random_data(n=6, seed=seed)
    got = lo.batched_rowwise_gradients(net, X, Y, reduction)
    ref = lo.batched_autograd_gradients(net, X, Y, reduction)
    L = net.L
    G = (lo.batched_forward(net, X).a[L] - Y) / sizes[-1] / (6 if reduction == "mean" else 1)
    assert_matches(got.grad_a[L], G, "(B2) G^(L) = (1/(N N_L))(A - Y)")
    assert_matches(got.grad_a[L], ref.grad_a[L], "(B2) G^(L) = autograd dC_D/dA^(L)")
    for l in range(L, 0, -1):
        assert_matches(got.delta[l], ref.delta[l], f"(B3) Delta^({l}) = G * f'(Z)")
        assert_matches(got.grad_a[l - 1], ref.grad_a[l - 1], f"(B4) dC/dA^({l - 1}) = Delta W")
        assert_matches(got.grad_weight[l], ref.grad_weight[l], f"(B5) dC/dW^({l}) = Delta^T X")
        assert_matches(got.grad_bias[l], ref.grad_bias[l], f"(B6) dC/db^({l}) = 1^T Delta")
    assert_matches(got.grad_x, ref.grad_x, "(B4) dC/dX")


@covers("B3", "B4", "B5", "B6")
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"])
def test_B3_B6_one_layer_with_any_upstream_gradient(act):
    """The kernels' formulas for one layer, for an arbitrary G, against autograd's vector-Jacobian product."""
    gen = torch.Generator().manual_seed(7)
    N, n_in, n_out = 5, 4, 3
    X = torch.randn(N, n_in, generator=gen, dtype=DTYPE, requires_grad=True)
    W = torch.randn(n_out, n_in, generator=gen, dtype=DTYPE, requires_grad=True)
    b = torch.randn(n_out, generator=gen, dtype=DTYPE, requires_grad=True)
    G = torch.randn(N, n_out, generator=gen, dtype=DTYPE)
    activation = Network.random([n_in, n_out], act).activation
    Z = X @ W.T + b
    A = activation.f(Z)
    gX, gW, gb = torch.autograd.grad(A, (X, W, b), grad_outputs=G)
    out = lo.dense_backward_rowwise(G, Z.detach(), X.detach(), W.detach(), activation)
    assert_matches(out.delta, G * activation.f_grad(Z.detach()), "(B3) Delta = G * f'(Z)")
    assert_matches(out.grad_x, gX, "(B4) dC/dX = Delta W")
    assert_matches(out.grad_weight, gW, "(B5) dC/dW = Delta^T X")
    assert_matches(out.grad_bias, gb, "(B6) dC/db^T = 1^T Delta")
    assert out.grad_x.shape == X.shape and out.grad_weight.shape == W.shape, "(B4/B5) shaped like the stored variables"


@covers("B7")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_B7_batch_is_the_mean_of_per_sample_gradients(sizes, act, seed):
    net, _, _ = make(sizes, act, seed)
    n = 5
    X, Y = net.random_data(n=n, seed=seed)
    got = lo.batched_rowwise_gradients(net, X, Y, "mean")
    per = [lo.delta_recursion(net, X[i], Y[i], "denominator") for i in range(n)]
    for l in range(1, net.L + 1):
        for i in range(n):
            assert_matches(got.delta[l][i], per[i].delta[l].flatten() / n, f"(B7) row {i} of Delta^({l}) = delta_n^T / N")
        outer = sum(p.delta[l] @ row(lo.batched_forward(net, X).a[l - 1][i]) for i, p in enumerate(per)) / n
        assert_matches(got.grad_weight[l], outer, f"(B7) Delta^T A = (1/N) sum_n delta_n a_n^T, layer {l}")
        bias = sum(p.grad_bias[l].flatten() for p in per) / n
        assert_matches(got.grad_bias[l], bias, f"(B7) 1^T Delta = (1/N) sum_n delta_n^T, layer {l}")
    for i in range(n):
        assert_matches(got.grad_x[i], per[i].grad_x.flatten() / n, f"(B7) row {i} of Delta W = (dC/dx_n)^T / N")


@covers("B8")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_B8_batched_numerator_is_the_transpose(sizes, act, seed):
    net, _, _ = make(sizes, act, seed)
    X, Y = net.random_data(n=4, seed=seed)
    den = lo.batched_rowwise_gradients(net, X, Y)
    num = lo.batched_rowwise_gradients_numerator(net, X, Y)
    ref = lo.batched_autograd_gradients(net, X, Y)
    assert_matches(num.grad_x, ref.grad_x.T, "(B8) dC/dX = W^T Delta^T")
    for l in range(1, net.L + 1):
        assert_matches(num.grad_weight[l], den.grad_weight[l].T, f"(B8) X^T Delta = (Delta^T X)^T, layer {l}")
        assert_matches(num.grad_weight[l], ref.grad_weight[l].T, f"(B8) dC/dW^({l}) numerator = autograd^T")
        assert num.grad_bias[l].shape == (sizes[l], 1), f"(B8) dC/db^T is a column [out, 1] in numerator layout"
        assert_matches(num.grad_bias[l].flatten(), ref.grad_bias[l], f"(B8) Delta^T 1, layer {l}")


# ---------------------------------------------------------------------------
# (E) The question's errors: as written, wrong; corrected, right.


@covers("E1a")
@pytest.mark.parametrize("sizes,act,seed", ERR_NETS, ids=ERR_IDS[: len(ERR_NETS)])
def test_E1a_layers_indexed_from_zero(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    # As written, l in [0, L]: layer 0 needs W^(0), b^(0) (and a^(-1)), which do not exist.
    with pytest.raises(IndexError, match=r"W\^\(0\) does not exist"):
        [net.W(l) for l in range(0, net.L + 1)]
    # Supplying a layer 0 to make it run: a^(0) = f(W^(0) x + b^(0)) is no longer x, the gradient is wrong.
    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(sizes[0], sizes[0], generator=gen, dtype=DTYPE) / sizes[0] ** 0.5
    b0 = torch.randn(sizes[0], generator=gen, dtype=DTYPE)
    written = Network([W0, *net.weight], [b0, *net.bias], act)
    assert written.L == net.L + 1, "(E1a) l in [0, L] makes L + 1 layers"
    a0 = lo.forward(written, x).a[1]  # what layer 0 would make of x
    assert rel_err(a0, x) > LARGE, "(E1a) with a layer 0, a^(0) = x no longer holds"
    assert_wrong(lambda: lo.autograd_gradients(written, x, y).grad_x, ref.grad_x, "(E1a) dC/dx with a layer 0")
    # Corrected, l = 1..L (E1a): a^(0) = x and the gradients are right.
    fwd = lo.forward(net, x)
    assert torch.equal(fwd.a[0], x) and sorted(fwd.z) == list(range(1, net.L + 1)), "(E1a) l in {1..L}, a^(0) = x"
    assert_matches(lo.denominator_gradients(net, x, y).grad_x, ref.grad_x, "(E1a) corrected dC/dx")


@covers("E1b")
@pytest.mark.parametrize("sizes,act,seed", ERR_NETS, ids=ERR_IDS[: len(ERR_NETS)])
def test_E1b_min_over_layers_from_zero(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    # As written the min ranges over W^(l), b^(l) for l in [0, L]: L + 1 pairs, the first of which does not exist.
    with pytest.raises(IndexError, match=r"W\^\(0\) does not exist"):
        [(net.W(l), net.b(l)) for l in range(0, net.L + 1)]
    with pytest.raises(IndexError, match=r"b\^\(0\) does not exist"):
        net.b(0)
    assert len(range(0, net.L + 1)) != len(ref.grad_weight), "(E1b) [0, L] counts one parameter pair too many"
    # Corrected (E1b): l in {1..L} is exactly the parameters the gradient has.
    params = [(net.W(l), net.b(l)) for l in range(1, net.L + 1)]
    assert len(params) == len(ref.grad_weight) == net.L, f"(E1b) L parameter pairs, got {len(params)}"
    for l, (W, b) in enumerate(params, start=1):
        assert W.shape == ref.grad_weight[l].shape, f"(E1b) dC/dW^({l}) exists for W^({l})"
        assert b.shape == ref.grad_bias[l].flatten().shape, f"(E1b) dC/db^({l}) exists for b^({l})"


def _all_weight_grads(g) -> torch.Tensor:
    return torch.cat([g.grad_weight[l].flatten() for l in sorted(g.grad_weight)] + [g.grad_bias[l].flatten() for l in sorted(g.grad_bias)])


@covers("E2")
@pytest.mark.parametrize("sizes,act,seed", ERR_NETS, ids=ERR_IDS[: len(ERR_NETS)])
def test_E2_dataset_of_one_repeated_pair(sizes, act, seed):
    net, _, _ = make(sizes, act, seed)
    n = 6
    X, Y = net.random_data(n=n, seed=seed)  # the data set D = {(x_n, y_n)} (E2)
    ref = _all_weight_grads(lo.batched_autograd_gradients(net, X, Y))
    # As written, X_i = x and Y_i = y for every i: N copies of one pair.
    X_written, Y_written = X[0].expand(n, -1), Y[0].expand(n, -1)
    written = _all_weight_grads(lo.batched_rowwise_gradients(net, X_written, Y_written))
    assert_wrong(lambda: written, ref, "(E2) gradient over the data set as written")
    one = _all_weight_grads(lo.delta_recursion(net, X[0], Y[0]))
    assert_matches(written, one, "(E2) as written, the 'data set' gradient is one sample's")
    assert_matches(_all_weight_grads(lo.batched_rowwise_gradients(net, X, Y)), ref, "(E2) corrected data set")


@covers("E3")
@pytest.mark.parametrize("sizes,act,seed", ERR_NETS, ids=ERR_IDS[: len(ERR_NETS)])
def test_E3_objective_of_one_data_point(sizes, act, seed):
    net, _, _ = make(sizes, act, seed)
    n = 6
    X, Y = net.random_data(n=n, seed=seed)
    ref = _all_weight_grads(lo.batched_autograd_gradients(net, X, Y, "mean"))  # gradient of (E3)
    single = _all_weight_grads(lo.delta_recursion(net, X[0], Y[0]))  # min C(a^(L), y) of one pair
    assert_wrong(lambda: single, ref, "(E3) gradient of one data point's cost")
    mean = sum(_all_weight_grads(lo.delta_recursion(net, X[i], Y[i])) for i in range(n)) / n
    assert_matches(mean, ref, "(E3) corrected: the mean of the per-sample gradients")
    assert_matches(_all_weight_grads(lo.batched_rowwise_gradients(net, X, Y, "mean")), ref, "(E3) corrected, batched")


@covers("E4a", "E4b", "E4c")
@pytest.mark.parametrize("form", ["E4a-index", "E4b-denominator", "E4c-numerator"])
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E4_dropped_one_over_N_L(sizes, act, seed, form):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y).grad_weight[net.L]
    fwd = lo.forward(net, x)
    L = net.L
    a_L, a_prev, f_L = fwd.a[L], fwd.a[L - 1], fp(net, fwd.z[L])
    diff = a_L - y  # the question's dC/da^(L)
    grad = diff / sizes[-1]  # (J3)
    if form == "E4a-index":  # (a_i - y_i) f'(z_i) a_j
        written = lambda: torch.einsum("i,i,j->ij", diff, f_L, a_prev)  # noqa: E731
        corrected, expected = torch.einsum("i,i,j->ij", grad, f_L, a_prev), ref
    elif form == "E4b-denominator":  # diag(f'(z)) (a - y) a^T
        written = lambda: lo.multiply([torch.diag(f_L), column(diff), row(a_prev)])  # noqa: E731
        corrected, expected = lo.multiply([torch.diag(f_L), column(grad), row(a_prev)]), ref
    else:  # (in the corrected order, E12) a (a - y)^T diag(f'(z))
        written = lambda: lo.multiply([column(a_prev), row(diff), torch.diag(f_L)])  # noqa: E731
        corrected, expected = lo.multiply([column(a_prev), row(grad), torch.diag(f_L)]), ref.T
    err, why = mismatch(written, expected)
    assert why == "values" and abs(err - (sizes[-1] - 1)) < 1e-9, f"({form}) without 1/N_L the gradient is N_L times too large: rel err {err} ({why})"
    assert err > LARGE, f"({form}) as written should be wrong, rel err {err}"
    assert_matches(corrected, expected, f"({form}) corrected")


@covers("E5a", "E5b", "E5c")
@pytest.mark.parametrize("form", ["E5a-index", "E5b-denominator", "E5c-numerator"])
@pytest.mark.parametrize("sizes,act,seed", SQUARE_NETS, ids=SQUARE_IDS)
def test_E5_z_without_layer_superscript(sizes, act, seed, form):
    """With equal widths nothing stops f'(z) being read at the wrong layer; only z^(L) is right."""
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y).grad_weight[net.L]
    fwd = lo.forward(net, x)
    L = net.L
    g, a_prev = lo.grad_cost(fwd.a[L], y), fwd.a[L - 1]

    def formula(z):
        if form == "E5a-index":
            return torch.einsum("i,i,j->ij", g, fp(net, z), a_prev)
        if form == "E5b-denominator":
            return lo.multiply([torch.diag(fp(net, z)), column(g), row(a_prev)])
        return lo.multiply([column(a_prev), row(g), torch.diag(fp(net, z))])

    expected = ref if form != "E5c-numerator" else ref.T
    for wrong in range(1, L):  # every other layer's z
        assert_wrong(lambda: formula(fwd.z[wrong]), expected, f"({form}) f'(z^({wrong})) for f'(z)", expect_values=True)
    assert_matches(formula(fwd.z[L]), expected, f"({form}) corrected f'(z^(L))")


@covers("E6")
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E6_penultimate_layer_indices(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y).grad_weight[net.L - 1]
    fwd = lo.forward(net, x)
    L = net.L
    operands = (lo.grad_cost(fwd.a[L], y), fp(net, fwd.z[L]), net.W(L), fp(net, fwd.z[L - 1]), fwd.a[L - 2])
    # dC/da_i . da_i/dz_i . dz_i/da_j (= W_ij) . da_j/dz_j . dz_j/dW_jk (= a_k), indices as in the question;
    # as written the left side keeps i, j (so k is summed), corrected it keeps j, k (i is summed).
    square = len(set(sizes[-3:])) == 1
    written = torch.einsum("i,i,ij,j,k->ij", *operands)
    assert written.shape == net.W(L).shape, f"(E6) as written the result is shaped like W^(L), {list(written.shape)}"
    assert_wrong(lambda: written, ref, "(E6) left side dC/dW^(L-1)_ij", expect_values=square)
    assert_matches(torch.einsum("i,i,ij,j,k->jk", *operands), ref, "(E6) corrected left side dC/dW^(L-1)_jk")


@covers("E7")
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E7_f_instead_of_f_prime(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    fwd = lo.forward(net, x)
    for l in range(0, net.L):
        g_next = ref.grad_a[l + 1].flatten()
        # sum_k dC/da^(l+1)_k f(z^(l+1)_k) W_ki, with W^(l+1) (E8 corrected) to isolate f vs f'
        written = lambda: torch.einsum("k,k,ki->i", g_next, net.activation.f(fwd.z[l + 1]), net.W(l + 1))  # noqa: E731
        assert_wrong(written, ref.grad_a[l].flatten(), f"(E7) f(z^({l + 1})) for f'", expect_values=True)
        corrected = torch.einsum("k,k,ki->i", g_next, fp(net, fwd.z[l + 1]), net.W(l + 1))
        assert_matches(corrected, ref.grad_a[l].flatten(), f"(E7) corrected dC/da^({l})")


@covers("E8a", "E8b", "E8c")
@pytest.mark.parametrize("form", ["E8a-index", "E8b-denominator", "E8c-numerator"])
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E8_W_l_instead_of_W_l_plus_1(sizes, act, seed, form):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    fwd = lo.forward(net, x)
    for l in range(1, net.L):  # W^(0) does not exist (E1), so l >= 1
        g_next, f_next = ref.grad_a[l + 1].flatten(), fp(net, fwd.z[l + 1])

        def formula(W):
            if form == "E8a-index":
                return torch.einsum("k,k,ki->i", g_next, f_next, W)
            if form == "E8b-denominator":
                return lo.multiply([W.T, torch.diag(f_next), column(g_next)])
            return lo.multiply([row(g_next), torch.diag(f_next), W])

        expected = {"E8a-index": ref.grad_a[l].flatten(), "E8b-denominator": ref.grad_a[l], "E8c-numerator": ref.grad_a[l].T}[form]
        square = sizes[l - 1] == sizes[l] == sizes[l + 1]
        assert_wrong(lambda: formula(net.W(l)), expected, f"({form}) W^({l}) in dC/da^({l})", expect_values=square)
        assert_matches(formula(net.W(l + 1)), expected, f"({form}) corrected W^({l + 1})")


@covers("E9a", "E9b", "E9c")
@pytest.mark.parametrize("form", ["E9a-index", "E9b-denominator", "E9c-numerator"])
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E9_a_l_instead_of_a_l_minus_1(sizes, act, seed, form):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    fwd = lo.forward(net, x)
    for l in range(1, net.L + 1):
        delta = ref.delta[l].flatten()

        def formula(a):
            if form == "E9a-index":
                return torch.einsum("i,j->ij", delta, a)
            if form == "E9b-denominator":
                return lo.multiply([column(delta), row(a)])
            return lo.multiply([column(a), row(delta)])

        expected = ref.grad_weight[l] if form != "E9c-numerator" else ref.grad_weight[l].T
        square = sizes[l - 1] == sizes[l]
        assert_wrong(lambda: formula(fwd.a[l]), expected, f"({form}) a^({l}) in dC/dW^({l})", expect_values=square)
        assert_matches(formula(fwd.a[l - 1]), expected, f"({form}) corrected a^({l - 1})")


@covers("E10")
@pytest.mark.parametrize("tensor_layout", lo.LAYOUTS)
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E10_dz_dW_as_a_matrix_factor(sizes, act, seed, tensor_layout):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y).grad_weight[net.L]
    fwd = lo.forward(net, x)
    L = net.L
    T = lo.to_layout(lo.jacobian_z_W(net, fwd, L), tensor_layout)  # the 3rd-order dz/dW, in either layout
    D = torch.diag(fp(net, fwd.z[L]))
    g = lo.grad_cost(fwd.a[L], y)
    # Denominator as written: da/dz . dC/da . dz/dW; numerator as written (E12's order): da/dz . dz/dW . dC/da.
    for what, written in [("denominator", [D, column(g), T]), ("numerator", [D, T, row(g)])]:
        with pytest.raises(lo.NonConformingError, match="do not conform"):
            lo.multiply(written)
        err, why = mismatch(lambda: lo.multiply(written), ref)
        assert math.isinf(err) and why.startswith("does not conform"), f"(E10) {what} as written: {why}"
    # Corrected (E10): dz/dW where the rule puts it, product = contraction (T4).
    T_den = lo.to_layout(lo.jacobian_z_W(net, fwd, L), "denominator")
    T_num = lo.jacobian_z_W(net, fwd, L)
    den = lo.drop_cost_index(lo.multiply([T_den, D, column(g)]), "denominator")
    num = lo.drop_cost_index(lo.multiply([row(g), D, T_num]), "numerator")
    assert_matches(den, ref, "(E10) denominator dz/dW . da/dz . dC/da = delta a^T")
    assert_matches(num, ref.T, "(E10) numerator dC/da . da/dz . dz/dW = a delta^T")


@covers("E10")
@pytest.mark.parametrize("sizes,act,seed", [([3, 1], "tanh", 41), ([4, 3, 1], "gelu", 42), ([2, 5, 3, 1], "sigmoid", 43)])
def test_E10_single_output_the_question_order_conforms(sizes, act, seed):
    """N_L = 1: da/dz and dC/da are 1x1, so the question's order is a scalar times dz/dW, conforms and is right."""
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y).grad_weight[net.L]
    fwd = lo.forward(net, x)
    L = net.L
    D, g = torch.diag(fp(net, fwd.z[L])), lo.grad_cost(fwd.a[L], y)
    den = lo.drop_cost_index(lo.multiply([D, column(g), lo.to_layout(lo.jacobian_z_W(net, fwd, L), "denominator")]), "denominator")
    num = lo.drop_cost_index(lo.multiply([D, lo.jacobian_z_W(net, fwd, L), row(g)]), "numerator")
    assert_matches(den, ref, "(E10) N_L = 1, denominator as written: da/dz . dC/da . dz/dW")
    assert_matches(num, ref.T, "(E10) N_L = 1, numerator as written: da/dz . dz/dW . dC/da")


@covers("E13")
@pytest.mark.parametrize("sizes,act,seed", ERR_NETS, ids=ERR_IDS[: len(ERR_NETS)])
def test_E13_f_for_the_activation_and_for_a_generic_function(sizes, act, seed):
    """The layout definitions are for a scalar function of a vector; the activation f is elementwise, R^n -> R^n."""
    net, x, y = make(sizes, act, seed)
    n = sizes[0]
    jac = torch.autograd.functional.jacobian
    # As written, with f the activation: its derivative by x is diag(f'(x)), [n, n], neither the column nor the row.
    J_f = jac(net.activation.f, x)
    assert J_f.shape == (n, n), f"(E13) the activation's derivative is [n, n], got {list(J_f.shape)}"
    assert_matches(J_f, torch.diag(fp(net, x)), "(E13) ... and it is diag(f'(x))")
    # Corrected (E13): a scalar g(x) (here the cost C(x)); denominator a column [n, 1], numerator a row [1, n].
    g = lambda v: lo.cost(lo.forward(net, v).a[net.L], y)  # noqa: E731
    grad = jac(g, x)
    assert grad.shape == (n,), "(E13) a scalar function of x has n partial derivatives"
    ref = lo.autograd_gradients(net, x, y).grad_x
    assert_matches(column(grad), ref, "(E13) denominator: the column [n, 1]")
    assert_matches(row(grad), lo.numerator_gradients(net, x, y).grad_x, "(E13) numerator: the row [1, n]")


@covers("E14")
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E14_recursion_at_l_zero_needs_W0(sizes, act, seed):
    """The question's recursion for l in [0, L-1] with W^(l): at l = 0 it needs W^(0), which does not exist."""
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    fwd = lo.forward(net, x)
    with pytest.raises(IndexError, match=r"W\^\(0\) does not exist"):
        net.W(0)
    g1, f1 = ref.grad_a[1].flatten(), fp(net, fwd.z[1])
    corrected = torch.einsum("k,k,ki->i", g1, f1, net.W(1))  # (E14): W^(l+1) = W^(1) at l = 0
    assert_matches(column(corrected), ref.grad_x, "(E14) dC/da^(0) = dC/dx with W^(1)")


@covers("E11a")
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E11a_denominator_factors_commuted(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    fwd = lo.forward(net, x)
    L = net.L
    bracket = net.W(L).T @ ref.delta[L]  # dz^(L)/da^(L-1) da^(L)/dz^(L) dC/da^(L) = dC/da^(L-1)
    D = torch.diag(fp(net, fwd.z[L - 1]))
    a = row(fwd.a[L - 2])  # what dz^(L-1)/dW^(L-1) contributes (T2)
    square = sizes[L - 2] == sizes[L - 1]
    # The question's right side: (bracket) dz/dW da/dz, diag(f') moved to the end.
    assert_wrong(lambda: lo.multiply([bracket, a, D]), ref.grad_weight[L - 1], "(E11a) diag(f'(z^(L-1))) moved right", expect_values=square)
    assert_matches(lo.multiply([D, bracket, a]), ref.grad_weight[L - 1], "(E11a) left side: diag(f') (W^T delta) a^T")


@covers("E11b")
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E11b_numerator_factors_commuted(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y)
    fwd = lo.forward(net, x)
    L = net.L
    bracket = row(lo.grad_cost(fwd.a[L], y)) @ torch.diag(fp(net, fwd.z[L])) @ net.W(L)  # dC/da^(L-1), a row
    D = torch.diag(fp(net, fwd.z[L - 1]))
    T = lo.jacobian_z_W(net, fwd, L - 1)  # numerator dz^(L-1)/dW^(L-1)
    # The question's left side: dz/dW (bracket) da/dz.
    err, why = mismatch(lambda: lo.multiply([T, bracket, D]), ref.grad_weight[L - 1].T)
    assert math.isinf(err) and why.startswith("does not conform"), f"(E11b) dz/dW in front should not conform: {why}"
    right = lo.drop_cost_index(lo.multiply([bracket, D, T]), "numerator")
    assert_matches(right, ref.grad_weight[L - 1].T, "(E11b) right side, outermost-first: a^(L-2) delta^(L-1)^T")


@covers("E12")
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_E12_numerator_last_layer_order(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y).grad_weight[net.L].T  # numerator: shape of W^T
    fwd = lo.forward(net, x)
    L = net.L
    D, a, g = torch.diag(fp(net, fwd.z[L])), column(fwd.a[L - 1]), row(lo.grad_cost(fwd.a[L], y))
    square = sizes[L - 1] == sizes[L]
    # As written (1/N_L kept, E4 isolated): diag(f'(z)) a^(L-1) (a^(L) - y)^T
    assert_wrong(lambda: lo.multiply([D, a, g]), ref, "(E12) diag(f') a (a - y)^T", expect_values=square)
    assert_matches(lo.multiply([a, g, D]), ref, "(E12) corrected a^(L-1) (1/N_L)(a - y)^T diag(f')")


# ---------------------------------------------------------------------------
# (I) the index-to-matrix rule, (M) the mixed convention


@covers("I1")
@pytest.mark.parametrize("sizes,act,seed", ALL_ERR_NETS, ids=ERR_IDS)
def test_I1_index_rule_on_the_penultimate_layer(sizes, act, seed):
    """sum_i g_i f'_i W_ij f'_j a_k: the summed i is a matrix product once W is transposed to stand next to it."""
    net, x, y = make(sizes, act, seed)
    ref = lo.autograd_gradients(net, x, y).grad_weight[net.L - 1]
    fwd = lo.forward(net, x)
    L = net.L
    g, fL, W, fL1, a = lo.grad_cost(fwd.a[L], y), fp(net, fwd.z[L]), net.W(L), fp(net, fwd.z[L - 1]), fwd.a[L - 2]
    index_form = torch.einsum("i,i,ij,j,k->jk", g, fL, W, fL1, a)
    assert_matches(index_form, ref, "(I1) the index form")
    matrix_form = torch.diag(fL1) @ W.T @ torch.diag(fL) @ column(g) @ row(a)
    assert_matches(matrix_form, ref, "(I1) diag(f'(z^(L-1))) (W^(L))^T diag(f'(z^(L))) g a^T")
    # Without the transpose W's summed index i is its first, and W . diag . g does not conform (N_L != N_(L-1)) or is wrong.
    if sizes[-1] != sizes[-2]:
        with pytest.raises(lo.NonConformingError):
            lo.multiply([torch.diag(fL1), W, torch.diag(fL), column(g), row(a)])


@covers("M1")
@pytest.mark.parametrize("sizes,act,seed", NETS, ids=NET_IDS)
def test_M1_pytorch_uses_the_mixed_convention(sizes, act, seed):
    """torch.autograd.functional.jacobian is the Jacobian [m, n] (numerator); .grad has the variable's shape."""
    net, x, y = make(sizes, act, seed)
    fwd = lo.forward(net, x)
    for l in range(1, net.L + 1):
        J = torch.autograd.functional.jacobian(lambda a: net.W(l) @ a + net.b(l), fwd.a[l - 1])
        assert J.shape == (sizes[l], sizes[l - 1]), f"(M1) jacobian() of z^({l}) by a^({l - 1}) is [m, n]"
        assert_matches(J, lo.chain_factors(net, fwd, y, ("a", l - 1), "numerator")[-1].value, "(M1) ... the numerator factor")
    weight = [w.clone().requires_grad_(True) for w in net.weight]
    xg = x.clone().requires_grad_(True)
    a = xg
    for l in range(1, net.L + 1):
        a = net.activation.f(weight[l - 1] @ a + net.b(l))
    lo.cost(a, y).backward()
    den = lo.denominator_gradients(net, x, y)
    assert xg.grad.shape == x.shape, "(M1) x.grad has the shape of x"
    assert_matches(column(xg.grad), den.grad_x, "(M1) x.grad is the denominator-layout gradient")
    for l in range(1, net.L + 1):
        assert weight[l - 1].grad.shape == net.W(l).shape, f"(M1) W^({l}).grad has the shape of W"
        assert_matches(weight[l - 1].grad, den.grad_weight[l], f"(M1) W^({l}).grad = delta a^T, denominator layout")


# ---------------------------------------------------------------------------
# (V) forward mode


FWD_NETS = NETS[:6] + [([3, 1], "tanh", 9), ([1, 1], "gelu", 10)]
FWD_IDS = NET_IDS[:6] + ["tanh-3x1", "gelu-1x1"]


def tangents_for(net: Network, seed: int):
    gen = torch.Generator().manual_seed(seed + 1000)
    dx = torch.randn(net.sizes[0], generator=gen, dtype=DTYPE)
    dW = {l: torch.randn(net.W(l).shape, generator=gen, dtype=DTYPE) for l in range(1, net.L + 1)}
    db = {l: torch.randn(net.b(l).shape, generator=gen, dtype=DTYPE) for l in range(1, net.L + 1)}
    return dx, dW, db


@covers("V1", "V2")
@pytest.mark.parametrize("sizes,act,seed", FWD_NETS, ids=FWD_IDS)
def test_V1_V2_tangent_recursion_equals_jvp(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    dx, dW, db = tangents_for(net, seed)
    fwd = lo.forward(net, x)
    for inputs in ({"dx": dx}, {"dW": dW}, {"db": db}, {"dx": dx, "dW": dW, "db": db}):
        got, ref = lo.tangent_recursion(net, x, y, **inputs), lo.jvp_reference(net, x, y, **inputs)
        what = "+".join(inputs)
        for l in range(1, net.L + 1):
            assert_matches(got.dz[l], ref.dz[l], f"(V1) {what}: dz^({l}) = W da + dW a + db")
            assert_matches(got.da[l], ref.da[l], f"(V1) {what}: da^({l}) = f'(z) * dz")
            assert_matches(got.da[l], torch.diag(fp(net, fwd.z[l])) @ got.dz[l], f"(V1) {what}: f'(z) * dz = diag(f'(z)) dz")
        assert_matches(got.dC, ref.dC, f"(V2) {what}: dC = (1/N_L)(a - y)^T da^(L)")


@covers("V3")
@pytest.mark.parametrize("sizes,act,seed", FWD_NETS, ids=FWD_IDS)
def test_V3_numerator_chain_applied_to_dx(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    dx, _, _ = tangents_for(net, seed)
    fwd = lo.forward(net, x)
    ref = lo.jvp_reference(net, x, y, dx=dx)
    factors = lo.forward_chain_factors(net, fwd, y, "x", dx, "numerator")
    reverse_chain = lo.chain_factors(net, fwd, y, "x", "numerator")
    assert [f.name for f in factors] == [f.name for f in reverse_chain] + ["dx"], "(V3) the chain of (N6), then dx"
    assert_matches(lo.multiply_forward_chain(factors, "numerator"), ref.dC.reshape(1, 1), "(V3) dC = (N6) dx")
    # innermost first: each partial product from the right is the tangent of one more variable
    values = [f.value for f in factors]
    for l in range(1, net.L + 1):
        k = len(values) - 1 - 2 * l  # dx, then W, diag(f') per layer: the product from factor k on is da^(l)
        assert_matches(lo.multiply(values[k:], start="right"), column(ref.da[l]), f"(V3) the partial product is da^({l})")
    a_chain = lo.forward_chain_factors(net, fwd, y, "x", dx, "numerator", to="a")
    assert_matches(lo.multiply_forward_chain(a_chain, "numerator"), column(ref.da[net.L]), "(V3) da^(L) without dC/da^(L)")


@covers("V4")
@pytest.mark.parametrize("sizes,act,seed", FWD_NETS, ids=FWD_IDS)
def test_V4_weight_tangent(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    _, dW, _ = tangents_for(net, seed)
    fwd = lo.forward(net, x)
    for l in range(1, net.L + 1):
        seed_vec = lo.weight_tangent_seed(net, fwd, l, dW[l])
        assert_matches(seed_vec, dW[l] @ fwd.a[l - 1], f"(V4) dz/dW : dW = dW a^({l - 1})")
        ref = lo.jvp_reference(net, x, y, dW={l: dW[l]})
        for layout in lo.LAYOUTS:
            factors = lo.forward_chain_factors(net, fwd, y, ("W", l), dW[l], layout)
            assert len(factors) == 2 * (net.L - l) + 3, f"(V4) {layout}: the chain stops at z^({l})"
            assert_matches(lo.multiply_forward_chain(factors, layout), ref.dC.reshape(1, 1), f"(V4) {layout}: dC for dW^({l})")


@covers("V5")
@pytest.mark.parametrize("sizes,act,seed", FWD_NETS, ids=FWD_IDS)
def test_V5_denominator_forward_chain_is_the_transpose(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    dx, _, _ = tangents_for(net, seed)
    fwd = lo.forward(net, x)
    ref = lo.jvp_reference(net, x, y, dx=dx)
    num = lo.forward_chain_factors(net, fwd, y, "x", dx, "numerator")
    den = lo.forward_chain_factors(net, fwd, y, "x", dx, "denominator")
    assert all(torch.equal(d.value, n.value.T) for d, n in zip(den, reversed(num))), "(V5) each factor transposed, order reversed"
    den_reverse = lo.chain_factors(net, fwd, y, "x", "denominator")
    assert all(torch.equal(a.value, b.value) for a, b in zip(den[1:], den_reverse)), "(V5) dx^T, then the chain of (D6)"
    assert_matches(lo.multiply_forward_chain(den, "denominator"), ref.dC.reshape(1, 1), "(V5) dC = dx^T (D6)")
    values = [f.value for f in den]
    for l in range(1, net.L + 1):  # from the left: dx^T, then two factors per layer
        assert_matches(lo.multiply(values[: 1 + 2 * l]), row(ref.da[l]), f"(V5) the partial product from the left is da^({l})^T")


@covers("V6")
@pytest.mark.parametrize("sizes,act,seed", FWD_NETS, ids=FWD_IDS)
def test_V6_forward_mode_is_the_gradient_dotted_with_the_tangent(sizes, act, seed):
    net, x, y = make(sizes, act, seed)
    dx, dW, db = tangents_for(net, seed)
    den = lo.denominator_gradients(net, x, y)
    dC = lo.tangent_recursion(net, x, y, dx=dx, dW=dW, db=db).dC
    dot = den.grad_x.flatten() @ dx
    dot = dot + sum(torch.trace(den.grad_weight[l].T @ dW[l]) + den.grad_bias[l].flatten() @ db[l] for l in range(1, net.L + 1))
    assert_matches(dC, dot, "(V6) dC = (dC/dx)^T dx + sum_l tr((dC/dW)^T dW) + (dC/db)^T db")


@covers("V7")
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh"])
def test_V7_one_layer_rowwise_tangent_is_the_jvp(act):
    """dZ = dX W^T + X dW^T + 1 db^T, dA = f'(Z) * dZ: against torch.func.jvp of F.linear + the torch activation."""
    gen = torch.Generator().manual_seed(8)
    N, n_in, n_out = 5, 4, 3
    X, dX = (torch.randn(N, n_in, generator=gen, dtype=DTYPE) for _ in range(2))
    W, dW = (torch.randn(n_out, n_in, generator=gen, dtype=DTYPE) for _ in range(2))
    b, db = (torch.randn(n_out, generator=gen, dtype=DTYPE) for _ in range(2))
    activation = Network.random([n_in, n_out], act).activation
    f = lo.torch_activation(activation)

    def layer(X, W, b):
        Z = F.linear(X, W, b)
        return Z, f(Z)

    _, (dZ_ref, dA_ref) = torch.func.jvp(layer, (X, W, b), (dX, dW, db))
    got = lo.dense_tangent_rowwise(X, W, b, dX, dW, db, activation)
    assert_matches(got.grad_z, dZ_ref, "(V7) dZ = dX W^T + X dW^T + 1 db^T")
    assert_matches(got.grad_a, dA_ref, "(V7) dA = f'(Z) * dZ")
    assert got.grad_a.shape == (N, n_out), "(V7) dA has the shape of A"


@covers("V8")
@pytest.mark.parametrize("sizes,act,seed", FWD_NETS, ids=FWD_IDS)
def test_V8_jacobian_by_columns_or_by_rows(sizes, act, seed):
    """N_0 forward passes give the Jacobian's columns, N_L reverse passes its rows; both are the Jacobian."""
    net, x, y = make(sizes, act, seed)
    J = torch.autograd.functional.jacobian(lambda v: lo.forward(net, v).a[net.L], x)
    assert_matches(lo.jacobian_by_forward_mode(net, x), J, "(V8) J = [J e_1 ... J e_n], n = N_0 forward passes")
    assert_matches(lo.jacobian_by_reverse_mode(net, x), J, "(V8) J = [e_1^T J; ...; e_m^T J], m = N_L reverse passes")


@covers("V9")
@pytest.mark.parametrize("sizes,act,seed", [s for s in FWD_NETS if s[1] != "relu"], ids=[i for s, i in zip(FWD_NETS, FWD_IDS) if s[1] != "relu"])
def test_V9_hessian_vector_product_is_jvp_of_grad(sizes, act, seed):
    """H v = d/dt grad C(x + t v) at t = 0: torch.func.jvp(torch.func.grad(C)) against the full Hessian and finite differences."""
    net, x, y = make(sizes, act, seed)
    dx, _, _ = tangents_for(net, seed)
    f = lo.torch_activation(net.activation)

    def C(v):
        for l in range(1, net.L + 1):
            v = f(F.linear(v, net.W(l), net.b(l)))
        return 0.5 * ((v - y) ** 2).mean()

    _, hvp = torch.func.jvp(torch.func.grad(C), (x,), (dx,))
    H = torch.autograd.functional.hessian(C, x)
    assert_matches(hvp, H @ dx, "(V9) jvp(grad C)(x; v) = H v")
    h = 1e-5
    fd = (torch.func.grad(C)(x + h * dx) - torch.func.grad(C)(x - h * dx)) / (2 * h)
    assert rel_err(fd, hvp) < 1e-6, "(V9) d/dt grad C(x + t v) by central differences"


# ---------------------------------------------------------------------------
# The document itself


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _doc_labels() -> list[str]:
    return re.findall(r"\\tag\{([A-Z]\d+[a-z]?)\}", _doc())


def test_every_doc_equation_is_exercised():
    labels = _doc_labels()
    assert labels, "the document shows no labelled equations"
    duplicates = sorted({l for l in labels if labels.count(l) > 1})
    assert not duplicates, f"labels used twice in the document: {duplicates}"
    missing = sorted(set(labels) - COVERED)
    assert not missing, f"equations in docs/derivation.md that no test exercises: {missing}"
    stale = sorted(COVERED - set(labels))
    assert not stale, f"tests cover labels the document does not show: {stale}"


def test_doc_error_list_is_numbered_and_each_has_a_correction():
    """Section 7: substantive errors (7.1), then notational slips (7.2), each group in order, E1..En in all."""
    doc = _doc()
    groups = re.split(r"^### 7\.2 ", doc.split("### 7.1 ", 1)[1], flags=re.M)
    assert len(groups) == 2, "section 7 has the groups 7.1 (substantive) and 7.2 (notational)"
    numbers = [[int(n) for n in re.findall(r"^\*\*E(\d+)\. ", g, flags=re.M)] for g in groups]
    for name, group in zip(("7.1", "7.2"), numbers):
        assert group and group == sorted(group), f"the items of {name} are in order: {group}"
    items = numbers[0] + numbers[1]
    assert sorted(items) == list(range(1, len(items) + 1)), f"errors are E1..E{len(items)}, each once: {sorted(items)}"
    assert set(numbers[1]) == {1, 2, 3, 5, 13, 14}, f"the notational slips: {numbers[1]}"
    tagged = {int(m) for m in re.findall(r"\\tag\{E(\d+)[a-z]?\}", doc)}
    assert tagged == set(items), f"every error needs a tagged correction: items {items}, tagged {sorted(tagged)}"


# ---------------------------------------------------------------------------
# The module's own contracts


@pytest.mark.parametrize(
    "make_net,match",
    [
        (lambda: Network([], [], "tanh"), "need L >= 1"),
        (lambda: Network([torch.zeros(3, 2)], [torch.zeros(2)], "tanh"), "layer 1"),
        (lambda: Network([torch.zeros(3, 2), torch.zeros(4, 2)], [torch.zeros(3), torch.zeros(4)], "tanh"), "takes 2 inputs"),
        (lambda: Network.random([3], "tanh"), "at least two"),
        (lambda: Network.random([3, 0], "tanh"), "positive"),
        (lambda: Network.random([3, 2], "swish"), "unknown activation"),
    ],
    ids=["no-layers", "bias-shape", "widths-chain", "one-size", "zero-width", "unknown-activation"],
)
def test_network_rejects_bad_definitions(make_net, match):
    with pytest.raises(ValueError, match=match):
        make_net()


def test_unknown_layout_and_target_are_rejected():
    net, x, y = make([3, 4, 2], "tanh", 0)
    with pytest.raises(ValueError, match="unknown layout 'transposed'"):
        lo.chain_gradients(net, x, y, "transposed")
    with pytest.raises(ValueError, match="unknown target"):
        lo.chain_factors(net, lo.forward(net, x), y, ("q", 1), "numerator")
    with pytest.raises(IndexError, match=r"W\^\(3\) does not exist"):
        lo.chain_factors(net, lo.forward(net, x), y, ("W", 3), "numerator")


def test_multiply_is_strict_about_conformity():
    """torch.tensordot alone would broadcast a length-1 index; multiply must not."""
    col, sq = torch.ones(3, 1, dtype=DTYPE), torch.eye(3, dtype=DTYPE)
    with pytest.raises(lo.NonConformingError, match=r"\[3, 1\] \. \[3, 3\]"):
        lo.multiply([col, sq])
    assert torch.equal(lo.multiply([sq, col]), col), "a conforming product is the matrix product"
    assert torch.equal(lo.multiply([sq, col], start="right"), col), "the association does not change the product"


# ---------------------------------------------------------------------------
# The gated layer (section 12): manualbp/derivation/gated.py

GATED = [(4, 3, "silu", 0), (3, 5, "gelu_tanh", 1), (3, 4, "relu", 5), (5, 4, "sigmoid", 3), (3, 3, "identity", 4)]
GATED_IDS = [f"{act}-{k}x{i}" for k, i, act, _ in GATED]


@covers("G1")
@pytest.mark.parametrize("k, i, act, seed", GATED, ids=GATED_IDS)
def test_G1_gated_forward_matches_torch(k, i, act, seed):
    from manualbp.derivation import gated

    layer = gated.GatedLayer.random(k, i, act, seed=seed)
    x, _ = layer.random_data(seed=seed + 1)
    torch_f = lo.torch_activation(layer.activation)
    expected = torch_f(F.linear(x, layer.W_g, layer.b_g)) * F.linear(x, layer.W_u, layer.b_u)
    assert_matches(gated.forward(layer, x).a, expected, "(G1) a = f(W_g x + b_g) * (W_u x + b_u)")


@covers("G2")
@pytest.mark.parametrize("k, i, act, seed", GATED, ids=GATED_IDS)
def test_G2_gated_jacobians(k, i, act, seed):
    from manualbp.derivation import gated

    layer = gated.GatedLayer.random(k, i, act, seed=seed)
    x, _ = layer.random_data(seed=seed + 1)
    fwd = gated.forward(layer, x)
    J = gated.jacobians(layer, fwd)
    f = layer.activation.f
    by_autograd = torch.autograd.functional.jacobian(lambda z_g, z_u: f(z_g) * z_u, (fwd.z_g, fwd.z_u))
    assert_matches(J["da/dz_g"], by_autograd[0], "(G2) da/dz_g = diag(f'(z_g) * z_u)")
    assert_matches(J["da/dz_u"], by_autograd[1], "(G2) da/dz_u = diag(f(z_g))")
    assert_matches(J["dz_g/dx"], torch.autograd.functional.jacobian(lambda x: gated.forward(layer, x).z_g, x),
                   "(G2) dz_g/dx = W_g")


@covers("G3", "G4")
@pytest.mark.parametrize("k, i, act, seed", GATED, ids=GATED_IDS)
def test_G3_G4_gated_chains_in_both_layouts(k, i, act, seed):
    """Both layouts against autograd, each in its own shapes; numerator is the transpose of denominator; and one
    path alone is not the gradient (the sum of both chains is needed)."""
    from manualbp.derivation import gated

    layer = gated.GatedLayer.random(k, i, act, seed=seed)
    x, y = layer.random_data(seed=seed + 1)
    exact = gated.autograd_gradients(layer, x, y)
    numerator, denominator = gated.reverse(layer, x, y, "numerator"), gated.reverse(layer, x, y, "denominator")
    assert numerator["x"].shape == (1, k) and denominator["x"].shape == (k, 1), "dC/dx: a row, a column"
    assert numerator["W_g"].shape == (k, i) and denominator["W_g"].shape == (i, k), "dC/dW_g: W^T's, W's shape"
    for name in ("x",) + gated.PARAMETERS:
        assert_matches(denominator[name].reshape(exact[name].shape), exact[name], f"(G4) dC/d{name}")
        assert_matches(numerator[name].T.reshape(exact[name].shape), exact[name], f"(G3) dC/d{name}")
    fwd = gated.forward(layer, x)
    J = gated.jacobians(layer, fwd)
    g = lo.column(gated.grad_cost(fwd.a, y))
    gate_path_only = J["dz_g/dx"].T @ J["da/dz_g"].T @ g
    if act != "relu":  # relu may zero the gate path's every unit, where one path alone would happen to be right
        assert rel_err(gate_path_only.flatten(), exact["x"]) > 1e-3, "(G4) the up path's chain is needed too"


@covers("G5")
@pytest.mark.parametrize("k, i, act, seed", GATED, ids=GATED_IDS)
def test_G5_gated_rowwise_is_manualbps_backward(k, i, act, seed):
    """(G5) against autograd of the plain layer, and manualbp's gated_linear (reference backend) against (G5)."""
    import manualbp
    from manualbp.derivation import gated

    layer = gated.GatedLayer.random(k, i, act, seed=seed)
    X, G = layer.random_data(seed=seed + 2, n=6)
    rows = gated.rowwise_backward(layer, X, G)
    leaves = [t.clone().requires_grad_(True) for t in (X, layer.W_g, layer.W_u, layer.b_g, layer.b_u)]
    plain = gated.forward(gated.GatedLayer(*leaves[1:], layer.activation), leaves[0]).a
    exact = dict(zip(("x",) + gated.PARAMETERS, torch.autograd.grad(plain, leaves, G)))
    ours = [t.clone().requires_grad_(True) for t in (X, layer.W_g, layer.W_u, layer.b_g, layer.b_u)]
    manualbp.functional.gated_linear(*ours, activation=act, backend="reference").backward(G)
    for name, leaf in zip(("x",) + gated.PARAMETERS, ours):
        assert_matches(rows[name], exact[name], f"(G5) dC/d{name} vs autograd")
        assert_matches(leaf.grad, rows[name], f"(G5) manualbp's dC/d{name}")


@covers("G6", "G7")
@pytest.mark.parametrize("k, i, act, seed", GATED, ids=GATED_IDS)
def test_G6_G7_gated_forward_mode(k, i, act, seed):
    from manualbp.derivation import gated

    layer = gated.GatedLayer.random(k, i, act, seed=seed)
    x, y = layer.random_data(seed=seed + 1)
    tangents = gated.tangents_for(layer, seed + 3)
    da_ref, dC_ref = gated.jvp_reference(layer, x, y, tangents)
    for layout, shape in (("numerator", (i, 1)), ("denominator", (1, i))):
        da, dC = gated.tangent(layer, x, y, tangents, layout)
        assert da.shape == shape, f"(G6) {layout}: da is {shape}"
        assert_matches(da.flatten(), da_ref, f"(G6) {layout} da")
        assert_matches(dC.reshape(()), dC_ref, f"(G6) {layout} dC")
    X, _ = layer.random_data(seed=seed + 4, n=5)
    row_tangents = {**tangents, "x": torch.randn(5, k, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))}
    names = ("x",) + gated.PARAMETERS
    _, dA_ref = torch.func.jvp(
        lambda X, *p: gated.forward(gated.GatedLayer(*p, layer.activation), X).a,
        (X,) + tuple(getattr(layer, n) for n in gated.PARAMETERS), tuple(row_tangents[n] for n in names))
    assert_matches(gated.rowwise_tangent(layer, X, row_tangents), dA_ref, "(G7) dA, row-wise")
