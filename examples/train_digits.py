#!/usr/bin/env python
"""Train a handwritten-digit classifier twice, with nn.Linear and with manualbp layers, and compare.

The data are scikit-learn's bundled 8x8 handwritten digits (1797 images, shipped
inside scikit-learn: nothing is downloaded). From the same seed, the script builds

    nn.Sequential(nn.Linear, activation, ..., nn.Linear)     autograd's backward
    manualbp.MLP(sizes, activation)                          the hand-written backward

with identical initial parameters (checked: the two state_dicts are equal), trains
both on the same mini-batches in the same order with the same optimizer, and prints
each model's final test accuracy and the largest difference between the two
training-loss curves. Both curves (and their difference) are plotted to a PNG.

Needs the `examples` extra:  pip install -e ".[examples]"
(scikit-learn for the data, tqdm for the progress bars, matplotlib for the plot).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

# Exit statuses, also listed in --help.
EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_MISSING_DEPENDENCY = 0, 1, 2, 3
INSTALL_HINT = 'pip install -e ".[examples]"'
TARGET_ACCURACY = 0.95  # what the defaults are meant to reach; printed, not enforced


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's line breaks and show every default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_digits.py",
        description=__doc__.split("\n\nNeeds")[0],
        formatter_class=_HelpFormatter,
        epilog=(
            f"needs: scikit-learn, tqdm, matplotlib (the last only for the plot): {INSTALL_HINT}\n"
            f"exit status: {EXIT_OK} done; {EXIT_MISMATCH} the loss curves differ by more than --tolerance; "
            f"{EXIT_USAGE} bad arguments or an unusable --device/--backend; "
            f"{EXIT_MISSING_DEPENDENCY} a package is missing"
        ),
    )
    parser.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    parser.add_argument("--hidden", type=str, default="128,128",
                        help="hidden layer widths, comma-separated ('' for none: a linear classifier)")
    parser.add_argument("--activation", default="gelu",
                        help="hidden activation, a name from manualbp.ACTIVATIONS (identity, relu, leaky_relu, "
                             "gelu, gelu_tanh, silu, sigmoid, tanh)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--batch-size", type=int, default=32, help="mini-batch size")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="fraction of the 1797 images held out for the test accuracy (stratified)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the split, of both models' initial parameters and of the batch order")
    parser.add_argument("--device", default="cpu", help="'cpu', or 'cuda' where a GPU is available")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for PyTorch. One is fastest for layers this small, and keeps a busy "
                             "machine from slowing the run down many times over (threads waiting on each other)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="manualbp backend. auto: Triton kernels on CUDA, plain PyTorch ('reference') on "
                             "the CPU. triton on the CPU runs the kernels in Triton's interpreter "
                             "(TRITON_INTERPRET=1 is set for you): correct but slow, use tiny settings")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="exit with status 1 if the loss curves differ by more than this anywhere")
    parser.add_argument("--plot", default="train_digits.png", help="where to save the PNG of the loss curves")
    parser.add_argument("--no-plot", action="store_true", help="do not plot (matplotlib is then not needed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, only the summary")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.hidden_sizes = [int(w) for w in args.hidden.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--hidden must be comma-separated integers, got {args.hidden!r}")
    if any(w <= 0 for w in args.hidden_sizes):
        parser.error(f"--hidden widths must be positive, got {args.hidden!r}")
    for name in ("epochs", "batch_size", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 < args.test_fraction < 1.0:
        parser.error("--test-fraction must be between 0 and 1")
    for name, ok, allowed in (  # nan fails every comparison
        ("--lr", 0 < args.lr <= 10, "a number in (0, 10]"),
        ("--momentum", 0 <= args.momentum < 1, "a number in [0, 1)"),
        ("--seed", 0 <= args.seed <= 2**32 - 1, f"an integer in [0, {2**32 - 1}] (scikit-learn's random_state)"),
        ("--tolerance", 0 < args.tolerance <= 1e-2, "a number in (0, 0.01]"),
    ):
        if not ok:
            parser.error(f"{name} must be {allowed}, got {getattr(args, name[2:])}")
    args.parser = parser
    return args


def require(packages: dict) -> dict:
    """Import the optional packages {import name: pip name}; on any missing, say what to install and exit."""
    modules, missing = {}, []
    for module_name, pip_name in packages.items():
        try:
            modules[module_name] = importlib.import_module(module_name)
        except ImportError:
            missing.append(pip_name)
    if missing:
        missing = list(dict.fromkeys(missing))  # one pip name may provide several modules
        verb = "is" if len(missing) == 1 else "are"
        print(
            f"train_digits.py needs {', '.join(missing)}, which {verb} not installed.\n"
            f"Install the examples' dependencies with:  {INSTALL_HINT}\n"
            f"(or just these:  pip install {' '.join(missing)})",
            file=sys.stderr,
        )
        sys.exit(EXIT_MISSING_DEPENDENCY)
    return modules


def load_data(args, sklearn_datasets, model_selection, torch, device):
    """The digits as float32 tensors: pixels scaled from 0..16 to 0..1, a stratified train/test split."""
    digits = sklearn_datasets.load_digits()  # bundled with scikit-learn: no download
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        digits.data, digits.target, test_size=args.test_fraction, stratify=digits.target, random_state=args.seed,
    )

    def images(a):
        return torch.as_tensor(a / 16.0, dtype=torch.float32, device=device)

    def labels(a):
        return torch.as_tensor(a, dtype=torch.long, device=device)

    return images(x_train), labels(y_train), images(x_test), labels(y_test)


# The PyTorch module computing each manualbp activation, for the nn.Linear twin.
TORCH_ACTIVATIONS = {
    "identity": lambda nn, act: nn.Identity(),
    "relu": lambda nn, act: nn.ReLU(),
    "leaky_relu": lambda nn, act: nn.LeakyReLU(act.negative_slope),
    "gelu": lambda nn, act: nn.GELU(),
    "gelu_tanh": lambda nn, act: nn.GELU(approximate="tanh"),
    "silu": lambda nn, act: nn.SiLU(),
    "sigmoid": lambda nn, act: nn.Sigmoid(),
    "tanh": lambda nn, act: nn.Tanh(),
}


def build_models(sizes, activation, args, torch, nn, manualbp, device):
    """The same network twice, from the same seed: nn.Linear layers, and manualbp.MLP."""
    torch.manual_seed(args.seed)
    modules = []
    for index in range(len(sizes) - 1):
        modules.append(nn.Linear(sizes[index], sizes[index + 1]))
        if index < len(sizes) - 2:
            modules.append(TORCH_ACTIVATIONS[activation.name](nn, activation))
    torch_model = nn.Sequential(*modules)
    torch.manual_seed(args.seed)
    # MLP registers its layers as "0", "2", ... like nn.Sequential, and initialises them in the same order.
    manual_model = manualbp.MLP(sizes, activation=activation, backend=args.backend)
    return torch_model.to(device), manual_model.to(device)


def accuracy(model, x, y, torch) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def train(label, model, data, args, torch, tqdm):
    """SGD with momentum on cross-entropy; returns (loss of every step, final test accuracy, seconds)."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    order_generator = torch.Generator().manual_seed(args.seed)  # same batches, same order, for both models
    losses = []
    count = x_train.shape[0]
    start = time.perf_counter()
    bar = tqdm(range(args.epochs), desc=f"{label:>9}", unit="epoch", disable=args.quiet, file=sys.stderr)
    for _ in bar:
        model.train()
        order = torch.randperm(count, generator=order_generator).to(x_train.device)
        for first in range(0, count, args.batch_size):
            batch = order[first:first + args.batch_size]
            loss = torch.nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        bar.set_postfix(loss=f"{losses[-1]:.4f}", test_acc=f"{accuracy(model, x_test, y_test, torch):.2%}")
    seconds = time.perf_counter() - start
    return losses, accuracy(model, x_test, y_test, torch), seconds


