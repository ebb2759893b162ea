"""Call overhead as CPU instructions: bench_overhead.py's problems, counted by valgrind instead of timed.

    python benchmarks/count_instructions.py                         # linear and mlp, fwd+bwd, 300 steps
    python benchmarks/count_instructions.py --steps 500 --modes fwd,fwd+bwd
    python benchmarks/count_instructions.py --manualbp-path /tmp/old_checkout   # another manualbp's code
    python benchmarks/count_instructions.py --impls nn,manualbp-triton          # the GPU's launch path, stubbed

A timing on a busy 2-core machine moves with everything else that runs; an instruction count
does not. Each (problem, implementation) runs in its own process under ``valgrind --tool=callgrind``
with instrumentation off until the measured loop (imports, model construction and 50 warm-up
steps are not counted): a tiny C helper, compiled here with ``cc`` against valgrind's
``callgrind.h``, switches counting on before the loop and dumps the count after it. The table
gives instructions per step (the loop's total / steps, garbage collection off during the loop)
and the ratio to nn's. Counts are deterministic for a given machine, Python, torch and code
(PYTHONHASHSEED=0); they weigh every instruction alike, so they track Python overhead well but
are not a timing: the time ratio of the same step is higher (Python's instructions are slower
than torch's C++ ones). Needs valgrind with its headers, and a C compiler.

Implementations: ``nn`` (nn.Linear + the activation), ``manualbp`` (the reference backend, PyTorch's math) and
``manualbp-triton``: the triton backend on CPU tensors with every kernel launch a no-op (host_path.py's stub: the
GPU's path of autotuned tiles and warm plans, each launch reaching the compiled launcher's call with addresses),
so its count is the Python a GPU step runs before and around its launches, without the kernels, Triton's C
launcher or the driver. Its math is not done, where nn's and manualbp's is (a tiny layer: little of it).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile

HELPER_C = r"""
#include <valgrind/callgrind.h>
void count_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; CALLGRIND_TOGGLE_COLLECT; }
void count_stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS; CALLGRIND_STOP_INSTRUMENTATION; }
"""
WARMUP = 50


def child(helper: str, problem: str, impl: str, mode: str, steps: int, manualbp_path: str) -> None:
    """Runs under valgrind: builds bench_overhead's case, then counts `steps` calls of it."""
    import ctypes
    import gc

    if manualbp_path:  # the other checkout first, and not the editable install's finder
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, manualbp_path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    backend = "reference"
    if impl == "manualbp-triton":
        os.environ["TRITON_INTERPRET"] = "1"  # triton imports and takes CPU tensors; no kernel runs (stubbed)
        import host_path

        host_path.stub_kernels()
        impl, backend = "manualbp", "triton"
    import torch

    import bench_overhead

    torch.set_num_threads(1)
    case = bench_overhead.prepare(problem, impl, mode, torch.device("cpu"), torch.float32, backend)
    fn, reset = case
    import manualbp

    print(f"manualbp from {os.path.dirname(manualbp.__file__)}", file=sys.stderr)
    with manualbp.use_backend(backend):
        for _ in range(WARMUP):
            for t in reset:
                t.grad = None
            fn()
        counter = ctypes.CDLL(helper)
        gc.collect()
        gc.disable()
        counter.count_start()
        for _ in range(steps):
            for t in reset:
                t.grad = None
            fn()
        counter.count_stop()


def build_helper(directory: str) -> str:
    source = os.path.join(directory, "count.c")
    library = os.path.join(directory, "libcount.so")
    with open(source, "w") as file:
        file.write(HELPER_C)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("count_instructions: needs a C compiler (cc) to build its valgrind helper")
    result = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", library, source], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"count_instructions: could not build the helper (valgrind headers missing?):\n"
                         f"{result.stderr}")
    return library


def count(helper: str, directory: str, problem: str, impl: str, mode: str, steps: int,
          manualbp_path: str) -> tuple[int, str]:
    """(instructions per step, where manualbp came from) for one case, in a fresh process under callgrind."""
    stem = os.path.join(directory, f"{problem}-{impl}-{mode}".replace("+", "_"))
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
               f"--callgrind-out-file={stem}.%p", sys.executable, os.path.abspath(__file__), "--child", helper,
               problem, impl, mode, str(steps), manualbp_path]
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    dumps = [name for name in os.listdir(directory)
             if name.startswith(os.path.basename(stem) + ".") and name.endswith(".1")]
    if result.returncode != 0 or len(dumps) != 1:
        raise SystemExit(f"count_instructions: {problem}/{impl}/{mode} failed (rc {result.returncode}):\n"
                         f"{result.stderr[-3000:]}")
    with open(os.path.join(directory, dumps[0])) as file:
        total = next(int(line.split()[1]) for line in file if line.startswith("summary:"))
    source = next((line.split(" from ", 1)[1] for line in result.stderr.splitlines()
                   if line.startswith("manualbp from ")), "?")
    return total // steps, source


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        helper, problem, impl, mode, steps, path = sys.argv[2:8]
        child(helper, problem, impl, mode, int(steps), path)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default="linear,mlp", help="comma-separated: linear, mlp")
    parser.add_argument("--modes", default="fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    parser.add_argument("--impls", default="nn,manualbp,manualbp-triton",
                        help="comma-separated: nn (always counted first, the ratios' base), manualbp, manualbp-triton")
    parser.add_argument("--steps", type=int, default=300, help="counted calls per case")
    parser.add_argument("--manualbp-path", default="", help="a folder holding another manualbp package to count")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("count_instructions: valgrind is not installed", file=sys.stderr)
        return 2
    import torch

    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"# instructions per step (callgrind, not a timing); {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, {version}, float32, {args.steps} steps; "
          f"manualbp: reference backend, manualbp-triton: triton backend, launches stubbed")
    with tempfile.TemporaryDirectory() as directory:
        helper = build_helper(directory)
        print(f"{'problem':8s} {'mode':8s} {'impl':15s} {'instr/step':>11s} {'x nn':>6s}  manualbp")
        print("-" * 78)
        for problem in args.problems.split(","):
            for mode in args.modes.split(","):
                counts = {}
                for impl in ["nn"] + [i for i in args.impls.split(",") if i != "nn"]:
                    counts[impl], source = count(helper, directory, problem, impl, mode, args.steps,
                                                 args.manualbp_path)
                    ratio = counts[impl] / counts["nn"]
                    print(f"{problem:8s} {mode:8s} {impl:15s} {counts[impl]:11d} {ratio:6.3f}  "
                          f"{source if impl != 'nn' else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
