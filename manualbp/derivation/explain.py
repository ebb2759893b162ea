"""``python -m manualbp explain``: a network's chain rule in one layout, with shapes, checked.

For the network of ``--sizes`` N_0,N_1,...,N_L (``docs/derivation.md``, F1-F2) it prints,
in reverse mode (``--mode reverse``, the default), each layer's forward and backward
equations in the chosen layout with the actual shape of every factor and the order of
the products of every chain, then checks every gradient numerically in float64 against
torch.autograd. In forward mode (``--mode forward``) it prints the tangents layer by layer
and the forward-mode chain (the Jacobians applied to a tangent on the input or on one
layer's weight, innermost first, section 11) and checks them against ``torch.func.jvp`` of
a plain PyTorch network. Exit status: 0 when every check holds, 1 when one fails, 2 for
bad arguments (one line naming the argument and the allowed range).

``--order reversed`` multiplies every chain in the opposite order on purpose, to show
that the check can fail: the factors of a fully reversed chain never conform, unless every
factor but one is 1x1, and then scalars commute and the check holds (the output says so).
A wrong number from a conforming order needs a partial reorder (``docs/derivation.md``
section 2, sizes 2,3,2).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from manualbp.derivation import layouts
from manualbp.activations import ACTIVATIONS

MAX_WIDTH = 100  # every factor is a dense matrix and dz/dW a dense 3rd-order array
ORDERS = ("prescribed", "reversed")
MODES = ("reverse", "forward")
MAX_SEED = 2**32 - 1  # seeds torch.Generator; seed + 1 and seed + 2 seed the data and the tangent
# The checks compare float64 results whose errors are ~1e-15; a tolerance above MAX_TOL would
# let through a wrong formula that misses by a little, and 1e300 would pass anything.
MAX_TOL = 1e-6
MAX_SLOPE = 100.0  # leaky_relu slope: generous (it is usually 0.01); 1e300 would overflow float64
DATA_DRAWS = 64  # candidate inputs; the one with fewest units where f'(z) = 0 is used


def parse_sizes(text: str) -> list[int]:
    """'4,5,3' -> [4, 5, 3]; at least two integers, each in [1, MAX_WIDTH]."""
    parts = [p.strip() for p in text.split(",")]
    sizes = []
    for p in parts:
        try:
            n = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"sizes must be positive integers separated by commas, got {p!r} in {text!r}") from None
        if not 1 <= n <= MAX_WIDTH:
            raise argparse.ArgumentTypeError(
                f"sizes must be positive integers, each in [1, {MAX_WIDTH}] (every factor is built as a dense matrix), got {n} in {text!r}"
            )
        sizes.append(n)
    if len(sizes) < 2:
        raise argparse.ArgumentTypeError(f"need at least two sizes (input and output width, N_0,...,N_L), got {text!r}")
    return sizes


def _number(text: str, kind: type, accept: Callable[[float], bool], allowed: str):
    """``kind(text)`` if it parses and ``accept``s, else an argparse error naming the allowed range."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not accept(value):  # nan fails every comparison, so every accept rejects it
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    return value


