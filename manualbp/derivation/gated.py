"""The gated layer's chain rule in both layouts and both modes (docs/derivation.md section 12, G1-G7).

One sample, vectors as columns, K inputs and I gated units:

    z_g = W_g x + b_g,  z_u = W_u x + b_u,  a = f(z_g) ⊙ z_u,  C = (1/I) sum_i 1/2 (a_i - y_i)^2     (G1)

a depends on x through two paths, so every chain to x is a sum of two chains (G3, G4), and each
path's Jacobian of a is diagonal (G2): da/dz_g = diag(f'(z_g) ⊙ z_u), da/dz_u = diag(f(z_g)).
Everything here is float64 and checked against torch.autograd and torch.func.jvp;
``python -m manualbp explain --gated`` prints it (``describe`` / ``check``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from manualbp.activations import Activation, get_activation
from manualbp.derivation.layouts import DTYPE, check_layout, column, row

PARAMETERS = ("W_g", "W_u", "b_g", "b_u")


@dataclass(frozen=True)
class GatedLayer:
    """W_g, W_u [I, K], b_g, b_u [I], and f."""

    W_g: Tensor
    W_u: Tensor
    b_g: Tensor
    b_u: Tensor
    activation: Activation

    @classmethod
    def random(cls, K: int, I: int, activation="silu", seed: int = 0,  # noqa: E741 - I, the equations' name
               negative_slope: Optional[float] = None) -> "GatedLayer":
        """W ~ N(0, 1/K) (z of order one), b ~ N(0, 1/4)."""
        gen = torch.Generator().manual_seed(seed)
        draw = lambda *shape, scale: torch.randn(*shape, generator=gen, dtype=DTYPE) * scale  # noqa: E731
        options = {} if negative_slope is None else {"negative_slope": negative_slope}
        return cls(draw(I, K, scale=K ** -0.5), draw(I, K, scale=K ** -0.5), draw(I, scale=0.5), draw(I, scale=0.5),
                   get_activation(activation, **options))

    @property
    def sizes(self) -> tuple[int, int]:
        """(K, I)."""
        return self.W_g.shape[1], self.W_g.shape[0]

    def random_data(self, seed: int = 1, n: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """x [K], y [I]; or X [n, K], Y [n, I]."""
        gen = torch.Generator().manual_seed(seed)
        lead = () if n is None else (n,)
        K, I = self.sizes  # noqa: E741
        return (torch.randn(*lead, K, generator=gen, dtype=DTYPE), torch.randn(*lead, I, generator=gen, dtype=DTYPE))

    def with_parameters(self, **replaced: Tensor) -> "GatedLayer":
        values = {name: replaced.get(name, getattr(self, name)) for name in PARAMETERS}
        return GatedLayer(**values, activation=self.activation)


@dataclass(frozen=True)
class Forward:
    z_g: Tensor
    z_u: Tensor
    a: Tensor


def forward(layer: GatedLayer, x: Tensor) -> Forward:
    """(G1): one sample x [K] (or a batch X [N, K] stored row-wise, G5)."""
    z_g = x @ layer.W_g.T + layer.b_g
    z_u = x @ layer.W_u.T + layer.b_u
    return Forward(z_g, z_u, layer.activation.f(z_g) * z_u)


def cost(a: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((a - y) ** 2).sum() / a.shape[-1]


def grad_cost(a: Tensor, y: Tensor) -> Tensor:
    """∂C/∂a = (1/I)(a - y), [I]."""
    return (a - y) / a.shape[-1]


def jacobians(layer: GatedLayer, fwd: Forward) -> dict[str, Tensor]:
    """(G2), numerator layout (the Jacobians themselves): da/dz_g, da/dz_u [I, I]; dz_g/dx = W_g, dz_u/dx = W_u."""
    f, f_grad = layer.activation.f, layer.activation.f_grad
    return {"da/dz_g": torch.diag(f_grad(fwd.z_g) * fwd.z_u), "da/dz_u": torch.diag(f(fwd.z_g)),
            "dz_g/dx": layer.W_g, "dz_u/dx": layer.W_u}


def reverse(layer: GatedLayer, x: Tensor, y: Tensor, layout: str) -> dict[str, Tensor]:
    """Every gradient of C by the chains of ``layout``: numerator (G3), rows multiplied from C's end on the
    left, ∂C/∂W shaped like Wᵀ; denominator (G4), columns, the transposed Jacobians multiplied from the right,
    ∂C/∂W shaped like W."""
    fwd = forward(layer, x)
    J = jacobians(layer, fwd)
    if check_layout(layout) == "numerator":
        g = row(grad_cost(fwd.a, y))  # [1, I]
        delta_g, delta_u = g @ J["da/dz_g"], g @ J["da/dz_u"]  # δᵀ rows [1, I]
        return {"x": delta_g @ J["dz_g/dx"] + delta_u @ J["dz_u/dx"],  # two chains, summed  [1, K]
                "W_g": column(x) @ delta_g, "W_u": column(x) @ delta_u,  # x δᵀ  [K, I]
                "b_g": delta_g, "b_u": delta_u}
    g = column(grad_cost(fwd.a, y))  # [I, 1]
    delta_g, delta_u = J["da/dz_g"].T @ g, J["da/dz_u"].T @ g  # δ columns [I, 1]
    return {"x": J["dz_g/dx"].T @ delta_g + J["dz_u/dx"].T @ delta_u,  # [K, 1]
            "W_g": delta_g @ row(x), "W_u": delta_u @ row(x),  # δ xᵀ  [I, K]
            "b_g": delta_g, "b_u": delta_u}


def autograd_gradients(layer: GatedLayer, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """torch.autograd's gradients (shaped like their variables: denominator layout, vectors flat)."""
    leaves = {"x": x.clone().requires_grad_(True),
              **{name: getattr(layer, name).clone().requires_grad_(True) for name in PARAMETERS}}
    c = cost(forward(layer.with_parameters(**{n: leaves[n] for n in PARAMETERS}), leaves["x"]).a, y)
    grads = torch.autograd.grad(c, list(leaves.values()))
    return dict(zip(leaves, grads))


