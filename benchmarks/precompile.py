"""Compile the GPU benchmark's Triton kernels for Hopper (sm_90) on a machine without a GPU, into a cache directory
that the GPU run loads instead of compiling (docs/development.md, "Carrying Triton's cache to the GPU run").

    bash benchmarks/precompile.sh           # in .venv-gpu: gpu_perf_check.sh's kernels -> .triton-cache.tgz
    .venv-gpu/bin/python benchmarks/precompile.py --script launch --script check --pack .triton-cache.tgz
    .venv-gpu/bin/python benchmarks/precompile.py --command "warm_caches.py --problems linear8192x1024x4096"

A bare GPU machine compiles every kernel variant the benchmark autotunes (ptxas, seconds each) before it times
anything. Triton's cache key needs no GPU: triton_key() (Triton's own files, libtriton.so included), the kernel's
source and dependencies, its signature specialisation, constexprs and attributes, the backend (ptxas version, target
arch), the compile options and the cache-invalidating environment variables. So the same launches are compiled here,
by the benchmark's own code on a pretend H100 (:func:`pretend_hopper`):

  tensors      what the benchmark puts on "cuda" (modules, inputs) lives on the meta device, where autograd runs
               without a driver; a manualbp operator called on meta tensors runs its own implementation (the
               launchers) on FakeTensors on "cuda" (the same shapes, strides, storage offsets and dtypes, no memory),
               whose data_ptr() is an aligned base plus the storage offset, as PyTorch's caching allocator gives
               (256-byte aligned blocks; a view keeps its offset); its outputs go back to meta
  torch.cuda   capability (9, 0), an H100 SXM's properties (132 SMs); synchronize and the device guard do nothing
  Triton       a driver whose target is GPUTarget("cuda", 90, 32), what CudaDriver.get_current_target reports on
               sm_90; an H100's device properties (227 KiB of shared memory per block); loading and launching do
               nothing; the autotuner's benchmark runs each config once (compiling it) and times nothing; its disk
               cache of timings is not written (a GPU run must tune for itself)

Everything between (the launchers and launch plans, Triton's JITFunction.run: its binder's specialisation of dtypes,
16-byte alignment, ints equal to 1 or divisible by 16; the autotuner's pruning; the cache key and triton.compile) is
the code that runs on the GPU. The key matches the GPU's only with the same Triton wheel for the same Python (the
GPU machine: Python 3.12, torch 2.11.0, Triton 3.6.0; libtriton.so differs between Python 3.11's and 3.12's wheels,
so a cache built under 3.11 misses every kernel there), the same source tree (a kernel's key holds its source and
line number: rebuild after any change) and the same cache-invalidating environment. manifest.json records them;
benchmarks/triton_cache.py checks them on the GPU before the run.

What runs: the cache-warming commands of the GPU script (WARM_STEPS, the lists gpu_perf_check.sh's step 2 runs),
with every config the autotuner keeps compiled in this one process (one worker: no config split).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# An H100 SXM (the H200 reports the same for everything compiled in: sm_90, 132 SMs, 227 KiB per block).
H100 = dict(name="NVIDIA H100 80GB HBM3", capability=(9, 0), multi_processor_count=132, max_shared_mem=232448,
            max_num_regs=65536, total_memory=80 * 2**30, warp_size=32)
_BASE = 1 << 32  # a pretend allocation's address: aligned as the caching allocator's 256-byte blocks, never 0

# The cache-warming commands of each GPU script, as (environment, script, arguments): what its warming step runs,
# without the worker split (one process here compiles every config) and without Inductor's (--compile: the
# torch.compile rows). tests/test_precompile.py checks them against the scripts' own lines.
_TARGETS = "linear8192x1024x4096,linear8192x4096x1024"
_BOUND = "linear8192x4096x16384,linear8192x16384x4096,mlp8192x1024x4096,mlp8192x4096x16384"
_CROSSING = "linear8192x2048x4096,linear8192x2048x1024"
_GATED = "gated8192x4096x11008"
_MLPS = "mlp8192x1024x4096,mlp8192x4096x16384"
# bench_backward's: (2048 -> 1024) last, where the plan splits ∂C/∂W (its "unsplit" way beside it)
_BACKWARD = "linear8192x1024x4096,linear8192x2048x4096,linear8192x4096x1024,linear8192x2048x1024"
_CHECK_PROBLEMS = ("linear8192x1024x4096,mlp8192x1024x4096,linear8192x4096x1024,linear8192x4096x16384,"
                   "linear8192x16384x4096,mlp8192x4096x16384")
WARM_STEPS = {
    "perf": [  # gpu_perf_check.sh, step 2
        ({}, "bench_matmul.py", ["--warm-only"]),
        ({}, "warm_caches.py", ["--problems", _TARGETS, "--layers", "hidden,first"]),
        ({}, "warm_caches.py", ["--problems", f"{_BOUND},{_CROSSING},{_GATED}"]),
        ({"MANUALBP_MLP_FUSION": "0"}, "warm_caches.py", ["--problems", _MLPS]),
        ({}, "bench_backward.py", ["--warm-only", "--activations", "relu", "--problems", _BACKWARD]),
        ({}, "bench_backward.py", ["--warm-only", "--activations", "gelu", "--problems", _BACKWARD]),
    ],
    "launch": [  # gpu_launch_check.sh, step 2
        ({}, "warm_caches.py", ["--problems", "linear8192x1024x4096", "--activations", "relu,gelu"]),
    ],
    "check": [  # gpu_check.sh, step 2
        ({}, "warm_caches.py", ["--problems", _CHECK_PROBLEMS, "--matmul-dtypes", "fp32,fp32-tf32"]),
        ({"MANUALBP_DELTA_PROLOGUE": "0"}, "warm_caches.py", ["--problems", _TARGETS]),
        ({"MANUALBP_MLP_FUSION": "0"}, "warm_caches.py", ["--problems", "mlp8192x1024x4096"]),
        ({"MANUALBP_TMA": "1", "MANUALBP_WARP_SPECIALIZE": "1"}, "warm_caches.py", ["--problems", _TARGETS]),
    ] + [({}, "bench_backward.py", ["--warm-only", "--activations", activation, "--problems",
                                    "linear8192x1024x4096,linear8192x4096x1024,linear8192x2048x4096"])
         for activation in ("relu", "gelu", "leaky_relu", "tanh")],
}
_SETTINGS = {"MANUALBP_MLP_FUSION": "mlp_fusion", "MANUALBP_DELTA_PROLOGUE": "delta_prologue",
             "MANUALBP_TMA": "tma", "MANUALBP_WARP_SPECIALIZE": "warp_specialize", "MANUALBP_AUTOTUNE": "autotune"}


class Unavailable(Exception):
    """This installation cannot build the cache (no Triton NVIDIA backend, an internal moved)."""


# --------------------------------------------------------------------------------------
# The pretend GPU
# --------------------------------------------------------------------------------------


class _Launcher:
    """Stands in for CudaLauncher: a launch does nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


