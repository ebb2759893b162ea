"""benchmarks/precompile.py: the GPU benchmark's kernels compiled for sm_90 without a GPU, into a cache the GPU run
loads (benchmarks/triton_cache.py carries it). What can be checked here: that the pretend GPU's target is what
Triton's CUDA driver reports on sm_90, that the pretend tensors specialise as real ones do, and that a fresh process
computes the same cache keys (it loads every kernel the first compiled, also after the cache was packed, moved and
unpacked). That a GPU machine's keys match is shown only by a GPU run (triton_cache.py summary)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import precompile  # noqa: E402
import triton_cache  # noqa: E402

# One warming command: the first layer's launches at the benchmark's shape (its forward, and ∂C/∂W with δ formed in
# the loads and ∂C/∂b), at every config the autotuner keeps.
COMMAND = "warm_caches.py --problems linear8192x1024x4096 --activations relu --layers first"
GPU_PYTHON = ROOT / ".venv-gpu" / "bin" / "python"  # the GPU machine's Python, torch and Triton (docs/development.md)


def _python() -> str:
    """The GPU machine's stack where it is installed here (its keys are the ones that matter), else this one."""
    return str(GPU_PYTHON) if GPU_PYTHON.exists() else sys.executable


def _precompile(cache_dir, *extra, command=COMMAND, **environment):
    # compiled kernels, not the interpreter; the settings a GPU script's run has (its own MANUALBP_* only), not
    # whatever this process's environment holds
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("MANUALBP_")}
    env.update(environment)
    done = subprocess.run([_python(), str(ROOT / "benchmarks" / "precompile.py"), "--cache-dir", str(cache_dir),
                           "--command", command, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if "precompile: unavailable" in done.stdout:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, f"precompile ran: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return json.loads((Path(cache_dir) / "manifest.json").read_text())


def test_pretend_target_is_what_the_cuda_driver_reports_on_sm90():
    """The target the offline compile uses is the one Triton's own CudaDriver.get_current_target builds for a
    device of capability (9, 0)."""
    pytest.importorskip("triton")
    driver = pytest.importorskip("triton.backends.nvidia.driver")

    class Sm90:
        def get_current_device(self):
            return 0

        def get_device_capability(self, device):
            return (9, 0)

    assert driver.CudaDriver.get_current_target(Sm90()) == precompile.hopper_target(), \
        "the pretend GPU's target equals the CUDA driver's for sm_90"


@pytest.mark.compile_report
def test_a_fresh_process_loads_every_precompiled_kernel(tmp_path):
    """Compiled once, then in a fresh process every kernel is loaded, none compiled (the keys do not depend on the
    process); packed (metadata and binaries only), unpacked elsewhere and relocated, the same again, and the GPU
    run's probe (triton_cache_probe) records each of those loads."""
    pytest.importorskip("triton")
    first = _precompile(tmp_path / "cache", "--fresh")
    assert first["compiled"] > 0 and first["loaded"] == 0, f"the first run compiles: {first['steps']}"
    assert all(step["status"] == 0 for step in first["steps"]), f"every step ran: {first['steps']}"
    again = _precompile(tmp_path / "cache")
    assert (again["compiled"], again["loaded"]) == (0, first["compiled"]), \
        f"a fresh process loads all {first['compiled']} kernels: compiled {again['compiled']}, loaded {again['loaded']}"
    size = triton_cache.pack(str(tmp_path / "cache"), str(tmp_path / "cache.tgz"))
    assert 0 < size < 64 * 2**20, f"the pack fits what a GPU run carries: {size} bytes"
    info = triton_cache.unpack(str(tmp_path / "cache.tgz"), str(tmp_path / "moved"))
    assert info["kernels_here"] == first["compiled"], f"every kernel unpacked: {info['kernels_here']}"
    events = tmp_path / "events"  # as a GPU run records its compiles (gpu_common.sh)
    moved = _precompile(tmp_path / "moved", TRITON_CACHE_EVENTS=str(events),
                        PYTHONPATH=str(ROOT / "benchmarks" / "triton_cache_probe"))
    assert (moved["compiled"], moved["loaded"]) == (0, first["compiled"]), \
        f"the moved, binaries-only cache serves every kernel: compiled {moved['compiled']}, loaded {moved['loaded']}"
    assert triton_cache.summary(str(events)).splitlines()[0] == (
        f"triton cache: {first['compiled']} kernels loaded from the cache, 0 compiled on this machine"), \
        f"the probe recorded each load: {triton_cache.summary(str(events))}"


@pytest.mark.compile_report
def test_precompile_derives_the_split_k_kernels(tmp_path):
    """A layer whose ∂C/∂W the plan splits on the pretend H100 (2048 -> 1024 at 8192 rows: 64 output tiles for 132
    SMs, dense.grad_weight_splits gives 2): the launchers' own choice compiles split-K's kernel, at the configs its
    autotuner keeps, and its fixed-order sum, and no unsplit ∂C/∂W kernel."""
    pytest.importorskip("triton")
    manifest = _precompile(tmp_path / "cache", "--fresh",
                           command="warm_caches.py --problems linear8192x2048x1024 --activations relu --layers first")
    assert all(step["status"] == 0 for step in manifest["steps"]), f"every step ran: {manifest['steps']}"
    names = [path.name for path in (tmp_path / "cache").rglob("*.json") if not path.name.startswith("__grp__")]
    assert names.count("_grad_weight_split_kernel.json") >= 2, f"the split kernel at its configs: {sorted(names)}"
    assert names.count("_split_sum_kernel.json") == 1, f"its sum: {sorted(names)}"
    assert "_grad_weight_kernel.json" not in names, f"no unsplit ∂C/∂W kernel: {sorted(names)}"


@pytest.mark.compile_report
def test_precompile_derives_the_split_plain_product(tmp_path):
    """The plain product takes the split plan too (dense.matmul): a first layer 2048 -> 1024 at 8192 rows with δ by
    a pass (MANUALBP_DELTA_PROLOGUE=0: then ∂C/∂W = δᵀ X by dense.matmul, 64 output tiles on the pretend H100's 132
    SMs, 2 splits) compiles the split kernel and its sum, and no plain matmul kernel."""
    pytest.importorskip("triton")
    manifest = _precompile(tmp_path / "cache", "--fresh", MANUALBP_DELTA_PROLOGUE="0",
                           command="warm_caches.py --problems linear8192x2048x1024 --activations relu --layers first")
    assert all(step["status"] == 0 for step in manifest["steps"]), f"every step ran: {manifest['steps']}"
    names = [path.name for path in (tmp_path / "cache").rglob("*.json") if not path.name.startswith("__grp__")]
    assert "_delta_kernel.json" in names, f"δ by its pass (the setting reached the run): {sorted(names)}"
    assert names.count("_grad_weight_split_kernel.json") >= 2, f"the split kernel at its configs: {sorted(names)}"
    assert names.count("_split_sum_kernel.json") == 1, f"its sum: {sorted(names)}"
    assert "_matmul_kernel.json" not in names, f"no unsplit plain product: {sorted(names)}"


def test_summary_counts_loads_and_compiles(tmp_path):
    """The GPU run's record of its compiles (triton_cache_probe) counted per kernel."""
    events = tmp_path / "events"
    events.write_text("hit _matmul_kernel\nhit _matmul_kernel\nmiss _delta_kernel\nhit _delta_kernel\n")
    text = triton_cache.summary(str(events))
    assert text.splitlines()[0] == "triton cache: 3 kernels loaded from the cache, 1 compiled on this machine", \
        f"the totals: {text}"
    assert "_delta_kernel: 1 loaded, 1 compiled" in text, f"per kernel: {text}"
    assert "no compile events" in triton_cache.summary(str(tmp_path / "absent")), "no record: said so"


@pytest.mark.parametrize("view", ["contiguous", "transposed", "offset by 8 elements", "offset by 1 element",
                                  "expanded (stride 0)"])
def test_pretend_tensors_specialise_as_real_ones(view):
    """Triton's binder specialises a launch on each pointer's dtype and 16-byte alignment: a pretend "cuda" tensor
    (a FakeTensor whose data_ptr is an aligned base plus its storage offset) gets what a real tensor of the same
    view gets (a real allocation is aligned: 256 bytes on CUDA, 64 on the CPU; an odd offset breaks it on both)."""
    torch = pytest.importorskip("torch")
    jit = pytest.importorskip("triton.runtime.jit")
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from triton.compiler.compiler import make_backend

    specialize = getattr(jit, "native_specialize_impl", None)
    if specialize is None:
        pytest.skip("this Triton's binder has no native_specialize_impl")
    backend = make_backend(precompile.hopper_target())
    base = torch.empty(64, 48, dtype=torch.bfloat16)
    real = {"contiguous": lambda t: t, "transposed": lambda t: t.t(), "offset by 8 elements": lambda t: t[:, 8:],
            "offset by 1 element": lambda t: t.view(-1)[1:], "expanded (stride 0)": lambda t: t[0:1, :].expand(64, 48)
            }[view](base)
    mode = FakeTensorMode()
    meta = torch.empty_strided(base.shape, base.stride(), dtype=base.dtype, device="meta")
    meta = {"contiguous": lambda t: t, "transposed": lambda t: t.t(), "offset by 8 elements": lambda t: t[:, 8:],
            "offset by 1 element": lambda t: t.view(-1)[1:], "expanded (stride 0)": lambda t: t[0:1, :].expand(64, 48)
            }[view](meta)
    fake = mode.fake_tensor_converter.from_meta_and_device(mode, meta, torch.device("cuda", 0))
    saved = FakeTensor.data_ptr
    FakeTensor.data_ptr = precompile._fake_data_ptr
    try:
        assert fake.device.type == "cuda" and fake.storage_offset() == real.storage_offset(), "the same view"
        got, want = specialize(backend, fake, False, True, True), specialize(backend, real, False, True, True)
    finally:
        FakeTensor.data_ptr = saved
    assert got == want, f"{view}: the pretend tensor specialises as {got}, a real one as {want}"


def _script_warmers(text: str) -> set:
    """A GPU script's warming commands of Triton kernels (warm_caches.py without --compile, --warm-only runs), as
    (environment, script, arguments): its variables and `for act in ...` loops expanded, the worker split dropped."""
    import re
    import shlex

    text = text.replace("\\\n", " ")
    variables = dict(re.findall(r"^\s*(\w+)=([^\s#$(]+)\s*$", text, re.M))
    for values, body in re.findall(r"for act in ([\w ]+); do\n(.*?)\n\s*done", text, re.S):
        text = text.replace(body, "\n".join(body.replace("$act", value) for value in values.split()))
    found = set()
    for line in text.splitlines():
        match = re.search(r"^\s*((?:\w+=\S+\s+)*)(?:nice -n \d+ )?\$py benchmarks/(\w+\.py)([^&|>\n]*)", line)
        if not match or (match.group(2) != "warm_caches.py" and "--warm-only" not in match.group(3)):
            continue
        arguments = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)),
                                       match.group(3)))
        if "--compile" in arguments:  # Inductor's caches
            continue
        for option in ("--worker", "--workers"):
            while option in arguments:
                at = arguments.index(option)
                del arguments[at:at + 2]
        env = tuple(sorted(tuple(pair.split("=", 1)) for pair in match.group(1).split()))
        found.add((env, match.group(2), tuple(arguments)))
    return found