def plot(path, torch_losses, manual_losses, steps_per_epoch, accuracies, title, pyplot) -> str:
    """Both loss curves (top) and their absolute difference (bottom), against the step; returns the path."""
    steps = range(1, len(torch_losses) + 1)
    difference = [abs(a - b) for a, b in zip(torch_losses, manual_losses)]
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(8, 6.5), sharex=True,
                                            gridspec_kw={"height_ratios": [3, 2]})
    # Every step faintly (mini-batch losses are noisy), and the mean of each epoch on top of it.
    top.plot(steps, torch_losses, lw=0.6, alpha=0.35, color="tab:blue")
    top.plot(steps, manual_losses, lw=0.6, alpha=0.35, color="tab:orange")
    epoch_ends = list(range(steps_per_epoch, len(torch_losses) + 1, steps_per_epoch))

    def epoch_means(losses):
        return [sum(losses[end - steps_per_epoch:end]) / steps_per_epoch for end in epoch_ends]

    top.plot(epoch_ends, epoch_means(torch_losses), lw=3, marker="o", color="tab:blue", alpha=0.7,
             label=f"nn.Linear (autograd), test acc {accuracies[0]:.2%}")
    top.plot(epoch_ends, epoch_means(manual_losses), lw=1.2, ls="--", marker="x", color="black",
             label=f"manualbp (hand-written backward), test acc {accuracies[1]:.2%}")
    top.set_yscale("log")
    top.set_ylabel("training loss (cross-entropy)\nper step, and epoch means")
    top.set_title(title, fontsize=10)
    top.legend()
    top.grid(True, which="both", alpha=0.3)
    # Exact zeros cannot sit on a log axis: they are drawn at its bottom rather than left out.
    floor = min([d for d in difference if d > 0], default=1e-12) / 2
    bottom.plot(steps, [max(d, floor) for d in difference], lw=0.8, color="tab:red")
    bottom.set_yscale("log")
    bottom.set_ylabel("|loss difference| per step\n(0 drawn at the bottom)")
    bottom.set_xlabel(f"step ({steps_per_epoch} per epoch)")
    bottom.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return os.path.abspath(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.backend == "triton" and args.device == "cpu":
        # Triton runs CPU tensors only in its interpreter, which must be on before the kernels are created.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    packages = {"sklearn.datasets": "scikit-learn", "sklearn.model_selection": "scikit-learn"}
    if not args.quiet:
        packages["tqdm"] = "tqdm"
    if not args.no_plot:
        packages["matplotlib"] = "matplotlib"
    found = require(packages)
    if not args.no_plot:
        found["matplotlib"].use("Agg")  # write files; no display needed
        pyplot = importlib.import_module("matplotlib.pyplot")
    if args.quiet:
        def tqdm(iterable, **_):
            return _Silent(iterable)
    else:
        tqdm = found["tqdm"].tqdm

    import torch
    from torch import nn

    import manualbp

    try:
        activation = manualbp.get_activation(args.activation)
    except ValueError as error:
        args.parser.error(str(error))
    torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        args.parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        args.parser.error("--device cuda was given but torch.cuda.is_available() is False; use --device cpu")
    try:
        ran_on = manualbp.backends.resolve(args.backend, device, torch.float32)
    except RuntimeError as error:
        args.parser.error(str(error))

    data = load_data(args, found["sklearn.datasets"], found["sklearn.model_selection"], torch, device)
    x_train, _, x_test, _ = data
    sizes = [x_train.shape[1], *args.hidden_sizes, 10]
    torch_model, manual_model = build_models(sizes, activation, args, torch, nn, manualbp, device)
    torch_state, manual_state = torch_model.state_dict(), manual_model.state_dict()
    same_start = torch_state.keys() == manual_state.keys() and all(
        torch.equal(torch_state[k], manual_state[k]) for k in torch_state)

    steps_per_epoch = -(-x_train.shape[0] // args.batch_size)
    print(f"digits: {x_train.shape[0]} training and {x_test.shape[0]} test images (8x8, scikit-learn's bundled set)")
    print(f"network: {sizes}, {activation.name} hidden activation, float32, {device}, "
          f"{args.epochs} epoch(s) x {steps_per_epoch} steps (batch {args.batch_size}, SGD lr {args.lr} "
          f"momentum {args.momentum}), seed {args.seed}")
    print(f"manualbp backend: {ran_on} (asked for {args.backend}); "
          f"identical initial parameters: {'yes' if same_start else 'NO'}")

    torch_losses, torch_acc, torch_seconds = train("nn.Linear", torch_model, data, args, torch, tqdm)
    manual_losses, manual_acc, manual_seconds = train("manualbp", manual_model, data, args, torch, tqdm)

    differences = [abs(a - b) for a, b in zip(torch_losses, manual_losses)]
    torch_state, manual_state = torch_model.state_dict(), manual_model.state_dict()
    parameter_difference = max((torch_state[k] - manual_state[k]).abs().max().item() for k in torch_state)
    worst = max(range(len(differences)), key=differences.__getitem__)
    for label, acc, losses, seconds in (("nn.Linear", torch_acc, torch_losses, torch_seconds),
                                        ("manualbp", manual_acc, manual_losses, manual_seconds)):
        met = "met" if acc >= TARGET_ACCURACY else "NOT met"
        print(f"{label:>9}: test accuracy {acc:.2%} (target {TARGET_ACCURACY:.0%}: {met}), "
              f"final training loss {losses[-1]:.6f}, {seconds:.1f} s")
    where = f"at step {worst + 1}" if differences[worst] > 0 else "(identical at every step)"
    print(f"loss curves: {len(differences)} steps, max |loss(nn.Linear) - loss(manualbp)| = "
          f"{differences[worst]:.3g} {where} (tolerance {args.tolerance:g})")
    print(f"trained parameters: max |nn.Linear - manualbp| = {parameter_difference:.3g}")
    if not args.no_plot:
        title = (f"digits MLP {sizes}, {activation.name}, float32, {device}; manualbp backend {ran_on}; "
                 f"max |loss diff| {differences[worst]:.2g}")
        path = plot(args.plot, torch_losses, manual_losses, steps_per_epoch, (torch_acc, manual_acc), title, pyplot)
        print(f"plot: {path}")
    if not same_start or differences[worst] > args.tolerance:
        print("the two runs disagree more than expected", file=sys.stderr)
        return EXIT_MISMATCH
    return EXIT_OK


class _Silent:
    """What --quiet uses instead of a tqdm bar: the bare iterable, with set_postfix doing nothing."""

    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **_):
        pass


if __name__ == "__main__":
    sys.exit(main())
