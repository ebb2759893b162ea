"""Call overhead as CPU instructions: bench_overhead.py's problems, counted by valgrind instead of timed.

    python benchmarks/count_instructions.py                         # linear and mlp, fwd+bwd, 300 steps
    python benchmarks/count_instructions.py --problems gated        # GatedMLP (silu) beside LlamaMLP written out
    python benchmarks/count_instructions.py --steps 500 --modes fwd,fwd+bwd
    python benchmarks/count_instructions.py --manualbp-path /tmp/old_checkout   # another manualbp's code (compare
                                                    # it with this one's copy given so too: the import path alone,
                                                    # the editable install's finder or not, moved counts by 0.9-6.5k)
    python benchmarks/count_instructions.py --impls nn,manualbp-triton          # the GPU's launch path, stubbed
    python benchmarks/count_instructions.py --breakdown --steps 100             # where a step's instructions go
    python benchmarks/count_instructions.py --rs-hazard --problems gated        # the plans of the GPU machines' Triton

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

``--breakdown``: for manualbp and manualbp-triton, the step's instructions by layer of the call chain. One step's
calls of each layer's entry are recorded (``ops.direct``'s computations, the triton launchers of ``dense``/``jvp``
that the operators call, ``launch.run``), then each is replayed --steps times under the counter, with the same
arguments; a layer's own share is its replays' count less the layer's below:

    forward: module, functional, autograd Function   model(x) less its operators' computations
    backward: autograd, Function.backward            the step less model(x) and the backward's computations
    operators' computations (ops.direct)             their replays less the launchers'
    launchers' Python (arguments, outputs)           their replays less launch.run's
    launch.run (lookup, launch)                      its replays (a stubbed launch: the compiled launcher's call)

Counted on 2026-12-07 (the 2-core CPU machine, Python 3.11.7, torch 2.13.0+cpu, triton 3.9.0, valgrind 3.19.0,
float32, ``--steps 100``; docs/performance.md has the history and the breakdown), instructions per fwd+bwd step:

    code                                   Linear: nn  manualbp  manualbp-triton    MLP: nn   manualbp  manualbp-triton
    65535e4 (plan key on every launch)        506,140   591,351          963,074  1,069,251  1,233,558        2,654,788
    52c3521 (warm-call table)                 506,365   587,432          745,662  1,069,009  1,230,583        1,938,651
    3a16d09 (setup cached, no views)          504,327   588,687          599,130  1,063,984  1,229,964        1,522,942
    50c69d8 (generated warm call, no guards)  504,769   587,603          521,292  1,064,759  1,230,915        1,226,121

    --problems gated (GatedMLP(16, 16) silu)  GatedMLP: nn  manualbp  manualbp-triton
    b4321ca (before its launchers' change)        653,998   843,212        1,177,071
    8340c8b (gated launchers as dense ones)       653,051   767,995          905,825
"""

from __future__ import annotations

import argparse
import importlib.metadata
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
RS_HAZARD_ENV = "MANUALBP_COUNT_RS_HAZARD"  # --rs-hazard, for the children


def _rs_hazard_if_asked() -> None:
    """--rs-hazard: the triton path as on a GPU whose toolchain miscompiles register-operand wgmmas (sm_90 with
    Triton < 3.8 or ptxas < 13.3, the GPU machines' Triton 3.6): toolchain.rs_operand_hazard names a reason for
    every launch, so no launch forms δ in its loads (the plans of docs/kernels.md's "RS wgmma hazard")."""
    if os.environ.get(RS_HAZARD_ENV):
        from manualbp.triton_kernels import toolchain

        toolchain.rs_operand_hazard = lambda device, dtype: "forced by count_instructions.py --rs-hazard"
PROBLEMS = ("linear", "mlp", "gated")  # bench_overhead's problems that have a backward


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
        _rs_hazard_if_asked()
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


def _record(owner, names, calls: list, phase: list) -> list:
    """Wrap owner's functions named names so that their outermost calls are recorded into calls as
    (phase, function, args, kwargs); returns what restores them."""
    depth = [0]
    restore = []

    def wrap(name, real):
        def recorded(*args, **kwargs):
            if depth[0] == 0:
                calls.append((phase[0], real, args, kwargs))
            depth[0] += 1
            try:
                return real(*args, **kwargs)
            finally:
                depth[0] -= 1
        return recorded

    for name in names:
        real = owner.__dict__[name]
        function = real.__func__ if isinstance(real, staticmethod) else real
        setattr(owner, name, staticmethod(wrap(name, function)) if isinstance(real, staticmethod)
                else wrap(name, function))
        restore.append((owner, name, real))
    return restore