def _bench_once(kernel_call, quantiles=None, **kwargs):
    """The autotuner's benchmark: one call (which compiles the config), no timing; every config ties."""
    kernel_call()
    return [1.0, 1.0, 1.0] if quantiles else 1.0


class HopperDriver:
    """Triton's active driver on a pretend H100: Triton's CUDA backend compiles for its target; nothing runs."""

    def __init__(self, target):
        self.target = target
        self.launcher_cls = _Launcher
        props = dict(max_shared_mem=H100["max_shared_mem"], max_num_regs=H100["max_num_regs"],
                     multiprocessor_count=H100["multi_processor_count"], warpSize=H100["warp_size"],
                     sm_clock_rate=1980000, mem_clock_rate=2619000, mem_bus_width=5120)
        self.utils = types.SimpleNamespace(
            get_device_properties=lambda device: dict(props),
            # (module, function, registers, spills, max threads per block): handles nobody dereferences
            load_binary=lambda name, kernel, shared, device: (1, 1, 0, 0, 1024))

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_active_torch_device(self):
        import torch

        return torch.device("cuda", 0)

    def get_device_interface(self):
        import torch

        return torch.cuda

    def get_device_capability(self, device=None):
        return H100["capability"]

    def map_python_to_cpp_type(self, ty):
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_benchmarker(self):
        return _bench_once

    def get_empty_cache_for_benchmark(self):
        import torch

        return torch.empty(1, dtype=torch.int, device="cuda")

    def clear_cache(self, cache):
        pass


