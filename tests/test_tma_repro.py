"""benchmarks/tma_tile_repro.py, the minimal reproducer of the excluded TMA tile (docs/kernels.md): its kernel in
Triton's interpreter (on a GPU: compiled), its register-hazard check on hand-written SASS, and (marked
``compile_report``) its variants compiled for sm_90 beside manualbp's kernel at the same tile."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _repro():
    """The reproducer's module, created under this run's TRITON_INTERPRET (tests/conftest.py: 1 without a GPU)."""
    spec = importlib.util.spec_from_file_location("tma_tile_repro", ROOT / "benchmarks" / "tma_tile_repro.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs_here(repro, dtype, device):
    """Skips where the reproducer cannot run: bfloat16 in the interpreter, TMA before sm_90 or Triton 3.4."""
    import triton.language as tl

    if dtype == torch.bfloat16 and repro.interpreted():
        pytest.skip("Triton's CPU interpreter has no bfloat16")
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        pytest.skip("TMA descriptors need sm_90 or newer")
    if not hasattr(tl, "make_tensor_descriptor"):
        pytest.skip("this Triton has no tensor descriptors (tl.make_tensor_descriptor, Triton >= 3.4)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["tma-prologue", "tma", "pointer-prologue"])
def test_every_variant_is_right(name, dtype, device):
    """Each variant (the suspect TMA + prologue, and its two controls) at sizes no tile divides, with 2 programs
    walking 2 x 3 output tiles where the grid is persistent, 3 launches: right by the script's own rule (normwise
    error within 8x torch.mm's against the same float64 reference). Compiled, the variants with the prologue are
    skipped where the toolchain rewrites the registers of RS wgmmas in flight (rs_hazard: their result is a race
    there; benchmarks/gpu_check.sh runs the script, which reports it)."""
    repro = _repro()
    _runs_here(repro, dtype, device)
    assert set(repro.VARIANTS) == {"tma-prologue", "tma", "pointer-prologue"}, "the variants this test names"
    if device.type == "cuda" and repro.VARIANTS[name][0] and repro.rs_hazard():
        pytest.skip(f"RS wgmma operand hazard: {repro.rs_hazard()}")
    g, s, b = repro.inputs(136, 520, 200, dtype, device)  # 400-byte rows in float16: TMA can describe them
    worst, torch_error, right = repro.check(name, g, s, b, repeats=3, programs=2)
    assert right, f"{name} {dtype}: normwise error {worst:.3e} against torch.mm's {torch_error:.3e}"


def test_the_tma_and_pointer_prologues_give_the_same_bits_in_the_interpreter(device):
    """In the interpreter (one program at a time, a fixed-order dot) the persistent TMA walk and the pointer grid
    compute the same products: the descriptors' zero fill and the pointers' masks agree at every edge."""
    repro = _repro()
    if not repro.interpreted():
        pytest.skip("compiled, the two loops may sum in other orders")
    _runs_here(repro, torch.float16, device)
    g, s, b = repro.inputs(136, 520, 200, torch.float16, device)
    tma, pointer = (repro.run_variant(name, g, s, b, programs=2) for name in ("tma-prologue", "pointer-prologue"))
    assert torch.equal(tma, pointer), "the TMA and pointer prologues, bitwise"


def test_run_all_prints_a_line_per_variant_and_shape(device, capsys):
    """The GPU run's loop (run_all) on small float16 shapes: one line per variant and shape, saying right, and the
    outcome the verdict reads."""
    repro = _repro()
    _runs_here(repro, torch.float16, device)
    if device.type == "cuda" and repro.rs_hazard():
        pytest.skip(f"RS wgmma operand hazard: {repro.rs_hazard()}")
    outcome = repro.run_all(device, [torch.float16], [(136, 520, 200), (64, 256, 64)], repeats=1, programs=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * len(repro.VARIANTS), f"a line per variant and shape: {lines}"
    assert all(" right " in line for line in lines), f"every row right: {lines}"
    assert outcome == {name: [True, True] for name in repro.VARIANTS}, f"the outcome: {outcome}"


def test_the_script_asks_the_packages_toolchain_rule():
    """One rule, one place: the script's rs_hazard and ptxas version are triton_kernels/toolchain.py's, loaded from
    its file (the script imports no manualbp)."""
    from manualbp.triton_kernels import toolchain

    repro = _repro()
    assert repro.TOOLCHAIN.__file__ == toolchain.__file__, f"the package's file: {repro.TOOLCHAIN.__file__}"
    assert repro.rs_hazard() == toolchain.rs_hazard(), "the same verdict on this toolchain"
    assert repro.rs_hazard.__code__ is repro.TOOLCHAIN.rs_hazard.__code__, "the module's own function"


def test_the_check_calls_a_wrong_product_wrong(monkeypatch):
    """The script's rule is not vacuous: a kernel whose product is off by 1% of its largest entry in one place is
    called wrong, and a NaN is too."""
    repro = _repro()
    g, s, b = repro.inputs(8, 16, 32, torch.float32, "cpu")
    exact = (g * s).double() @ b.double()

    for bad in (0.01 * exact.abs().max().item(), float("nan")):
        def broken(name, g_, s_, b_, programs=None, bad=bad):
            c = exact.float().clone()
            c[3, 5] += bad
            return c

        monkeypatch.setattr(repro, "run_variant", broken)
        worst, _, right = repro.check("tma-prologue", g, s, b, repeats=2)
        assert not right, f"an error of {bad} is called wrong (worst {worst})"


def _loop(*lines):
    return [line.strip() for line in lines]


def test_rs_operand_overwrites_counts_writes_to_registers_of_pending_wgmma():
    """rs_operand_overwrites on hand-written loops: the next iteration's load into the A registers of a wgmma left
    pending across the back edge counts once per writing instruction; waiting it out first, a shared-memory (SS)
    operand, or registers no pending wgmma reads count nothing."""
    repro = _repro()
    rs = "HGMMA.64x256x16.F32.BF16 R24, R152, gdesc[UR16].tnspB, R24, gsb0;"
    pending_one = _loop("LDSM.16.M88.4 R152, [R4+UR12];",  # R152-R155: the previous iteration's A
                        "HMUL2.BF16_V2 R153, R153, R180;",  # R153 again
                        "HMUL2.BF16_V2 R160, R160, R180;",  # no wgmma reads R160
                        "WARPGROUP.ARRIVE;", rs, "WARPGROUP.DEPBAR.LE gsb0, 0x1;", "BRA `(.L_x_3);")
    assert repro.rs_operand_overwrites(pending_one) == 2, "two writes into the pending wgmma's A registers"
    waited = [line.replace("0x1", "0x0") for line in pending_one]
    assert repro.rs_operand_overwrites(waited) == 0, "wait_group 0 before the back edge: nothing pending"
    waited_at_top = ["WARPGROUP.DEPBAR.LE gsb0, 0x0;"] + pending_one
    assert repro.rs_operand_overwrites(waited_at_top) == 0, "waited for at the loop's top, before the loads"
    shared = [line.replace(" R152, gdesc", " gdesc") for line in pending_one]
    assert repro.rs_operand_overwrites(shared) == 0, "an SS wgmma reads no registers for A"
    # Triton 3.6's shape of the loop: four k16 wgmmas, wait_group 3 after each; the next iteration reloads all four
    # A fragments, three of them (R156, R160, R164) still pending.
    four = _loop(*[f"LDSM.16.M88.4 R{r}, [R4+UR12];" for r in (152, 156, 160, 164)],
                 *[line for r in (152, 156, 160, 164)
                   for line in (rs.replace("R152", f"R{r}"), "WARPGROUP.DEPBAR.LE gsb0, 0x3;")], "BRA `(.L_x_3);")
    assert repro.rs_operand_overwrites(four) == 3, "three loads into the A registers of the last three wgmmas"
    # The copy Triton 3.9 makes (a mov into the wgmma's own registers after the wait): nothing pending is written.
    copied = _loop("LDSM.16.M88.4 R160, [R4+UR12];", "WARPGROUP.ARRIVE;",
                   "HGMMA.64x256x16.F32.BF16 R24, R160, gdesc[UR16].tnspB, R24, gsb0;", "WARPGROUP.DEPBAR.LE gsb0, 0x1;",
                   "IMAD.MOV.U32 R152, RZ, RZ, R170;", "WARPGROUP.ARRIVE;", rs, "WARPGROUP.DEPBAR.LE gsb0, 0x1;",
                   "BRA `(.L_x_3);")
    assert repro.rs_operand_overwrites(copied) == 0, "each group's registers rewritten only after its wait"


@pytest.mark.compile_report
def test_sm90_compile_puts_the_reproducer_on_manualbps_code_path(tmp_path):
    """tma_tile_repro.py --sm90: the suspect variant and manualbp's ∂C/∂X launch with δ = G ⊙ f'(Z) in the loads,
    at the excluded tile, compile to the same code path: RS wgmma m64n256k16 with TMA loads and the same operand
    buffers and TMA issues per loop; the controls differ where they should (SS without the prologue, cp.async with
    pointers); the gated backward's launches take δ_g, δ_u from registers (RS) too; the suspect's
    register-hazard count is manualbp's, above 0 exactly where rs_hazard says so, and where it does not, 0 in
    every row."""
    out = tmp_path / "repro.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tma_tile_repro.py"), "--sm90", "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, f"the compile ran: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    report = json.loads(out.read_text())
    if "unavailable" in report:
        pytest.skip(f"no sm_90 compile here: {report['unavailable']}")
    rows = {row["kernel"]: row for row in report["rows"]}
    for label, row in rows.items():
        assert "error" not in row, f"{label} compiles: {row.get('error')}"
    suspect, ours = rows["repro tma-prologue"], rows["manualbp dX prologue gelu (tma)"]
    for key in ("mma", "A", "bufs", "tma", "cp_async", "loop_mma", "loop_tma", "rs_overwrites"):
        assert suspect[key] == ours[key], f"{key}: the reproducer's {suspect[key]}, manualbp's {ours[key]}"
    assert (suspect["mma"], suspect["A"]) == ("wgmma.m64n256k16", "RS"), f"the suspect: {suspect}"
    assert suspect["tma"] > 0 and suspect["cp_async"] == 0, f"the suspect loads by TMA: {suspect}"
    assert rows["repro tma"]["A"] == "SS", "without the prologue both operands come from shared memory"
    pointer = rows["repro pointer-prologue"]
    assert pointer["A"] == "RS" and pointer["tma"] == 0 and pointer["cp_async"] > 0, f"pointer loads: {pointer}"
    gated = {label: row for label, row in rows.items() if label.startswith("manualbp gated")}
    assert len(gated) == 3, f"the gated backward's ∂C/∂X, ∂C/∂W and ∂C/∂W+∂C/∂b launches: {sorted(gated)}"
    for label, row in gated.items():
        assert row["A"] == "RS" and row["mma"].startswith("wgmma"), f"{label}: δ_g, δ_u from registers, {row}"
    hazard = _repro().rs_hazard()
    assert (suspect["rs_overwrites"] > 0) == bool(hazard), \
        f"the version rule ({hazard or 'no hazard'}) and this toolchain's loop ({suspect['rs_overwrites']} writes)"
    if not hazard:
        for label, row in rows.items():
            assert row["rs_overwrites"] == 0, f"{label}: {row['rs_overwrites']} writes to pending wgmma registers"


def test_the_verdict_follows_the_rule_in_docs_kernels_md():
    """verdict() for each kind of outcome docs/kernels.md lists: the suspect (or the pointer prologue) wrong with and
    without the known hazard, all right with and without it, and the SS control wrong."""
    repro = _repro()
    right = {name: [True, True] for name in repro.VARIANTS}
    hazard = "Triton 3.6.0 (< 3.8: rewrites with every ptxas tried)"
    cases = [
        (dict(right, **{"tma-prologue": [True, False]}), hazard, "Triton's (triton-lang/triton issue 9433)"),
        (dict(right, **{"pointer-prologue": [False, True]}), hazard, "Triton's (triton-lang/triton issue 9433)"),
        (dict(right, **{"tma-prologue": [False, False]}), None, "not a known issue"),
        (right, hazard, "the race was not lost"),
        (right, None, "the fault is manualbp's"),
        (dict(right, tma=[False, True], **{"tma-prologue": [False, True]}), hazard, "the SS control is wrong"),
    ]
    for outcome, toolchain, expected in cases:
        said = repro.verdict(outcome, toolchain)
        assert expected in said, f"{outcome}, hazard {toolchain!r}: {said!r} says {expected!r}"