def tangent(layer: GatedLayer, x: Tensor, y: Tensor, tangents: dict[str, Tensor], layout: str):
    """Forward mode (G6): (da, dC) for tangents of any of x, W_g, W_u, b_g, b_u (absent: zero).

    Numerator layout: columns, the Jacobians applied from the tangent's end on the right,
    da = da/dz_g dz_g + da/dz_u dz_u with dz = W dx + dW x + db; dC = ∂C/∂a da. Denominator layout:
    the transpose, rows multiplied from the left: daᵀ = dz_gᵀ (da/dz_g)ᵀ + dz_uᵀ (da/dz_u)ᵀ.
    """
    fwd = forward(layer, x)
    J = jacobians(layer, fwd)
    zero = torch.zeros_like

    def dz(path: str) -> Tensor:  # dz = W dx + dW x + db, a column [I, 1]
        weight = layer.W_g if path == "g" else layer.W_u
        dx = tangents.get("x", zero(x))
        dW = tangents.get(f"W_{path}", zero(weight))
        db = tangents.get(f"b_{path}", zero(layer.b_g))
        return weight @ column(dx) + dW @ column(x) + column(db)

    dz_g, dz_u = dz("g"), dz("u")
    if check_layout(layout) == "numerator":
        da = J["da/dz_g"] @ dz_g + J["da/dz_u"] @ dz_u  # [I, 1]
        return da, row(grad_cost(fwd.a, y)) @ da  # [1, I] [I, 1]
    da = dz_g.T @ J["da/dz_g"].T + dz_u.T @ J["da/dz_u"].T  # [1, I]
    return da, da @ column(grad_cost(fwd.a, y))


def jvp_reference(layer: GatedLayer, x: Tensor, y: Tensor, tangents: dict[str, Tensor]):
    """(da, dC) by torch.func.jvp of the plain PyTorch layer (flat)."""
    names = ("x",) + PARAMETERS
    primals = (x,) + tuple(getattr(layer, n) for n in PARAMETERS)
    duals = tuple(tangents.get(n, torch.zeros_like(p)) for n, p in zip(names, primals))

    def run(x, W_g, W_u, b_g, b_u):
        a = forward(GatedLayer(W_g, W_u, b_g, b_u, layer.activation), x).a
        return a, cost(a, y)

    _, (da, dC) = torch.func.jvp(run, primals, duals)
    return da, dC


