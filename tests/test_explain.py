"""Tests of ``python -m manualbp explain``.

The command runs as a subprocess (``sys.executable -m manualbp explain ...``); the
subprocesses start together in one module fixture, since each pays for importing torch.
The checking function and the parser are also tested in-process.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from manualbp.derivation import explain, layouts

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "derivation.md"

# Each subprocess costs about 1.5 s of CPU (importing torch); more cases run in-process below.
GOOD = {
    "denominator": ["--sizes", "4,5,3", "--activation", "sigmoid", "--layout", "denominator"],
    "numerator": ["--sizes", "4,5,3", "--activation", "sigmoid", "--layout", "numerator", "--seed", "3"],
}
GOOD_IN_PROCESS = {
    "deep-tanh": ["--sizes", "3,4,4,2", "--activation", "tanh", "--layout", "numerator", "--seed", "7"],
    "leaky-slope": ["--sizes", "2,3,2", "--activation", "leaky_relu", "--negative-slope", "0.2", "--seed", "4"],
    "identity-1-layer": ["--sizes", "3,2", "--activation", "identity", "--layout", "denominator"],
}
# case -> (argv, words the error message must contain)
BAD = {
    "unknown-activation": (["--sizes", "4,5,3", "--activation", "swish"], ["--activation", "invalid choice", "swish"]),
    "unknown-layout": (["--sizes", "4,5,3", "--layout", "transposed"], ["--layout", "invalid choice", "transposed"]),
    "zero-size": (["--sizes", "4,0,3"], ["--sizes", "positive integers", "0"]),
    "not-integer": (["--sizes", "4,x,3"], ["--sizes", "positive integers", "'x'"]),
    "one-size": (["--sizes", "4"], ["--sizes", "at least two sizes"]),
}
WRONG_ORDER = ["--sizes", "4,5,3", "--activation", "sigmoid", "--order", "reversed"]
FORWARD = ["--sizes", "4,5,3", "--activation", "tanh", "--mode", "forward", "--tangent", "W2", "--layout", "numerator"]


def _launch(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "manualbp", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[int, str, str]]:
    """Every subprocess case, started at once; name -> (exit status, stdout, stderr)."""
    cases = {f"good:{k}": ["explain", *v] for k, v in GOOD.items()}
    cases.update({f"bad:{k}": ["explain", *argv] for k, (argv, _) in BAD.items()})
    cases["wrong-order"] = ["explain", *WRONG_ORDER]
    cases["forward"] = ["explain", *FORWARD]
    procs = {name: _launch(args) for name, args in cases.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = (p.returncode, stdout, stderr)
    return out


def _product_shapes(stdout: str) -> dict[str, str]:
    """'dC/dW^(2)' -> the shape after '->' on its chain's shape line, from the 'Order of the products' section."""
    shapes, current = {}, None
    section = stdout.split("Order of the products", 1)[1].split("Check against", 1)[0]
    for line in section.splitlines():
        m = re.match(r"\s+(dC/d\S+) = ", line)
        if m:
            current = m.group(1)
        m = re.search(r"-> (\[[\d,]+\])( = (\[[\d,]+\]))?", line)
        if m and current:
            shapes[current] = m.group(3) or m.group(1)
    return shapes


