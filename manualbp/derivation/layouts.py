"""Backpropagation as explicit products of Jacobians, in numerator and denominator layout.

The executable companion of ``docs/derivation.md``: every factor of every chain is
built as an explicit tensor (the Jacobian of one step, ``diag(f'(z))``, ``W^T``, the
third-order ``dz/dW``), the factors are multiplied in the order the layout
prescribes, and the results are the gradients of the cost. Equation labels such
as (D2) refer to the document. Float64 throughout; nothing here is fast, it is
meant to be read and checked.

Conventions (those of the document):

    layers l = 1..L,  a^(0) = x,  z^(l) = W^(l) a^(l-1) + b^(l),  a^(l) = f(z^(l))
    C = (1/N_L) sum_i 1/2 (a^(L)_i - y_i)^2
    N_l = sizes[l];  W^(l): [N_l, N_{l-1}];  b^(l), z^(l), a^(l): [N_l]

    numerator layout    a derivative is the Jacobian; chains run outermost-first
                        (from C towards the variable); dC/dv is a row [1, n],
                        dC/dW^(l) is [N_{l-1}, N_l] (the shape of W^T)
    denominator layout  a derivative is the transposed Jacobian; chains run
                        innermost-first; dC/dv is a column [n, 1], dC/dW^(l) is
                        [N_l, N_{l-1}] (the shape of W)

Per-layer results are dicts keyed by the layer number l of the equations, so
``grad_weight[2]`` is dC/dW^(2); ``Network.weight`` is a tuple, ``weight[l - 1]``
is W^(l) (use ``Network.W(l)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from manualbp.activations import Activation, get_activation

DTYPE = torch.float64
LAYOUTS: tuple[str, ...] = ("denominator", "numerator")

# What a chain can end at: "x", or (kind, l) with kind in a, z, W, b.
Target = Union[str, tuple[str, int]]


def check_layout(layout: str) -> str:
    """Return ``layout`` if it is one of LAYOUTS, else raise ValueError."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    return layout


def column(v: Tensor) -> Tensor:
    """[n] -> [n, 1]."""
    return v.reshape(-1, 1)


def row(v: Tensor) -> Tensor:
    """[n] -> [1, n]."""
    return v.reshape(1, -1)


def reverse_dims(t: Tensor) -> Tensor:
    """The layout change of one factor: reverse the order of its indices.

    For a matrix this is the transpose; for the third-order dz/dW it turns
    T[i, k, j] = dz_i/dW_jk (numerator) into T[j, k, i] (denominator). With it,
    (A B C) reversed = C^rev B^rev A^rev for any chain of contractions, which is
    the whole relation between the two layouts (R5).
    """
    return t.permute(*reversed(range(t.dim())))


def to_layout(jacobian: Tensor, layout: str) -> Tensor:
    """A numerator-layout derivative (the Jacobian) expressed in ``layout`` (R1, R2)."""
    return jacobian if check_layout(layout) == "numerator" else reverse_dims(jacobian)


