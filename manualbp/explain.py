"""``python -m manualbp explain``: a network's backprop equations in one layout, with shapes, checked.

For the network of ``--sizes`` N_0,N_1,...,N_L (``docs/derivation.md``, F1-F2) it prints
each layer's forward and backward equations in the chosen layout with the actual
shape of every factor, writes out the order of the products of every chain, then
checks every gradient numerically in float64 against torch.autograd on random data.
Exit status: 0 when every check holds, 1 when one fails, 2 for bad arguments.

``--order reversed`` multiplies every chain in the opposite order on purpose, to
show that the check can fail (the factors then do not conform, or give wrong numbers).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from manualbp import layouts
from manualbp.activations import ACTIVATIONS

MAX_WIDTH = 100  # every factor is a dense matrix and dz/dW a dense 3rd-order array
ORDERS = ("prescribed", "reversed")


def parse_sizes(text: str) -> list[int]:
    """'4,5,3' -> [4, 5, 3]; at least two positive integers, each at most MAX_WIDTH."""
    parts = [p.strip() for p in text.split(",")]
    sizes = []
    for p in parts:
        try:
            n = int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"sizes must be positive integers separated by commas, got {p!r} in {text!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {n} in {text!r}")
        if n > MAX_WIDTH:
            raise argparse.ArgumentTypeError(f"sizes must be at most {MAX_WIDTH} (every factor is built as a dense matrix), got {n}")
        sizes.append(n)
    if len(sizes) < 2:
        raise argparse.ArgumentTypeError(f"need at least two sizes (input and output width, N_0,...,N_L), got {text!r}")
    return sizes


def _nonnegative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {n}")
    return n


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return v


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register the ``explain`` subcommand on ``subparsers``."""
    p = subparsers.add_parser(
        "explain",
        help="print a network's backprop equations in one layout, with shapes, and check them against autograd",
        description=(
            "Print, for the network a^(l) = f(W^(l) a^(l-1) + b^(l)), l = 1..L, with cost "
            "C = (1/N_L) sum 1/2 (a^(L) - y)^2, each layer's forward and backward equations in "
            "the chosen layout with the shape of every factor and the order of the products, "
            "then check them in float64 against torch.autograd. Exit status 0 when every check holds."
        ),
    )
    p.add_argument("--sizes", type=parse_sizes, required=True, metavar="N0,N1,...,NL", help="layer widths, input first, e.g. 4,5,3")
    p.add_argument("--activation", choices=ACTIVATIONS, default="sigmoid", help="the f of every layer (default: sigmoid)")
    p.add_argument("--negative-slope", type=_finite_float, default=None, help="slope of leaky_relu for z < 0 (default 0.01)")
    p.add_argument("--layout", choices=layouts.LAYOUTS, default="denominator", help="derivative layout (default: denominator)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of the random network and data (default: 0)")
    p.add_argument("--tol", type=_positive_float, default=1e-10, help="largest error accepted, relative to max(1, largest entry) (default: 1e-10)")
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="prescribed",
        help="multiply the chains in the layout's order, or reversed on purpose to see the check fail (default: prescribed)",
    )
    p.set_defaults(run=run, parser=p)
    return p


# ---------------------------------------------------------------------------
# The equations, as text with shapes.


def fmt_shape(t: Tensor) -> str:
    return "[" + ",".join(str(n) for n in t.shape) + "]"


def _line(equation: str, shapes: str, width: int = 64) -> str:
    return f"  {equation:<{width}} {shapes}"


def describe(net: layouts.Network, x: Tensor, y: Tensor, layout: str) -> list[str]:
    """The forward and backward equations of ``net`` in ``layout``, with the shape of every factor."""
    numerator = layouts.check_layout(layout) == "numerator"
    fwd = layouts.forward(net, x)
    L = net.L
    col = lambda v: layouts.column(v)  # noqa: E731  vectors are columns in both layouts
    vec = layouts.row if numerator else layouts.column  # the layout's shape of dC/dv
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
        out.append(f"  {label} = " + " . ".join(f.name for f in factors))
        out.append(f"  {' ' * len(label)} = " + " . ".join(f.formula for f in factors))
        out.append(f"  {' ' * len(label)}   " + " ".join(fmt_shape(f.value) for f in factors) + f" -> {result}")
    return out


# ---------------------------------------------------------------------------
# The numerical check.


@dataclass(frozen=True)
class Check:
    """One comparison: ``error`` = max |candidate - reference|, inf when it could not be formed."""

    name: str
    error: float
    ok: bool
    note: str = ""


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


def _compare(name: str, compute: Callable[[], Tensor], reference: Tensor, tol: float) -> Check:
    try:
        candidate = compute()
    except layouts.NonConformingError as e:
        return Check(name, math.inf, False, str(e))
    except RuntimeError as e:  # torch's own message when a matrix product does not conform
        return Check(name, math.inf, False, f"shapes do not conform: {str(e).splitlines()[0]}")
    if candidate.shape != reference.shape:
        return Check(name, math.inf, False, f"shape {fmt_shape(candidate)}, expected {fmt_shape(reference)}")
    error = (candidate - reference).abs().max().item()
    bound = tol * max(1.0, reference.abs().max().item())
    return Check(name, error, error <= bound)