def _run_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    from manualbp.__main__ import main

    rc = main(["explain", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("case", list(GOOD) + list(GOOD_IN_PROCESS))
def test_good_arguments_exit_0_and_print_every_check(runs, case, capsys):
    if case in GOOD:
        rc, stdout, stderr = runs[f"good:{case}"]
    else:
        rc, stdout, stderr = _run_in_process(GOOD_IN_PROCESS[case], capsys)
    assert rc == 0, f"{case}: exit status {rc}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    assert "Forward" in stdout and "Backward" in stdout, f"{case}: equations missing from the output"
    assert re.search(r"largest error: \d\.\d\de[-+]\d\d \(tolerance", stdout), f"{case}: no largest error printed"
    assert "FAILED" not in stdout and re.search(r"all \d+ checks hold", stdout), f"{case}: checks should all hold"


@pytest.mark.parametrize(
    "case,expected",
    [
        # denominator: dC/dW has the shape of W, gradients are columns
        ("denominator", {"dC/dx": "[4,1]", "dC/dW^(2)": "[3,5]", "dC/dW^(1)": "[5,4]", "dC/db^(2)": "[3,1]", "dC/db^(1)": "[5,1]"}),
        # numerator: dC/dW has the shape of W^T, gradients are rows
        ("numerator", {"dC/dx": "[1,4]", "dC/dW^(2)": "[5,3]", "dC/dW^(1)": "[4,5]", "dC/db^(2)": "[1,3]", "dC/db^(1)": "[1,5]"}),
        ("deep-tanh", {"dC/dx": "[1,3]", "dC/dW^(3)": "[4,2]", "dC/dW^(2)": "[4,4]", "dC/dW^(1)": "[3,4]", "dC/db^(1)": "[1,4]"}),
    ],
)
def test_printed_shapes(runs, case, expected, capsys):
    rc, stdout, _ = runs[f"good:{case}"] if case in GOOD else _run_in_process(GOOD_IN_PROCESS[case], capsys)
    assert rc == 0, f"{case}: exit status {rc}"
    shapes = _product_shapes(stdout)
    for name, shape in expected.items():
        assert shapes.get(name) == shape, f"{case}: {name} should come out {shape}, printed {shapes.get(name)}"


def test_denominator_output_shows_factor_shapes_in_order(runs):
    _, stdout, _ = runs["good:denominator"]
    assert "z^(1) = W^(1) a^(0) + b^(1)" in stdout and "[5,4] [4,1] + [5,1] -> [5,1]" in stdout, "forward shapes of layer 1"
    assert re.search(r"delta\^\(2\) = da\^\(2\)/dz\^\(2\) dC/da\^\(2\) = diag\(f'\(z\^\(2\)\)\) dC/da\^\(2\)\s+\[3,3\] \[3,1\] -> \[3,1\]", stdout), "(D1) with shapes"
    assert re.search(r"dC/dW\^\(2\) = delta\^\(2\) \(a\^\(1\)\)\^T\s+\[3,1\] \[1,5\] -> \[3,5\]", stdout), "(D3) with shapes"
    assert re.search(r"dC/da\^\(1\) = dz\^\(2\)/da\^\(1\) delta\^\(2\) = \(W\^\(2\)\)\^T delta\^\(2\)\s+\[5,3\] \[3,1\] -> \[5,1\]", stdout), "(D5) with shapes"
    assert "innermost-first" in stdout, "the denominator order is named"


def test_numerator_output_shows_factor_shapes_in_order(runs):
    _, stdout, _ = runs["good:numerator"]
    assert re.search(r"delta\^\(2\)\^T = dC/da\^\(2\) da\^\(2\)/dz\^\(2\) = dC/da\^\(2\) diag\(f'\(z\^\(2\)\)\)\s+\[1,3\] \[3,3\] -> \[1,3\]", stdout), "(N1) with shapes"
    assert re.search(r"dC/dW\^\(2\) = a\^\(1\) delta\^\(2\)\^T\s+\[5,1\] \[1,3\] -> \[5,3\]", stdout), "(N3) with shapes"
    assert "outermost-first" in stdout, "the numerator order is named"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_exit_2_naming_the_problem(runs, case):
    rc, stdout, stderr = runs[f"bad:{case}"]
    assert rc == 2, f"{case}: exit status should be 2 (argparse), got {rc}\nstderr:\n{stderr}"
    assert "usage: python -m manualbp explain" in stderr, f"{case}: argparse usage line missing:\n{stderr}"
    for word in BAD[case][1]:
        assert word in stderr, f"{case}: the error should mention {word!r}:\n{stderr}"
    assert "Traceback" not in stderr, f"{case}: a traceback instead of an error message:\n{stderr}"


def test_reversed_order_fails_the_check_and_exits_1(runs):
    rc, stdout, stderr = runs["wrong-order"]
    assert rc == 1, f"chains multiplied in the reversed order must fail the check, exit status {rc}\n{stdout}\n{stderr}"
    assert "checks FAILED" in stdout and "factors do not conform" in stdout, f"the failure is reported:\n{stdout}"
    assert "largest error: inf" in stdout, "the largest error is reported as inf"


# ---------------------------------------------------------------------------
# In-process: the parser and the checking function


@pytest.mark.parametrize(
    "argv,word",
    [
        (["explain"], "--sizes"),
        (["explain", "--sizes", "4,3", "--negative-slope", "0.2"], "--negative-slope"),
        (["explain", "--sizes", "4,3", "--seed", "-1"], "--seed"),
        (["explain", "--sizes", "4,3", "--tol", "0"], "--tol"),
        (["explain", "--sizes", f"4,{explain.MAX_WIDTH + 1}"], f"[1, {explain.MAX_WIDTH}]"),
        (["explain", "--sizes", "2.5,3"], "positive integers"),
        (["explain", "--sizes", "4,-2"], "positive integers"),
        (["frobnicate"], "invalid choice"),
        ([], "COMMAND"),
    ],
    ids=["missing-sizes", "slope-without-leaky-relu", "negative-seed", "zero-tol", "too-wide", "float-size", "negative-size", "unknown-command", "no-command"],
)
def test_more_bad_arguments_in_process(argv, word, capsys):
    from manualbp.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, f"{argv}: exit status {exc.value.code}, expected 2"
    err = capsys.readouterr().err
    assert word in err, f"{argv}: the message should mention {word!r}: {err}"


@pytest.mark.parametrize("text,sizes", [("4,5,3", [4, 5, 3]), (" 2, 1 ", [2, 1]), ("1,1,1,1", [1, 1, 1, 1])])
def test_parse_sizes(text, sizes):
    assert explain.parse_sizes(text) == sizes, f"parse_sizes({text!r})"


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("sizes,act", [([4, 5, 3], "sigmoid"), ([3, 3, 3], "tanh"), ([2, 4, 3, 2], "gelu")])
def test_check_passes_in_order_and_fails_reversed(sizes, act, layout):
    net = layouts.Network.random(sizes, act, seed=5)
    x, y = net.random_data(seed=6)
    good = explain.check(net, x, y, layout)
    assert good.ok and good.largest_error < 1e-14, f"{layout}: prescribed order should pass, largest error {good.largest_error}"
    bad = explain.check(net, x, y, layout, order="reversed")
    assert not bad.ok, f"{layout}: the reversed order must fail the check"
    chain_checks = [c for c in bad.checks if "chain" in c.name]
    assert chain_checks and all(not c.ok for c in chain_checks), f"{layout}: every chain check fails reversed: {chain_checks}"
    assert math.isinf(bad.largest_error), f"{layout}: a non-conforming product reports an infinite error"


def test_check_reports_a_wrong_value_not_only_wrong_shapes():
    """A conforming but wrong product (diag factors of two layers swapped, equal widths) fails on its numbers."""
    net = layouts.Network.random([3, 3, 3], "tanh", seed=2)
    x, y = net.random_data(seed=3)
    fwd = layouts.forward(net, x)
    factors = [f.value for f in layouts.chain_factors(net, fwd, y, "x", "denominator")]
    swapped = [factors[0], factors[3], factors[2], factors[1], factors[4]]  # diag(f'(z^(1))) <-> diag(f'(z^(2)))
    ref = layouts.autograd_gradients(net, x, y).grad_x
    c = explain._compare("dC/dx swapped", lambda: layouts.multiply(swapped), ref, 1e-10)
    assert not c.ok and math.isfinite(c.error) and c.error > 1e-3, f"a wrong value must fail with a finite error: {c}"
    assert explain._compare("dC/dx", lambda: layouts.multiply(factors), ref, 1e-10).ok, "the prescribed order passes"


def test_main_in_process_returns_status(capsys):
    from manualbp.__main__ import main

    assert main(["explain", "--sizes", "3,2", "--layout", "numerator"]) == 0, "good arguments: status 0"
    assert "all 7 checks hold" in capsys.readouterr().out, "7 checks for one layer"
    assert main(["explain", "--sizes", "3,2", "--order", "reversed"]) == 1, "reversed order: status 1"


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_doc_excerpts_are_what_the_command_prints(layout):
    """The output quoted in docs/derivation.md section 10 is the command's own."""
    blocks = re.findall(r"```text\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    # the numerator chain starts at C: "dC/dx = dC/da^(2) . ..."
    block = next((b for b in blocks if (layout == "numerator") == ("dC/dx = dC/da^(2)" in b)), None)
    assert block is not None, f"docs/derivation.md should quote the {layout} output"
    net = layouts.Network.random([4, 5, 3], "sigmoid", seed=0)
    x, y = net.random_data(seed=1)
    printed = explain.describe(net, x, y, layout)
    for line in block.rstrip("\n").splitlines():
        assert line in printed, f"doc line not printed by `explain --layout {layout}`: {line!r}"


def test_describe_rejects_unknown_layout():
    net = layouts.Network.random([2, 2], "tanh")
    x, y = net.random_data()
    with pytest.raises(ValueError, match="unknown layout"):
        explain.describe(net, x, y, "transposed")
    with pytest.raises(ValueError, match="unknown order"):
        explain.check(net, x, y, "numerator", order="sideways")


def test_negative_slope_reaches_the_network():
    net = layouts.Network.random([2, 3], "leaky_relu", seed=0, negative_slope=0.2)
    z = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    assert torch.equal(net.activation.f_grad(z), torch.tensor([0.2, 1.0], dtype=torch.float64)), "f' uses the given slope"


# ---------------------------------------------------------------------------
# Forward mode (--mode forward, docs/derivation.md section 11)

FORWARD_NETS = {"4x5x3": [4, 5, 3], "3x7x2x5": [3, 7, 2, 5], "2x3x2": [2, 3, 2], "5x1": [5, 1]}
FORWARD_ACTIVATIONS = ["sigmoid", "tanh", "relu", "gelu"]


def test_forward_mode_command_runs(runs):
    rc, stdout, stderr = runs["forward"]
    assert rc == 0, f"--mode forward: exit status {rc}\n{stdout}\n{stderr}"
    assert "Check against torch.func.jvp" in stdout and re.search(r"all \d+ checks hold", stdout), "checked against jvp"
    assert "Tangent: dW^(2), [3,5]" in stdout, "the tangent and its shape are printed"
    assert re.search(r"dz\^\(2\) = dz\^\(2\)/dW\^\(2\) : dW\^\(2\) = dW\^\(2\) a\^\(1\)\s+\[3,5\] \[5,1\] -> \[3,1\]", stdout), "(V4) seed"
    assert "dz^(1)" not in stdout.split("Tangents, layer by layer", 1)[1], "layers below the weight's have no tangent"


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("activation", FORWARD_ACTIVATIONS)
@pytest.mark.parametrize("net", list(FORWARD_NETS))
def test_forward_mode_on_networks_activations_layouts(net, activation, layout, capsys):
    """``explain --mode forward`` passes for a tangent on x and on W1, and prints the chain's shapes in the layout."""
    from manualbp.__main__ import main

    sizes = FORWARD_NETS[net]
    n0, nl = sizes[0], sizes[-1]
    for tangent in ("x", "W1"):
        argv = ["explain", "--sizes", ",".join(map(str, sizes)), "--activation", activation, "--layout", layout]
        rc = main([*argv, "--mode", "forward", "--tangent", tangent])
        out = capsys.readouterr().out
        assert rc == 0, f"{net} {activation} {layout} tangent {tangent}: exit {rc}\n{out}"
        n_checks = 2 * (len(sizes) - 1) + 4  # dz, da per layer from the tangent's up; 2 chains, dC, <dC/dv, dv>
        assert f"all {n_checks} checks hold" in out, f"{net} {activation} {layout} {tangent}: every check holds\n{out}"
        chain = out.split("The forward-mode chain", 1)[1]
        shapes = re.findall(r"^\s+((?:\[[\d,]+\] )+)-> (\[[\d,]+\])$", chain, flags=re.M)
        assert len(shapes) == 2, f"two chains (da^(L) and dC) with shapes: {shapes}"
        (a_factors, a_result), (c_factors, c_result) = shapes
        assert c_result == "[1,1]", f"dC is a scalar, got {c_result}"
        assert a_result == (f"[{nl},1]" if layout == "numerator" else f"[1,{nl}]"), f"da^(L) in {layout} layout: {a_result}"
        n_seed = n0 if tangent == "x" else sizes[1]  # dx, or dz^(1)/dW^(1) : dW^(1) = dW^(1) a^(0)
        first, last = c_factors.split()[0], c_factors.split()[-1]
        if layout == "numerator":  # the Jacobians, dC/da^(L) first, the tangent a column last
            assert (first, last) == (f"[1,{nl}]", f"[{n_seed},1]"), f"numerator chain ends with the tangent: {c_factors}"
        else:  # transposed, the tangent a row first, dC/da^(L) last
            assert (first, last) == (f"[1,{n_seed}]", f"[{nl},1]"), f"denominator chain starts with the tangent: {c_factors}"


def test_forward_check_fails_on_a_wrong_recursion():
    """The reference is independent: with f in place of f' (E7) the recursion and chains fail, jvp does not move."""
    net = layouts.Network.random([3, 4, 2], "tanh", seed=3)
    x, y, _ = explain.choose_data(net, 4)
    dx = torch.randn(3, dtype=layouts.DTYPE, generator=torch.Generator().manual_seed(5))
    assert explain.check_forward(net, x, y, "numerator", "x", dx).ok, "the right f' passes"
    wrong = layouts.Network(net.weight, net.bias, net.activation)
    object.__setattr__(wrong.activation, "_f_grad", lambda z, **_: torch.tanh(z))  # f instead of f'
    report = explain.check_forward(wrong, x, y, "numerator", "x", dx)
    failed = {c.name for c in report.checks if not c.ok}
    assert "dC chain (V3)" in failed and "da^(2) recursion (V1)" in failed, f"a wrong f' fails: {failed}"


def test_forward_reversed_order_fails_on_shapes(capsys):
    from manualbp.__main__ import main

    rc = main(["explain", "--sizes", "4,5,3", "--mode", "forward", "--order", "reversed"])
    out = capsys.readouterr().out
    assert rc == 1 and "factors do not conform" in out, f"reversed forward chain: exit {rc}\n{out}"


# ---------------------------------------------------------------------------
# Checks that would prove nothing


def test_all_widths_one_reversed_says_scalars_commute(capsys):
    """[1,1]: every factor is 1x1, the reversed order gives the same numbers, and the output says why."""
    from manualbp.__main__ import main

    rc = main(["explain", "--sizes", "1,1", "--order", "reversed"])
    out = capsys.readouterr().out
    assert rc == 0, f"no check fails (scalars commute), exit {rc}\n{out}"
    assert "4 chain checks held in the REVERSED order only because every factor but one is 1x1 and scalars commute" in out
    assert out.count(explain.COMMUTE_NOTE) == 4, "each chain check that held reversed says why"


def test_partly_scalar_chains_reversed(capsys):
    """[3,1]: the chains to b^(1) and z^(1) are all 1x1 and hold reversed (said so); dC/dx does not conform."""
    from manualbp.__main__ import main

    rc = main(["explain", "--sizes", "3,1", "--order", "reversed"])
    out = capsys.readouterr().out
    assert rc == 1, f"dC/dx reversed does not conform: exit {rc}\n{out}"
    assert re.search(r"dC/db\^\(1\) chain \(D4\).*ok\s+\(" + re.escape(explain.COMMUTE_NOTE), out), "b^(1) chain holds, noted"
    assert re.search(r"dC/dx chain \(D6\).*FAILED", out), "dC/dx reversed fails"


def test_relu_data_are_chosen_with_fewest_flat_units(capsys):
    """relu on 3,7,2,5 (seed 0): the issue found 4 of 5 top-layer delta entries zero; the chosen input has the fewest."""
    net = layouts.Network.random([3, 7, 2, 5], "relu", seed=0)
    X, _ = net.random_data(n=explain.DATA_DRAWS, seed=1)
    fwd = layouts.batched_forward(net, X)
    flat = sum((fwd.z[l] <= 0).sum(dim=1) for l in range(1, net.L + 1))
    x, y, k = explain.choose_data(net, 1)
    assert flat[k] == flat.min() and (flat[:k] > flat.min()).all(), f"draw {k}: the first with fewest flat units"
    assert torch.equal(x, X[k]), "x is that draw"
    top = layouts.delta_recursion(net, x, y).delta[net.L]
    assert int((top == 0).sum()) <= 2, f"at most 2 of 5 top-layer delta entries are zero: {top.flatten()}"
    from manualbp.__main__ import main

    assert main(["explain", "--sizes", "3,7,2,5", "--activation", "relu"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Note: f'\(z\^\(\d\)\) = 0 at \d of \d units", out), "the remaining flat units are reported"


def test_all_zero_reference_is_not_a_pass():
    check = explain._compare("zeros", lambda: torch.zeros(3), torch.zeros(3), 1e-10)
    assert not check.ok and "prove nothing" in check.note, f"zeros against zeros is not a pass: {check}"


def test_largest_seed_runs(capsys):
    from manualbp.__main__ import main

    assert main(["explain", "--sizes", "2,2", "--seed", str(explain.MAX_SEED)]) == 0, "the largest seed is valid"
    assert main(["explain", "--sizes", "2,2", "--seed", str(explain.MAX_SEED), "--mode", "forward"]) == 0


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_doc_forward_excerpts_are_what_the_command_prints(layout):
    """The forward-mode output quoted in docs/derivation.md section 11 is the command's own."""
    blocks = re.findall(r"```text\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    marker = "dC = dC/da^(2) ." if layout == "numerator" else "dC = dx^T ."
    block = next((b for b in blocks if marker in b), None)
    assert block is not None, f"docs/derivation.md should quote the forward-mode {layout} output"
    net = layouts.Network.random([4, 5, 3], "sigmoid", seed=0)
    x, y = net.random_data(seed=1)
    printed = explain.describe_forward(net, x, y, layout, "x", torch.zeros(4, dtype=layouts.DTYPE))
    for line in block.rstrip("\n").splitlines():
        assert line in printed, f"doc line not printed by `explain --mode forward --layout {layout}`: {line!r}"


# ---------------------------------------------------------------------------
# The gated layer (--gated, docs/derivation.md section 12)


@pytest.mark.parametrize("mode", explain.MODES)
@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu", "identity"])
def test_gated_explain_checks_hold(activation, layout, mode, capsys):
    from manualbp.__main__ import main

    argv = ["explain", "--gated", "--sizes", "4,3", "--activation", activation, "--layout", layout, "--mode", mode]
    assert main(argv) == 0, f"explain {' '.join(argv)}: status 0"
    out = capsys.readouterr().out
    checks = 5 if mode == "reverse" else 3
    assert f"all {checks} checks hold" in out, f"{argv}: every check holds\n{out}"
    label = {("reverse", "numerator"): "(G3)", ("reverse", "denominator"): "(G4)",
             ("forward", "numerator"): "(G6)", ("forward", "denominator"): "(G6, transposed)"}[mode, layout]
    assert label in out, f"{argv}: prints the equations {label}"


def test_gated_explain_fails_a_wrong_chain(monkeypatch, capsys):
    """The check can fail: with the two paths' diagonal factors swapped, dC/dx and the weights' are wrong."""
    from manualbp.__main__ import main
    from manualbp.derivation import gated

    right = gated.jacobians

    def swapped(layer, fwd):
        J = right(layer, fwd)
        return {**J, "da/dz_g": J["da/dz_u"], "da/dz_u": J["da/dz_g"]}

    monkeypatch.setattr(gated, "jacobians", swapped)
    assert main(["explain", "--gated", "--sizes", "4,3", "--activation", "tanh"]) == 1, "a wrong chain: status 1"
    assert "checks FAILED" in capsys.readouterr().out, "the report says which failed"


@pytest.mark.parametrize("argv, match", [
    (["--sizes", "4,3,2"], "exactly two widths"),
    (["--sizes", "4,3", "--order", "reversed"], "not with --gated"),
    (["--sizes", "4,3", "--mode", "forward", "--tangent", "x"], "not with --gated"),
])
def test_gated_explain_bad_arguments(argv, match, capsys):
    from manualbp.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--gated", *argv])
    assert exit_info.value.code == 2, f"{argv}: status 2"
    assert match in capsys.readouterr().err, f"{argv}: the error names {match!r}"


def test_gated_doc_excerpt_is_what_the_command_prints():
    """The output quoted in docs/derivation.md section 12 is the command's own."""
    from manualbp.derivation import gated

    blocks = re.findall(r"```text\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    block = next((b for b in blocks if "delta_g" in b), None)
    assert block is not None, "docs/derivation.md should quote the gated layer's output"
    layer = gated.GatedLayer.random(4, 3, "silu", seed=0)
    x, y = layer.random_data(seed=1)
    printed = gated.describe(layer, x, y, "denominator", "reverse")
    for line in block.rstrip("\n").splitlines():
        assert line in printed, f"doc line not printed by `explain --gated`: {line!r}"
