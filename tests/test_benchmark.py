"""The benchmark harness runs on the CPU (reference backend vs eager) and writes its CSV."""

import csv
import importlib.util
import os
import pathlib
import sys

import pytest
import torch

import manualbp

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
    # Every model row is checked against the same model in float64: fp32 errors, and manualbp's as eager's
    # (the reference backend runs eager's own kernels).
    for row in rows:
        if row["impl"] != "cublas":
            assert 0 < float(row["max_rel_err"]) < 1e-5, f"{row['impl']} {row['mode']}: error {row['max_rel_err']}"
    manual_row = next(r for r in rows if r["impl"] == "manualbp" and r["mode"] == "fwd+bwd")
    assert float(manual_row["err_vs_eager"]) == pytest.approx(1.0, abs=0.5), "manualbp's error about eager's"
    assert "CHECK" not in printed, "no row flagged"


def test_error_column_catches_a_wrong_gradient(monkeypatch, tmp_path, capsys):
    """A manualbp whose ∂C/∂W were off by 1% is flagged in the table (and its error shows it)."""
    bench = _load()
    import manualbp.functional

    real = manualbp.functional.linear

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weight):
            return weight.view_as(weight)

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    monkeypatch.setattr(manualbp.functional, "linear",
                        lambda x, weight, *args, **kwargs: real(x, Wrong.apply(weight), *args, **kwargs))
    bench.main(["--device", "cpu", "--dtypes", "fp32", "--modes", "fwd+bwd", "--activations", "relu",
                "--problems", "linear1024x256x1024", "--impls", "eager,manualbp", "--rep-ms", "5",
                "--out-dir", str(tmp_path), "--tag", "wrong"])
    rows = {r["impl"]: r for r in csv.DictReader(open(tmp_path / "bench_dense_wrong.csv"))}
    assert float(rows["manualbp"]["max_rel_err"]) > 5e-3, f"error {rows['manualbp']['max_rel_err']}"
    flagged = [line for line in capsys.readouterr().out.splitlines() if "CHECK" in line]
    assert len(flagged) == 1 and " manualbp " in flagged[0], f"flagged rows: {flagged}"


def test_csv_with_new_columns_is_rewritten_with_all_of_them(tmp_path):
    bench = _load()
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n")
    rows = bench.CsvRows(str(path))
    rows.add({"a": 3, "b": 4, "c": 5})
    rows.add({"a": 6, "b": 7, "c": 8})
    assert list(csv.DictReader(open(path))) == [{"a": "1", "b": "2", "c": ""}, {"a": "3", "b": "4", "c": "5"},
                                                 {"a": "6", "b": "7", "c": "8"}], "old rows kept, new column added"


def test_bad_arguments_are_refused():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--dtypes", "fp8"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--impls", "magic"])


def test_matmul_ceiling_script_runs_in_the_interpreter(capsys):
    spec = importlib.util.spec_from_file_location("bench_matmul", ROOT / "benchmarks" / "bench_matmul.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the script runs at full size in benchmarks/gpu_check.sh")
    assert module.main(["--size", "40", "--dtypes", "fp32,fp16"]) == 0, "exit status"
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("fp32 ", "fp16 "))]
    assert [r[0] for r in rows] == ["fp32", "fp16"], f"one row per dtype: {rows}"
    errors = {r[0]: float(r[-2]) for r in rows}  # the Triton kernel's max relative error vs float64
    assert errors["fp32"] < 1e-5, f"fp32 error {errors['fp32']}"
    assert errors["fp16"] < 1e-2, f"fp16 error {errors['fp16']}"