def _seed(text: str) -> int:
    return _number(text, int, lambda n: 0 <= n <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")


def _tolerance(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= MAX_TOL, f"a number in (0, {MAX_TOL:g}]")


def _slope(text: str) -> float:
    return _number(text, float, lambda v: -MAX_SLOPE <= v <= MAX_SLOPE, f"a number in [-{MAX_SLOPE:g}, {MAX_SLOPE:g}]")


def parse_tangent(text: str) -> layouts.TangentTarget:
    """'x' -> "x"; 'W2' -> ("W", 2). Whether layer 2 exists is checked against --sizes in ``run``."""
    if text == "x":
        return "x"
    if text[:1] == "W" and text[1:].isdigit() and int(text[1:]) >= 1:
        return ("W", int(text[1:]))
    raise argparse.ArgumentTypeError(f"must be x or W1..WL (a layer's weight, L the number of layers), got {text!r}")


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register the ``explain`` subcommand on ``subparsers``."""
    p = subparsers.add_parser(
        "explain",
        help="print a network's chain rule in one layout and mode, with shapes, and check it numerically",
        description=(
            "Print, for the network a^(l) = f(W^(l) a^(l-1) + b^(l)), l = 1..L, with cost "
            "C = (1/N_L) sum 1/2 (a^(L) - y)^2, the chain rule in the chosen layout with the shape of "
            "every factor and the order of the products: reverse mode (each layer's backward, every "
            "gradient) or forward mode (the tangents of a tangent on x or on one W^(l)); then check it "
            "in float64 against torch.autograd (reverse) or torch.func.jvp (forward). "
            "Exit status 0 when every check holds, 1 when one fails, 2 for bad arguments."
        ),
    )
    p.add_argument("--sizes", type=parse_sizes, required=True, metavar="N0,N1,...,NL", help=f"layer widths, input first, each in [1, {MAX_WIDTH}], e.g. 4,5,3")
    p.add_argument("--activation", choices=ACTIVATIONS, default="sigmoid", help="the f of every layer (default: sigmoid)")
    p.add_argument("--negative-slope", type=_slope, default=None, help="slope of leaky_relu for z < 0 (default 0.01)")
    p.add_argument("--layout", choices=layouts.LAYOUTS, default="denominator", help="derivative layout (default: denominator)")
    p.add_argument("--mode", choices=MODES, default="reverse", help="reverse mode (gradients of C) or forward mode (a tangent's dC) (default: reverse)")
    p.add_argument(
        "--tangent", type=parse_tangent, default=None, metavar="x|W<l>",
        help="forward mode only: the tangent's variable, the input x or the weight W<l> of layer l (default: x)",
    )
    p.add_argument("--seed", type=_seed, default=0, help=f"seed of the random network, data and tangent, in [0, {MAX_SEED}] (default: 0)")
    p.add_argument(
        "--tol", type=_tolerance, default=1e-10,
        help=f"largest error accepted, relative to max(1, largest entry), in (0, {MAX_TOL:g}] (default: 1e-10)",
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="prescribed",
        help="multiply the chains in the layout's order, or reversed on purpose to see the check fail (default: prescribed)",
    )
    p.add_argument(
        "--gated", action="store_true",
        help="the gated layer a = f(W_g x + b_g) * (W_u x + b_u) instead (SwiGLU, GEGLU, ...; docs/derivation.md "
             "section 12): --sizes K,I",
    )
    p.set_defaults(run=run, parser=p)
    return p


# ---------------------------------------------------------------------------
# The equations, as text with shapes.


def fmt_shape(t: Tensor) -> str:
    return "[" + ",".join(str(n) for n in t.shape) + "]"


def _line(equation: str, shapes: str, width: int = 64) -> str:
    return f"  {equation:<{width}} {shapes}"


def describe_network(net: layouts.Network, fwd: layouts.Forward) -> list[str]:
    """The network and its forward pass (F1, F2), with shapes; vectors are columns in either layout."""
    L = net.L
    col = layouts.column
    sizes = ",".join(str(n) for n in net.sizes)
    out = [
        f"Network: sizes {sizes} (L = {L} layer{'s' if L > 1 else ''}), f = {net.activation.name}, N_L = {net.sizes[-1]}",
        "",
        "Forward (vectors are columns in either layout; the layout only concerns derivatives):",
        _line("a^(0) = x", fmt_shape(col(fwd.a[0]))),
    ]
    for l in range(1, L + 1):
        W, a_prev, z = net.W(l), col(fwd.a[l - 1]), col(fwd.z[l])
        out.append(_line(f"z^({l}) = W^({l}) a^({l - 1}) + b^({l})", f"{fmt_shape(W)} {fmt_shape(a_prev)} + {fmt_shape(z)} -> {fmt_shape(z)}"))
        out.append(_line(f"a^({l}) = f(z^({l}))", fmt_shape(z)))
    out.append(_line(f"C = (1/N_L) sum_i 1/2 (a^({L})_i - y_i)^2", "scalar"))
    out.append("")
    return out


def _chain_lines(label: str, factors: Sequence[layouts.Factor], result: str) -> list[str]:
    """A chain as three lines: the derivatives, their formulas, their shapes and the product's."""
    pad = " " * len(label)
    return [
        f"  {label} = " + " . ".join(f.name for f in factors),
        f"  {pad} = " + " . ".join(f.formula for f in factors),
        f"  {pad}   " + " ".join(fmt_shape(f.value) for f in factors) + f" -> {result}",
    ]


def describe(net: layouts.Network, x: Tensor, y: Tensor, layout: str) -> list[str]:
    """The forward and backward equations of ``net`` in ``layout``, with the shape of every factor."""
    numerator = layouts.check_layout(layout) == "numerator"
    fwd = layouts.forward(net, x)
    L = net.L
    vec = layouts.row if numerator else layouts.column  # the layout's shape of dC/dv
    out = describe_network(net, fwd)
    if numerator:
        out.append("Backward, numerator layout: every derivative is the Jacobian; dC/dv is a row and dC/dW^(l) has")
        out.append("the shape of (W^(l))^T; chains run outermost-first, from C towards the variable (R3).")
    else:
        out.append("Backward, denominator layout: every derivative is the transposed Jacobian; dC/dv is a column and")
        out.append("dC/dW^(l) has the shape of W^(l); chains run innermost-first, from the variable towards C (R4).")
    g = vec(layouts.grad_cost(fwd.a[L], y))
    gt = "^T" if numerator else ""
    out.append(_line(f"dC/da^({L}) = (1/N_L)(a^({L}) - y){gt}", fmt_shape(g)))
    grad_a = g
    for l in range(L, 0, -1):
        fp = torch.diag(net.activation.f_grad(fwd.z[l]))
        W, a_prev = net.W(l), fwd.a[l - 1]
        out.append(f" layer {l}:")
        if numerator:
            delta = grad_a @ fp
            out.append(_line(f"delta^({l})^T = dC/da^({l}) da^({l})/dz^({l}) = dC/da^({l}) diag(f'(z^({l})))", f"{fmt_shape(grad_a)} {fmt_shape(fp)} -> {fmt_shape(delta)}  (N{1 if l == L else 2})"))
            gw = layouts.column(a_prev) @ delta
            out.append(_line(f"dC/dW^({l}) = a^({l - 1}) delta^({l})^T", f"{fmt_shape(layouts.column(a_prev))} {fmt_shape(delta)} -> {fmt_shape(gw)}  (N3)"))
            out.append(_line(f"dC/db^({l}) = delta^({l})^T", f"{fmt_shape(delta)}  (N4)"))
            nxt = delta @ W
            name = "dC/dx = dC/da^(0)" if l == 1 else f"dC/da^({l - 1})"
            out.append(_line(f"{name} = delta^({l})^T dz^({l})/da^({l - 1}) = delta^({l})^T W^({l})", f"{fmt_shape(delta)} {fmt_shape(W)} -> {fmt_shape(nxt)}  (N5)"))
        else:
            delta = fp @ grad_a
            out.append(_line(f"delta^({l}) = da^({l})/dz^({l}) dC/da^({l}) = diag(f'(z^({l}))) dC/da^({l})", f"{fmt_shape(fp)} {fmt_shape(grad_a)} -> {fmt_shape(delta)}  (D{1 if l == L else 2})"))
            gw = delta @ layouts.row(a_prev)
            out.append(_line(f"dC/dW^({l}) = delta^({l}) (a^({l - 1}))^T", f"{fmt_shape(delta)} {fmt_shape(layouts.row(a_prev))} -> {fmt_shape(gw)}  (D3)"))
            out.append(_line(f"dC/db^({l}) = delta^({l})", f"{fmt_shape(delta)}  (D4)"))
            nxt = W.T @ delta
            name = "dC/dx = dC/da^(0)" if l == 1 else f"dC/da^({l - 1})"
            out.append(_line(f"{name} = dz^({l})/da^({l - 1}) delta^({l}) = (W^({l}))^T delta^({l})", f"{fmt_shape(W.T)} {fmt_shape(delta)} -> {fmt_shape(nxt)}  (D5)"))
        grad_a = nxt
    out.append("")
    where = "outermost-first: dC/da^(L) on the left" if numerator else "innermost-first: dC/da^(L) on the right"
    out.append(f"Order of the products ({where}; a^(0) = x):")
    targets: list[layouts.Target] = ["x"] + [(k, l) for l in range(L, 0, -1) for k in ("W", "b")]
    for target in targets:
        factors = layouts.chain_factors(net, fwd, y, target, layout)
        label = "dC/dx" if target == "x" else f"dC/d{target[0]}^({target[1]})"
        product = layouts.multiply_chain(factors, layout)
        result = fmt_shape(product)
        if target != "x" and target[0] == "W":
            result += f" = {fmt_shape(layouts.drop_cost_index(product, layout))} (the 3rd-order dz/dW contracts one index, T4)"
        out.extend(_chain_lines(label, factors, result))
    return out


def tangent_name(target: layouts.TangentTarget) -> str:
    return "dx" if target == "x" else f"dW^({target[1]})"


def describe_forward(net: layouts.Network, x: Tensor, y: Tensor, layout: str, target: layouts.TangentTarget, tangent: Tensor) -> list[str]:
    """Forward mode for a tangent on ``target`` ("x" or ("W", l)): the tangents layer by layer (V1, V2)
    and the forward-mode chain (V3-V5), in ``layout``, with the shape of every factor."""
    numerator = layouts.check_layout(layout) == "numerator"
    fwd = layouts.forward(net, x)
    L = net.L
    first = 1 if target == "x" else target[1]  # the layers below a weight's do not move
    vec = layouts.column if numerator else layouts.row  # a tangent: a column, or a row in denominator layout
    t = "" if numerator else "^T"
    out = describe_network(net, fwd)
    if numerator:
        out.append("Forward mode, numerator layout: every derivative is the Jacobian and a tangent is a column; the")
        out.append("chain is written as in reverse mode, outermost-first (R3), and applied to the tangent on its right,")
        out.append("innermost first (V3): each partial product from the right is the tangent of one more variable.")
    else:
        out.append("Forward mode, denominator layout: every derivative is the transposed Jacobian and a tangent is a")
        out.append("row; the chain is written as in reverse mode, innermost-first (R4), with the tangent on its left,")
        out.append("and applied from the left (V5): each partial product from the left is the tangent of one more variable.")
    if target == "x":
        out.append(f"Tangent: dx, {fmt_shape(vec(tangent))} (random); every W^(l), b^(l) held fixed.")
    else:
        l0 = target[1]
        out.append(f"Tangent: dW^({l0}), {fmt_shape(tangent)} (random); x and every other parameter held fixed"
                   + (f", so the tangents of layers 1..{l0 - 1} are zero and are not shown." if l0 > 1 else "."))
    out.append("Tangents, layer by layer (V1, V2):")
    tan = layouts.tangent_recursion(net, x, y, **({"dx": tangent} if target == "x" else {"dW": {target[1]: tangent}}))
    if target == "x":
        out.append(_line(f"da^(0){t} = dx{t}", fmt_shape(vec(tan.da[0]))))
    for l in range(first, L + 1):
        W, fp = net.W(l), torch.diag(net.activation.f_grad(fwd.z[l]))
        dz, da = vec(tan.dz[l]), vec(tan.da[l])
        if target != "x" and l == first:
            T = layouts.jacobian_z_W(net, fwd, l)
            if numerator:
                eq, shapes = f"dz^({l}) = dz^({l})/dW^({l}) : dW^({l}) = dW^({l}) a^({l - 1})", f"{fmt_shape(tangent)} {fmt_shape(layouts.column(fwd.a[l - 1]))}"
            else:
                eq, shapes = f"dz^({l})^T = dW^({l}) : dz^({l})/dW^({l}) = (a^({l - 1}))^T (dW^({l}))^T", f"{fmt_shape(layouts.row(fwd.a[l - 1]))} {fmt_shape(tangent.T)}"
            out.append(_line(eq, f"{shapes} -> {fmt_shape(dz)}  (V1, V4)"))
            out.append(f"    (\":\" contracts both indices of W: dz/dW is the 3rd-order {fmt_shape(T)} of T1, and the sum is dW a)")
        elif numerator:
            out.append(_line(f"dz^({l}) = dz^({l})/da^({l - 1}) da^({l - 1}) = W^({l}) da^({l - 1})", f"{fmt_shape(W)} {fmt_shape(vec(tan.da[l - 1]))} -> {fmt_shape(dz)}  (V1)"))
        else:
            out.append(_line(f"dz^({l})^T = da^({l - 1})^T dz^({l})/da^({l - 1}) = da^({l - 1})^T (W^({l}))^T", f"{fmt_shape(vec(tan.da[l - 1]))} {fmt_shape(W.T)} -> {fmt_shape(dz)}  (V1)"))
        if numerator:
            out.append(_line(f"da^({l}) = da^({l})/dz^({l}) dz^({l}) = diag(f'(z^({l}))) dz^({l})", f"{fmt_shape(fp)} {fmt_shape(dz)} -> {fmt_shape(da)}  (V1)"))
        else:
            out.append(_line(f"da^({l})^T = dz^({l})^T da^({l})/dz^({l}) = dz^({l})^T diag(f'(z^({l})))", f"{fmt_shape(dz)} {fmt_shape(fp)} -> {fmt_shape(da)}  (V1)"))
    g = layouts.grad_cost(fwd.a[L], y)
    if numerator:
        out.append(_line(f"dC = dC/da^({L}) da^({L}) = (1/N_L)(a^({L}) - y)^T da^({L})", f"{fmt_shape(layouts.row(g))} {fmt_shape(vec(tan.da[L]))} -> [1,1]  (V2)"))
    else:
        out.append(_line(f"dC = da^({L})^T dC/da^({L}) = da^({L})^T (1/N_L)(a^({L}) - y)", f"{fmt_shape(vec(tan.da[L]))} {fmt_shape(layouts.column(g))} -> [1,1]  (V2)"))
    out.append("")
    where = "from the right, the tangent's end" if numerator else "from the left, the tangent's end"
    out.append(f"The forward-mode chain, multiplied {where} ({'V3' if target == 'x' else 'V4'}{'' if numerator else ', V5'}):")
    for to, label in (("a", f"da^({L}){t}"), ("C", "dC")):
        factors = layouts.forward_chain_factors(net, fwd, y, target, tangent, layout, to=to)
        out.extend(_chain_lines(label, factors, fmt_shape(layouts.multiply_forward_chain(factors, layout))))
    out.append("Reverse mode multiplies the same factors from C's end instead; both give dC = <dC/dv, dv> (V6).")
    return out


# ---------------------------------------------------------------------------
# The numerical check.


@dataclass(frozen=True)
class Check:
    """One comparison: ``error`` = max |candidate - reference|, inf when it could not be formed.

    ``commuted``: it holds in the reversed order only because every factor but one is 1x1.
    """

    name: str
    error: float
    ok: bool
    note: str = ""
    commuted: bool = False


@dataclass(frozen=True)
class Report:
    checks: list[Check]
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def largest_error(self) -> float:
        return max((c.error for c in self.checks), default=math.inf)


COMMUTE_NOTE = "holds reversed only because every factor but one is 1x1: scalars commute"


def _scalars_commute(factors: Sequence[Tensor]) -> bool:
    """True when a product cannot depend on the order: every factor but at most one is 1x1."""
    return sum(f.numel() > 1 for f in factors) <= 1


def _compare(name: str, compute: Callable[[], Tensor], reference: Tensor, tol: float, commutes: bool = False) -> Check:
    try:
        candidate = compute()
    except layouts.NonConformingError as e:
        return Check(name, math.inf, False, str(e))
    except RuntimeError as e:  # torch's own message when a matrix product does not conform
        return Check(name, math.inf, False, f"shapes do not conform: {str(e).splitlines()[0]}")
    if candidate.shape != reference.shape:
        return Check(name, math.inf, False, f"shape {fmt_shape(candidate)}, expected {fmt_shape(reference)}")
    error = (candidate - reference).abs().max().item()
    scale = reference.abs().max().item()
    if scale == 0:  # zeros compared with zeros: nothing would be tested
        return Check(name, error, False, "the reference is all zero, so this check would prove nothing")
    ok = error <= tol * max(1.0, scale)
    return Check(name, error, ok, COMMUTE_NOTE if ok and commutes else "", ok and commutes)


def _check_order(layout: str, order: str) -> None:
    layouts.check_layout(layout)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of: {', '.join(ORDERS)}")


def check(
    net: layouts.Network,
    x: Tensor,
    y: Tensor,
    layout: str,
    order: str = "prescribed",
    tol: float = 1e-10,
) -> Report:
    """Check every gradient of ``net`` in ``layout`` against torch.autograd, in float64 (reverse mode).

    Each chain (``layouts.chain_factors``) is multiplied in the layout's order, or in
    the reversed order when ``order="reversed"`` (which fails on shapes unless every
    factor but one is 1x1, and the check says so); the delta recursion is checked as
    well. The reference is autograd's gradient, transposed for the numerator layout.
    """
    _check_order(layout, order)
    numerator = layout == "numerator"
    fwd = layouts.forward(net, x)
    ref = layouts.autograd_gradients(net, x, y)
    if numerator:
        ref = ref.transpose()
    eq = "N" if numerator else "D"
    rec = layouts.delta_recursion(net, x, y, layout)

    def factors(target: layouts.Target) -> list[Tensor]:
        values = [f.value for f in layouts.chain_factors(net, fwd, y, target, layout)]
        return values[::-1] if order == "reversed" else values

    def chain(target: layouts.Target) -> Callable[[], Tensor]:
        start = "left" if numerator else "right"
        return lambda: layouts.multiply(factors(target), start=start)

    def chain_weight(l: int) -> Callable[[], Tensor]:
        def compute() -> Tensor:  # the chain down to z^(l), then the trace result (T2, T3)
            return layouts.weight_gradient_from_delta(chain(("z", l))(), fwd.a[l - 1], layout)

        return compute

    def commutes(target: layouts.Target) -> bool:
        return order == "reversed" and _scalars_commute(factors(target))

    checks: list[Check] = []
    for l in range(net.L, 0, -1):
        checks.append(
            _compare(f"dC/dW^({l}) chain to z^({l}), then the trace result ({eq}3)", chain_weight(l), ref.grad_weight[l], tol, commutes(("z", l)))
        )
        checks.append(
            _compare(
                f"dC/dW^({l}) chain with the 3rd-order dz/dW (T4)",
                lambda l=l: layouts.drop_cost_index(chain(("W", l))(), layout),
                ref.grad_weight[l],
                tol,
                commutes(("W", l)),
            )
        )
        checks.append(_compare(f"dC/db^({l}) chain ({eq}4)", chain(("b", l)), ref.grad_bias[l], tol, commutes(("b", l))))
        checks.append(_compare(f"delta^({l}) recursion ({eq}{1 if l == net.L else 2})", lambda l=l: rec.delta[l], ref.delta[l], tol))
        checks.append(_compare(f"dC/dW^({l}) recursion ({eq}3)", lambda l=l: rec.grad_weight[l], ref.grad_weight[l], tol))
    checks.append(_compare(f"dC/dx chain ({eq}6)", chain("x"), ref.grad_x, tol, commutes("x")))
    checks.append(_compare(f"dC/dx recursion ({eq}5)", lambda: rec.grad_x, ref.grad_x, tol))
    return Report(checks, tol)


def check_forward(
    net: layouts.Network,
    x: Tensor,
    y: Tensor,
    layout: str,
    target: layouts.TangentTarget,
    tangent: Tensor,
    order: str = "prescribed",
    tol: float = 1e-10,
) -> Report:
    """Check forward mode for a tangent on ``target`` against ``torch.func.jvp`` of a plain PyTorch network.

    The tangents of the recursion (V1, V2), the forward-mode chains for da^(L) and dC (V3-V5,
    reversed on purpose with ``order="reversed"``), and dC from reverse mode's gradient (V6).
    """
    _check_order(layout, order)
    numerator = layout == "numerator"
    fwd = layouts.forward(net, x)
    L = net.L
    inputs = {"dx": tangent} if target == "x" else {"dW": {target[1]: tangent}}
    ref = layouts.jvp_reference(net, x, y, **inputs)
    rec = layouts.tangent_recursion(net, x, y, **inputs)
    vec = layouts.column if numerator else layouts.row
    chain_eq = ("V3" if target == "x" else "V4") if numerator else "V5"

    def factors(to: str) -> list[Tensor]:
        values = [f.value for f in layouts.forward_chain_factors(net, fwd, y, target, tangent, layout, to=to)]
        return values[::-1] if order == "reversed" else values

    def chain(to: str) -> Callable[[], Tensor]:
        return lambda: layouts.multiply(factors(to), start="right" if numerator else "left")

    def commutes(to: str) -> bool:
        return order == "reversed" and _scalars_commute(factors(to))

    def by_reverse_mode() -> Tensor:  # <dC/dv, dv> with the gradient from reverse mode (D5, D3)
        grads = layouts.delta_recursion(net, x, y, "denominator")
        if target == "x":
            return grads.grad_x.flatten() @ tangent
        return (grads.grad_weight[target[1]] * tangent).sum()

    checks: list[Check] = []
    first = 1 if target == "x" else target[1]
    for l in range(first, L + 1):
        checks.append(_compare(f"dz^({l}) recursion (V1)", lambda l=l: rec.dz[l], ref.dz[l], tol))
        checks.append(_compare(f"da^({l}) recursion (V1)", lambda l=l: rec.da[l], ref.da[l], tol))
    checks.append(_compare(f"da^({L}) chain ({chain_eq})", chain("a"), vec(ref.da[L]), tol, commutes("a")))
    checks.append(_compare(f"dC chain ({chain_eq})", chain("C"), ref.dC.reshape(1, 1), tol, commutes("C")))
    checks.append(_compare("dC recursion (V2)", lambda: rec.dC, ref.dC, tol))
    checks.append(_compare("dC = <dC/dv, dv>, dC/dv by reverse mode (V6)", by_reverse_mode, ref.dC, tol))
    return Report(checks, tol)


def choose_data(net: layouts.Network, seed: int) -> tuple[Tensor, Tensor, int]:
    """x [N_0], y [N_L]: of DATA_DRAWS random pairs (seed ``seed``), the first with fewest units where f'(z) = 0.

    Where f'(z^(l)_i) = 0 (relu for z < 0) every method gives 0 for delta^(l)_i, and a check of
    that entry proves nothing; the chosen input keeps such units as few as the draws allow.
    Returns (x, y, index of the draw).
    """
    X, Y = net.random_data(n=DATA_DRAWS, seed=seed)
    fwd = layouts.batched_forward(net, X)
    flat = sum((net.activation.f_grad(fwd.z[l]) == 0).sum(dim=1) for l in range(1, net.L + 1))
    k = int(torch.argmin(flat))  # the first draw with the fewest
    return X[k], Y[k], k


def flat_units_note(net: layouts.Network, x: Tensor) -> list[str]:
    """A line for each layer with units where f'(z) = 0, empty when there are none."""
    fwd = layouts.forward(net, x)
    out = []
    for l in range(1, net.L + 1):
        n = int((net.activation.f_grad(fwd.z[l]) == 0).sum())
        if n:
            out.append(
                f"Note: f'(z^({l})) = 0 at {n} of {net.sizes[l]} units ({net.activation.name} is flat there): those entries "
                f"of delta^({l}) and da^({l}) are 0 in every method and test nothing; the others are checked."
            )
    return out


def format_report(report: Report, layout: str, order: str, seed: int, reference: str = "torch.autograd") -> list[str]:
    how = "" if order == "prescribed" else ", chains multiplied in REVERSED order on purpose"
    out = [f"Check against {reference} (float64, seed {seed}, {layout} layout{how}):"]
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        status = "ok" if c.ok else "FAILED"
        err = "inf" if math.isinf(c.error) else f"{c.error:.1e}"
        out.append(f"  {c.name:<{width}}  max |error| = {err:>7}  {status}" + (f"  ({c.note})" if c.note else ""))
    n_bad = sum(not c.ok for c in report.checks)
    largest = "inf" if math.isinf(report.largest_error) else f"{report.largest_error:.2e}"
    verdict = f"all {len(report.checks)} checks hold" if report.ok else f"{n_bad} of {len(report.checks)} checks FAILED"
    out.append(f"largest error: {largest} (tolerance {report.tol:g} x max(1, largest entry)); {verdict}")
    n_commuted = sum(c.commuted for c in report.checks)
    if n_commuted:
        out.append(
            f"{n_commuted} chain check{'s' if n_commuted > 1 else ''} held in the REVERSED order only because every factor "
            "but one is 1x1 and scalars commute: those widths cannot show an order mistake; widths > 1 can."
        )
    return out


def run(args: argparse.Namespace) -> int:
    """Print the equations and the check for parsed ``args``; 0 when every check holds, else 1."""
    parser = args.parser
    if args.negative_slope is not None and args.activation != "leaky_relu":
        parser.error(f"argument --negative-slope: an option of leaky_relu only, not of {args.activation}")
    if args.tangent is not None and args.mode != "forward":
        parser.error("argument --tangent: only with --mode forward")
    if args.gated:
        return _run_gated(args)
    L = len(args.sizes) - 1
    target = "x" if args.tangent is None else args.tangent
    if target != "x" and not 1 <= target[1] <= L:
        parser.error(f"argument --tangent: must be x or W1..W{L} (--sizes gives L = {L}), got W{target[1]}")
    net = layouts.Network.random(args.sizes, args.activation, seed=args.seed, negative_slope=args.negative_slope)
    x, y, draw = choose_data(net, args.seed + 1)
    notes = [f"Data: x, y = draw {draw} of {DATA_DRAWS} (seed {args.seed + 1}), the first with fewest units where f'(z) = 0."]
    notes += flat_units_note(net, x)
    if args.mode == "reverse":
        print("\n".join(describe(net, x, y, args.layout)))
        report = check(net, x, y, args.layout, order=args.order, tol=args.tol)
        reference = "torch.autograd"
    else:
        gen = torch.Generator().manual_seed(args.seed + 2)
        shape = (args.sizes[0],) if target == "x" else tuple(net.W(target[1]).shape)
        tangent = torch.randn(shape, generator=gen, dtype=layouts.DTYPE)
        print("\n".join(describe_forward(net, x, y, args.layout, target, tangent)))
        report = check_forward(net, x, y, args.layout, target, tangent, order=args.order, tol=args.tol)
        reference = "torch.func.jvp of a plain PyTorch network"
    print()
    print("\n".join(notes))
    print("\n".join(format_report(report, args.layout, args.order, args.seed, reference)))
    return 0 if report.ok else 1


def _run_gated(args: argparse.Namespace) -> int:
    """``--gated``: the gated layer's equations and checks (manualbp/derivation/gated.py)."""
    from manualbp.derivation import gated

    parser = args.parser
    if len(args.sizes) != 2:
        parser.error(f"argument --sizes: with --gated, exactly two widths K,I (inputs, gated units), got {args.sizes}")
    if args.tangent is not None or args.order != "prescribed":
        parser.error("arguments --tangent and --order: not with --gated (its forward mode puts a tangent on x and on "
                     "every parameter; its chains have one order)")
    layer = gated.GatedLayer.random(*args.sizes, args.activation, seed=args.seed, negative_slope=args.negative_slope)
    x, y = layer.random_data(seed=args.seed + 1)
    print("\n".join(gated.describe(layer, x, y, args.layout, args.mode)))
    report = gated.check(layer, x, y, args.layout, args.mode, args.tol, args.seed + 2)
    reference = "torch.autograd" if args.mode == "reverse" else "torch.func.jvp of a plain PyTorch layer"
    print()
    print("\n".join(format_report(report, args.layout, args.order, args.seed, reference)))
    return 0 if report.ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m manualbp.derivation.explain ARGS`` behaves as ``python -m manualbp explain ARGS``."""
    from manualbp.__main__ import main as cli_main

    return cli_main(["explain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