def hopper_target():
    """GPUTarget of an sm_90 GPU, as Triton 3.6's CudaDriver.get_current_target builds it (capability major * 10 +
    minor, warp size 32)."""
    from triton.backends.compiler import GPUTarget

    major, minor = H100["capability"]
    return GPUTarget("cuda", major * 10 + minor, H100["warp_size"])


class _DeviceGuard:
    """torch.cuda.device on the pretend GPU: nothing to switch."""

    def __init__(self, device=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _on_meta():
    """A function mode that puts what the benchmark creates on "cuda" on the meta device instead: modules, inputs and
    autograd run on meta tensors (autograd on CUDA tensors asks the driver for streams)."""
    import torch
    from torch.overrides import TorchFunctionMode

    meta = torch.device("meta")

    def moved(value):
        if isinstance(value, torch.device) and value.type == "cuda":
            return meta
        if isinstance(value, str) and value.split(":")[0] == "cuda":
            return meta
        return value

    class OnMeta(TorchFunctionMode):
        active = True  # off inside a launcher (_on_hopper), whose tensors are the pretend GPU's

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if self.active:
                if func is torch.Tensor.cuda:
                    return args[0].to(meta)
                if "device" in kwargs:
                    kwargs = dict(kwargs, device=moved(kwargs["device"]))
                if func is torch.Tensor.to:
                    args = tuple(moved(a) for a in args)
            return func(*args, **kwargs)

    return OnMeta()


def _on_hopper(implementation, fake_mode, on_meta):
    """A manualbp operator's implementation as its meta kernel: its meta arguments become FakeTensors on the pretend
    "cuda" device (strides, storage offsets and dtypes kept), it runs (the launchers: every decision they make on a
    CUDA tensor's device, down to Triton's launch), and its outputs come back as meta tensors."""
    import torch
    from torch.utils._pytree import tree_map

    cuda = torch.device("cuda", 0)
    converter = fake_mode.fake_tensor_converter

    def to_fake(value):
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return converter.from_meta_and_device(fake_mode, value, cuda)
        return value

    def to_meta(value):
        if isinstance(value, torch.Tensor):
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        return value

    def run(*args, **kwargs):
        if not on_meta.active:  # called from another operator's implementation: on the pretend GPU already
            return implementation(*args, **kwargs)
        args, kwargs = tree_map(to_fake, (args, kwargs))
        on_meta.active = False
        try:
            with fake_mode:
                result = implementation(*args, **kwargs)
        finally:
            on_meta.active = True
        return tree_map(to_meta, result)

    return run


def _fake_data_ptr(tensor) -> int:
    return _BASE + tensor.storage_offset() * tensor.element_size()


@contextlib.contextmanager
def _patched(obj, name, value):
    missing = object()
    saved = getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, saved)


def _manualbp_opdefs():
    """manualbp's custom operators (torch.library.custom_op), by name."""
    from torch._library import custom_ops

    import manualbp  # noqa: F401 - registers the operators
    import manualbp.gated_ops  # noqa: F401

    return {name: op for name, op in getattr(custom_ops, "OPDEFS", {}).items() if name.startswith("manualbp::")}