def _load_overhead():
    spec = importlib.util.spec_from_file_location("bench_overhead", ROOT / "benchmarks" / "bench_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_run_writes_csv_rows(tmp_path, capsys):
    bench = _load_overhead()
    rc = bench.main(["--device", "cpu", "--rounds", "5", "--calls", "1", "--out-dir", str(tmp_path), "--tag", "test"])
    assert rc == 0, "exit status"
    printed = capsys.readouterr().out
    assert "# manualbp call-overhead benchmark" in printed and "torch" in printed, "header with versions"
    rows = list(csv.DictReader(open(tmp_path / "bench_overhead_test.csv")))
    cases = sorted((r["problem"], r["mode"], r["impl"]) for r in rows)
    expected = sorted([(p, m, i) for p in ("linear", "mlp") for m in ("fwd", "fwd+bwd") for i in ("nn", "manualbp")]
                      + [("op", "fwd", "nn"), ("op", "fwd", "custom_op"), ("op", "fwd", "manualbp")])
    assert cases == expected, f"rows: {cases}"
    for row in rows:
        assert float(row["median_us"]) > 0, "median time"
        assert row["backend"] == "reference", "the CPU times the reference backend"
        if row["impl"] == "nn":
            assert float(row["ratio_to_nn"]) == pytest.approx(1.0), "nn's ratio to itself"


def test_overhead_call_chain_reaches_the_reference(capsys):
    bench = _load_overhead()
    assert bench.main(["--device", "cpu", "--depth"]) == 0, "exit status"
    frames = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert frames[0] == "manualbp/modules.py:forward", f"starts at Linear.forward: {frames}"
    assert frames[-1] == "manualbp/reference.py:pre_activation", f"ends where the kernel is called: {frames}"


def test_instruction_counter_child_runs_natively(tmp_path):
    """count_instructions.py's measured loop, outside valgrind (its client requests then do nothing): the
    helper builds and the child runs bench_overhead's case, so the script keeps up with that harness."""
    import shutil
    import subprocess

    script = ROOT / "benchmarks" / "count_instructions.py"
    spec = importlib.util.spec_from_file_location("count_instructions", script)
    counter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(counter)
    if (shutil.which("cc") or shutil.which("gcc")) is None:
        pytest.skip("no C compiler to build the valgrind helper")
    if not pathlib.Path("/usr/include/valgrind/callgrind.h").exists():
        pytest.skip("valgrind's callgrind.h is not installed")
    helper = counter.build_helper(str(tmp_path))
    for problem in ("linear", "mlp"):
        result = subprocess.run([sys.executable, str(script), "--child", helper, problem, "manualbp", "fwd+bwd", "3",
                                 ""], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{problem}: child failed:\n{result.stderr[-2000:]}"
        assert "manualbp from" in result.stderr, f"{problem}: the child names the manualbp it counted"


def test_problems_run_in_the_order_given_and_unknown_ones_are_refused(tmp_path):
    bench = _load()
    order = ["linear1024x256x1024", "linear1024x1024x256"]  # the reverse of cpu_problems()'s order
    rc = bench.main(["--device", "cpu", "--dtypes", "fp32", "--modes", "fwd", "--activations", "relu",
                     "--problems", ",".join(order), "--impls", "eager", "--rep-ms", "5",
                     "--out-dir", str(tmp_path), "--tag", "order"])
    assert rc == 0, "exit status"
    rows = list(csv.DictReader(open(tmp_path / "bench_dense_order.csv")))
    assert [r["problem"] for r in rows] == order, "rows in the order of --problems"
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--problems", "linear1024x1024x256,linear7x7x7", "--out-dir", str(tmp_path)])


def test_cache_warmers_together_compile_every_config_the_autotuner_keeps(monkeypatch):
    """benchmarks/warm_caches.py: worker i offers each launch one config, the i-th (mod) of those kept."""
    import torch

    monkeypatch.setattr(sys, "path", list(sys.path))  # warm_caches.py puts benchmarks/ on it
    _load()  # the bench_dense it imports
    spec = importlib.util.spec_from_file_location("warm_caches", ROOT / "benchmarks" / "warm_caches.py")
    warm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(warm)
    from manualbp.triton_kernels import dense

    monkeypatch.setattr(dense, "_shared_memory_bytes", lambda index: 227 * 1024)  # an H100's
    monkeypatch.setattr(dense, "_prune_configs", dense._prune_configs)  # restored after the test
    prune = dense._prune_configs
    a16 = torch.empty(1, 1, dtype=torch.bfloat16)
    launches = [dict(), dict(A_PROLOGUE=True, TMA_OK=True), dict(ROW_SUMS=True, A_PROLOGUE=True, TMA_OK=True)]
    workers = 9
    offered = {i: [] for i in range(len(launches))}
    for worker in range(workers):
        monkeypatch.setattr(dense, "_prune_configs", prune)
        warm.offer_one_config(dense, worker)
        for i, flags in enumerate(launches):
            one = dense._prune_configs(dense.matmul_configs(), {"a_ptr": a16}, **flags)
            assert len(one) == 1, f"worker {worker}, launch {flags}: one config offered"
            offered[i].append(one[0])
    for i, flags in enumerate(launches):
        kept = prune(dense.matmul_configs(), {"a_ptr": a16}, **flags)
        assert len(kept) <= workers, f"{flags}: {len(kept)} configs kept, more than the {workers} workers"
        assert {str(c) for c in offered[i]} == {str(c) for c in kept}, f"{flags}: the workers cover every kept config"


def test_host_path_runs_the_gpu_launch_path_with_kernels_stubbed():
    """benchmarks/host_path.py: manualbp's triton path on CPU tensors, every launch a no-op, timed per step."""
    import subprocess

    reason = manualbp.backends.interpreter_numpy_reason()
    if reason:  # the script runs manualbp's triton path on CPU tensors, which needs the interpreter
        pytest.skip(reason)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_path.py"), "--steps", "5", "--rounds",
                             "3", "--cprofile", "5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {line[:30].strip(): float(line[30:]) for line in result.stdout.splitlines()
            if line.startswith(("nn ", "manualbp "))}
    assert set(rows) == {"nn Linear+ReLU (CPU math)", "manualbp Linear relu", "manualbp MLP 2 layers gelu"}, rows
    assert all(value > 0 for value in rows.values()), f"µs per step: {rows}"
    assert "launch.py" in result.stdout and "(run)" in result.stdout, "the profile shows the launch plans taken"
    assert "compiled" in result.stdout and "interpreted" not in result.stdout, "... with the compiled launcher"


def test_host_breakdown_needs_a_gpu_and_its_launch_parts_run_on_the_stubbed_path():
    """benchmarks/host_breakdown.py times a GPU machine's host work (gpu_check.sh runs it there): without CUDA it
    refuses with the reason. Its launch parts, dry-run on the CPU in a fresh process on host_path.py's stubbed GPU
    path (plans with the compiled launcher, every launch a no-op): each part runs, and the launches it replays are
    the step's warm ones, through their plans."""
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("on a GPU the script runs in benchmarks/gpu_check.sh")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_breakdown.py")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "CUDA is not available" in result.stderr, result.stderr
    reason = manualbp.backends.interpreter_numpy_reason()
    if reason:
        pytest.skip(reason)
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
import host_path
host_path.stub_kernels()
import torch, manualbp, host_breakdown
from manualbp.triton_kernels import launch
torch.cuda.synchronize = lambda: None
model = manualbp.Linear(64, 96, activation="relu", backend="triton")
x, grad = torch.randn(40, 64, requires_grad=True), torch.randn(40, 96)
step = lambda: model(x).backward(grad)
step()
parts = host_breakdown.launch_parts(launch, step)
for name, part in parts.items():
    part()
    print("part", name)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    parts = [line[5:] for line in result.stdout.splitlines() if line.startswith("part ")]
    assert parts == ["3 warm launches (plans)", "  their keys + lookups", "  their addresses",
                     "  their JITFunction.run",
                     "  compiled launcher, tensors", "  compiled launcher, addresses"], result.stdout
    assert "roles ['forward', 'grad_x', 'grad_weight'], launchers ['compiled']" in result.stdout, result.stdout


def test_problem_names_read_back():
    """Problem.from_name (profile_step.py's and host_breakdown.py's --problem) inverts Problem.name, for every
    problem bench_dense.py runs, and refuses a name it cannot read."""
    bench = _load()
    for problem in bench.gpu_problems(["relu", "gelu"]) + bench.cpu_problems(["relu", "gelu"]):
        assert bench.Problem.from_name(problem.name, problem.activation) == problem, problem.name
    with pytest.raises(ValueError, match="linearMxINxOUT"):
        bench.Problem.from_name("linear8192x1024", "relu")


def test_backward_ways_run_in_the_interpreter_and_agree(tmp_path, capsys):
    """bench_backward.py at a small size through Triton's CPU interpreter: every way of forming δ, both layers,
    one CSV row each, every error within float32's reach of the float64 gradients (a wrong way shows there)."""
    bench_dense_module = _load()  # noqa: F841 - bench_backward imports it by name
    spec = importlib.util.spec_from_file_location("bench_backward", ROOT / "benchmarks" / "bench_backward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reason = manualbp.backends.triton_unavailable_reason(torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(f"the ways run manualbp's Triton kernels: {reason}")
    assert module.main(["--problems", "linear40x24x36", "--activations", "gelu,relu,identity", "--out-dir",
                        str(tmp_path), "--rep-ms", "1"]) == 0, "exit status"
    rows = list(csv.DictReader(open(next(tmp_path.glob("bench_backward_*.csv")))))
    ways = sorted({(r["activation"], r["layer"], r["way"]) for r in rows})
    expected = [(act, layer, way) for act in ("gelu", "relu") for layer in ("first", "hidden")
                for way in ("fused", "delta+dW", "unfused", "eager")]
    expected += [("identity", layer, way) for layer in ("first", "hidden") for way in ("fused", "eager")]  # no δ
    assert ways == sorted(expected), f"rows: {ways}"
    for row in rows:
        assert float(row["max_rel_err"]) < 1e-5, f"{row['activation']} {row['layer']} {row['way']}: error"
    assert "max rel err" in capsys.readouterr().out, "the table"
    if importlib.util.find_spec("matplotlib") is not None:
        assert list(tmp_path.glob("bench_backward_*.png")), "the plot beside the CSV"


def test_gpu_launch_check_script_parses_and_its_calls_exist(tmp_path):
    """benchmarks/gpu_launch_check.sh, dry-run on the CPU: bash parses it; every script it runs exists and takes
    every option the script gives it (each one's --help); its summary reads the figures out of a log written as
    the scripts print them, and says which were not measured."""
    import re
    import shutil
    import subprocess

    script = ROOT / "benchmarks" / "gpu_launch_check.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, f"bash -n: {result.stderr}"
    text = script.read_text().replace("\\\n", " ")
    calls = re.findall(r"\$py (benchmarks/\w+\.py)([^|&\n]*)", text)
    assert {name for name, _ in calls} >= {"benchmarks/host_breakdown.py", "benchmarks/profile_step.py",
                                          "benchmarks/bench_overhead.py", "benchmarks/bench_dense.py",
                                          "benchmarks/warm_caches.py"}, calls
    options = {}
    for name, arguments in calls:
        options.setdefault(name, set()).update(re.findall(r"(--[a-z][a-z-]*)", arguments))
    for name, given in options.items():  # one --help each
        helped = subprocess.run([sys.executable, str(ROOT / name), "--help"], capture_output=True, text=True,
                                timeout=120)
        assert helped.returncode == 0, f"{name} --help: {helped.stderr[-2000:]}"
        for option in given:
            assert option in helped.stdout, f"{name} takes no {option}"
    summary = text.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    log = ("=== profile_step relu at 260 s\n## eager: host 0.250 ms/call, wall 0.461 ms/call\n"
           "## manualbp: host 0.300 ms/call, wall 0.500 ms/call\n=== profile_step gelu at 300 s\n"
           "# a warm launch: 12.3 µs, 1.40x an empty 8-tensor launch through JITFunction.run\n")
    tests = "tests/test_launch.py::test_cuda_graph_replays_eager_results PASSED\n"
    paths = [tmp_path / "gpu_launch_check.log", tmp_path / "gpu_launch_tests.log"]
    for path, content in zip(paths, (log, tests)):
        path.write_text(content)
    result = subprocess.run([sys.executable, "-", *map(str, paths)], input=summary, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "warm launch 12.3 µs = 1.40x the empty 8-tensor launch" in out, out
    assert "profile_step relu: manualbp host 0.300 ms against eager's 0.250 ms (target <= eager's: MISSED)" in out, out
    assert "profile_step gelu: not measured" in out, out
    assert "test_cuda_graph_replays_eager_results: PASSED" in out and "test_reduce_overhead_matches_eager: not run" \
        in out, out


def test_gated_mlp_rows_with_the_saved_memory_column(tmp_path, capsys):
    """The gated MLP problem on the CPU, tiny: eager (transformers' LlamaMLP written out), manualbp.GatedMLP and its
    recompute=True, each checked against float64; the saved-MiB column is what each keeps for the backward, M·I
    float32 elements per tensor: eager 4 (Z_g, f(Z_g), Z_u, A), GatedMLP 3 (Z_g, Z_u, A), recompute 1 (A)."""
    bench = _load()
    assert bench.main(["--device", "cpu", "--dtypes", "fp32", "--modes", "fwd+bwd", "--problems", "gated1024x256x688",
                       "--impls", "eager,manualbp,manualbp-recompute", "--rep-ms", "5", "--out-dir", str(tmp_path),
                       "--tag", "gated"]) == 0, "exit status"
    rows = {r["impl"]: r for r in csv.DictReader(open(tmp_path / "bench_dense_gated.csv"))}
    assert sorted(rows) == ["eager", "manualbp", "manualbp-recompute"], f"rows: {sorted(rows)}"
    unit = 1024 * 688 * 4 / 2**20
    saved = {impl: float(row["saved_mib"]) / unit for impl, row in rows.items()}
    assert saved == pytest.approx({"eager": 4, "manualbp": 3, "manualbp-recompute": 1}), f"saved, in M·I·4 B: {saved}"
    for impl, row in rows.items():
        assert 0 < float(row["max_rel_err"]) < 1e-5, f"{impl}: error {row['max_rel_err']}"
        assert float(row["tflops"]) == pytest.approx(3 * 6 * 1024 * 256 * 688 / float(row["median_ms"]) / 1e9), \
            f"{impl}: three products counted"
    assert "saved MiB" in capsys.readouterr().out, "the column in the table"
    assert bench.Problem.from_name("gated8192x4096x14336", "relu").activation == "silu", "a gated problem is SwiGLU"
    assert {p.name for p in bench.gpu_problems(["relu"]) if p.kind == "gated"} == {
        "gated8192x4096x11008", "gated8192x4096x14336"}, "the GPU run's gated shapes"