def rowwise_backward(layer: GatedLayer, X: Tensor, G: Tensor) -> dict[str, Tensor]:
    """(G5): a batch stored row-wise, X [N, K], G = ∂C/∂A [N, I] -> every gradient, shaped like its variable."""
    fwd = forward(layer, X)
    f, f_grad = layer.activation.f, layer.activation.f_grad
    delta_g = G * fwd.z_u * f_grad(fwd.z_g)  # [N, I]
    delta_u = G * f(fwd.z_g)
    return {"x": delta_g @ layer.W_g + delta_u @ layer.W_u,  # [N, I] [I, K], one sum over 2I
            "W_g": delta_g.T @ X, "W_u": delta_u.T @ X,  # [I, N] [N, K]
            "b_g": delta_g.sum(0), "b_u": delta_u.sum(0)}


def rowwise_tangent(layer: GatedLayer, X: Tensor, tangents: dict[str, Tensor]) -> Tensor:
    """(G7): dA = f'(Z_g) ⊙ dZ_g ⊙ Z_u + f(Z_g) ⊙ dZ_u, dZ = dX Wᵀ + X dWᵀ + db, [N, I]."""
    fwd = forward(layer, X)
    zero = torch.zeros_like
    dX = tangents.get("x", zero(X))
    dZ = {p: dX @ getattr(layer, f"W_{p}").T + X @ tangents.get(f"W_{p}", zero(layer.W_g)).T
          + tangents.get(f"b_{p}", zero(layer.b_g)) for p in ("g", "u")}
    f, f_grad = layer.activation.f, layer.activation.f_grad
    return f_grad(fwd.z_g) * dZ["g"] * fwd.z_u + f(fwd.z_g) * dZ["u"]


# ---------------------------------------------------------------------------
# python -m manualbp explain --gated


def describe(layer: GatedLayer, x: Tensor, y: Tensor, layout: str, mode: str) -> list[str]:
    """The gated layer's equations in ``layout`` and ``mode``, with the shape of every factor."""
    from manualbp.derivation.explain import _line, fmt_shape

    numerator = check_layout(layout) == "numerator"
    fwd = forward(layer, x)
    J = jacobians(layer, fwd)
    K, I = layer.sizes  # noqa: E741
    s = lambda *shape: "[" + ",".join(map(str, shape)) + "]"  # noqa: E731
    out = [f"Gated layer: K = {K} inputs, I = {I} units, f = {layer.activation.name} (a = f(z_g) * z_u)", "",
           "Forward (vectors are columns in either layout; the layout only concerns derivatives):  (G1)",
           _line("z_g = W_g x + b_g", f"{fmt_shape(layer.W_g)} {s(K, 1)} + {s(I, 1)} -> {s(I, 1)}"),
           _line("z_u = W_u x + b_u", f"{fmt_shape(layer.W_u)} {s(K, 1)} + {s(I, 1)} -> {s(I, 1)}"),
           _line("a = f(z_g) * z_u  (elementwise)", s(I, 1)),
           _line("C = (1/I) sum_i 1/2 (a_i - y_i)^2", "scalar"), "",
           "Jacobians (G2): two paths from x to a, each through a diagonal factor:",
           _line("da/dz_g = diag(f'(z_g) * z_u),  da/dz_u = diag(f(z_g))", f"{fmt_shape(J['da/dz_g'])} each"),
           _line("dz_g/dx = W_g,  dz_u/dx = W_u", f"{fmt_shape(layer.W_g)} each"), ""]
    if mode == "reverse":
        if numerator:
            out += ["Backward, numerator layout (G3): rows, from C's end on the left; one chain per path, summed:",
                    _line("delta_g^T = dC/da da/dz_g,  delta_u^T = dC/da da/dz_u", f"{s(1, I)} {s(I, I)} -> {s(1, I)}"),
                    _line("dC/dx = delta_g^T W_g + delta_u^T W_u", f"{s(1, I)} {s(I, K)} + {s(1, I)} {s(I, K)} -> {s(1, K)}"),
                    _line("dC/dW_g = x delta_g^T,  dC/dW_u = x delta_u^T", f"{s(K, 1)} {s(1, I)} -> {s(K, I)} (W^T's shape)"),
                    _line("dC/db_g = delta_g^T,  dC/db_u = delta_u^T", s(1, I))]
        else:
            out += ["Backward, denominator layout (G4): columns, transposed Jacobians from the variable's end:",
                    _line("delta_g = (da/dz_g)^T dC/da = dC/da * z_u * f'(z_g)", f"{s(I, I)} {s(I, 1)} -> {s(I, 1)}"),
                    _line("delta_u = (da/dz_u)^T dC/da = dC/da * f(z_g)", f"{s(I, I)} {s(I, 1)} -> {s(I, 1)}"),
                    _line("dC/dx = W_g^T delta_g + W_u^T delta_u", f"{s(K, I)} {s(I, 1)} + {s(K, I)} {s(I, 1)} -> {s(K, 1)}"),
                    _line("dC/dW_g = delta_g x^T,  dC/dW_u = delta_u x^T", f"{s(I, 1)} {s(1, K)} -> {s(I, K)} (W's shape)"),
                    _line("dC/db_g = delta_g,  dC/db_u = delta_u", s(I, 1))]
        out += ["A batch stored row-wise (G5): delta_g = G * Z_u * f'(Z_g), delta_u = G * f(Z_g) [N, I];",
                "dC/dX = delta_g W_g + delta_u W_u, dC/dW_g = delta_g^T X, dC/db_g = 1^T delta_g (manualbp's kernels)."]
    else:
        if numerator:
            out += ["Forward mode, numerator layout (G6): columns, the Jacobians applied to the tangent on the right:",
                    _line("dz_g = W_g dx + dW_g x + db_g,  dz_u likewise", f"{s(I, K)} {s(K, 1)} -> {s(I, 1)}"),
                    _line("da = da/dz_g dz_g + da/dz_u dz_u", f"{s(I, I)} {s(I, 1)} + {s(I, I)} {s(I, 1)} -> {s(I, 1)}"),
                    _line("dC = dC/da da", f"{s(1, I)} {s(I, 1)} -> {s(1, 1)}")]
        else:
            out += ["Forward mode, denominator layout (G6, transposed): rows multiplied from the left:",
                    _line("da^T = dz_g^T (da/dz_g)^T + dz_u^T (da/dz_u)^T", f"{s(1, I)} {s(I, I)} + {s(1, I)} {s(I, I)} -> {s(1, I)}"),
                    _line("dC = da^T dC/da", f"{s(1, I)} {s(I, 1)} -> {s(1, 1)}")]
        out += ["A batch stored row-wise (G7): dA = f'(Z_g) * dZ_g * Z_u + f(Z_g) * dZ_u [N, I] (manualbp's jvp)."]
    return out