class Network:
    """A dense network a^(l) = f(W^(l) a^(l-1) + b^(l)), l = 1..L (F1).

    weight: sequence of L tensors, weight[l - 1] = W^(l), [N_l, N_{l-1}]
    bias:   sequence of L tensors, bias[l - 1] = b^(l), [N_l]
    activation: a name from ``manualbp.activations.ACTIVATIONS`` or an Activation;
    the same f in every layer, as in the question.
    """

    def __init__(
        self,
        weight: Sequence[Tensor],
        bias: Sequence[Tensor],
        activation: Union[str, Activation] = "sigmoid",
        negative_slope: Optional[float] = None,
    ):
        weight = tuple(torch.as_tensor(w, dtype=DTYPE) for w in weight)
        bias = tuple(torch.as_tensor(b, dtype=DTYPE) for b in bias)
        if len(weight) == 0 or len(weight) != len(bias):
            raise ValueError(f"need L >= 1 weights and as many biases, got {len(weight)} and {len(bias)}")
        for l, (w, b) in enumerate(zip(weight, bias), start=1):
            if w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[0]:
                raise ValueError(f"layer {l}: W must be [out, in] and b [out], got {list(w.shape)} and {list(b.shape)}")
            if l > 1 and w.shape[1] != weight[l - 2].shape[0]:
                raise ValueError(f"layer {l}: W^({l}) takes {w.shape[1]} inputs but layer {l - 1} has {weight[l - 2].shape[0]} outputs")
        self.weight = weight
        self.bias = bias
        # negative_slope is passed only when given: it is an option of leaky_relu alone.
        options = {} if negative_slope is None else {"negative_slope": negative_slope}
        self.activation = get_activation(activation, **options)

    @classmethod
    def random(
        cls,
        sizes: Sequence[int],
        activation: Union[str, Activation] = "sigmoid",
        seed: int = 0,
        negative_slope: Optional[float] = None,
    ) -> "Network":
        """Random network with layer widths ``sizes`` = [N_0, N_1, ..., N_L].

        W ~ N(0, 1/N_{l-1}) keeps z of order one, so no activation saturates and
        every gradient is well away from zero (the error tests need that).
        """
        sizes = [int(n) for n in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be at least two positive integers, got {sizes}")
        gen = torch.Generator().manual_seed(seed)
        weight = [torch.randn(n_out, n_in, generator=gen, dtype=DTYPE) / n_in**0.5 for n_in, n_out in zip(sizes, sizes[1:])]
        bias = [0.5 * torch.randn(n_out, generator=gen, dtype=DTYPE) for n_out in sizes[1:]]
        return cls(weight, bias, activation, negative_slope)

    @property
    def L(self) -> int:
        """Number of layers (weight matrices)."""
        return len(self.weight)

    @property
    def sizes(self) -> list[int]:
        """[N_0, N_1, ..., N_L]."""
        return [self.weight[0].shape[1]] + [w.shape[0] for w in self.weight]

    def W(self, l: int) -> Tensor:
        """W^(l), [N_l, N_{l-1}], for l = 1..L only (there is no W^(0): E1)."""
        if not 1 <= l <= self.L:
            raise IndexError(f"W^({l}) does not exist: layers are l = 1..{self.L}")
        return self.weight[l - 1]

    def b(self, l: int) -> Tensor:
        """b^(l), [N_l], for l = 1..L only."""
        if not 1 <= l <= self.L:
            raise IndexError(f"b^({l}) does not exist: layers are l = 1..{self.L}")
        return self.bias[l - 1]

    def random_data(self, n: Optional[int] = None, seed: int = 1) -> tuple[Tensor, Tensor]:
        """A random input and target: x [N_0], y [N_L]; or X [n, N_0], Y [n, N_L] when n is given."""
        gen = torch.Generator().manual_seed(seed)
        lead = () if n is None else (n,)
        x = torch.randn(*lead, self.sizes[0], generator=gen, dtype=DTYPE)
        y = torch.randn(*lead, self.sizes[-1], generator=gen, dtype=DTYPE)
        return x, y


@dataclass(frozen=True)
class Forward:
    """The forward pass of one sample (or of a batch stored row-wise, B1).

    z: {l: z^(l)} for l = 1..L, [N_l] (batch: [N, N_l])
    a: {l: a^(l)} for l = 0..L, a[0] = x, [N_l] (batch: [N, N_l])
    """

    z: dict[int, Tensor]
    a: dict[int, Tensor]

    @property
    def x(self) -> Tensor:
        return self.a[0]


def forward(net: Network, x: Tensor) -> Forward:
    """z^(l) = W^(l) a^(l-1) + b^(l), a^(l) = f(z^(l)) for l = 1..L (F1). x: [N_0]."""
    x = torch.as_tensor(x, dtype=DTYPE)
    z: dict[int, Tensor] = {}
    a: dict[int, Tensor] = {0: x}
    for l in range(1, net.L + 1):
        z[l] = net.W(l) @ a[l - 1] + net.b(l)
        a[l] = net.activation.f(z[l])
    return Forward(z, a)


def cost(a_L: Tensor, y: Tensor) -> Tensor:
    """C = (1/N_L) sum_i 1/2 (a^(L)_i - y_i)^2 (F2). a_L, y: [N_L]; returns a scalar."""
    return 0.5 * ((a_L - y) ** 2).sum() / a_L.shape[-1]


def grad_cost(a_L: Tensor, y: Tensor) -> Tensor:
    """The entries of dC/da^(L) = (1/N_L)(a^(L) - y) (J3), [N_L]."""
    return (a_L - y) / a_L.shape[-1]


# ---------------------------------------------------------------------------
# The factors: Jacobians of one step each (numerator layout), J1..J4 and T1.


def jacobian_cost(fwd: Forward, y: Tensor) -> Tensor:
    """dC/da^(L) as a Jacobian: the row (1/N_L)(a^(L) - y)^T, [1, N_L] (J3)."""
    return row(grad_cost(fwd.a[max(fwd.z)], y))


def jacobian_a_z(net: Network, fwd: Forward, l: int) -> Tensor:
    """da^(l)/dz^(l) = diag(f'(z^(l))), [N_l, N_l]; symmetric, so the same in both layouts (J2)."""
    return torch.diag(net.activation.f_grad(fwd.z[l]))


def jacobian_z_a(net: Network, l: int) -> Tensor:
    """dz^(l)/da^(l-1) = W^(l), [N_l, N_{l-1}] (J1)."""
    return net.W(l)


def jacobian_z_b(net: Network, l: int) -> Tensor:
    """dz^(l)/db^(l) = I, [N_l, N_l] (J4)."""
    return torch.eye(net.sizes[l], dtype=DTYPE)


def jacobian_z_W(net: Network, fwd: Forward, l: int) -> Tensor:
    """dz^(l)/dW^(l), third order, numerator layout (T1).

    T[i, k, j] = dz_i/dW_jk = [i = j] a^(l-1)_k, [N_l, N_{l-1}, N_l]: the index of z
    first, then the indices of W in the shape of W^T (the numerator-layout shape of
    a derivative by a matrix). Only its "diagonal" i = j is nonzero.
    """
    a_prev = fwd.a[l - 1]
    eye = torch.eye(net.sizes[l], dtype=DTYPE)
    return eye[:, None, :] * a_prev[None, :, None]


class Factor(NamedTuple):
    """One factor of a chain: what it is the derivative of, its formula, its value in the layout."""

    name: str  # e.g. "dz^(2)/da^(1)"
    formula: str  # e.g. "(W^(2))^T"
    value: Tensor


class _Step(NamedTuple):
    name: str
    numerator: str  # the formula of the Jacobian
    denominator: str  # the formula of its transpose
    jacobian: Tensor


def _jacobian_path(net: Network, fwd: Forward, y: Tensor, target: Target) -> list[_Step]:
    """The Jacobians from C down to ``target``, outermost (C's end) first."""
    L = net.L
    kind, l = ("a", 0) if target == "x" else target
    if kind not in ("a", "z", "W", "b"):
        raise ValueError(f"unknown target {target!r}; expected 'x' or (kind, l), kind in a, z, W, b")
    if kind == "a" and l == L:
        return [_Step(f"dC/da^({L})", f"(1/N_L)(a^({L}) - y)^T", f"(1/N_L)(a^({L}) - y)", jacobian_cost(fwd, y))]
    if kind == "a":
        if not 0 <= l < L:
            raise IndexError(f"a^({l}) does not exist: l = 0..{L}")
        step = _Step(f"dz^({l + 1})/da^({l})", f"W^({l + 1})", f"(W^({l + 1}))^T", jacobian_z_a(net, l + 1))
        return _jacobian_path(net, fwd, y, ("z", l + 1)) + [step]
    if not 1 <= l <= L:
        raise IndexError(f"{kind}^({l}) does not exist: layers are l = 1..{L}")
    if kind == "z":
        diag = f"diag(f'(z^({l})))"
        step = _Step(f"da^({l})/dz^({l})", diag, diag, jacobian_a_z(net, fwd, l))
        return _jacobian_path(net, fwd, y, ("a", l)) + [step]
    if kind == "b":
        step = _Step(f"dz^({l})/db^({l})", "I", "I", jacobian_z_b(net, l))
    else:
        tensor = f"[i=j] a^({l - 1})_k, 3rd order"
        step = _Step(f"dz^({l})/dW^({l})", tensor, tensor, jacobian_z_W(net, fwd, l))
    return _jacobian_path(net, fwd, y, ("z", l)) + [step]


def chain_factors(net: Network, fwd: Forward, y: Tensor, target: Target, layout: str) -> list[Factor]:
    """The factors of dC/d(target), in the order ``layout`` multiplies them (R3, R4).

    target: "x", ("a", l), ("z", l), ("W", l) or ("b", l).
    numerator:   the Jacobians, outermost-first:  dC/da^(L) . da^(L)/dz^(L) . ... . d(step)/d(target)
    denominator: each factor reversed (transposed), innermost-first: the same list
                 read backwards, so the product is the transpose of the numerator one.
    """
    path = _jacobian_path(net, fwd, y, target)
    if check_layout(layout) == "numerator":
        return [Factor(s.name, s.numerator, s.jacobian) for s in path]
    return [Factor(s.name, s.denominator, reverse_dims(s.jacobian)) for s in reversed(path)]


class NonConformingError(RuntimeError):
    """Two adjacent factors of a product whose shapes do not conform."""


def contract(left: Tensor, right: Tensor) -> Tensor:
    """The product of two factors: the last index of ``left`` contracted with the first of ``right``.

    For matrices this is the matrix product. Strict: the two indices must have the
    same length (``torch.tensordot`` alone would broadcast a length-1 index, which
    would hide exactly the mistakes this module is about).
    """
    if left.dim() == 0 or right.dim() == 0 or left.shape[-1] != right.shape[0]:
        # the last index of the left factor must have the length of the first index of the right one
        raise NonConformingError(f"factors do not conform: {list(left.shape)} . {list(right.shape)}")
    return torch.tensordot(left, right, dims=1)


def multiply(factors: Sequence[Tensor], start: str = "left") -> Tensor:
    """The product of ``factors`` in the order given, each product a ``contract``.

    Contracting adjacent indices lets the third-order dz/dW stand in a chain like
    any other factor. ``start`` only picks the association (left: ((AB)C), right:
    (A(BC))), which cannot change the result; backprop starts at C's end so that
    every product is vector-by-matrix. Raises NonConformingError when two adjacent
    factors do not conform.
    """
    if not factors:
        raise ValueError("empty chain")
    if start not in ("left", "right"):
        raise ValueError(f"start must be 'left' or 'right', got {start!r}")
    if start == "left":
        out = factors[0]
        for f in factors[1:]:
            out = contract(out, f)
        return out
    out = factors[-1]
    for f in reversed(factors[:-1]):
        out = contract(f, out)
    return out


def multiply_chain(factors: Sequence[Factor], layout: str) -> Tensor:
    """Multiply a chain from ``chain_factors``, starting at C's end (left in numerator, right in denominator)."""
    return multiply([f.value for f in factors], start="left" if check_layout(layout) == "numerator" else "right")


def drop_cost_index(t: Tensor, layout: str) -> Tensor:
    """Remove the length-1 index of the scalar C from a chain ending at W.

    numerator [1, N_{l-1}, N_l] -> [N_{l-1}, N_l]; denominator [N_l, N_{l-1}, 1] -> [N_l, N_{l-1}].
    """
    return t.squeeze(0) if check_layout(layout) == "numerator" else t.squeeze(-1)


def weight_gradient_from_delta(delta: Tensor, a_prev: Tensor, layout: str) -> Tensor:
    """dC/dW^(l) by the differential dC = tr(G^T dW) (T2, T3).

    denominator: delta [N_l, 1] (a column), returns delta a^T, [N_l, N_{l-1}]
    numerator:   delta [1, N_l] (a row),    returns a delta,   [N_{l-1}, N_l]
    """
    if check_layout(layout) == "numerator":
        return column(a_prev) @ delta
    return delta @ row(a_prev)


@dataclass(frozen=True)
class Gradients:
    """All gradients of C for one sample, in one layout.

                 numerator              denominator
    grad_x       [1, N_0]               [N_0, 1]
    grad_a[l]    [1, N_l], l = 0..L     [N_l, 1]       dC/da^(l)
    delta[l]     [1, N_l], l = 1..L     [N_l, 1]       dC/dz^(l)
    grad_weight  [N_{l-1}, N_l]         [N_l, N_{l-1}] dC/dW^(l), by the trace result
    grad_bias    [1, N_l]               [N_l, 1]
    grad_weight_tensor: dC/dW^(l) again, by contracting the third-order dz/dW (T4),
    where it was computed.
    """

    layout: str
    grad_x: Tensor
    grad_a: dict[int, Tensor]
    delta: dict[int, Tensor]
    grad_weight: dict[int, Tensor]
    grad_bias: dict[int, Tensor]
    grad_weight_tensor: dict[int, Tensor] = field(default_factory=dict)

    def transpose(self) -> "Gradients":
        """The same gradients in the other layout: every entry transposed (R5)."""
        other = "numerator" if self.layout == "denominator" else "denominator"
        t = lambda d: {l: v.T for l, v in d.items()}  # noqa: E731
        return Gradients(
            other, self.grad_x.T, t(self.grad_a), t(self.delta), t(self.grad_weight), t(self.grad_bias), t(self.grad_weight_tensor)
        )


def chain_gradients(net: Network, x: Tensor, y: Tensor, layout: str) -> Gradients:
    """Every gradient, each from its own explicit chain of matrices multiplied in ``layout``'s order.

    Nothing is reused between layers: dC/dz^(1) is the full product from C down to
    z^(1) (D6, N6), which is what the recursion (D2, N2) computes incrementally.
    """
    check_layout(layout)
    fwd = forward(net, x)
    y = torch.as_tensor(y, dtype=DTYPE)
    prod = lambda target: multiply_chain(chain_factors(net, fwd, y, target, layout), layout)  # noqa: E731
    L = net.L
    grad_a = {l: prod(("a", l)) for l in range(0, L + 1)}
    delta = {l: prod(("z", l)) for l in range(1, L + 1)}
    grad_bias = {l: prod(("b", l)) for l in range(1, L + 1)}
    grad_weight = {l: weight_gradient_from_delta(delta[l], fwd.a[l - 1], layout) for l in range(1, L + 1)}
    grad_weight_tensor = {l: drop_cost_index(prod(("W", l)), layout) for l in range(1, L + 1)}
    return Gradients(layout, grad_a[0], grad_a, delta, grad_weight, grad_bias, grad_weight_tensor)


def denominator_gradients(net: Network, x: Tensor, y: Tensor) -> Gradients:
    """Gradients in denominator layout: transposed Jacobians, innermost-first (R4, D1-D6)."""
    return chain_gradients(net, x, y, "denominator")


def numerator_gradients(net: Network, x: Tensor, y: Tensor) -> Gradients:
    """Gradients in numerator layout: Jacobians, outermost-first (R3, N1-N6)."""
    return chain_gradients(net, x, y, "numerator")


def delta_recursion(net: Network, x: Tensor, y: Tensor, layout: str = "denominator") -> Gradients:
    """Backprop as a recursion on delta^(l) = dC/dz^(l), elementwise products only.

    denominator (columns): delta^(L) = f'(z^(L)) * (1/N_L)(a^(L) - y)          (D1)
                           delta^(l) = f'(z^(l)) * (W^(l+1))^T delta^(l+1)     (D2)
    numerator (rows):      delta^(L) = (1/N_L)(a^(L) - y)^T * f'(z^(L))^T      (N1)
                           delta^(l) = (delta^(l+1) W^(l+1)) * f'(z^(l))^T     (N2)
    and dC/dW, dC/db, dC/dx from delta (D3-D5, N3-N5).
    """
    numerator = check_layout(layout) == "numerator"
    fwd = forward(net, x)
    y = torch.as_tensor(y, dtype=DTYPE)
    vec = row if numerator else column
    L = net.L
    grad_a = {L: vec(grad_cost(fwd.a[L], y))}
    delta: dict[int, Tensor] = {}
    grad_weight: dict[int, Tensor] = {}
    grad_bias: dict[int, Tensor] = {}
    for l in range(L, 0, -1):
        delta[l] = vec(net.activation.f_grad(fwd.z[l])) * grad_a[l]
        grad_weight[l] = weight_gradient_from_delta(delta[l], fwd.a[l - 1], layout)
        grad_bias[l] = delta[l]
        grad_a[l - 1] = delta[l] @ net.W(l) if numerator else net.W(l).T @ delta[l]
    return Gradients(layout, grad_a[0], grad_a, delta, grad_weight, grad_bias)


def autograd_gradients(net: Network, x: Tensor, y: Tensor) -> Gradients:
    """The reference: torch.autograd on the same forward, returned in denominator layout."""
    x = torch.as_tensor(x, dtype=DTYPE).detach().clone().requires_grad_(True)
    weight = [w.detach().clone().requires_grad_(True) for w in net.weight]
    bias = [b.detach().clone().requires_grad_(True) for b in net.bias]
    a = {0: x}
    z = {}
    for l in range(1, net.L + 1):
        z[l] = weight[l - 1] @ a[l - 1] + bias[l - 1]
        a[l] = net.activation.f(z[l])
    C = cost(a[net.L], torch.as_tensor(y, dtype=DTYPE))
    L = net.L
    inputs = [a[l] for l in range(0, L + 1)] + [z[l] for l in range(1, L + 1)] + weight + bias
    grads = torch.autograd.grad(C, inputs)
    g_a, g_z, g_w, g_b = grads[: L + 1], grads[L + 1 : 2 * L + 1], grads[2 * L + 1 : 3 * L + 1], grads[3 * L + 1 :]
    grad_a = {l: column(g_a[l]) for l in range(0, L + 1)}
    return Gradients(
        "denominator",
        grad_a[0],
        grad_a,
        {l: column(g_z[l - 1]) for l in range(1, L + 1)},
        {l: g_w[l - 1] for l in range(1, L + 1)},
        {l: column(g_b[l - 1]) for l in range(1, L + 1)},
    )


# ---------------------------------------------------------------------------
# A batch stored row-wise (B1-B8): the form the kernels use.


def batched_forward(net: Network, X: Tensor) -> Forward:
    """Z^(l) = A^(l-1) (W^(l))^T + 1 (b^(l))^T, A^(l) = f(Z^(l)), one sample per row (B1).

    X: [N, N_0]; z[l], a[l]: [N, N_l].
    """
    X = torch.as_tensor(X, dtype=DTYPE)
    z: dict[int, Tensor] = {}
    a: dict[int, Tensor] = {0: X}
    for l in range(1, net.L + 1):
        z[l] = a[l - 1] @ net.W(l).T + net.b(l)  # + b broadcasts as 1 b^T
        a[l] = net.activation.f(z[l])
    return Forward(z, a)


def batch_cost(A_L: Tensor, Y: Tensor, reduction: str = "mean") -> Tensor:
    """C_D = (1/N) sum_n C(a_n, y_n) ("mean", B2) or sum_n C(a_n, y_n) ("sum"). A_L, Y: [N, N_L]."""
    per_sample = 0.5 * ((A_L - Y) ** 2).sum(dim=1) / A_L.shape[1]
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")


def batch_grad_cost(A_L: Tensor, Y: Tensor, reduction: str = "mean") -> Tensor:
    """G^(L) = dC_D/dA^(L) = (1/(N N_L))(A^(L) - Y) for "mean" (B2), without 1/N for "sum"; [N, N_L]."""
    G = (A_L - Y) / A_L.shape[1]
    if reduction == "mean":
        return G / A_L.shape[0]
    if reduction == "sum":
        return G
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean' or 'sum'")


class DenseBackward(NamedTuple):
    """One layer's backward, rows = samples, every gradient in the shape of its variable."""

    delta: Tensor  # Delta = G * f'(Z), [N, out]           (B3)
    grad_x: Tensor  # dC/dX = Delta W, [N, in]             (B4)
    grad_weight: Tensor  # dC/dW = Delta^T X, [out, in]    (B5)
    grad_bias: Tensor  # dC/db^T = 1^T Delta, [out]        (B6)


def dense_backward_rowwise(grad_a: Tensor, z: Tensor, x: Tensor, weight: Tensor, activation: Activation) -> DenseBackward:
    """The kernels' backward of A = f(X W^T + 1 b^T), denominator layout (B3-B6).

    grad_a: G = dC/dA, [N, out]; z: Z, [N, out]; x: X, [N, in]; weight: W, [out, in].
    """
    delta = grad_a * activation.f_grad(z)
    ones = torch.ones(x.shape[0], dtype=DTYPE)
    return DenseBackward(delta, delta @ weight, delta.T @ x, ones @ delta)


@dataclass(frozen=True)
class BatchGradients:
    """Gradients of the batch cost C_D (B2), denominator layout (shape of the variable).

    grad_x [N, N_0]; grad_a[l], delta[l] [N, N_l]; grad_weight[l] [N_l, N_{l-1}];
    grad_bias[l] [N_l] (the entries of 1^T Delta^(l)).
    """

    grad_x: Tensor
    grad_a: dict[int, Tensor]
    delta: dict[int, Tensor]
    grad_weight: dict[int, Tensor]
    grad_bias: dict[int, Tensor]


def batched_rowwise_gradients(net: Network, X: Tensor, Y: Tensor, reduction: str = "mean") -> BatchGradients:
    """Backprop over a batch stored row-wise, layer by layer with (B3)-(B6).

    X: [N, N_0], Y: [N, N_L]. The G of layer l-1 is the dC/dX of layer l (B4).
    """
    fwd = batched_forward(net, X)
    L = net.L
    grad_a = {L: batch_grad_cost(fwd.a[L], torch.as_tensor(Y, dtype=DTYPE), reduction)}
    delta, grad_weight, grad_bias = {}, {}, {}
    for l in range(L, 0, -1):
        step = dense_backward_rowwise(grad_a[l], fwd.z[l], fwd.a[l - 1], net.W(l), net.activation)
        delta[l], grad_a[l - 1], grad_weight[l], grad_bias[l] = step.delta, step.grad_x, step.grad_weight, step.grad_bias
    return BatchGradients(grad_a[0], grad_a, delta, grad_weight, grad_bias)


def batched_rowwise_gradients_numerator(net: Network, X: Tensor, Y: Tensor, reduction: str = "mean") -> BatchGradients:
    """The same in numerator layout, each formula the transpose of its denominator one (B8).

    dC/dX = W^T Delta^T [N_0, N];  dC/dW = X^T Delta [N_{l-1}, N_l];  dC/db^T = Delta^T 1 [N_l, 1];
    delta[l] is Delta^T [N_l, N] and grad_a[l] is [N_l, N].
    """
    fwd = batched_forward(net, X)
    L = net.L
    ones = torch.ones(fwd.a[0].shape[0], 1, dtype=DTYPE)
    grad_a = {L: batch_grad_cost(fwd.a[L], torch.as_tensor(Y, dtype=DTYPE), reduction).T}
    delta, grad_weight, grad_bias = {}, {}, {}
    for l in range(L, 0, -1):
        delta[l] = grad_a[l] * net.activation.f_grad(fwd.z[l]).T  # Delta^T
        grad_a[l - 1] = net.W(l).T @ delta[l]
        grad_weight[l] = fwd.a[l - 1].T @ delta[l].T
        grad_bias[l] = delta[l] @ ones
    return BatchGradients(grad_a[0], grad_a, delta, grad_weight, grad_bias)


def batched_autograd_gradients(net: Network, X: Tensor, Y: Tensor, reduction: str = "mean") -> BatchGradients:
    """The reference for the batch: torch.autograd on C_D (B2), denominator layout."""
    X = torch.as_tensor(X, dtype=DTYPE).detach().clone().requires_grad_(True)
    weight = [w.detach().clone().requires_grad_(True) for w in net.weight]
    bias = [b.detach().clone().requires_grad_(True) for b in net.bias]
    a = {0: X}
    z = {}
    for l in range(1, net.L + 1):
        z[l] = a[l - 1] @ weight[l - 1].T + bias[l - 1]
        a[l] = net.activation.f(z[l])
    L = net.L
    C = batch_cost(a[L], torch.as_tensor(Y, dtype=DTYPE), reduction)
    inputs = [a[l] for l in range(0, L + 1)] + [z[l] for l in range(1, L + 1)] + weight + bias
    grads = torch.autograd.grad(C, inputs)
    g_a, g_z, g_w, g_b = grads[: L + 1], grads[L + 1 : 2 * L + 1], grads[2 * L + 1 : 3 * L + 1], grads[3 * L + 1 :]
    return BatchGradients(
        g_a[0],
        {l: g_a[l] for l in range(0, L + 1)},
        {l: g_z[l - 1] for l in range(1, L + 1)},
        {l: g_w[l - 1] for l in range(1, L + 1)},
        {l: g_b[l - 1] for l in range(1, L + 1)},
    )


# ---------------------------------------------------------------------------
# Forward mode (V1-V9): the Jacobians applied to a tangent, innermost first.

# The reference for every forward-mode check: plain PyTorch functions, not manualbp's
# activations, so that torch.func.jvp differentiates code this module did not write.
TORCH_ACTIVATIONS = {
    "identity": lambda z, s: z,
    "relu": lambda z, s: torch.relu(z),
    "leaky_relu": lambda z, s: torch.nn.functional.leaky_relu(z, s),
    "gelu": lambda z, s: torch.nn.functional.gelu(z),
    "gelu_tanh": lambda z, s: torch.nn.functional.gelu(z, approximate="tanh"),
    "silu": lambda z, s: torch.nn.functional.silu(z),
    "sigmoid": lambda z, s: torch.sigmoid(z),
    "tanh": lambda z, s: torch.tanh(z),
}


def torch_activation(activation: Activation):
    """The plain PyTorch function of ``activation`` (with its negative_slope bound), z -> f(z)."""
    f = TORCH_ACTIVATIONS[activation.name]
    return lambda z: f(z, activation.negative_slope)


@dataclass(frozen=True)
class Tangents:
    """The tangents of one forward-mode pass, one sample, vectors as [N_l] (V1, V2).

    dz: {l: dz^(l)} for l = 1..L;  da: {l: da^(l)} for l = 0..L, da[0] = dx;  dC: the scalar dC.
    """

    dz: dict[int, Tensor]
    da: dict[int, Tensor]
    dC: Tensor


def _zero_tangents(net: Network, dx: Optional[Tensor], dW: Optional[dict], db: Optional[dict]):
    dx = torch.zeros(net.sizes[0], dtype=DTYPE) if dx is None else torch.as_tensor(dx, dtype=DTYPE)
    dW = {l: torch.as_tensor((dW or {}).get(l, torch.zeros_like(net.W(l))), dtype=DTYPE) for l in range(1, net.L + 1)}
    db = {l: torch.as_tensor((db or {}).get(l, torch.zeros_like(net.b(l))), dtype=DTYPE) for l in range(1, net.L + 1)}
    return dx, dW, db


def tangent_recursion(
    net: Network, x: Tensor, y: Tensor, dx: Optional[Tensor] = None, dW: Optional[dict] = None, db: Optional[dict] = None
) -> Tangents:
    """Forward mode as a recursion, from the input towards C, beside the forward pass (V1, V2).

        da^(0) = dx
        dz^(l) = W^(l) da^(l-1) + dW^(l) a^(l-1) + db^(l)     [N_l]
        da^(l) = f'(z^(l)) * dz^(l)                            [N_l]
        dC     = (1/N_L)(a^(L) - y)^T da^(L)                   scalar

    dx [N_0], dW {l: [N_l, N_{l-1}]}, db {l: [N_l]}: the tangents of the inputs; any left out is zero.
    """
    fwd = forward(net, x)
    dx, dW, db = _zero_tangents(net, dx, dW, db)
    da = {0: dx}
    dz: dict[int, Tensor] = {}
    for l in range(1, net.L + 1):
        dz[l] = net.W(l) @ da[l - 1] + dW[l] @ fwd.a[l - 1] + db[l]
        da[l] = net.activation.f_grad(fwd.z[l]) * dz[l]
    dC = grad_cost(fwd.a[net.L], torch.as_tensor(y, dtype=DTYPE)) @ da[net.L]
    return Tangents(dz, da, dC)


def jvp_reference(
    net: Network, x: Tensor, y: Tensor, dx: Optional[Tensor] = None, dW: Optional[dict] = None, db: Optional[dict] = None
) -> Tangents:
    """The same tangents by ``torch.func.jvp`` of a plain PyTorch network (F.linear + the torch activation)."""
    f = torch_activation(net.activation)
    L = net.L
    dx, dW, db = _zero_tangents(net, dx, dW, db)
    y = torch.as_tensor(y, dtype=DTYPE)

    def network(x, *params):
        a, z = [x], []
        for l in range(1, L + 1):
            z.append(torch.nn.functional.linear(a[-1], params[l - 1], params[L + l - 1]))
            a.append(f(z[-1]))
        return (*z, *a, 0.5 * ((a[-1] - y) ** 2).mean())

    primals = (torch.as_tensor(x, dtype=DTYPE), *net.weight, *net.bias)
    tangents = (dx, *(dW[l] for l in range(1, L + 1)), *(db[l] for l in range(1, L + 1)))
    _, out = torch.func.jvp(network, primals, tangents)
    return Tangents({l: out[l - 1] for l in range(1, L + 1)}, {l: out[L + l] for l in range(0, L + 1)}, out[-1])


def weight_tangent_seed(net: Network, fwd: Forward, l: int, dW: Tensor) -> Tensor:
    """dz^(l)/dW^(l) : dW^(l), the 3rd-order dz/dW (T1) contracted with dW over both of W's indices (V4).

    T[i, k, j] = [i = j] a^(l-1)_k and dW [N_l, N_{l-1}]: sum_jk T[i, k, j] dW_jk = (dW a^(l-1))_i, [N_l].
    """
    return torch.tensordot(jacobian_z_W(net, fwd, l), torch.as_tensor(dW, dtype=DTYPE).T, dims=2)


TangentTarget = Union[str, tuple[str, int]]  # "x" or ("W", l)


def forward_chain_factors(
    net: Network, fwd: Forward, y: Tensor, target: TangentTarget, tangent: Tensor, layout: str, to: str = "C"
) -> list[Factor]:
    """The factors of the forward-mode chain for a tangent on ``target``, in ``layout``'s order (V3-V5).

    target "x" (tangent dx [N_0]) or ("W", l) (tangent dW^(l) [N_l, N_{l-1}]); ``to`` "C" for the chain
    ending in dC [1, 1], "a" for the one ending in da^(L) (without the factor dC/da^(L)).
    numerator:   dC/da^(L) . da^(L)/dz^(L) . ... . dz^(1)/da^(0) . dx        (the Jacobians, tangent a column)
    denominator: dx^T . dz^(1)/da^(0) . ... . da^(L)/dz^(L) . dC/da^(L)      (each transposed, tangent a row)
    For a weight tangent the innermost factor is dz^(l)/dW^(l) : dW^(l) = dW^(l) a^(l-1) (V4), and the
    chain stops at z^(l): the layers below do not depend on W^(l).
    """
    if to not in ("C", "a"):
        raise ValueError(f"to must be 'C' or 'a', got {to!r}")
    if target == "x":
        path = _jacobian_path(net, fwd, y, "x")
        seed = _Step("dx", "dx", "dx^T", column(torch.as_tensor(tangent, dtype=DTYPE)))
    elif isinstance(target, tuple) and len(target) == 2 and target[0] == "W":
        l = target[1]
        net.W(l)  # raises IndexError for a layer that does not exist
        path = _jacobian_path(net, fwd, y, ("z", l))
        name, formula = f"dz^({l})/dW^({l}) : dW^({l})", f"dW^({l}) a^({l - 1})"
        seed = _Step(name, formula, f"(a^({l - 1}))^T (dW^({l}))^T", column(weight_tangent_seed(net, fwd, l, tangent)))
    else:
        raise ValueError(f"unknown tangent target {target!r}; expected 'x' or ('W', l)")
    path = path + [seed]
    if to == "a":
        path = path[1:]  # without dC/da^(L)
    if check_layout(layout) == "numerator":
        return [Factor(s.name, s.numerator, s.jacobian) for s in path]
    # the tangent is no derivative: its name is its formula, dx^T (the weight's seed keeps its name)
    named = lambda s: s.denominator if s.name == "dx" else s.name  # noqa: E731
    return [Factor(named(s), s.denominator, reverse_dims(s.jacobian)) for s in reversed(path)]


def multiply_forward_chain(factors: Sequence[Factor], layout: str) -> Tensor:
    """Multiply a chain from ``forward_chain_factors`` starting at the tangent's end (forward mode):
    from the right in numerator layout, from the left in denominator layout (V3, V5)."""
    return multiply([f.value for f in factors], start="right" if check_layout(layout) == "numerator" else "left")


def jacobian_by_forward_mode(net: Network, x: Tensor) -> Tensor:
    """The Jacobian of x -> a^(L), [N_L, N_0], one column per forward pass: J e_j (V8)."""
    y = torch.zeros(net.sizes[-1], dtype=DTYPE)  # C is not used; da^(L) does not depend on y
    eye = torch.eye(net.sizes[0], dtype=DTYPE)
    return torch.stack([tangent_recursion(net, x, y, dx=eye[j]).da[net.L] for j in range(net.sizes[0])], dim=1)


def jacobian_by_reverse_mode(net: Network, x: Tensor) -> Tensor:
    """The same Jacobian, one row per reverse pass: e_i^T J, by the delta recursion (D2) from e_i (V8)."""
    fwd = forward(net, x)
    rows = []
    for i in range(net.sizes[-1]):
        grad_a = torch.eye(net.sizes[-1], dtype=DTYPE)[i]  # the cotangent e_i of a^(L)
        for l in range(net.L, 0, -1):
            grad_a = net.W(l).T @ (net.activation.f_grad(fwd.z[l]) * grad_a)
        rows.append(grad_a)
    return torch.stack(rows, dim=0)


class DenseTangent(NamedTuple):
    """One layer's forward-mode step, rows = samples (V7)."""

    grad_z: Tensor  # dZ = dX W^T + X dW^T + 1 db^T, [N, out]
    grad_a: Tensor  # dA = f'(Z) * dZ, [N, out]


def dense_tangent_rowwise(
    x: Tensor, weight: Tensor, bias: Tensor, dx: Tensor, dweight: Tensor, dbias: Tensor, activation: Activation
) -> DenseTangent:
    """The tangent of A = f(X W^T + 1 b^T) along (dX, dW, db): what a layer's ``jvp`` computes (V7).

    x, dx: [N, in]; weight, dweight: [out, in]; bias, dbias: [out].
    """
    z = x @ weight.T + bias
    dz = dx @ weight.T + x @ dweight.T + dbias  # + db broadcasts as 1 db^T
    return DenseTangent(dz, activation.f_grad(z) * dz)