@contextlib.contextmanager
def pretend_hopper(cache_dir: str):
    """Inside: what the code puts on "cuda" lives on the meta device, manualbp's operators run their launchers on
    FakeTensors of a pretend H100, and every Triton kernel they launch compiles for sm_90 into cache_dir (module
    docstring)."""
    try:
        import torch
        import triton
        from torch._subclasses import fake_tensor
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
        from triton.runtime import autotuner as triton_autotuner
        from triton.runtime import driver as triton_driver
    except ImportError as error:
        raise Unavailable(f"torch or Triton's runtime is not importable ({error})") from error
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401 - the sm_90 compiler
    except ImportError as error:
        raise Unavailable(f"Triton has no NVIDIA backend here ({error})") from error
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(triton_driver, "set_active"):
        raise Unavailable(f"triton {triton.__version__}: no triton.knobs / driver.set_active")
    if not hasattr(triton_autotuner.Autotuner, "check_disk_cache"):
        raise Unavailable(f"triton {triton.__version__}: Autotuner.check_disk_cache moved")
    os.makedirs(cache_dir, exist_ok=True)
    cuda = torch.cuda
    props = types.SimpleNamespace(name=H100["name"], major=H100["capability"][0], minor=H100["capability"][1],
                                  multi_processor_count=H100["multi_processor_count"],
                                  total_memory=H100["total_memory"], warp_size=H100["warp_size"])

    def no_stream(device_index=None):
        return 0

    def no_disk_timings(self, tuning_key, configs, bench_fn):  # time nothing, store nothing: the GPU tunes
        bench_fn()
        return False

    opdefs = _manualbp_opdefs()
    if not opdefs or not all(hasattr(op, "_abstract_fn") and hasattr(op, "_init_fn") for op in opdefs.values()):
        raise Unavailable(f"torch {torch.__version__}: custom operators keep their implementation elsewhere")
    if not hasattr(fake_tensor.FakeTensorConverter, "from_meta_and_device"):
        raise Unavailable(f"torch {torch.__version__}: no FakeTensorConverter.from_meta_and_device")
    if not hasattr(knobs.compilation, "listener"):
        raise Unavailable(f"triton {triton.__version__}: no compilation listener (loads and compiles uncounted)")
    with contextlib.ExitStack() as stack:
        patches = [
            (cuda, "is_available", lambda: True), (cuda, "device_count", lambda: 1),
            (cuda, "current_device", lambda: 0), (cuda, "get_device_capability", lambda device=None: H100["capability"]),
            (cuda, "get_device_properties", lambda device=None: props),
            (cuda, "get_device_name", lambda device=None: H100["name"]), (cuda, "device", _DeviceGuard),
            (cuda, "synchronize", lambda device=None: None), (cuda, "empty_cache", lambda: None),
            (torch._C, "_cuda_getCurrentRawStream", no_stream),
            (FakeTensor, "data_ptr", _fake_data_ptr),
            (fake_tensor, "init_gpu_context", lambda device: None),  # it allocates a real CUDA tensor
            (triton_autotuner.Autotuner, "check_disk_cache", no_disk_timings),
            (knobs.cache, "dir", cache_dir),
        ]
        raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        if raw_stream is not None:  # modules imported already hold the real one (a warm launch asks it)
            patches += [(module, name, no_stream) for module in list(sys.modules.values())
                        if getattr(module, "__name__", "").startswith(("manualbp", "triton_kernels"))
                        for name, value in list(vars(module).items()) if value is raw_stream]
        for obj, name, value in patches:
            stack.enter_context(_patched(obj, name, value))
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        on_meta = _on_meta()
        for op in opdefs.values():  # an operator on meta tensors runs itself, on the pretend GPU, down to Triton
            stack.enter_context(_patched(op, "_abstract_fn", _on_hopper(op._init_fn, fake_mode, on_meta)))
        previous = triton_driver._active
        triton_driver.set_active(HopperDriver(hopper_target()))
        stack.callback(setattr, triton_driver, "_active", previous)
        stack.enter_context(on_meta)
        yield


@contextlib.contextmanager
def _settings(env: dict):
    """manualbp.config as the GPU script's environment variables set it for one command."""
    import manualbp

    changes = {_SETTINGS[name]: value != "0" for name, value in env.items()}
    with manualbp.config.override(**changes):
        yield


# --------------------------------------------------------------------------------------
# What gets compiled
# --------------------------------------------------------------------------------------


class Recorder:
    """Counts triton.compile's results by their listener: compiled here or loaded from the cache."""

    def __init__(self):
        self.compiled, self.loaded, self.previous = [], [], None

    def __call__(self, *, src=None, cache_hit=False, **details):
        (self.loaded if cache_hit else self.compiled).append(getattr(src, "name", "?"))
        if self.previous is not None:  # one set before (triton_cache_probe's): it hears of every compile too
            self.previous(src=src, cache_hit=cache_hit, **details)

    @contextlib.contextmanager
    def listening(self):
        import triton

        self.previous = triton.knobs.compilation.listener
        with _patched(triton.knobs.compilation, "listener", self):
            yield self


