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


def _load_script(name: str):
    """benchmarks/<name>.py as a module (not run)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_matmul():
    _load()  # the bench_dense it imports by name
    return _load_script("bench_matmul")


def _interpreted_matmul():
    """bench_matmul.py, where it runs through Triton's CPU interpreter; else the test skips, saying why."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the script runs at full size in benchmarks/gpu_perf_check.sh")
    reason = manualbp.backends.triton_unavailable_reason(torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(f"the script runs manualbp's Triton matmul: {reason}")
    return _load_matmul()


def test_matmul_ceiling_script_writes_a_row_per_product_and_dtype(tmp_path, capsys):
    """bench_matmul.py through Triton's CPU interpreter at tiny sizes: a square product and a layer's three, each in
    the layout the layer reads it, one CSV row per product and dtype with the run's device, versions and date, the
    Triton kernel's error against float64 at its dtype's reach (a wrong product shows there); bf16 said skipped."""
    module = _interpreted_matmul()
    assert module.main(["--problems", "square40,linear48x24x40", "--dtypes", "fp32,fp16,bf16", "--out-dir",
                        str(tmp_path), "--tag", "test"]) == 0, "exit status"
    printed = capsys.readouterr().out
    assert "bf16: skipped: the CPU interpreter has no bf16 products" in printed, "bf16 skipped, saying why"
    rows = list(csv.DictReader(open(tmp_path / "bench_matmul_test.csv")))
    expected_columns = {"device", "torch", "triton", "date", "problem", "product", "symbol", "m", "n", "k", "layout",
                        "dtype", "input_precision", "first_call_s", "triton_ms", "triton_tflops", "cublas_ms",
                        "cublas_tflops", "x_cublas", "err_triton", "err_cublas", "timed_by"}
    assert expected_columns <= set(rows[0]), f"columns missing: {expected_columns - set(rows[0])}"
    found = [(r["problem"], r["symbol"], r["m"], r["n"], r["k"], r["layout"], r["dtype"], r["input_precision"])
             for r in rows]
    # linear48x24x40: X [48, 24], W [40, 24], δ [48, 40]
    shapes = [("square40", "A B", "40", "40", "40", "a:row b:row"),
              ("linear48x24x40", "X Wᵀ", "48", "40", "24", "a:row b:col"),
              ("linear48x24x40", "δ W", "48", "24", "40", "a:row b:row"),
              ("linear48x24x40", "δᵀ X", "40", "24", "48", "a:col b:row")]
    assert found == [(*shape, dtype, precision) for dtype, precision in (("fp32", "ieee"), ("fp16", "fp16"))
                     for shape in shapes], f"rows: {found}"
    for row in rows:
        what = f"{row['problem']} {row['symbol']} {row['dtype']}"
        assert row["torch"] == torch.__version__ and row["date"], f"{what}: versions and date"
        limit = 1e-5 if row["dtype"] == "fp32" else 1e-2
        assert 0 < float(row["err_triton"]) < limit, f"{what}: Triton's error {row['err_triton']}"
        assert float(row["triton_ms"]) > 0 and float(row["x_cublas"]) > 0, f"{what}: times"
        flops = 2 * int(row["m"]) * int(row["n"]) * int(row["k"])
        assert float(row["triton_tflops"]) == pytest.approx(flops / float(row["triton_ms"]) / 1e9), f"{what}: TFLOP/s"
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench_matmul_test.png").exists(), "the plot beside the CSV"


def test_matmul_products_are_the_layers(capsys):
    """The three products' operands are what a layer's matmuls read (X Wᵀ, δ W, δᵀ X of the same X, W, δ shapes),
    the GPU run's default problems are the issue's, and bad names are refused before anything runs."""
    module = _load_matmul()
    assert module.products("linear8192x1024x4096", module.PRODUCTS) == [
        ("forward", 8192, 4096, 1024), ("grad_x", 8192, 1024, 4096), ("grad_weight", 4096, 1024, 8192)], "shapes"
    assert module.products("square4096", module.PRODUCTS) == [("square", 4096, 4096, 4096)], "the square"
    assert module.GPU_PROBLEMS.split(",") == ["square4096", "linear8192x1024x4096", "linear8192x4096x1024"], \
        "the GPU run's problems"
    x, weight = module.operands("forward", 6, 5, 4, "cpu", torch.float32)
    delta, weight_too = module.operands("grad_x", 6, 4, 5, "cpu", torch.float32)
    delta_t, x_too = module.operands("grad_weight", 5, 4, 6, "cpu", torch.float32)
    assert (x.shape, weight.shape, weight.t().is_contiguous()) == ((6, 4), (4, 5), True), "X [M, IN], W [OUT, IN]"
    assert (delta.shape, weight_too.shape, weight_too.is_contiguous()) == ((6, 5), (5, 4), True), "δ [M, OUT], W"
    assert (delta_t.shape, delta_t.t().is_contiguous(), x_too.shape) == ((5, 6), True, (6, 4)), "δ [M, OUT], X"
    for bad in (["--problems", "mlp8192x1024x4096"], ["--problems", "square"], ["--products", "jvp"],
                ["--dtypes", "fp8"], ["--size", "0"], ["--size", "8", "--problems", "square8"]):
        with pytest.raises(SystemExit):
            module.main(bad)


def test_matmul_warm_only_runs_each_product_and_writes_nothing(monkeypatch, tmp_path, capsys):
    """--warm-only (the GPU run's cache warming, one config per worker): each product runs once, no timing, no CSV."""
    module = _interpreted_matmul()
    dense = manualbp.backends.kernels()
    from manualbp.triton_kernels import gated

    # warm_caches.offer_one_config replaces both (restored after the test)
    monkeypatch.setattr(dense, "_prune_configs", dense._prune_configs)
    monkeypatch.setattr(gated, "_prune_configs", gated._prune_configs)
    assert module.main(["--warm-only", "--worker", "1", "--workers", "2", "--problems", "linear40x24x36",
                        "--dtypes", "fp32", "--out-dir", str(tmp_path)]) == 0, "exit status"
    dense._autotuned_matmul.cache_clear()  # built with the replaced pruning
    gated._autotuned.cache_clear()
    assert "warm bench_matmul worker 1/2: 3 products x 1 dtypes" in capsys.readouterr().out, "the worker's line"
    assert list(tmp_path.iterdir()) == [], "nothing written"
    with pytest.raises(SystemExit):
        module.main(["--warm-only", "--worker", "2", "--workers", "2"])


def _load_overhead():
    return _load_script("bench_overhead")


def test_overhead_run_writes_csv_rows(tmp_path, capsys):
    bench = _load_overhead()
    rc = bench.main(["--device", "cpu", "--rounds", "5", "--calls", "1", "--out-dir", str(tmp_path), "--tag", "test"])
    assert rc == 0, "exit status"
    printed = capsys.readouterr().out
    assert "# manualbp call-overhead benchmark" in printed and "torch" in printed, "header with versions"
    rows = list(csv.DictReader(open(tmp_path / "bench_overhead_test.csv")))
    cases = sorted((r["problem"], r["mode"], r["impl"]) for r in rows)
    expected = sorted([(p, m, i) for p in ("linear", "mlp", "gated") for m in ("fwd", "fwd+bwd")
                       for i in ("nn", "manualbp")]
                      + [("op", "fwd", "nn"), ("op", "fwd", "custom_op"), ("op", "fwd", "manualbp")])
    assert cases == expected, f"rows: {cases}"
    for row in rows:
        assert float(row["median_us"]) > 0, "median time"
        assert row["backend"] == "reference", "the CPU times the reference backend"
        if row["impl"] == "nn":
            assert float(row["ratio_to_nn"]) == pytest.approx(1.0), "nn's ratio to itself"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_overhead_gated_problem_compares_like_with_like(backend):
    """bench_overhead's gated problem: manualbp.GatedMLP (SwiGLU) and its nn twin (bench_dense's GatedEager, loaded
    with the GatedMLP's state_dict) hold the same parameters, and a step of each gives the same output and
    gradients: within twice PyTorch's own float32 error against the twin in float64 (the reference backend runs
    PyTorch's own ops: the same bits)."""
    from checks import assert_close_to_float64

    if backend == "triton":
        reason = manualbp.backends.triton_unavailable_reason(torch.device("cpu"), torch.float32)
        if reason:
            pytest.skip(reason)
    bench = _load_overhead()
    ours = bench.build("gated", "manualbp", torch.device("cpu"), torch.float32)
    theirs = bench.build("gated", "nn", torch.device("cpu"), torch.float32)
    assert isinstance(ours, manualbp.GatedMLP) and ours.activation.name == "silu", f"ours: {ours}"
    assert type(theirs).__name__ == "GatedEager" and isinstance(theirs.act_fn, torch.nn.SiLU), f"theirs: {theirs}"
    assert ours.state_dict().keys() == theirs.state_dict().keys(), "the same state_dict keys"
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), f"{name}: the same values"
    exact = bench.build("gated", "nn", torch.device("cpu"), torch.float64)
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    torch.manual_seed(3)
    x = torch.randn(bench.ROWS, bench.WIDTH)
    grad = torch.randn(bench.ROWS, bench.WIDTH)
    results = {}
    for label, model, dtype in (("ours", ours, torch.float32), ("theirs", theirs, torch.float32),
                                ("exact", exact, torch.float64)):
        leaf = x.to(dtype).detach().clone().requires_grad_(True)
        with manualbp.use_backend(backend):
            out = model(leaf)
            out.backward(grad.to(dtype))
        results[label] = [out.detach(), leaf.grad, *(p.grad for p in model.parameters())]
    names = ["output", "x.grad", *(name for name, _ in ours.named_parameters())]
    assert len(results["ours"]) == len(results["theirs"]) == len(names) == 5, f"compared: {names}"
    for name, mine, their, exact_ in zip(names, results["ours"], results["theirs"], results["exact"]):
        if backend == "reference":
            assert torch.equal(mine, their), f"reference: {name} bitwise equal to nn's"
        assert_close_to_float64(f"{backend}: {name}", mine, their, exact_)