def tangents_for(layer: GatedLayer, seed: int) -> dict[str, Tensor]:
    """A random tangent on x and on every parameter (explain's forward mode)."""
    gen = torch.Generator().manual_seed(seed)
    K, _ = layer.sizes
    values = {"x": torch.zeros(K, dtype=DTYPE), **{n: getattr(layer, n) for n in PARAMETERS}}
    return {n: torch.randn(v.shape, generator=gen, dtype=DTYPE) for n, v in values.items()}


def check(layer: GatedLayer, x: Tensor, y: Tensor, layout: str, mode: str, tol: float, seed: int):
    """The chains of ``describe`` against torch.autograd (reverse) or torch.func.jvp (forward): an explain Report."""
    from manualbp.derivation.explain import Report, _compare

    numerator = check_layout(layout) == "numerator"
    checks = []
    if mode == "reverse":
        ours, theirs = reverse(layer, x, y, layout), autograd_gradients(layer, x, y)
        for name in ("x",) + PARAMETERS:
            # numerator layout: rows, and dC/dW shaped like W^T; compared in the variable's own shape
            value = ours[name].T if numerator and name.startswith("W") else ours[name]
            checks.append(_compare(f"dC/d{name}", lambda v=value, t=theirs[name]: v.reshape(t.shape), theirs[name],
                                   tol))
    else:
        tangents = tangents_for(layer, seed)
        da_ref, dC_ref = jvp_reference(layer, x, y, tangents)
        da, dC = tangent(layer, x, y, tangents, layout)
        checks.append(_compare("da", lambda: da.reshape(da_ref.shape), da_ref, tol))
        checks.append(_compare("dC", lambda: dC.reshape(()), dC_ref, tol))
        grads = autograd_gradients(layer, x, y)
        by_reverse = sum((grads[n] * tangents[n]).sum() for n in tangents)
        checks.append(_compare("dC from the gradients (V6)", lambda: by_reverse, dC_ref, tol))
    return Report(checks, tol)
