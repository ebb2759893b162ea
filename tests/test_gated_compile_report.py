"""The gated layer's kernels as an H100 would compile them (benchmarks/compile_report_gated.py --quick), checked
without a GPU: each of the three matmul kernels at its first (untuned) 16-bit config. Marked ``compile_report``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.compile_report
def test_gated_compile_report_quick_subset(tmp_path):
    """wgmma in every gated matmul (forward, ∂C/∂X, ∂C/∂W), no register spill."""
    pytest.importorskip("triton")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report_gated.py"), "--quick", "--quiet",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, f"the report ran: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    report = json.loads(out.read_text())
    if "unavailable" in report:
        pytest.skip(f"no sm_90 compile here: {report['unavailable']}")
    rows = report["rows"]
    assert {row["kernel"].split()[0] for row in rows} == {"fwd", "dX", "dW"}, f"the three kernels: {done.stdout}"
    for row in rows:
        label = f"{row['kernel']} {row['config']}"
        assert "error" not in row, f"{label} compiles: {row.get('error')}"
        assert row["mma"].startswith("wgmma"), f"{label}: wgmma, got {row['mma']}"
        if "spill" not in row:
            pytest.skip(f"no ptxas log on this Triton ({report['header']['notes']})")
        assert row["spill"] == 0, f"{label}: {row['spill']} bytes of spill stores"
