"""Every bad argument of ``python -m manualbp explain`` and of each example is a usage error.

Exit status 2 and one error line naming the argument and the allowed range; nothing runs.
(A failed check is exit status 1: tests/test_explain.py.) The parsers run in-process: an
example module only defines functions when imported, and ``parse_args`` exits before any work.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "a usage error prints a message on stderr"
    return err[-1]


def _load_example(script: str):
    spec = importlib.util.spec_from_file_location(f"usage_{script[:-3]}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# argv, the words the one error line must hold (the argument, then the allowed range)
EXPLAIN_BAD = {
    "seed-2^64-1": (["--seed", "18446744073709551615"], ["--seed", "[0, 4294967295]"]),
    "seed-negative": (["--seed", "-1"], ["--seed", "[0, 4294967295]"]),
    "seed-not-integer": (["--seed", "1.5"], ["--seed", "[0, 4294967295]"]),
    "tol-absurd": (["--tol", "1e300"], ["--tol", "(0, 1e-06]"]),
    "tol-nan": (["--tol", "nan"], ["--tol", "(0, 1e-06]"]),
    "tol-inf": (["--tol", "inf"], ["--tol", "(0, 1e-06]"]),
    "tol-negative": (["--tol=-1e-12"], ["--tol", "(0, 1e-06]"]),
    "tol-zero": (["--tol", "0"], ["--tol", "(0, 1e-06]"]),
    "size-zero": (["--sizes", "4,0,3"], ["--sizes", "[1, 100]"]),
    "size-negative": (["--sizes", "4,-2"], ["--sizes", "[1, 100]"]),
    "size-too-wide": (["--sizes", "4,101"], ["--sizes", "[1, 100]"]),
    "slope-nan": (["--activation", "leaky_relu", "--negative-slope", "nan"], ["--negative-slope", "[-100, 100]"]),
    "slope-absurd": (["--activation", "leaky_relu", "--negative-slope", "1e300"], ["--negative-slope", "[-100, 100]"]),
    "tangent-unknown": (["--mode", "forward", "--tangent", "b1"], ["--tangent", "x or W1..WL"]),
    "tangent-W0": (["--mode", "forward", "--tangent", "W0"], ["--tangent", "x or W1..WL"]),
    "tangent-no-such-layer": (["--mode", "forward", "--tangent", "W3"], ["--tangent", "x or W1..W2", "W3"]),
    "tangent-in-reverse-mode": (["--tangent", "x"], ["--tangent", "only with --mode forward"]),
    "mode-unknown": (["--mode", "sideways"], ["--mode", "invalid choice"]),
}


@pytest.mark.parametrize("case", list(EXPLAIN_BAD))
def test_explain_bad_argument_is_a_usage_error(case, capsys):
    from manualbp.__main__ import main

    argv, words = EXPLAIN_BAD[case]
    if "--sizes" not in argv:
        argv = ["--sizes", "4,5,3", *argv]
    with pytest.raises(SystemExit) as exc:
        main(["explain", *argv])
    assert exc.value.code == 2, f"{case}: exit status {exc.value.code}, expected 2"
    line = _error_line(capsys)
    assert line.startswith("python -m manualbp explain: error: argument "), f"{case}: one error line: {line}"
    for word in words:
        assert word in line, f"{case}: the error line should hold {word!r}: {line}"
    assert capsys.readouterr().out == "", f"{case}: nothing runs"


# script -> {case: (argv, argument, allowed range)}
EXAMPLE_BAD = {
    "seed_network.py": {
        "lr-nan": (["--lr", "nan"], "--lr", "(0, 100]"),
        "lr-inf": (["--lr", "inf"], "--lr", "(0, 100]"),
        "lr-negative": (["--lr", "-1"], "--lr", "(0, 100]"),
        "lr-absurd": (["--lr", "1e300"], "--lr", "(0, 100]"),
        "tolerance-negative": (["--tolerance", "-1"], "--tolerance", "(0, 1e-06]"),
        "tolerance-nan": (["--tolerance", "nan"], "--tolerance", "(0, 1e-06]"),
        "tolerance-absurd": (["--tolerance", "1e300"], "--tolerance", "(0, 1e-06]"),
        "seed-2^64-1": (["--seed", "18446744073709551615"], "--seed", "[0, 4294967295]"),
        "seed-negative": (["--seed", "-1"], "--seed", "[0, 4294967295]"),
        "sizes-zero": (["--sizes", "4,0,3"], "--sizes", "positive"),
        "samples-zero": (["--samples", "0"], "--samples", ">= 1"),
        "epochs-negative": (["--epochs", "-1"], "--epochs", ">= 0"),
        "sample-out-of-range": (["--samples", "4", "--sample", "4"], "--sample", "[0, 3]"),
        "threads-zero": (["--threads", "0"], "--threads", ">= 1"),
    },
    "train_digits.py": {
        "lr-nan": (["--lr", "nan"], "--lr", "(0, 10]"),
        "lr-negative": (["--lr", "-0.1"], "--lr", "(0, 10]"),
        "lr-absurd": (["--lr", "1e300"], "--lr", "(0, 10]"),
        "momentum-one": (["--momentum", "1"], "--momentum", "[0, 1)"),
        "momentum-nan": (["--momentum", "nan"], "--momentum", "[0, 1)"),
        "tolerance-inf": (["--tolerance", "inf"], "--tolerance", "(0, 0.01]"),
        "tolerance-negative": (["--tolerance", "-1"], "--tolerance", "(0, 0.01]"),
        "seed-negative": (["--seed", "-3"], "--seed", "[0, 4294967295]"),
        "seed-2^64-1": (["--seed", "18446744073709551615"], "--seed", "[0, 4294967295]"),
        "hidden-zero": (["--hidden", "0"], "--hidden", "positive"),
        "epochs-zero": (["--epochs", "0"], "--epochs", "positive"),
    },
    "convert_model.py": {
        "lr-nan": (["--lr", "nan"], "--lr", "(0, 1]"),
        "lr-absurd": (["--lr", "1e300"], "--lr", "(0, 1]"),
        "tolerance-nan": (["--tolerance", "nan"], "--tolerance", "(0, 0.001]"),
        "tolerance-negative": (["--tolerance", "-1"], "--tolerance", "(0, 0.001]"),
        "seed-negative": (["--seed", "-3"], "--seed", "[0, 4294967295]"),
        "threads-zero": (["--threads", "0"], "--threads", ">= 1"),
        "hidden-size-zero": (["--hidden-size", "0"], "--hidden-size", "positive"),
    },
}
EXAMPLE_CASES = [(script, case) for script, cases in EXAMPLE_BAD.items() for case in cases]


@pytest.mark.parametrize("script,case", EXAMPLE_CASES, ids=[f"{s[:-3]}-{c}" for s, c in EXAMPLE_CASES])
def test_example_bad_argument_is_a_usage_error(script, case, capsys):
    argv, argument, allowed = EXAMPLE_BAD[script][case]
    module = _load_example(script)
    with pytest.raises(SystemExit) as exc:
        module.parse_args(argv)
    assert exc.value.code == 2, f"{script} {case}: exit status {exc.value.code}, expected 2"
    line = _error_line(capsys)
    assert line.startswith(f"{script}: error: {argument} "), f"{script} {case}: the line names {argument}: {line}"
    assert allowed in line, f"{script} {case}: the line gives the allowed range {allowed!r}: {line}"


@pytest.mark.parametrize("script", list(EXAMPLE_BAD))
def test_example_defaults_are_in_range(script):
    """The ranges admit every default (the checks above are not simply rejecting everything)."""
    args = _load_example(script).parse_args([])
    assert args.lr > 0 and args.seed == 0, f"{script}: defaults parsed"