def breakdown_child(helper: str, problem: str, impl: str, steps: int) -> None:
    """Runs under valgrind: counts the step, its forward, and replays of each layer's recorded calls (module
    docstring), one dump each, in the order of the names printed to stderr."""
    import ctypes
    import gc

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    backend = "reference"
    if impl == "manualbp-triton":
        os.environ["TRITON_INTERPRET"] = "1"
        import host_path

        host_path.stub_kernels()
        _rs_hazard_if_asked()
        backend = "triton"
    import torch

    import bench_overhead
    import manualbp
    from manualbp import gated_ops, ops

    torch.set_num_threads(1)
    model = bench_overhead.build(problem, "manualbp", torch.device("cpu"), torch.float32)
    x = torch.randn(bench_overhead.ROWS, bench_overhead.WIDTH, requires_grad=True)
    grad = torch.randn(bench_overhead.ROWS, bench_overhead.WIDTH)
    reset = [x, *model.parameters()]

    def step():
        for t in reset:
            t.grad = None
        model(x).backward(grad)

    layers = {"ops": [], "launchers": [], "launch": []}
    phase = ["forward"]
    with manualbp.use_backend(backend):
        for _ in range(WARMUP):
            step()
        restore = []
        for namespace in (ops.direct, gated_ops.direct):  # the dense and the gated layer's computations
            restore += _record(namespace, [n for n, v in vars(namespace).items() if isinstance(v, staticmethod)],
                               layers["ops"], phase)
        if backend == "triton":
            from manualbp.triton_kernels import dense, gated, jvp, launch

            launchers = ("linear_forward", "linear_backward", "delta_and_bias_grad", "activation_forward", "matmul",
                         "matmul_times_activation_grad")
            restore += _record(dense, launchers, layers["launchers"], phase)
            restore += _record(jvp, ("linear_jvp",), layers["launchers"], phase)
            restore += _record(gated, ("gated_forward", "gated_backward", "gated_jvp", "gate_forward",
                                       "gate_backward", "gate_jvp"), layers["launchers"], phase)
            restore += _record(launch, ("run",), layers["launch"], phase)
        for t in reset:
            t.grad = None
        out = model(x)
        phase[0] = "backward"
        out.backward(grad)
        for owner, name, real in restore:
            setattr(owner, name, real)

        def replay(calls, which=None):
            chosen = [(fn, args, kwargs) for p, fn, args, kwargs in calls if which is None or p == which]
            return lambda: [fn(*args, **kwargs) for fn, args, kwargs in chosen]

        cases = {"step": step, "forward": lambda: model(x), "ops forward": replay(layers["ops"], "forward"),
                 "ops backward": replay(layers["ops"], "backward")}
        if backend == "triton":
            cases.update({"launchers": replay(layers["launchers"]), "launch.run": replay(layers["launch"])})
        counter = ctypes.CDLL(helper)
        for name, fn in cases.items():
            for _ in range(5):
                fn()
            gc.collect()
            gc.disable()
            counter.count_start()
            for _ in range(steps):
                fn()
            counter.count_stop()
            gc.enable()
    print("counted " + ",".join(cases), file=sys.stderr)
    print("calls " + ",".join(f"{name}={len(calls)}" for name, calls in layers.items()), file=sys.stderr)


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


def _callgrind(directory: str, name: str, child_args: list) -> tuple[list, str]:
    """Runs this file's child (child_args after --child) under callgrind in a fresh process: (the totals of its
    dumps, in order; its stderr)."""
    stem = os.path.join(directory, name.replace("+", "_"))
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
               f"--callgrind-out-file={stem}.%p", sys.executable, os.path.abspath(__file__), "--child", *child_args]
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    prefix = os.path.basename(stem) + "."
    # the counter's dumps, <stem>.<pid>.<part>; <stem>.<pid> is callgrind's own at exit (nothing collected)
    dumps = sorted((name for name in os.listdir(directory)
                    if name.startswith(prefix) and name[len(prefix):].count(".") == 1),
                   key=lambda name: int(name.rsplit(".", 1)[1]))
    if result.returncode != 0 or not dumps:
        raise SystemExit(f"count_instructions: {name} failed (rc {result.returncode}):\n{result.stderr[-3000:]}")
    totals = []
    for dump in dumps:
        with open(os.path.join(directory, dump)) as file:
            totals.append(next(int(line.split()[1]) for line in file if line.startswith("summary:")))
    return totals, result.stderr


def count(helper: str, directory: str, problem: str, impl: str, mode: str, steps: int,
          manualbp_path: str) -> tuple[int, str]:
    """(instructions per step, where manualbp came from) for one case, in a fresh process under callgrind."""
    totals, stderr = _callgrind(directory, f"{problem}-{impl}-{mode}",
                                [helper, problem, impl, mode, str(steps), manualbp_path])
    if len(totals) != 1:
        raise SystemExit(f"count_instructions: {problem}/{impl}/{mode}: {len(totals)} dumps, expected 1")
    source = next((line.split(" from ", 1)[1] for line in stderr.splitlines()
                   if line.startswith("manualbp from ")), "?")
    return totals[0] // steps, source


