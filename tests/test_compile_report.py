"""The offline sm_90 compile report (benchmarks/compile_report.py) on a small subset: the kernels as an H100
would compile them, checked without a GPU. Marked ``compile_report``; about a minute on a 2-core CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick_report(script: str, tmp_path, options=("--quick",)) -> dict:
    """benchmarks/<script> --quick (or options) on the compiled kernels (not the interpreter): its JSON report; skips
    where this machine cannot compile for sm_90."""
    pytest.importorskip("triton")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *options, "--quiet", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, f"the report ran: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    report = json.loads(out.read_text())
    if "unavailable" in report:
        pytest.skip(f"no sm_90 compile here: {report['unavailable']}")
    report["stdout"] = done.stdout
    return report


def _assert_wgmma_and_no_spill(row: dict, report: dict) -> str:
    """A report row compiled, with wgmma and no spill store (skips where this Triton gives no ptxas log); its label."""
    label = f"{row['kernel']} {row['config']}"
    assert "error" not in row, f"{label} compiles: {row.get('error')}"
    assert row["mma"].startswith("wgmma"), f"{label}: wgmma, got {row['mma']}"
    if "spill" not in row:
        pytest.skip(f"no ptxas log on this Triton ({report['header']['notes']})")
    assert row["spill"] == 0, f"{label}: {row['spill']} bytes of spill stores"
    return label


@pytest.mark.compile_report
def test_compile_report_quick_subset(tmp_path):
    """wgmma in every matmul, never serialized by ptxas, no spill anywhere, none in a main loop; at most 3 bar.sync per
    iteration with cp.async loads; a TMA config (sm_90) loads by TMA only (its bar.sync are Triton's around each TMA
    issue, as in tutorial 09's kernel: the report shows both, no bound asserted here)."""
    report = _quick_report("compile_report.py", tmp_path)
    rows = [row for row in report["rows"] if not row["kernel"].startswith("tutorial")]
    assert len(rows) >= 4, f"the quick subset compiled: {report['stdout']}"
    if hasattr(pytest.importorskip("triton.language"), "make_tensor_descriptor"):
        assert any(" tma" in row["config"] for row in rows), "TMA configs compiled where Triton has them"
    from manualbp.triton_kernels import dense

    warp_specialized = [row for row in rows if row["config"].endswith(" ws")]
    assert bool(warp_specialized) == dense.WARP_SPECIALIZE_AVAILABLE, (
        f"warp-specialized configs compiled exactly where this Triton partitions a Hopper loop "
        f"({dense.WARP_SPECIALIZE_AVAILABLE}): {[row['kernel'] for row in warp_specialized]}")
    for row in rows:
        label = _assert_wgmma_and_no_spill(row, report)
        assert not row.get("wgmma_serialized"), f"{label}: ptxas serialized its wgmmas ({row['wgmma_serialized']})"
        if " tma" in row["config"]:
            assert row["tma"] > 0 and row["cp_async"] == 0, f"{label}: TMA loads, not cp.async"
        if row["config"].endswith(" ws"):  # a producer warpgroup and two consumers, registers moved to the consumers
            assert row.get("ws_partitions") == 3 and row["ws_warps"] == 12, (
                f"{label}: the K loop warp-specialized into 3 warpgroups, got {row.get('ws_partitions')} "
                f"partitions, {row.get('ws_warps')} warps")
            assert min(row["ws_registers"]) > row["regs"], (
                f"{label}: the consumers asked for more registers ({row['ws_registers']}) than the launch's {row['regs']}")
        else:
            assert not row.get("ws_partitions"), f"{label}: warp-specialized without the config asking"
        if "loop_instr" not in row:
            continue
        assert row["loop_spill"] == 0, f"{label}: spill instructions in the main loop"
        if " tma" not in row["config"]:
            # Triton syncs after each group of wgmma: 2 for the product (and 1 more); the ∂C/∂b kernel's sums by
            # MMA against a ones tile (dense._row_sums_add) are 2 groups more. A chunk's end (the ∂C/∂b kernels'
            # branch, once per SUM_CHUNK_K rows) is not in every iteration: counted apart, and bounded too.
            bound = 5 if row["kernel"].startswith("dW prologue+db") else 3
            every = row["loop_bar"] - row["loop_branch_bar"]
            assert every <= bound, (f"{label}: {every} bar.sync per main-loop iteration (and "
                                    f"{row['loop_branch_bar']} at a chunk's end)")
            assert row["loop_branch_bar"] <= (3 if "+db" in row["kernel"] else 0), (
                f"{label}: {row['loop_branch_bar']} bar.sync in the main loop's branch")


@pytest.mark.compile_report
def test_tf32_plain_products_load_k_major_operands(tmp_path):
    """float32 with TF32 products on sm_90 (compile_report.py --dtype tf32: the launchers as on that GPU, their
    K-major copies included): ∂C/∂X of a stored δ and ∂C/∂W through δᵀ's strides load their tiles into shared
    memory as the forward (X Wᵀ, both operands K-major) does, the same cp.async count per loop at every config,
    with wgmma and no spill; read along M or N they took 2.5-4x the copies and spilled (docs/compile-report.md)."""
    report = _quick_report("compile_report.py", tmp_path,
                           ("--dtype", "tf32", "--only", "fwd identity,dX plain,dW plain (δᵀ"))
    rows = [row for row in report["rows"] if not row["kernel"].startswith("tutorial")]
    forward = {row["config"].split(" e")[0]: row for row in rows if row["kernel"] == "fwd identity"}
    products = [row for row in rows if row["kernel"] != "fwd identity"]
    assert forward and len(products) == 2 * len(forward), f"the three launches at each config: {report['stdout']}"
    for row in products:
        label = _assert_wgmma_and_no_spill(row, report)
        twin = forward[row["config"].split(" e")[0]]
        assert row["cp_async"] == twin["cp_async"], (
            f"{label}: {row['cp_async']} cp.async per loop, the K-major forward's {twin['cp_async']}")


@pytest.mark.compile_report
def test_gated_compile_report_quick_subset(tmp_path):
    """The gated layer's kernels (benchmarks/compile_report_gated.py --quick), each of the three matmul kernels at
    its first (untuned) 16-bit config: wgmma in every one (forward, ∂C/∂X, ∂C/∂W), no register spill; ∂C/∂X reading
    a stored δ_g, δ_u takes both operands from shared memory (SS: no RS wgmma, so no RS hazard), where forming
    them in its loads makes them register operands (RS)."""
    report = _quick_report("compile_report_gated.py", tmp_path)
    rows = report["rows"]
    assert {row["kernel"].split()[0] for row in rows} == {"fwd", "dX", "dW"}, f"the three kernels: {report['stdout']}"
    for row in rows:
        _assert_wgmma_and_no_spill(row, report)
    operands = {row["kernel"]: row["A"] for row in rows if row["kernel"].startswith("dX")}
    assert operands == {"dX silu": "RS", "dX δ stored": "SS"}, f"∂C/∂X's A operand by plan: {operands}"


def _report_module(monkeypatch):
    """benchmarks/compile_report.py imported, the environment it sets for itself restored after the test."""
    for name in ("TRITON_INTERPRET", "MANUALBP_AUTOTUNE"):  # the report's import sets both for itself: restored after
        # (setenv records the old value, or its absence, for the teardown; a delenv of an absent name records
        # nothing, and MANUALBP_AUTOTUNE=0 then reached every later test's subprocesses)
        monkeypatch.setenv(name, os.environ.get(name, ""))
        if not os.environ[name]:
            monkeypatch.delenv(name)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compile_report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return compile_report


def test_main_loop_is_the_loop_not_a_wait_retry_block(monkeypatch):
    """The report's main loop: the backward branch that closes the K loop, not a wait's retry block placed after the
    kernel that jumps back into the loop (its span holds the loop's MMAs too, and may be shorter than the loop)."""
    compile_report = _report_module(monkeypatch)
    sass = "\n".join([
        "LBB0:",  # the K loop: 6 instructions, 1 MMA
        "\tSYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R1;",
        "\t@!P0 BRA LBB5;",
        "LBB1:",
        "\tLDSM.16.M88.4 R8, [R2];",
        "\tHGMMA.64x256x16.F32.BF16 R24, R8, gdesc[UR8], R24;",
        "\tBAR.SYNC.DEFER_BLOCKING 0x0;",
        "\t@P1 BRA LBB0;",
        "\tSTG.E [R4], R24;",  # the epilogue
        "\tEXIT;",
        "LBB5:",  # the retry block: 3 instructions, jumping back into the loop
        "\tSYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R1;",
        "\t@!P0 BRA LBB5;",
        "\tBRA LBB1;",
    ])
    loop = compile_report.main_loop(sass)
    assert (loop["loop_instr"], loop["loop_mma"], loop["loop_bar"]) == (6, 1, 1), f"the K loop: {loop}"
    assert loop["loops_with_mma"] == 1, f"one loop holds the MMA: {loop}"
    assert (loop["loop_branch_instr"], loop["loop_branch_bar"]) == (0, 0), f"no branch inside the K loop: {loop}"


def test_a_branch_inside_the_main_loop_is_counted(monkeypatch):
    """The instructions a forward branch inside the K loop skips (the ∂C/∂W + ∂C/∂b loop's chunk end, run once per
    chunk), its target a label or an address (16 bytes an instruction, from the function's first): loop_branch_instr,
    within loop_instr."""
    compile_report = _report_module(monkeypatch)
    body = [
        "\tMOV R1, R2;",  # instruction 0 (address 0x0)
        "LBB1:",  # the K loop
        "\tHGMMA.64x256x16.F32.BF16 R24, R8, gdesc[UR8], R24;",  # 1
        "\t@P2 BRA P0, 0x60;",  # 2: over instructions 3-5 to 6 (0x60)
        "\tWARPGROUP.DEPBAR.LE gsb0, 0x0;",  # 3
        "\tBAR.SYNC.DEFER_BLOCKING 0x0;",  # 4
        "\tFADD R5, R5, R6;",  # 5
        "\t@P1 BRA LBB2;",  # 6: over instruction 7 to the label
        "\tSTS [R3], R5;",  # 7
        "LBB2:",
        "\t@P3 BRA LBB1;",  # 8: the back edge
        "\tEXIT;",
    ]
    loop = compile_report.main_loop("\n".join(["Function:kernel"] + body))
    assert loop["loop_instr"] == 8, f"the K loop's span, branches included: {loop}"
    assert loop["loop_branch_instr"] == 4, f"3 instructions skipped to an address, 1 to a label: {loop}"
    assert loop["loop_branch_bar"] == 1, f"the bar.sync among them: {loop}"


def test_issue_pressure_counts_the_mma_clocks_of_the_target_and_the_operands(monkeypatch):
    """Issue pressure divides the loop's issue clocks by the tensor cores' clocks for one K step's tile, at the rate
    of the target and the operand kind (NVIDIA's whitepapers: an H100 SM 2048 dense 16-bit multiply-adds a clock,
    TF32 half of that; an A100 SM 1024 and 512): a TF32 loop has twice a 16-bit loop's MMA clocks to issue in."""
    import triton

    compile_report = _report_module(monkeypatch)
    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3)
    row = {"loop_instr": 256}
    # 128*128*32 = 524288 multiply-adds a K step; 8 warps = 2 per SM sub-partition: 512 issue clocks.
    assert compile_report.issue_pressure(row, config) == 2.0, "H100 bf16: 512 / (524288 / 2048) clocks"
    assert compile_report.issue_pressure(row, config, tf32=True) == 1.0, "H100 TF32: 512 / (524288 / 1024)"
    assert compile_report.issue_pressure(row, config, arch=80) == 1.0, "A100 bf16: 512 / (524288 / 1024)"
    assert compile_report.issue_pressure(row, config, arch=80, tf32=True) == 0.5, "A100 TF32: 512 / (524288 / 512)"
    assert compile_report.issue_pressure(row, config, products=2, tf32=True) == 0.5, "two TF32 products a step"
