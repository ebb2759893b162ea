"""The host's share of a GPU step, measured without a GPU: manualbp's triton code path with every kernel launch
replaced by a no-op.

    python benchmarks/host_path.py                       # Linear(512, 512, relu) and MLP([512, 512, 512]), fwd+bwd
    python benchmarks/host_path.py --cprofile 300        # and where that time goes

On the H200 (docs/performance.md) a manualbp step at (1024, 4096) took 1.59 ms of host time for 0.40 ms of
kernels: the Python around the kernels decides the speed there. This runs the same Python — module, functional,
autograd Function, operators, launchers, the launch plans (`triton_kernels/launch.py`: key, lookup, addresses,
the compiled launcher's call) — on CPU tensors,
with the kernels, the autotuner's kernel and the interpreter out of the way: what it measures is manualbp's own
host work per step (not Triton's runtime or the CUDA driver, which a GPU adds). Medians over rounds of
--steps steps, µs per step, beside nn.Linear + the activation doing real CPU math (a yardstick, not a
like-for-like comparison). Set up in a fresh process: it replaces kernels in manualbp's modules for good.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton imports without a GPU; no kernel runs either way

import torch  # noqa: E402

import manualbp  # noqa: E402


class _NoLaunch:
    """Stands in for a Triton kernel (and for the autotuner and its kernel): launching it does nothing; asked for
    its compiled kernel (JITFunction.run with warmup=True), it gives a _NoCompiled."""

    def __init__(self, kernel=None, best_config=None):
        from triton.runtime.jit import JITFunction

        self.best_config = best_config
        self.fn = self
        self.params = JITFunction(kernel.fn).params if kernel is not None else None  # the real kernel's

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def run(self, *args, warmup=False, **kwargs):
        return _NoCompiled() if warmup else None


class _NoCompiled:
    """Stands in for a CompiledKernel: its launcher (what a warm plan calls, with addresses) does nothing."""

    function = packed_metadata = None

    def run(self, *args):
        return None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels():
    """Replace every kernel launch of manualbp's triton backend by a no-op, and take the GPU's launch path on CPU
    tensors: autotuned matmuls (the autotuner having chosen the first config), warm launches through each plan's
    compiled launcher (launch.py), given the tensors' addresses."""
    from manualbp.triton_kernels import dense, jvp, launch

    tuners = {}
    for name in dense.MATMUL_KERNELS:  # one per role kernel, as dense._autotuned_matmul
        tuners[name] = _NoLaunch(best_config=dense.role_configs(name)[0])
        tuners[name].params = _NoLaunch(getattr(dense, name)).params
    for name in (*dense.MATMUL_KERNELS, "_delta_kernel", "_activation_kernel"):
        setattr(dense, name, _NoLaunch(getattr(dense, name)))
    jvp_tuner = _NoLaunch(jvp._jvp_kernel, best_config=dense.matmul_configs()[0])
    jvp._jvp_kernel = _NoLaunch(jvp._jvp_kernel)
    dense.is_interpreted = lambda: True  # the backend takes CPU tensors for the triton path ...
    dense._fixed_config = lambda fp64, use_dot: None  # ... and the launchers the GPU's autotuned launches
    dense._autotuned_matmul = lambda kernel: tuners[kernel]
    jvp._autotuned_jvp = lambda: jvp_tuner
    from manualbp.triton_kernels import gated  # the gated layer's launchers: the same path

    gated_tuners = {}
    for role, name in gated._KERNELS.items():  # one autotuner per role and element size (gated._autotuned)
        for size in (2, 4):
            gated_tuners[role, size] = _NoLaunch(getattr(gated, name), best_config=gated.matmul_configs(role, size)[0])
    for name in (*gated._KERNELS.values(), "_gate_kernel", "_gated_tangent_kernel"):
        setattr(gated, name, _NoLaunch(getattr(gated, name)))
    gated._autotuned = lambda role, element_size, tf32=False, stored=False: gated_tuners[role, element_size]
    gated._fixed_tile = lambda role, dtype, use_dot, tf32=False, stored=False: None  # the autotuned tiles, as on a GPU
    real_build = launch.build

    def build(*args, **kwargs):  # ... whose plans keep the compiled launcher, as on an NVIDIA GPU
        return real_build(*args, **dict(kwargs, interpreted=False, compiled_ok=True))

    launch.build = build
    launch._raw_stream = lambda device_index: 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256, help="batch rows (the math is not run: size barely matters)")
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cprofile", type=int, default=0, metavar="N", help="Python's profiler over N steps")
    args = parser.parse_args(argv)

    stub_kernels()
    n = args.features
    x = torch.randn(args.rows, n, requires_grad=True)
    grad = torch.randn(args.rows, n)
    models = {
        "nn Linear+ReLU (CPU math)": torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.ReLU()),
        "manualbp Linear relu": manualbp.Linear(n, n, activation="relu", backend="triton"),
        "manualbp MLP 2 layers gelu": manualbp.MLP([n, n, n], activation="gelu", backend="triton"),
    }

    def step(model):
        for p in model.parameters():
            p.grad = None
        x.grad = None
        model(x).backward(grad)

    print(f"# host path, kernels stubbed: x [{args.rows}, {n}], fwd+bwd, torch {torch.__version__}, "
          f"{args.rounds} rounds of {args.steps} steps, median µs per step")
    for name, model in models.items():
        for _ in range(10):
            step(model)
        rounds = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model)
            rounds.append((time.perf_counter() - start) / args.steps * 1e6)
        print(f"{name:30s} {statistics.median(rounds):9.1f}")
        if args.cprofile and name.startswith("manualbp"):
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.cprofile):
                step(model)
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)
    from manualbp.triton_kernels import launch

    kinds = sorted({plan.kind for plan in launch.PLANS.values()})
    print(f"# {len(launch.PLANS)} launch plans, roles {sorted({p.role for p in launch.PLANS.values()})}, "
          f"launchers {kinds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
