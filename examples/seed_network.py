#!/usr/bin/env python
"""The network of the question manualbp started from, trained with manualbp, its gradients checked three ways.

The question (shared/seed/, derived and corrected in docs/derivation.md) defines

    z^(l) = W^(l) a^(l-1) + b^(l),  a^(l) = sigmoid(z^(l)),  l = 1..L,  a^(0) = x      (F1)
    C = (1/N_L) sum_i 1/2 (a^(L)_i - y_i)^2     half mean-squared error, one sample   (F2)

and trains it by SGD, one sample at a time. This script builds that network from
manualbp.Linear(..., activation="sigmoid") layers in float64, trains it so on a
small synthetic data set (targets from a random "teacher" network of the same
shape), and then, for one sample, computes every layer's gradient three ways:

    numpy      the equations of docs/derivation.md, section 5, column vectors,
               denominator layout (every gradient has its variable's shape):
                 delta^(L) = f'(z^(L)) * (a^(L) - y) / N_L                  (D1)
                 delta^(l) = f'(z^(l)) * (W^(l+1))^T delta^(l+1)            (D2)
                 dC/dW^(l) = delta^(l) (a^(l-1))^T,  dC/db^(l) = delta^(l)  (D3, D4)
                 dC/dx     = (W^(1))^T delta^(1)                            (D5)
    manualbp   .backward() through the manualbp layers (the hand-written backward)
    autograd   .backward() through an nn.Linear + torch.sigmoid twin with the same parameters

and prints them with their largest differences. Exit status 1 if any difference
exceeds --tolerance. Needs only torch and numpy (manualbp's own dependencies).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
MAX_SEED = 2**32 - 1  # numpy's and torch's generators take it; seed + 1 seeds the sample order
MAX_LR = 100.0  # far above any useful rate (the default is 2); nan, inf or 1e300 would make every parameter nan
# float64 gradients agree to ~1e-16; a tolerance above this would let a wrong gradient through
MAX_TOLERANCE = 1e-6


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's line breaks and show every default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seed_network.py",
        description=__doc__,
        formatter_class=_HelpFormatter,
        epilog=f"exit status: {EXIT_OK} all gradients agree; {EXIT_MISMATCH} a difference exceeds --tolerance; "
               f"{EXIT_USAGE} bad arguments",
    )
    parser.add_argument("--sizes", default="4,6,5,3",
                        help="layer widths N_0,N_1,...,N_L (L layers; N_0 inputs, N_L outputs)")
    parser.add_argument("--samples", type=int, default=32, help="size N of the synthetic data set")
    parser.add_argument("--epochs", type=int, default=100, help="SGD passes over the data set, one sample per step")
    parser.add_argument("--lr", type=float, default=2.0, help="SGD learning rate eta: W <- W - eta dC/dW")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the initial parameters and the order")
    parser.add_argument("--sample", type=int, default=0, help="index of the sample whose gradients are compared")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for PyTorch: one is fastest for tensors this small, and keeps a busy "
                             "machine from slowing the run down many times over")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="manualbp backend; triton on the CPU runs Triton's interpreter "
                             "(TRITON_INTERPRET=1 is set for you): slow, use few samples and epochs")
    parser.add_argument("--tolerance", type=float, default=1e-10,
                        help="largest absolute difference allowed between any two of the three gradients")
    parser.add_argument("--no-values", action="store_true", help="print only the table of differences")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.layer_sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if len(args.layer_sizes) < 2 or any(s <= 0 for s in args.layer_sizes):
        parser.error(f"--sizes needs at least two positive widths (inputs, outputs), got {args.sizes!r}")
    # Every number in its range, or a usage error naming it (nan fails every comparison).
    for name, ok, allowed in (
        ("--samples", args.samples >= 1, "an integer >= 1"),
        ("--epochs", args.epochs >= 0, "an integer >= 0"),
        ("--lr", 0 < args.lr <= MAX_LR, f"a number in (0, {MAX_LR:g}]"),
        ("--seed", 0 <= args.seed <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
        ("--sample", 0 <= args.sample < args.samples, f"an integer in [0, {args.samples - 1}] (an index into --samples)"),
        ("--threads", args.threads >= 1, "an integer >= 1"),
        ("--tolerance", 0 < args.tolerance <= MAX_TOLERANCE, f"a number in (0, {MAX_TOLERANCE:g}]"),
    ):
        if not ok:
            parser.error(f"{name} must be {allowed}, got {getattr(args, name[2:])}")
    args.parser = parser
    return args


# ----------------------------------------------------------------------------------------
# The equations of docs/derivation.md in NumPy: one sample, column vectors, denominator layout.
# ----------------------------------------------------------------------------------------


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def sigmoid_grad(z):
    s = sigmoid(z)
    return s * (1.0 - s)  # f'(z) = f(z) (1 - f(z))


def numpy_gradients(weights, biases, x, y):
    """weights[l-1] = W^(l) [N_l, N_{l-1}], biases[l-1] = b^(l) [N_l, 1], x [N_0, 1], y [N_L, 1].

    Returns (cost, {l: dC/dW^(l)}, {l: dC/db^(l)}, dC/dx), every gradient shaped like its variable.
    """
    L = len(weights)
    a, z = {0: x}, {}
    for l in range(1, L + 1):  # (F1)
        z[l] = weights[l - 1] @ a[l - 1] + biases[l - 1]
        a[l] = sigmoid(z[l])
    N_L = y.shape[0]
    cost = float(np.sum(0.5 * (a[L] - y) ** 2) / N_L)  # (F2)
    delta = {L: sigmoid_grad(z[L]) * (a[L] - y) / N_L}  # (D1)
    for l in range(L - 1, 0, -1):
        delta[l] = sigmoid_grad(z[l]) * (weights[l].T @ delta[l + 1])  # (D2): weights[l] is W^(l+1)
    grad_weight = {l: delta[l] @ a[l - 1].T for l in range(1, L + 1)}  # (D3) [N_l, N_{l-1}]
    grad_bias = {l: delta[l] for l in range(1, L + 1)}  # (D4) [N_l, 1]
    grad_x = weights[0].T @ delta[1]  # (D5) [N_0, 1]
    return cost, grad_weight, grad_bias, grad_x


# ----------------------------------------------------------------------------------------
# The same network in PyTorch: manualbp layers, and an nn.Linear twin for autograd.
# ----------------------------------------------------------------------------------------


def half_mse(a_L, y):
    """C = (1/N_L) sum_i 1/2 (a_i - y_i)^2 for one sample (F2); a_L, y [1, N_L] (a sample is a row)."""
    return 0.5 * ((a_L - y) ** 2).mean()


def torch_gradients(layers, x, y, forward):
    """(C, {l: dC/dW^(l)}, {l: dC/db^(l)}, dC/dx) by .backward() through ``forward``; x, y rows [1, N]."""
    for layer in layers:
        layer.weight.grad = layer.bias.grad = None
    x = x.clone().requires_grad_(True)
    cost = half_mse(forward(x), y)
    cost.backward()
    L = len(layers)
    grad_weight = {l: layers[l - 1].weight.grad.numpy() for l in range(1, L + 1)}
    grad_bias = {l: layers[l - 1].bias.grad.numpy().reshape(-1, 1) for l in range(1, L + 1)}  # as a column
    return cost.item(), grad_weight, grad_bias, x.grad.numpy().reshape(-1, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.backend == "triton":
        # The kernels run CPU tensors only in Triton's interpreter, switched on before they are first used.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from torch import nn

    import manualbp

    torch.set_num_threads(args.threads)
    dtype = torch.float64
    sizes, L = args.layer_sizes, len(args.layer_sizes) - 1
    try:
        backend = manualbp.backends.resolve(args.backend, torch.device("cpu"), dtype)
    except RuntimeError as error:
        args.parser.error(str(error))

    # Data: x ~ N(0, I), y = a teacher network's output, so the targets lie in (0, 1) like sigmoid's.
    rng = np.random.default_rng(args.seed)
    X = rng.standard_normal((args.samples, sizes[0]))
    teacher = [(rng.standard_normal((sizes[l], sizes[l - 1])) * 1.5, rng.standard_normal((sizes[l], 1)))
               for l in range(1, L + 1)]
    Y = np.empty((args.samples, sizes[-1]))
    for n in range(args.samples):
        h = X[n].reshape(-1, 1)
        for W, b in teacher:
            h = sigmoid(W @ h + b)
        Y[n] = h.ravel()
    X_t, Y_t = torch.from_numpy(X), torch.from_numpy(Y)

    torch.manual_seed(args.seed)
    layers = [manualbp.Linear(sizes[l - 1], sizes[l], activation="sigmoid", dtype=dtype, backend=args.backend)
              for l in range(1, L + 1)]
    network = nn.Sequential(*layers)

    def mean_cost():  # C_D, the mean cost over the data set (F3)
        with torch.no_grad():
            return half_mse(network(X_t), Y_t).item()

    print(f"network: sizes {sizes} (L = {L} layers), sigmoid every layer, half mean-squared error, float64; "
          f"manualbp backend: {backend}")
    print(f"data: {args.samples} samples, x ~ N(0, I), y = a random sigmoid teacher network's output")
    start_cost = mean_cost()
    order = np.random.default_rng(args.seed + 1)
    for _ in range(args.epochs):
        for n in order.permutation(args.samples):
            # One sample at a time, as in the question: C for (x_n, y_n), then W <- W - eta dC/dW.
            cost = half_mse(network(X_t[n:n + 1]), Y_t[n:n + 1])
            network.zero_grad(set_to_none=True)
            cost.backward()
            with torch.no_grad():
                for p in network.parameters():
                    p -= args.lr * p.grad  # denominator layout: dC/dW has W's shape, no transpose
    print(f"SGD, one sample per step, lr {args.lr}: mean cost C_D {start_cost:.6f} -> {mean_cost():.6f} "
          f"after {args.epochs} epochs ({args.epochs * args.samples} steps)")

    # The gradients at the trained parameters for one sample, three ways.
    n = args.sample
    weights = [layer.weight.detach().numpy().copy() for layer in layers]
    biases = [layer.bias.detach().numpy().reshape(-1, 1).copy() for layer in layers]
    results = {"numpy": numpy_gradients(weights, biases, X[n].reshape(-1, 1), Y[n].reshape(-1, 1))}
    results["manualbp"] = torch_gradients(layers, X_t[n:n + 1], Y_t[n:n + 1], network)

    twin = [nn.Linear(sizes[l - 1], sizes[l], dtype=dtype) for l in range(1, L + 1)]
    for linear, layer in zip(twin, layers):
        linear.load_state_dict(layer.state_dict())  # same parameters: manualbp.Linear keeps nn.Linear's state_dict

    def autograd_forward(h):
        for linear in twin:
            h = torch.sigmoid(linear(h))
        return h

    results["autograd"] = torch_gradients(twin, X_t[n:n + 1], Y_t[n:n + 1], autograd_forward)

    names = ("numpy", "manualbp", "autograd")
    pairs = (("numpy", "manualbp"), ("numpy", "autograd"), ("manualbp", "autograd"))
    costs = {name: results[name][0] for name in names}
    print(f"\nsample {n}: C = {costs['numpy']:.12g} (numpy), {costs['manualbp']:.12g} (manualbp), "
          f"{costs['autograd']:.12g} (autograd)")

    rows = []  # (label, {name: array})
    for l in range(1, L + 1):
        rows.append((f"dC/dW^({l})", {name: results[name][1][l] for name in names}))
        rows.append((f"dC/db^({l})", {name: results[name][2][l] for name in names}))
    rows.append(("dC/dx", {name: results[name][3] for name in names}))

    if not args.no_values:
        print("\ngradients, denominator layout: each has the shape of its variable (columns shown as rows, ^T)")
        np.set_printoptions(linewidth=120, formatter={"float": lambda v: f"{v: .5e}"})
        for label, values in rows:
            column = values["numpy"].shape[1] == 1
            print(f"\n{label} [{','.join(str(s) for s in values['numpy'].shape)}]{'  shown ^T' if column else ''}")
            for name in names:
                value = values[name].T if column else values[name]
                print(f"  {name:>8}: " + np.array2string(value, prefix=" " * 12))

    header = f"{'gradient':<11} {'shape':<8} {'max |value|':>11}   " + "   ".join(
        f"{'|' + a + ' - ' + b + '|':>21}" for a, b in pairs)
    print("\nlargest absolute differences, float64\n" + header)
    worst = max(abs(costs[a] - costs[b]) for a, b in pairs)
    for label, values in rows:
        differences = [np.abs(values[a] - values[b]).max() for a, b in pairs]
        worst = max(worst, *differences)
        shape = "[" + ",".join(str(s) for s in values["numpy"].shape) + "]"
        print(f"{label:<11} {shape:<8} {np.abs(values['numpy']).max():>11.3e}   "
              + "   ".join(f"{d:>21.3e}" for d in differences))
    ok = worst <= args.tolerance
    print(f"\nlargest difference: {worst:.3e} (tolerance {args.tolerance:g}): {'OK' if ok else 'TOO LARGE'}")
    return EXIT_OK if ok else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