BREAKDOWN_ROWS = (  # (row, how its count is made from the counted cases)
    ("forward: module, functional, autograd Function", lambda c: c["forward"] - c["ops forward"]),
    ("backward: autograd, Function.backward", lambda c: c["step"] - c["forward"] - c["ops backward"]),
    ("operators' computations (ops.direct)", lambda c: c["ops forward"] + c["ops backward"] - c.get("launchers", 0)),
    ("launchers' Python (arguments, outputs)", lambda c: c["launchers"] - c["launch.run"]),
    ("launch.run (lookup, launch)", lambda c: c["launch.run"]),
    ("step (forward+backward)", lambda c: c["step"]),
)


def breakdown(helper: str, directory: str, problems: list, impls: list, steps: int) -> None:
    """Prints, per problem, the step's instructions by layer for each manualbp implementation (module docstring)."""
    impls = [impl for impl in impls if impl != "nn"]
    for problem in problems:
        table = {}
        for impl in impls:
            totals, stderr = _callgrind(directory, f"breakdown-{problem}-{impl}",
                                        [helper, "breakdown", problem, impl, str(steps)])
            names = next(line.split(" ", 1)[1] for line in stderr.splitlines() if line.startswith("counted "))
            counted = dict(zip(names.split(","), (total // steps for total in totals)))
            table[impl] = {row: rule(counted) for row, rule in BREAKDOWN_ROWS if "launch" not in row
                           or "launchers" in counted}
            calls = next(line.split(" ", 1)[1] for line in stderr.splitlines() if line.startswith("calls "))
            print(f"# {problem} {impl}: calls recorded a step {calls}")
        print(f"{problem + ', instructions per step':50s}" + "".join(f"{impl:>17s}" for impl in impls))
        print("-" * (50 + 17 * len(impls)))
        for row, _ in BREAKDOWN_ROWS:
            print(f"{row:50s}" + "".join(f"{table[impl][row]:17,d}" if row in table[impl] else f"{'':17s}"
                                         for impl in impls), flush=True)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        if sys.argv[3] == "breakdown":
            helper, _, problem, impl, steps = sys.argv[2:7]
            breakdown_child(helper, problem, impl, int(steps))
            return 0
        helper, problem, impl, mode, steps, path = sys.argv[2:8]
        child(helper, problem, impl, mode, int(steps), path)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default="linear,mlp", help=f"comma-separated: {', '.join(PROBLEMS)}")
    parser.add_argument("--modes", default="fwd+bwd", help="comma-separated: fwd, fwd+bwd")
    parser.add_argument("--impls", default="nn,manualbp,manualbp-triton",
                        help="comma-separated: nn (always counted first, the ratios' base), manualbp, manualbp-triton")
    parser.add_argument("--steps", type=int, default=300, help="counted calls per case")
    parser.add_argument("--manualbp-path", default="", help="a folder holding another manualbp package to count")
    parser.add_argument("--breakdown", action="store_true",
                        help="the fwd+bwd step by layer of the call chain, for manualbp and manualbp-triton")
    parser.add_argument("--rs-hazard", action="store_true",
                        help="manualbp-triton as on a toolchain with the RS wgmma hazard (the GPU machines' Triton "
                             "3.6): no δ formed in a matmul's loads")
    args = parser.parse_args(argv)
    if args.rs_hazard:
        os.environ[RS_HAZARD_ENV] = "1"  # the children's environment
    unknown = [p for p in args.problems.split(",") if p not in PROBLEMS]
    if unknown:
        parser.error(f"--problems: unknown {unknown}; choose from {list(PROBLEMS)}")
    if shutil.which("valgrind") is None:
        print("count_instructions: valgrind is not installed", file=sys.stderr)
        return 2
    import torch

    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    try:
        triton_version = f"triton {importlib.metadata.version('triton')}"
    except importlib.metadata.PackageNotFoundError:
        triton_version = "no triton"
    print(f"# instructions per step (callgrind, not a timing); {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}, {triton_version}, {version}, float32, "
          f"{args.steps} steps; "
          f"manualbp: reference backend, manualbp-triton: triton backend, launches stubbed"
          f"{', the RS wgmma hazard forced (--rs-hazard)' if args.rs_hazard else ''}")
    with tempfile.TemporaryDirectory() as directory:
        helper = build_helper(directory)
        if args.breakdown:
            breakdown(helper, directory, args.problems.split(","), args.impls.split(","), args.steps)
            return 0
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
