"""The benchmark harness runs on the CPU (reference backend vs eager) and writes its CSV."""

import csv
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_dense", ROOT / "benchmarks" / "bench_dense.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_dense"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_cpu_run_writes_csv_rows(tmp_path, capsys):
    bench = _load()
    rc = bench.main(["--device", "cpu", "--dtypes", "fp32", "--modes", "fwd,fwd+bwd", "--activations", "gelu",
                     "--problems", "linear1024x1024x256", "--impls", "cublas,eager,manualbp", "--rep-ms", "20",
                     "--out-dir", str(tmp_path), "--tag", "test"])
    assert rc == 0, "exit status"
    printed = capsys.readouterr().out
    assert "# manualbp dense benchmark" in printed and "torch" in printed, "header with versions"
    rows = list(csv.DictReader(open(tmp_path / "bench_dense_test.csv")))
    impls = sorted({(r["mode"], r["impl"]) for r in rows})
    assert impls == [("fwd", "cublas"), ("fwd", "eager"), ("fwd", "manualbp"), ("fwd+bwd", "eager"),
                     ("fwd+bwd", "manualbp")], f"rows: {impls}"
    for row in rows:
        assert float(row["median_ms"]) > 0, "median time"
        assert float(row["tflops"]) > 0, "TFLOP/s"
        for key in ("device", "torch", "triton", "date", "speedup_vs_eager"):
            assert row[key] != "", f"column {key}"
    eager_row = next(r for r in rows if r["impl"] == "eager" and r["mode"] == "fwd+bwd")
    assert float(eager_row["speedup_vs_eager"]) == pytest.approx(1.0), "eager's speedup over itself"


def test_bad_arguments_are_refused():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--dtypes", "fp8"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--impls", "magic"])