def check(
    net: layouts.Network,
    x: Tensor,
    y: Tensor,
    layout: str,
    order: str = "prescribed",
    tol: float = 1e-10,
) -> Report:
    """Check every gradient of ``net`` in ``layout`` against torch.autograd, in float64.

    Each chain (``layouts.chain_factors``) is multiplied in the layout's order, or in
    the reversed order when ``order="reversed"`` (which must fail); the delta
    recursion is checked as well. The reference is autograd's gradient, transposed
    for the numerator layout.
    """
    layouts.check_layout(layout)
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of: {', '.join(ORDERS)}")
    numerator = layout == "numerator"
    fwd = layouts.forward(net, x)
    ref = layouts.autograd_gradients(net, x, y)
    if numerator:
        ref = ref.transpose()
    eq = "N" if numerator else "D"
    rec = layouts.delta_recursion(net, x, y, layout)

    def chain(target: layouts.Target) -> Callable[[], Tensor]:
        def compute() -> Tensor:
            factors = layouts.chain_factors(net, fwd, y, target, layout)
            if order == "reversed":
                factors = factors[::-1]
            return layouts.multiply_chain(factors, layout)

        return compute

    def chain_weight(l: int) -> Callable[[], Tensor]:
        def compute() -> Tensor:  # the chain down to z^(l), then the trace result (T2, T3)
            delta = chain(("z", l))()
            return layouts.weight_gradient_from_delta(delta, fwd.a[l - 1], layout)

        return compute

    checks: list[Check] = []
    for l in range(net.L, 0, -1):
        checks.append(_compare(f"dC/dW^({l}) chain to z^({l}), then the trace result ({eq}3)", chain_weight(l), ref.grad_weight[l], tol))
        checks.append(
            _compare(
                f"dC/dW^({l}) chain with the 3rd-order dz/dW (T4)",
                lambda l=l: layouts.drop_cost_index(chain(("W", l))(), layout),
                ref.grad_weight[l],
                tol,
            )
        )
        checks.append(_compare(f"dC/db^({l}) chain ({eq}4)", chain(("b", l)), ref.grad_bias[l], tol))
        checks.append(_compare(f"delta^({l}) recursion ({eq}{1 if l == net.L else 2})", lambda l=l: rec.delta[l], ref.delta[l], tol))
        checks.append(_compare(f"dC/dW^({l}) recursion ({eq}3)", lambda l=l: rec.grad_weight[l], ref.grad_weight[l], tol))
    checks.append(_compare(f"dC/dx chain ({eq}6)", chain("x"), ref.grad_x, tol))
    checks.append(_compare(f"dC/dx recursion ({eq}5)", lambda: rec.grad_x, ref.grad_x, tol))
    return Report(checks, tol)


def format_report(report: Report, layout: str, order: str, seed: int) -> list[str]:
    how = "" if order == "prescribed" else ", chains multiplied in REVERSED order on purpose"
    out = [f"Check against torch.autograd (float64, seed {seed}, {layout} layout{how}):"]
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        status = "ok" if c.ok else "FAILED"
        err = "inf" if math.isinf(c.error) else f"{c.error:.1e}"
        out.append(f"  {c.name:<{width}}  max |error| = {err:>7}  {status}" + (f"  ({c.note})" if c.note else ""))
    n_bad = sum(not c.ok for c in report.checks)
    largest = "inf" if math.isinf(report.largest_error) else f"{report.largest_error:.2e}"
    verdict = f"all {len(report.checks)} checks hold" if report.ok else f"{n_bad} of {len(report.checks)} checks FAILED"
    out.append(f"largest error: {largest} (tolerance {report.tol:g} x max(1, largest entry)); {verdict}")
    return out


def run(args: argparse.Namespace) -> int:
    """Print the equations and the check for parsed ``args``; 0 when every check holds, else 1."""
    if args.negative_slope is not None and args.activation != "leaky_relu":
        args.parser.error(f"--negative-slope is an option of leaky_relu only, not of {args.activation}")
    net = layouts.Network.random(args.sizes, args.activation, seed=args.seed, negative_slope=args.negative_slope)
    x, y = net.random_data(seed=args.seed + 1)
    print("\n".join(describe(net, x, y, args.layout)))
    print()
    report = check(net, x, y, args.layout, order=args.order, tol=args.tol)
    print("\n".join(format_report(report, args.layout, args.order, args.seed)))
    return 0 if report.ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m manualbp.explain ARGS`` behaves as ``python -m manualbp explain ARGS``."""
    from manualbp.__main__ import main as cli_main

    return cli_main(["explain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