def test_overhead_call_chain_reaches_the_reference(capsys):
    bench = _load_overhead()
    assert bench.main(["--device", "cpu", "--depth"]) == 0, "exit status"
    frames = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert frames[0] == "manualbp/modules.py:forward", f"starts at Linear.forward: {frames}"
    assert frames[-1] == "manualbp/reference.py:pre_activation", f"ends where the kernel is called: {frames}"


def _counter_and_helper(tmp_path, triton: bool = False):
    """count_instructions.py as a module and its valgrind helper built in tmp_path, or a skip saying what is missing
    (triton: the stubbed triton path, which takes CPU tensors through the interpreter's kernels)."""
    import shutil

    counter = _load_script("count_instructions")
    if (shutil.which("cc") or shutil.which("gcc")) is None:
        pytest.skip("no C compiler to build the valgrind helper")
    if not pathlib.Path("/usr/include/valgrind/callgrind.h").exists():
        pytest.skip("valgrind's callgrind.h is not installed")
    reason = manualbp.backends.interpreter_numpy_reason() if triton else None
    if reason:
        pytest.skip(reason)
    return counter, counter.build_helper(str(tmp_path))


def test_instruction_counter_child_runs_natively(tmp_path):
    """count_instructions.py's measured loop, outside valgrind (its client requests then do nothing): the
    helper builds and the child runs bench_overhead's case, so the script keeps up with that harness."""
    import subprocess

    script = ROOT / "benchmarks" / "count_instructions.py"
    counter, helper = _counter_and_helper(tmp_path)
    for problem in ("linear", "mlp", "gated"):
        result = subprocess.run([sys.executable, str(script), "--child", helper, problem, "manualbp", "fwd+bwd", "3",
                                 ""], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{problem}: child failed:\n{result.stderr[-2000:]}"
        assert "manualbp from" in result.stderr, f"{problem}: the child names the manualbp it counted"
    assert counter.PROBLEMS == ("linear", "mlp", "gated"), "the problems it counts"
    with pytest.raises(SystemExit):
        counter.main(["--problems", "linear,gatd"])  # refused before valgrind is asked for


def test_instruction_counter_takes_the_gated_problem_on_the_stubbed_triton_path(tmp_path):
    """count_instructions.py --problems gated: the child counts GatedMLP's step on the triton path with every launch
    stubbed (host_path.stub_kernels stubs the gated kernels too), and --breakdown records the gated layer's
    computation and launchers: a step is 2 computations (forward, backward) and 2 launchers per layer (GatedMLP's
    gated layer and its down_proj), 6 launches (the gated forward, ∂C/∂X, ∂C/∂W; down_proj's three)."""
    import subprocess

    _, helper = _counter_and_helper(tmp_path, triton=True)
    script = str(ROOT / "benchmarks" / "count_instructions.py")
    result = subprocess.run([sys.executable, script, "--child", helper, "gated", "manualbp-triton", "fwd+bwd", "3", ""],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"child failed:\n{result.stderr[-2000:]}"
    result = subprocess.run([sys.executable, script, "--child", helper, "breakdown", "gated", "manualbp-triton", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"breakdown child failed:\n{result.stderr[-2000:]}"
    lines = result.stderr.splitlines()
    assert "calls ops=4,launchers=4,launch=6" in lines, f"the calls recorded a step: {lines[-5:]}"


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
    """benchmarks/warm_caches.py: worker i offers each launch one config, the i-th (mod) of those kept, the dense
    layer's matmuls and the gated layer's."""
    import torch

    monkeypatch.setattr(sys, "path", list(sys.path))  # warm_caches.py puts benchmarks/ on it
    _load()  # the bench_dense it imports
    spec = importlib.util.spec_from_file_location("warm_caches", ROOT / "benchmarks" / "warm_caches.py")
    warm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(warm)
    from manualbp.triton_kernels import dense, gated

    monkeypatch.setattr(dense, "_shared_memory_bytes", lambda index: 227 * 1024)  # an H100's
    monkeypatch.setattr(dense, "_prune_configs", dense._prune_configs)  # restored after the test
    monkeypatch.setattr(gated, "_prune_configs", gated._prune_configs)
    prune, prune_gated = dense._prune_configs, gated._prune_configs
    a16 = torch.empty(1, 1, dtype=torch.bfloat16)
    launches = [dict(), dict(A_PROLOGUE=True, TMA_OK=True), dict(ROW_SUMS=True, A_PROLOGUE=True, TMA_OK=True)]
    workers = 9
    gated_launches = [(role, flags) for role in gated._KERNELS for flags in (dict(), dict(DELTAS_STORED=True))]
    offered = {i: [] for i in range(len(launches) + len(gated_launches))}
    for worker in range(workers):
        monkeypatch.setattr(dense, "_prune_configs", prune)
        monkeypatch.setattr(gated, "_prune_configs", prune_gated)
        warm.offer_one_config(dense, worker)
        for i, flags in enumerate(launches):
            one = dense._prune_configs(dense.matmul_configs(), {"a_ptr": a16}, **flags)
            assert len(one) == 1, f"worker {worker}, launch {flags}: one config offered"
            offered[i].append(one[0])
        for i, (role, flags) in enumerate(gated_launches, start=len(launches)):
            one = gated._prune_configs(role, gated.matmul_configs(role, 2), {"x_ptr": a16}, **flags)
            assert len(one) == 1, f"worker {worker}, {role} {flags}: one config offered"
            offered[i].append(one[0])
    gated._autotuned.cache_clear()  # offer_one_config cleared it: none built with the replaced pruning stays
    for i, flags in enumerate(launches):
        kept = prune(dense.matmul_configs(), {"a_ptr": a16}, **flags)
        assert len(kept) <= workers, f"{flags}: {len(kept)} configs kept, more than the {workers} workers"
        assert {str(c) for c in offered[i]} == {str(c) for c in kept}, f"{flags}: the workers cover every kept config"
    for i, (role, flags) in enumerate(gated_launches, start=len(launches)):
        kept = prune_gated(role, gated.matmul_configs(role, 2), {"x_ptr": a16}, **flags)
        assert len(kept) <= workers, f"{role} {flags}: {len(kept)} configs kept, more than the {workers} workers"
        assert {str(c) for c in offered[i]} == {str(c) for c in kept}, f"{role} {flags}: every kept config covered"


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
    the step's warm ones, through launch.run."""
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
print("lookups found", [plan.role for plan, *_ in parts["  their lookups"]()])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    parts = [line[5:] for line in result.stdout.splitlines() if line.startswith("part ")]
    assert parts == ["3 warm launches (launch.run)", "  their lookups", "  their addresses",
                     "  their JITFunction.run",
                     "  compiled launcher, tensors", "  compiled launcher, addresses"], result.stdout
    assert "roles ['forward', 'grad_x', 'grad_weight'], launchers ['compiled']" in result.stdout, result.stdout
    assert "lookups found ['forward', 'grad_x', 'grad_weight']" in result.stdout, "the lookups time hits, not misses"


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


def test_kernels_only_timing_skips_on_the_cpu_and_first_layers_have_no_input_gradient(tmp_path, capsys):
    """bench_dense.py --timing host,graph --layers hidden,first on the CPU: the CUDA-graph timing is said to be
    skipped and no row claims it; each layer's rows are host-timed, checked against float64, and a first layer's
    backward counts no ∂C/∂X (its TFLOP/s from 4MNK, a hidden layer's from 6MNK)."""
    bench = _load()
    if torch.cuda.is_available():
        pytest.skip("on a GPU the graph timing runs (benchmarks/gpu_perf_check.sh)")
    assert bench.main(["--device", "cpu", "--dtypes", "fp32", "--modes", "fwd+bwd", "--activations", "gelu",
                       "--problems", "linear1024x256x1024", "--impls", "eager,manualbp", "--rep-ms", "5",
                       "--timing", "host,graph", "--layers", "hidden,first", "--out-dir", str(tmp_path),
                       "--tag", "layers"]) == 0, "exit status"
    printed = capsys.readouterr().out
    assert "--timing graph (kernels only" in printed and "skipped on the CPU" in printed, "the skip, said"
    rows = list(csv.DictReader(open(tmp_path / "bench_dense_layers.csv")))
    assert sorted((r["layer"], r["timing"], r["impl"]) for r in rows) == sorted(
        (layer, "host", impl) for layer in ("hidden", "first") for impl in ("eager", "manualbp")), "rows"
    for row in rows:
        what = f"{row['layer']} {row['impl']}"
        assert 0 < float(row["max_rel_err"]) < 1e-5, f"{what}: error {row['max_rel_err']}"
        products = 3 if row["layer"] == "hidden" else 2  # forward, ∂C/∂W, and ∂C/∂X for a hidden layer
        flops = products * 2 * 1024 * 256 * 1024
        assert float(row["tflops"]) == pytest.approx(flops / float(row["median_ms"]) / 1e9), f"{what}: FLOPs"
    assert bench.main(["--device", "cpu", "--timing", "graph", "--out-dir", str(tmp_path), "--tag", "none"]) == 0, \
        "graph timing alone on the CPU: nothing to run, not an error"
    assert not (tmp_path / "bench_dense_none.csv").exists(), "and no file"
    for bad in (["--timing", "wall"], ["--layers", "last"]):
        with pytest.raises(SystemExit):
            bench.main(["--device", "cpu", *bad])


def test_the_gpu_problem_list_has_the_prologue_crossing():
    """in_features 2048, between the K where δ formed in the loads won (1024) and lost (4096), is a GPU problem."""
    bench = _load()
    names = {p.name for p in bench.gpu_problems(["relu"])}
    assert {"linear8192x2048x4096", "linear8192x2048x1024"} <= names, f"problems: {sorted(names)}"
    assert bench.Problem.from_name("gated8192x4096x11008", "silu").flops("fwd+bwd", "first") == pytest.approx(
        3 * 6 * 8192 * 4096 * 11008 - 2 * 2 * 8192 * 4096 * 11008), "a first gated layer: no ∂C/∂X of gate and up"


def test_gpu_perf_check_script_parses_and_its_calls_exist():
    """benchmarks/gpu_perf_check.sh, dry-run on the CPU: bash parses it; every script it runs exists and takes every
    option the script gives it (each one's --help), and each problem it names is one bench_dense.py runs on a GPU;
    its steps' time limits fit the limit its header states."""
    import re
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = ROOT / "benchmarks" / "gpu_perf_check.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, f"bash -n: {result.stderr}"
    text = script.read_text().replace("\\\n", " ")
    calls = re.findall(r"\$py (benchmarks/\w+\.py)([^|&\n]*)", text)
    assert {name for name, _ in calls} == {"benchmarks/bench_matmul.py", "benchmarks/bench_dense.py",
                                          "benchmarks/warm_caches.py", "benchmarks/bench_backward.py",
                                          "benchmarks/perf_targets.py"}, calls
    options = {}
    for name, arguments in calls:
        options.setdefault(name, set()).update(re.findall(r"(--[a-z][a-z-]*)", arguments))
    for name, given in options.items():
        helped = subprocess.run([sys.executable, str(ROOT / name), "--help"], capture_output=True, text=True,
                                timeout=120)
        assert helped.returncode == 0, f"{name} --help: {helped.stderr[-2000:]}"
        for option in given:
            assert option in helped.stdout, f"{name} takes no {option}"
    bench = _load()
    known = {p.name for p in bench.gpu_problems(["relu", "gelu"])}
    named = set(re.findall(r"(?:linear|mlp|gated)\d+x\d+x\d+", text))
    assert named and named <= known, f"problems bench_dense.py does not run on a GPU: {sorted(named - known)}"
    limit = int(re.search(r"DEFAULT_SECONDS=(\d+)", text).group(1))
    caps = [int(c) for c in re.findall(r"capped (\d+)", text)]
    assert len(caps) == 6 and sum(caps) + 15 <= limit - 10, f"step limits {caps} (+15 s install) within {limit} s"
    assert f"default {limit} s" in text, "the header states the limit"




def test_perf_targets_says_met_missed_and_not_measured(tmp_path, capsys):
    """perf_targets.py on hand-written rows: a ratio above its bound is met, below it missed, an error ratio above
    1.5 missed; rows before --since are not counted; a target without rows is NOT MEASURED, never met."""
    targets = _load_script("perf_targets")
    date, old = "2026-12-08 10:00 UTC", "2026-12-04 17:40 UTC"
    matmul = tmp_path / "bench_matmul.csv"
    with open(matmul, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["date", "problem", "symbol", "dtype", "x_cublas", "err_triton",
                                                    "err_cublas"])
        writer.writeheader()
        writer.writerow(dict(date=date, problem="square4096", symbol="A B", dtype="bf16", x_cublas=0.97,
                             err_triton=3e-3, err_cublas=3e-3))
        writer.writerow(dict(date=date, problem="square4096", symbol="A B", dtype="fp32-tf32", x_cublas=0.5,
                             err_triton=1e-3, err_cublas=3e-4))
        writer.writerow(dict(date=old, problem="square4096", symbol="A B", dtype="fp32", x_cublas=0.95,
                             err_triton=3e-6, err_cublas=3e-6))
    dense = tmp_path / "bench_dense.csv"
    with open(dense, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["date", "problem", "activation", "dtype", "mode", "impl", "layer",
                                                    "timing", "speedup_vs_eager", "speedup_vs_compile",
                                                    "err_vs_eager"])
        writer.writeheader()
        writer.writerow(dict(date=date, problem="linear8192x1024x4096", activation="relu", dtype="bf16",
                             mode="fwd+bwd", impl="manualbp", layer="hidden", timing="graph", speedup_vs_eager=1.2,
                             speedup_vs_compile=1.3, err_vs_eager=0.9))
        writer.writerow(dict(date=date, problem="linear8192x1024x4096", activation="relu", dtype="bf16",
                             mode="fwd+bwd", impl="manualbp", layer="hidden", timing="host", speedup_vs_eager=0.8,
                             speedup_vs_compile=1.1, err_vs_eager=0.9))
    assert targets.main(["--since", "2026-12-08 09:59 UTC", "--matmul", str(matmul), "--dense", str(dense),
                         str(tmp_path / "no_such.csv")]) == 0, "exit status"
    lines = capsys.readouterr().out.splitlines()

    def verdict(target, *words):
        found = [line for line in lines if line[:12].strip() == target and all(word in line for word in words)]
        assert len(found) == 1, f"one {target} line with {words}: {found}"
        return found[0].split()[-1] if not found[0].endswith("NOT MEASURED") else "NOT MEASURED"

    assert verdict("matmul", "square4096 A B bf16") == "met", "0.97 >= 0.95"
    assert verdict("matmul", "square4096 A B fp32-tf32") == "MISSED", "0.5 < 0.8"
    assert verdict("matmul error", "fp32-tf32") == "MISSED", "Triton's error 3.3x cuBLAS's"
    assert verdict("matmul", "fp32: no row") == "NOT MEASURED", "the fp32 row is of an earlier run"
    assert verdict("kernels", "linear8192x1024x4096 hidden speedup_vs_eager relu") == "met", "1.2 >= 1.15"
    assert verdict("kernels", "linear8192x1024x4096 first") == "NOT MEASURED", "no first-layer rows"
    assert verdict("kernels", "linear8192x16384x4096") == "NOT MEASURED", "no 16384-wide rows"
    assert verdict("host", "linear8192x1024x4096 hidden speedup_vs_compile relu") == "met", "1.1 >= 1.0"
    assert verdict("host", "mlp8192x1024x4096") == "NOT MEASURED", "no MLP rows"
    assert "no file" in "\n".join(lines) and "no_such.csv" in "\n".join(lines), "the missing file said"
    summary = lines[-1]
    assert summary.startswith("targets: ") and "missed" in summary and "not measured" in summary, summary


class _FakeCuda:
    """What graph_times asks of torch.cuda, on the CPU: streams and synchronisation do nothing, a capture runs the
    step once as it is, and each replay of the graph advances the events' clock by REPLAY_MS."""

    REPLAY_MS = 0.25

    def __init__(self):
        self.clock = 0.0
        self.captured = []  # per capture: the .grad of each reset tensor as the capture began
        fake = self

        class Stream:
            def wait_stream(self, other):
                pass

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self, stream=None):
                self.at = fake.clock

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.at - self.at

        class CUDAGraph:
            def replay(self):
                fake.clock += fake.REPLAY_MS

        self.Stream, self.Event, self.CUDAGraph = Stream, Event, CUDAGraph

    def install(self, monkeypatch, reset_of):
        import contextlib

        monkeypatch.setattr(torch.cuda, "Stream", self.Stream)
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", self.CUDAGraph)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *args: self.Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)

        @contextlib.contextmanager
        def graph(cuda_graph, **kwargs):
            self.captured.append([t.grad for t in reset_of()])
            yield

        monkeypatch.setattr(torch.cuda, "graph", graph)


def test_kernels_only_rows_replay_a_capture_of_a_fresh_step(monkeypatch, capsys):
    """bench_dense's graph timing, its logic on the CPU with torch.cuda's capture and events faked (no GPU here: the
    timing itself is unmeasured): each implementation's step is captured once with every gradient cleared (a replay
    computes a fresh step, not an accumulation), the per-replay time is the events' time over the replays, its rows
    say timing=graph beside the host rows, and their speedups compare graph times with graph times."""
    bench = _load()
    cases, last = {}, []
    real_prepare = bench.prepare

    def prepare(impl, *args, **kwargs):
        case = cases[impl] = real_prepare(impl, *args, **kwargs)
        step = case.fn
        case.fn = lambda: (last.append(impl), step())  # which case a capture (after its warm-up) is of
        return case

    monkeypatch.setattr(bench, "prepare", prepare)
    fake = _FakeCuda()
    fake.install(monkeypatch, lambda: cases[last[-1]].reset)
    problem = bench.Problem.from_name("linear64x48x80", "gelu")
    manualbp.set_backend("reference")
    try:
        rows = bench.measure(problem, "fwd+bwd", "hidden", "fp32", ["eager", "manualbp"], ["host", "graph"],
                             torch.device("cpu"), 5)
    finally:
        manualbp.set_backend(None)
    graph_rows = {r["impl"]: r for r in rows if r["timing"] == "graph"}
    assert sorted(graph_rows) == ["eager", "manualbp"], f"graph rows: {[(r['impl'], r['timing']) for r in rows]}"
    assert sorted(r["impl"] for r in rows if r["timing"] == "host") == ["eager", "manualbp"], "host rows beside"
    assert len(fake.captured) == 2, f"one capture per implementation: {len(fake.captured)}"
    for grads in fake.captured:
        assert all(g is None for g in grads), "every gradient cleared before the capture"
    for impl, row in graph_rows.items():
        assert float(row["median_ms"]) == pytest.approx(_FakeCuda.REPLAY_MS), f"{impl}: time per replay"
        assert float(row["speedup_vs_eager"]) == pytest.approx(1.0), f"{impl}: against eager's graph time"
        assert 0 < float(row["max_rel_err"]) < 1e-5, f"{impl}: checked against float64"
    case = cases["eager"]
    case.fn()  # gradients present, as a host-timed call leaves them
    assert bench.graph_times(case, 5) == pytest.approx((_FakeCuda.REPLAY_MS,) * 3), "median, p20, p80 per replay"
    assert all(t.grad is None for t in case.reset), "the gradients the capture assigned are dropped with the graph"
    assert " graph " in capsys.readouterr().out, "the table's rows say their timing"


def _load_models():
    """benchmarks/bench_models.py, with transformers (it builds the blocks from their configs) and the interpreter."""
    from checks import optional_import

    optional_import("transformers", "transformers is a test dependency (pip install .[test])")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the script runs at the models' widths (docs/development.md's plan for a GPU run)")
    reason = manualbp.backends.triton_unavailable_reason(torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(f"the converted blocks run manualbp's Triton kernels: {reason}")
    _load()  # the bench_dense it imports
    spec = importlib.util.spec_from_file_location("bench_models", ROOT / "benchmarks" / "bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converted_blocks_run_in_the_interpreter_with_saved_bytes_and_errors(tmp_path, capsys):
    """bench_models.py at its CPU size: every block eager and convert()ed (the triton backend, interpreted), one row
    each with the CSV's columns; the saved bytes are those the blocks keep (M·I float32 elements per tensor: the
    gated blocks eager 4, manualbp 3; BERT's feed-forward Z and A of the GELU and LayerNorm's input, mean and rstd
    either way; GPT-2's fused layer Z and A, its NewGELU in separate ops more), and each error against the float64
    block is within float32's rounding bound and manualbp's within twice eager's (tests/checks.py's rule)."""
    bench = _load_models()
    assert bench.main(["--impls", "eager,manualbp", "--rep-ms", "1", "--out-dir", str(tmp_path), "--tag", "test"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "bench_models_test.csv")))
    assert [(r["block"], r["impl"]) for r in rows] == [(b, i) for b in ("bert", "gpt2", "llama", "gemma", "phi3")
                                                       for i in ("eager", "manualbp")], "a row per block and impl"
    columns = ("device", "torch", "triton", "manualbp", "backend", "date", "block", "m", "dims", "dtype", "mode",
               "impl", "median_ms", "p20_ms", "p80_ms", "tflops", "saved_mib", "max_rel_err", "worst",
               "speedup_vs_eager", "speedup_vs_compile", "err_vs_eager", "fused")
    assert list(rows[0]) == list(columns), f"columns: {list(rows[0])}"
    m = bench.CPU_SHAPE[0] * bench.CPU_SHAPE[1]
    mib = 4 / 2**20  # float32
    by = {(r["block"], r["impl"]): r for r in rows}
    for row in rows:
        name, impl = row["block"], row["impl"]
        d, h = map(int, row["dims"].split("x"))
        assert (d, h) == bench.WIDTHS[name][1] and int(row["m"]) == m, f"{name}: the CPU's widths and tokens"
        assert row["backend"] == "triton" and row["dtype"] == "fp32" and row["mode"] == "fwd+bwd", f"{name} {impl}"
        assert float(row["median_ms"]) > 0 and float(row["tflops"]) > 0, f"{name} {impl}: timed"
        products = 3 if name in bench.GATED else 2
        assert float(row["tflops"]) == pytest.approx(products * 6 * m * d * h / float(row["median_ms"]) / 1e9), \
            f"{name} {impl}: {products} products counted"
        saved = float(row["saved_mib"])
        if name in bench.GATED:
            expected = {"eager": 4, "manualbp": 3}[impl] * m * h * mib
            assert saved == pytest.approx(expected), f"{name} {impl}: saved {saved} MiB, expected {expected}"
        elif name == "bert":
            expected = (2 * m * h + m * d + 2 * m) * mib
            assert saved == pytest.approx(expected), f"{name} {impl}: saved {saved} MiB, expected {expected}"
        elif impl == "manualbp":
            assert saved == pytest.approx(2 * m * h * mib), f"gpt2: the fused c_fc keeps Z and A, saved {saved}"
        else:
            assert saved > 2 * m * h * mib, f"gpt2 eager: NewGELU's separate ops keep more than Z and A: {saved}"
        err = float(row["max_rel_err"])
        # γ_n of float32 sums as long as the longest here (M tokens for ∂C/∂W, h for ∂C/∂x), per product passed
        bound = products * max(m, d, h) * torch.finfo(torch.float32).eps / 2
        assert 0 < err <= bound, f"{name} {impl}: error {err} against float64 (bound {bound:.2e}, at {row['worst']})"
        assert row["worst"] != "", f"{name} {impl}: where the error is largest"
    for name in bench.WIDTHS:
        eager, ours = by[(name, "eager")], by[(name, "manualbp")]
        assert float(ours["max_rel_err"]) <= 2 * float(eager["max_rel_err"]), f"{name}: error within twice eager's"
        assert float(eager["speedup_vs_eager"]) == pytest.approx(1.0), f"{name}: eager's speedup over itself"
        assert eager["fused"] == "" and ours["fused"] == {
            "bert": "Linear + activation(gelu)", "gpt2": "Linear + activation(gelu_tanh)", "llama": "gated MLP(silu)",
            "gemma": "gated MLP(gelu_tanh)", "phi3": "fused gate_up(silu)"}[name], f"{name}: {ours['fused']!r}"
    assert "CHECK" not in printed and "FAILED" not in printed, "no row flagged or failed"
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench_models_test.png").exists(), "the plot beside the CSV"


def test_converted_block_against_torch_compile(tmp_path):
    """The compile row: torch.compile of the unconverted GPT-2 MLP, its saved bytes counted by the same hooks (its
    graph keeps less than eager's NewGELU in separate ops) and its error against float64; manualbp's speedup vs it."""
    bench = _load_models()
    assert bench.main(["--blocks", "gpt2", "--rep-ms", "1", "--out-dir", str(tmp_path), "--tag", "compile"]) == 0
    rows = {r["impl"]: r for r in csv.DictReader(open(tmp_path / "bench_models_compile.csv"))}
    assert sorted(rows) == ["compile", "eager", "manualbp"], f"rows: {sorted(rows)}"
    assert 0 < float(rows["compile"]["saved_mib"]) < float(rows["eager"]["saved_mib"]), "compile's saved bytes"
    m, (d, h) = bench.CPU_SHAPE[0] * bench.CPU_SHAPE[1], bench.WIDTHS["gpt2"][1]
    bound = 2 * max(m, d, h) * torch.finfo(torch.float32).eps / 2
    assert 0 < float(rows["compile"]["max_rel_err"]) <= bound, f"compile's error {rows['compile']['max_rel_err']}"
    assert float(rows["compile"]["speedup_vs_compile"]) == pytest.approx(1.0), "compile's speedup over itself"
    assert float(rows["manualbp"]["speedup_vs_compile"]) > 0, "manualbp against compile"


def test_converted_block_error_column_catches_a_wrong_gradient(monkeypatch, tmp_path, capsys):
    """A converted Llama MLP whose ∂C/∂W of down_proj were off by 1%: its error shows it, where, and the row is
    flagged; and a block convert() cannot fuse is a failure, not a row timing something else."""
    bench = _load_models()
    real = bench.converted

    def wrong(block):
        model, fused = real(block)
        model.down_proj.weight.register_hook(lambda grad: grad * 1.01)
        return model, fused

    monkeypatch.setattr(bench, "converted", wrong)
    assert bench.main(["--blocks", "llama", "--impls", "eager,manualbp", "--rep-ms", "1", "--out-dir", str(tmp_path),
                       "--tag", "wrong"]) == 0
    rows = {r["impl"]: r for r in csv.DictReader(open(tmp_path / "bench_models_wrong.csv"))}
    assert float(rows["manualbp"]["max_rel_err"]) > 5e-3, f"error {rows['manualbp']['max_rel_err']}"
    assert rows["manualbp"]["worst"] == "down_proj.weight", f"at {rows['manualbp']['worst']}"
    flagged = [line for line in capsys.readouterr().out.splitlines() if "CHECK" in line]
    assert len(flagged) == 1 and " manualbp " in flagged[0], f"flagged rows: {flagged}"
    with pytest.raises(ValueError, match="did not fuse"):
        real(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 4)))
    with pytest.raises(SystemExit):
        bench.main(["--blocks", "llama,t5"])