@pytest.mark.parametrize("script", sorted(precompile.WARM_STEPS))
def test_precompile_compiles_what_the_gpu_script_warms(script):
    """precompile.py's warming commands for a GPU script are that script's own (its Triton warmers, expanded)."""
    name = {"perf": "gpu_perf_check.sh", "check": "gpu_check.sh", "launch": "gpu_launch_check.sh"}[script]
    warmers = _script_warmers((ROOT / "benchmarks" / name).read_text())
    ours = {(tuple(sorted(env.items())), command, tuple(arguments))
            for env, command, arguments in precompile.WARM_STEPS[script]}
    assert warmers, f"{name}: warming commands found"
    assert ours == warmers, f"{name}: only in precompile {sorted(ours - warmers)}; only in the script " \
                            f"{sorted(warmers - ours)}"


def test_unpack_relocates_groups_and_says_when_keys_cannot_match(tmp_path):
    """unpack rewrites a group file's absolute child paths to where the cache now lies (dropping children not
    carried), and says WILL MISS where the cache was built by another Triton wheel or from other kernel sources."""
    pytest.importorskip("triton")
    built = tmp_path / "built" / "HASH"
    built.mkdir(parents=True)
    (built / "k.json").write_text("{}")
    (built / "k.cubin").write_bytes(b"\0")
    (built / "k.ptx").write_text("// not carried")
    children = {name: str(built / name) for name in ("k.json", "k.cubin", "k.ptx")}
    (built / "__grp__k.json").write_text(json.dumps({"child_paths": children}))
    manifest = dict(triton="0.0", triton_key="another wheel", python="3.0", env={},
                    source=dict(kernels={"dense.py": "another digest"}))
    (tmp_path / "built" / "manifest.json").write_text(json.dumps(manifest))
    triton_cache.pack(str(tmp_path / "built"), str(tmp_path / "c.tgz"))
    info = triton_cache.unpack(str(tmp_path / "c.tgz"), str(tmp_path / "here"))
    group = json.loads((tmp_path / "here" / "HASH" / "__grp__k.json").read_text())["child_paths"]
    assert group == {name: str(tmp_path / "here" / "HASH" / name) for name in ("k.json", "k.cubin")}, \
        f"children point into the new place, the IR file left behind: {group}"
    assert info["kernels_here"] == 1, "one kernel carried"
    text = " ".join(info["differences"])
    assert "triton_key" in text and "dense.py" in text, f"the mismatches named: {info['differences']}"