def run_step(env: dict, script: str, arguments: list) -> int:
    """One warming command, in this process, on the pretend GPU: its main()'s exit status."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    module = __import__(os.path.splitext(script)[0])
    argv = list(arguments)
    if script == "warm_caches.py":
        argv += ["--worker", "0", "--workers", "1"]
    with _settings(env):
        return module.main(argv)


def source_state() -> dict:
    """The source tree the kernels were compiled from: a kernel's key holds its source and line numbers."""
    def git(*args):
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
                kernels=kernel_sources())


def kernel_sources(root: str = ROOT) -> dict:
    """sha256 of each file of triton_kernels/: where one differs from the cache's, its kernels' keys do too."""
    import hashlib

    folder = os.path.join(root, "triton_kernels")
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name.endswith(".py")}


def manifest(scripts, steps_run, recorder, seconds) -> dict:
    import torch
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import triton_key

    return dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                triton_key=triton_key(), env=get_cache_invalidating_env_vars(), target="cuda sm_90 (warp 32)",
                backend=make_backend(hopper_target()).hash(),
                scripts=list(scripts), steps=steps_run, compiled=len(recorder.compiled), loaded=len(recorder.loaded),
                kernels=sorted(set(recorder.compiled + recorder.loaded)), seconds=round(seconds, 1),
                built=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), source=source_state())


def build(cache_dir: str, scripts, progress=print, commands=()) -> dict:
    """Compile every warming step of scripts (or the given commands: "script.py args...") into cache_dir: the
    manifest (also written to cache_dir)."""
    recorder = Recorder()
    steps_run = []
    start = time.perf_counter()
    plan = [(script, step) for script in scripts for step in WARM_STEPS[script]]
    if commands:
        plan = [("command", ({}, command.split()[0], command.split()[1:])) for command in commands]
    with pretend_hopper(cache_dir), recorder.listening():
        for script, (env, name, arguments) in plan:
            before, began = len(recorder.compiled) + len(recorder.loaded), time.perf_counter()
            status = run_step(env, name, arguments)
            step = dict(script=script, env=env, command=" ".join([name, *arguments]), status=status,
                        kernels=len(recorder.compiled) + len(recorder.loaded) - before,
                        seconds=round(time.perf_counter() - began, 1))
            steps_run.append(step)
            progress(f"precompile {script}: {' '.join(f'{k}={v}' for k, v in env.items())} {step['command']}: "
                     f"exit {status}, {step['kernels']} kernels, {step['seconds']} s")
    info = manifest(scripts, steps_run, recorder, time.perf_counter() - start)
    with open(os.path.join(cache_dir, "manifest.json"), "w") as handle:
        json.dump(info, handle, indent=1)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, ".triton-cache"))
    parser.add_argument("--script", action="append", choices=sorted(WARM_STEPS),
                        help="whose warming steps to compile (repeatable; default: perf)")
    parser.add_argument("--command", action="append", default=[], metavar="'SCRIPT.py ARGS'",
                        help="compile this warming command instead of a script's (repeatable; no environment)")
    parser.add_argument("--fresh", action="store_true", help="empty the cache directory first")
    parser.add_argument("--pack", default="", metavar="TGZ",
                        help="also pack what the GPU needs to load (triton_cache.py pack) into this file")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the CPU interpreter
    if args.fresh and os.path.isdir(args.cache_dir):
        shutil.rmtree(args.cache_dir)
    try:
        info = build(args.cache_dir, args.script or ["perf"], commands=args.command)
    except Unavailable as reason:
        print(f"precompile: unavailable: {reason}")
        return 2
    failed = [step for step in info["steps"] if step["status"]]
    print(f"precompile: {info['compiled']} kernels compiled, {info['loaded']} already in {args.cache_dir}, "
          f"{len(info['kernels'])} distinct, {info['seconds']} s; Python {info['python']}, triton {info['triton']}, "
          f"torch {info['torch']}, source {info['source']['commit'][:12]}{' (dirty)' if info['source']['dirty'] else ''}")
    if args.pack:
        import triton_cache

        size = triton_cache.pack(args.cache_dir, args.pack)
        print(f"precompile: packed {args.pack}: {size / 2**20:.1f} MiB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
