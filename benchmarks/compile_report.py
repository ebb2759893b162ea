"""What the kernels compile to on Hopper (sm_90) and Ampere (sm_80), on a CPU machine: no GPU needed.

    python benchmarks/compile_report.py                        # every kernel variant, every shipped config, sm_90
    python benchmarks/compile_report.py --arch 90,80 --only dW # a subset, two targets
    python benchmarks/compile_report.py --quick                # the small subset the CI test compiles
    python benchmarks/compile_report.py --dtype tf32 --only "dX plain"   # float32 with TF32 products (fp32: IEEE),
                                                               # the launchers' K-major copies as on an sm_90 GPU
    python benchmarks/compile_report.py --out-dir benchmarks/results   # also writes the table and the JSON,
                                                                       # named by target and Triton version

Every launch the package makes for one layer (Linear 1024 -> 4096, M = 8192 rows, bf16 by default) is
captured by calling the real launchers on meta tensors with the kernels replaced by recorders; each
captured launch is then compiled by ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` exactly as a
launch on that GPU would compile it (Triton's own binder decides the specialisations), at every autotune
config the autotuner could pick for it (``matmul_configs()`` after ``_prune_configs`` with the target's
shared memory). Beside each matmul: Triton's tutorial 03 matmul at the same tile and operand layout; beside a
TMA config (sm_90: operand tiles by TMA descriptors, a persistent grid; "tma" in the config column), Triton's
tutorial 09 descriptor-persistent matmul at the same tile. The launchers decide TMA from the GPU they run on;
here their rule reads the target's capability (sm_90 and newer, where this Triton has tl.make_tensor_descriptor),
with the TMA configs included as MANUALBP_TMA=1 offers them.

Columns (all of them compiler output, none a timing):
  mma      the MMA instruction in the PTX (wgmma.m64nNk16 on sm_90, mma.sync on sm_80, none = FMAs)
  A        where wgmma's left operand comes from: SS shared memory, RS registers
  loads    cp.async / TMA / plain global loads in the PTX
  bufs     pipelined shared-memory buffers (= stages realised)
  regs, spill   registers per thread and spill-store bytes (ptxas -v, the log Triton produces); in the JSON also
           wgmma_serialized: ptxas's reason where it serialized the wgmmas (each waited for before the next)
  smem     shared memory per block (Triton's metadata), KiB
  ws       where Triton warp-specialized the K loop ("ws" configs, Triton 3.6+ on sm_90): the warps launched (a
           producer warpgroup issuing the TMA loads, consumer warpgroups running the MMAs) and the registers per
           thread its partitions asked for (setmaxnreg); the loop columns are then left out: each partition has
           loops of its own, and no one of them is the main loop the columns below describe
  loop     SASS instructions of the main loop (the innermost backward branch with the most MMAs)
  bar, shfl     bar.sync / shuffles per main-loop iteration
  side     SASS instructions of the largest loop without MMA (the ∂C/∂X launch's loop storing δ), per iteration
  x tut    loop instructions / the tutorial's at the same tile and layout
  press    issue pressure: loop instructions x warps per SM sub-partition / the SM's MMA clocks per iteration,
           BLOCK_M*BLOCK_N*BLOCK_K / (multiply-adds per clock: mma_per_clock, an H100's for sm_90, an A100's for
           sm_80; TF32 at half the 16-bit rate), twice that for the jvp kernel with two tangents (two products per
           iteration); the tutorial is 0.18-0.24 at its large bf16 tiles, and a loop above ~0.7 is bound by
           instruction issue rather than by the tensor cores (an estimate)

The forward-mode (jvp) tangent kernel is compiled beside them at every config its own pruning keeps (two
products per K step: dX Wᵀ and X dWᵀ); its tutorial twin is one product, so its "x tut" is about 2 by design.

Triton's internals move between releases: what this needs is feature-detected; a missing piece
skips its columns (or, without a compiler at all, the whole report) with the reason, never a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time

# Compiled kernels, not the CPU interpreter; one fixed tile per launch (swapped for each config below).
os.environ.pop("TRITON_INTERPRET", None)
os.environ["MANUALBP_AUTOTUNE"] = "0"

import torch  # noqa: E402

SHARED_MEMORY = {90: 232448, 80: 166912}  # bytes one block may use: H100 227 KiB, A100 163 KiB
TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
LAUNCH_KEYS = ("num_warps", "num_stages")
TUTORIAL_TILE_KEYS = dict(BLOCK_M="BLOCK_SIZE_M", BLOCK_N="BLOCK_SIZE_N", BLOCK_K="BLOCK_SIZE_K", GROUP_M="GROUP_SIZE_M")


class Unavailable(Exception):
    """A Triton internal or tool the report needs is missing in this installation."""


def internals():
    """The pieces of Triton the report uses, feature-detected: a dict, or Unavailable(reason)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as error:
        raise Unavailable(f"Triton's NVIDIA compiler internals are not importable here ({error})") from error
    if not hasattr(JITFunction, "_pack_args"):
        raise Unavailable(f"triton {triton.__version__}: JITFunction._pack_args is gone (launch binding moved)")
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs, "nvidia") or not hasattr(knobs, "compilation"):
        raise Unavailable(f"triton {triton.__version__}: no triton.knobs (ptxas log and cache switches)")
    try:
        ptxas = knobs.nvidia.ptxas.path
    except Exception as error:  # noqa: BLE001 - any failure to locate it means: not available
        raise Unavailable(f"no ptxas found ({type(error).__name__}: {error})") from error
    if not ptxas or not os.path.exists(ptxas):
        raise Unavailable("no ptxas found (neither Triton's bundled one nor TRITON_PTXAS_PATH)")
    notes = []
    if not hasattr(knobs.nvidia, "dump_ptxas_log"):
        notes.append("no knobs.nvidia.dump_ptxas_log: registers and spills not reported")
    return dict(triton=triton, GPUTarget=GPUTarget, CUDABackend=CUDABackend,
                create_function_from_signature=create_function_from_signature, ptxas=ptxas, notes=notes)


def ptxas_version(path):
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+)", out)
    return found.group(1) if found else "?"


# --------------------------------------------------------------------------------------
# Compiling one launch
# --------------------------------------------------------------------------------------


class Compiler:
    def __init__(self, tri, arch):
        self.tri = tri
        self.target = tri["GPUTarget"]("cuda", arch, 32)
        self.backend = tri["CUDABackend"](self.target)
        knobs = tri["triton"].knobs
        if hasattr(knobs.nvidia, "dump_ptxas_log"):
            knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v: registers, spills
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log

    def compile(self, fn, args, kwargs):
        """triton.compile of fn as fn[grid](*args, **kwargs) compiles it on the target GPU: (kernel, ptxas log)."""
        triton = self.tri["triton"]
        kwargs = dict(kwargs, debug=False)
        binder = self.tri["create_function_from_signature"](fn.signature, fn.params, self.backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, sig, consts, attrs = fn._pack_args(self.backend, kwargs, bound, spec, opts)
        log = io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            kernel = triton.compile(triton.compiler.ASTSource(fn, sig, consts, attrs), target=self.target,
                                    options=options.__dict__)
        return kernel, log.getvalue()


def _loop_spans(lines):
    """(first, last) line numbers of each loop (a backward branch's span: its target label to the branch)."""
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\w+:$", line)}
    block_start = 0  # the label line that begins the block the current line is in
    for i, line in enumerate(lines):
        if re.match(r"^\w+:$", line):
            block_start = i
        target = re.search(r"BRA (\w+);", line)
        if target and labels.get(target.group(1), i) < i:
            own_block = [x for x in lines[block_start + 1:i + 1] if x.strip() and "@!PT" not in x]
            if len(own_block) <= 3 and any("TRYWAIT" in x for x in own_block):
                # A wait's retry block, placed after the kernel's code, that jumps back into the loop: its span
                # (the loop's tail, the epilogue, the other retry blocks) is no loop.
                continue
            yield labels[target.group(1)], i


def _instructions(lines):
    return [x for x in lines if x.strip() and not x.startswith("@!PT") and not re.match(r"^\w+:$", x)]


def loop_bodies(sass):
    """The instructions of each loop (a backward branch's span), predicates and labels stripped, in order."""
    lines = sass.splitlines()
    for first, last in _loop_spans(lines):
        body = [x.split("\t", 1)[-1] for x in lines[first + 1:last + 1]]
        yield [re.sub(r"^@!?U?P\w+\s+", "", x) for x in _instructions(body)]  # labels: no instruction


def branch_instructions(sass, first, last) -> list:
    """The instructions (opcode first) of the loop spanning lines first..last that a forward branch inside it can skip:
    code run on some iterations only (the ∂C/∂W + ∂C/∂b loop's chunk end). A branch's target is a label or an address
    (16 bytes an instruction, counted from the function's first)."""
    lines = sass.splitlines()
    is_instruction = [bool(x.strip()) and not re.match(r"^\w+:$", x) and not x.startswith(("Function:", ".", "//"))
                      for x in lines]
    line_at = [i for i, yes in enumerate(is_instruction) if yes]  # instruction number -> line
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\w+:$", line)}
    skipped = set()
    for i in range(first + 1, last):
        target = re.search(r"BRA (?:!?U?P\w+, )?(\w+);", lines[i])
        if not target:
            continue
        name = target.group(1)
        to = labels.get(name) if not name.startswith("0x") else (
            line_at[int(name, 16) // 16] if int(name, 16) // 16 < len(line_at) else None)
        if to is not None and i < to <= last:
            skipped.update(j for j in range(i + 1, to)
                           if is_instruction[j] and not lines[j].split("\t", 1)[-1].startswith("@!PT"))
    return [re.sub(r"^@!?U?P\w+\s+", "", lines[j].split("\t", 1)[-1]) for j in sorted(skipped)]


def _mma_count(body) -> int:
    return sum(x.split()[0].startswith(("HGMMA", "HMMA")) for x in body)


def main_loop_body(sass) -> list:
    """The instructions of the innermost loop holding the most MMA instructions (loop_bodies; [] where none)."""
    best = max(loop_bodies(sass), key=lambda body: (_mma_count(body), -len(body)), default=[])
    return best if _mma_count(best) else []


def main_loop(sass):
    """Opcode counts of the innermost loop (a backward branch) holding the most MMA instructions; loop_branch_instr
    and loop_branch_bar: those of its instructions (and bar.sync) that a branch inside it skips on some iterations
    (branch_instructions): an iteration that skips them runs loop_instr - loop_branch_instr."""
    bodies = list(loop_bodies(sass))
    loops_with_mma = sum(_mma_count(body) > 0 for body in bodies)
    side = max((len(body) for body in bodies if not _mma_count(body) and len(body) > 2), default=0)  # not a spin
    ops = [x.split()[0].rstrip(";") for x in main_loop_body(sass)]
    count = lambda *prefixes: sum(o.startswith(prefixes) for o in ops)  # noqa: E731
    return dict(loop_instr=len(ops), loop_mma=count("HGMMA", "HMMA"), loop_bar=count("BAR.SYNC", "BAR.ARV"),
                loop_shfl=count("SHFL"), loop_spill=count("STL", "LDL"), loop_ldgsts=count("LDGSTS"),
                loop_tma=count("UTMALDG"), loops_with_mma=loops_with_mma, side_loop_instr=side or None,
                **_main_loop_branch(sass))


def _main_loop_branch(sass) -> dict:
    """loop_branch_instr and loop_branch_bar: the main loop's instructions and bar.sync run on some iterations only."""
    lines = sass.splitlines()
    spans = list(_loop_spans(lines))
    bodies = list(loop_bodies(sass))
    skipped = []
    if spans:
        best = max(range(len(spans)), key=lambda i: (_mma_count(bodies[i]), -len(bodies[i])))
        if _mma_count(bodies[best]):
            skipped = branch_instructions(sass, *spans[best])
    return dict(loop_branch_instr=len(skipped), loop_branch_bar=sum(x.startswith(("BAR.SYNC", "BAR.ARV"))
                                                                     for x in skipped))


def analyse(kernel, log):
    """The compiler facts of one compiled kernel (see the module docstring for each)."""
    asm = kernel.asm
    ptx, ttgir = asm["ptx"], asm.get("ttgir", "")
    wgmma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k\d+)\.[\w.]+\s+\{[^}]*\},\s*(\{|%rd)", ptx)
    mma = ("wgmma." + "/".join(sorted({s for s, _ in wgmma})) if wgmma else
           "mma.sync" if "mma.sync" in ptx else "none")
    allocs = re.findall(r"ttg\.local_alloc\s*(?::\s*\(\)\s*)?->\s*!ttg\.memdesc<([\dx]+)x(\w+),", ttgir)
    row = dict(
        mma=mma, A="/".join(sorted({"RS" if a == "{" else "SS" for _, a in wgmma})) or "-",
        cp_async=len(re.findall(r"cp\.async\.c[ga]\.shared\.global", ptx)),
        tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        ld_global=len(re.findall(r"\bld\.global", ptx)),
        bufs=[s for s, _ in allocs if s.count("x") >= 2],
        smem=kernel.metadata.shared,
    )
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs and spills:
        row.update(regs=int(regs[-1]), stack=int(spills.group(1)), spill=int(spills.group(2)),
                   spill_loads=int(spills.group(3)))
        # ptxas's "wgmma.mma_async instructions are serialized due to ...": each wgmma waited for before the next
        serialized = re.search(r"wgmma\.mma_async instructions are serialized due to ([^\n]*?)(?: in the function|$)",
                               log, re.MULTILINE)
        row["wgmma_serialized"] = serialized.group(1).strip() if serialized else ""

    row.update(warp_specialization(kernel, ttgir))
    if row.get("ws_partitions"):  # each partition has loops of its own: the loop columns' one loop is not there
        row["note"] = "warp-specialized: loop columns not comparable (one loop per partition)"
        return row
    try:  # disassembled on first access (nvdisasm); without it, no loop columns
        row.update(main_loop(asm["sass"]))
    except Exception as error:  # noqa: BLE001 - a disassembler problem costs the loop columns only
        row["note"] = f"no SASS ({type(error).__name__}: {str(error)[:80]})"
    return row


def warp_specialization(kernel, ttgir) -> dict:
    """Where Triton warp-specialized the kernel (a ttg.warp_specialize op in the TTGIR: the default region and its
    partitions, each a warpgroup of its own code): ws_partitions (regions, the default one included), ws_warps (the
    warps launched: more than the config's num_warps), ws_registers (the registers per thread the partitions asked
    for, setmaxnreg; the default region gets what is left). {} where not specialized."""
    if "ttg.warp_specialize(" not in ttgir:
        return {}
    asked = re.search(r"ttg\.warp_specialize\(.*requestedRegisters = array<i32: ([\d, ]+)>", ttgir)
    return dict(ws_partitions=1 + len(re.findall(r"^\s*partition\d+\(", ttgir, re.MULTILINE)),
                ws_warps=kernel.metadata.num_warps,
                ws_registers=[int(n) for n in asked.group(1).split(",")] if asked else [])


# --------------------------------------------------------------------------------------
# The launches: the package's (captured from its launchers) and the tutorial's
# --------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a kernel: records the (number, args, kwargs) of each launch instead of running it, numbered
    across all recorders in the order of the launches."""

    launches = itertools.count()

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((next(self.launches), args, kwargs))

    def run(self, *args, grid=None, warmup=False, **kwargs):  # the autotuner's way in
        if not warmup:  # a warm-up launches nothing: a launch plan asks for its compiled kernel that way
            self.calls.append((next(self.launches), args, kwargs))

    def __getattr__(self, name):
        return getattr(self.real, name)


# (name, activation, saved kind, what to call, operand layout of the tutorial twin)
def package_launches(dense, jvp, M, K, N, dtype, quick):
    """name -> (kernel, args, kwargs without tile or launch options, tutorial layout or None, config pruner)."""
    meta = dict(device="meta", dtype=dtype)
    x, w, b = torch.empty(M, K, **meta), torch.empty(N, K, **meta), torch.empty(N, **meta)
    g, saved = torch.empty(M, N, **meta), torch.empty(M, N, **meta)
    below = torch.empty(M, K, **meta)  # the MLP epilogue's saved tensor of the layer below
    ids = {"identity": 0, "relu": 1, "leaky_relu": 2, "gelu": 3, "gelu_tanh": 4, "silu": 5, "tanh": 7}
    slope = {"leaky_relu": -0.1}  # a negative slope: f' from Z, a select

    def fwd(act, kind):
        return lambda: dense.linear_forward(x, w, b, ids[act], slope.get(act, 0.0), write_z=kind != "a",
                                            f_prime_as_z=kind == "f_prime")

    def bwd(act, kind, want_x, want_w, want_b, splits=1):
        import manualbp

        def call():
            with manualbp.config.override(grad_weight_split=splits):
                return dense.linear_backward(g, x, w, saved, ids[act], slope.get(act, 0.0), kind, want_x, want_w,
                                             want_b)
        return call

    launches = [  # every class of epilogue / prologue: select (relu, leaky_relu), f' from A (tanh), f'(Z) saved
        ("fwd identity", fwd("identity", "a"), "NT"), ("fwd relu", fwd("relu", "a"), "NT"),
        ("fwd leaky_relu (Z)", fwd("leaky_relu", "z"), "NT"), ("fwd gelu (f')", fwd("gelu", "f_prime"), "NT"),
        ("fwd gelu_tanh (f')", fwd("gelu_tanh", "f_prime"), "NT"), ("fwd silu (f')", fwd("silu", "f_prime"), "NT"),
        ("fwd tanh", fwd("tanh", "a"), "NT"),
        ("dX prologue relu", bwd("relu", "a", True, False, False), "NN"),
        ("dX prologue leaky_relu", bwd("leaky_relu", "z", True, False, False), "NN"),
        ("dX prologue gelu", bwd("gelu", "f_prime", True, False, False), "NN"),
        ("dX prologue tanh", bwd("tanh", "a", True, False, False), "NN"),
        # ∂C/∂X and ∂C/∂W wanted: the ∂C/∂X matmul's first column of tiles stores δ, the ∂C/∂W matmul is plain
        (("dX+δ store relu", "dW plain+db relu"), bwd("relu", "a", True, True, True), ("NN", "TN")),
        (("dX+δ store leaky_relu", "dW plain+db leaky_relu"), bwd("leaky_relu", "z", True, True, True),
         ("NN", "TN")),
        (("dX+δ store gelu", "dW plain+db gelu"), bwd("gelu", "f_prime", True, True, True), ("NN", "TN")),
        (("dX+δ store tanh", "dW plain+db tanh"), bwd("tanh", "a", True, True, True), ("NN", "TN")),
        # ∂C/∂W without ∂C/∂X (the first layer): δ formed in the ∂C/∂W matmul's loads, ∂C/∂b beside it
        ("dW prologue+db relu", bwd("relu", "a", False, True, True), "TN"),
        ("dW prologue+db leaky_relu", bwd("leaky_relu", "z", False, True, True), "TN"),
        ("dW prologue+db gelu", bwd("gelu", "f_prime", False, True, True), "TN"),
        ("dW prologue+db tanh", bwd("tanh", "a", False, True, True), "TN"),
        ("dW prologue relu (no db)", bwd("relu", "a", False, True, False), "TN"),
        ("dW prologue gelu (no db)", bwd("gelu", "f_prime", False, True, False), "TN"),
        # split-K ∂C/∂W (4 splits of the rows: as grad_weight_split="auto" picks for 32 output tiles on 132 SMs),
        # then the fixed-order sum of the splits and of ∂C/∂b's chunks
        (("dW split4 prologue+db relu", "split sum+db"), bwd("relu", "a", False, True, True, 4), ("TN", None)),
        (("dW split4 prologue+db gelu", "split sum+db #2"), bwd("gelu", "f_prime", False, True, True, 4),
         ("TN", None)),
        (("dX+δ store relu #2", "dW split4 plain+db relu", "split sum+db #3"), bwd("relu", "a", True, True, True, 4),
         ("NN", "TN", None)),
        (("dW split4 prologue relu (no db)", "split sum"), bwd("relu", "a", False, True, False, 4), ("TN", None)),
        ("dX plain (δ stored)", lambda: dense.matmul(g, w), "NN"),
        ("dW plain (δᵀ strides)", lambda: dense.matmul(g.t(), x), "TN"),
        ("MLP epilogue+db relu", lambda: dense.matmul_times_activation_grad(g, w, below, 1, 0.0, "z", True), "NN"),
        ("MLP epilogue+db gelu", lambda: dense.matmul_times_activation_grad(g, w, below, 3, 0.0, "z", True), "NN"),
        ("δ pass+db gelu", lambda: dense.delta_and_bias_grad(g, saved, 3, 0.0, "z", True, True), None),
        ("δ pass db-only relu", lambda: dense.delta_and_bias_grad(g, saved, 1, 0.0, "a", False, True), None),
        ("activation pass gelu", lambda: dense.activation_forward(saved, 3, 0.0), None),
        # forward mode: dA = f'(Z) ⊙ (dX Wᵀ + X dWᵀ + db), one tangent (a select) and all three (f' from f'(Z), Z)
        ("jvp relu dX", lambda: jvp.linear_jvp(x, w, saved, x, None, None, 1, 0.0, "a", M, N), "NT"),
        ("jvp gelu (f') dX,dW,db", lambda: jvp.linear_jvp(x, w, saved, x, w, b, 3, 0.0, "f_prime", M, N), "NT"),
        ("jvp gelu (Z) dX,dW,db", lambda: jvp.linear_jvp(x, w, saved, x, w, b, 3, 0.0, "z", M, N), "NT"),
    ]
    if quick:  # the CI subset: the heaviest epilogue, the ∂C/∂b loop, a select prologue, the tangent kernel
        keep = ("fwd gelu (f')", "dW prologue+db relu", "dX prologue relu", "jvp gelu (Z) dX,dW,db",
                "dX+δ store relu")
        launches = [launch for launch in launches if keep[-1] in launch[0] or launch[0] in keep]
    # (module, kernel name) -> the configs its autotuner keeps for a launch's named arguments and constexprs, as
    # it prunes them (None: an elementwise pass, one fixed block). One role kernel per matmul (dense._role_kernel).
    kernels = {(dense, name): (lambda names, name=name, **kwargs: dense._prune_role(
        name, dense.role_configs(name), names, **kwargs)) for name in dense.MATMUL_KERNELS}
    kernels.update({(dense, "_delta_kernel"): None, (dense, "_activation_kernel"): None,
                    (dense, "_split_sum_kernel"): None,
                    (jvp, "_jvp_kernel"): lambda names, **kwargs: jvp._prune_configs(dense.matmul_configs(), names,
                                                                                     **kwargs)})
    recorders = {key: _Recorder(getattr(*key)) for key in kernels}
    out = {}
    try:
        for (module, name), recorder in recorders.items():
            setattr(module, name, recorder)
        for label, call, layout in launches:
            for recorder in recorders.values():
                recorder.calls.clear()
            call()
            # the call's launches in the order it made them, whichever kernels they went to
            calls = sorted((number, key, args, kwargs) for key, recorder in recorders.items()
                           for number, args, kwargs in recorder.calls)
            for i, (_, key, args, kwargs) in enumerate(calls):
                if isinstance(label, tuple):  # a name and a layout for each of the launches
                    tag, layout_i = label[i], layout[i]
                else:
                    tag, layout_i = (label if len(calls) == 1 else f"{label} #{i + 1}"), layout
                kwargs = {k: v for k, v in kwargs.items() if k not in TILE_KEYS + LAUNCH_KEYS}
                pruner = kernels[key]
                out[tag] = (recorders[key].real, args, kwargs, layout_i if pruner else None, pruner)
    finally:
        for (module, name), recorder in recorders.items():
            setattr(module, name, recorder.real)
    return out


def tutorial_kernel():
    """Triton's tutorial 03 matmul (a copy of the current tutorial's kernel; the reference of the loop counts)."""
    import triton
    import triton.language as tl

    @triton.jit
    def tutorial_matmul(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                        stride_cn, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                        BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
        pid = tl.program_id(axis=0)
        num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
        num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
        num_pid_in_group = GROUP_SIZE_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_SIZE_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m
        offs_am = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)) % M
        offs_bn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)) % N
        offs_k = tl.arange(0, BLOCK_SIZE_K)
        a_ptrs = a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
        b_ptrs = b_ptr + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
        accumulator = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_SIZE_K, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_SIZE_K, other=0.0)
            accumulator = tl.dot(a, b, accumulator)
            a_ptrs += BLOCK_SIZE_K * stride_ak
            b_ptrs += BLOCK_SIZE_K * stride_bk
        c = accumulator.to(c_ptr.dtype.element_ty)
        offs_cm = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
        offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
        c_ptrs = c_ptr + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :]
        tl.store(c_ptrs, c, mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))

    return tutorial_matmul


def tutorial09_kernel():
    """Triton's tutorial 09 descriptor-persistent matmul (device-side TMA descriptors, a persistent grid, the epilogue
    in two column halves), copied without its Blackwell-only options (warp specialization, loop flattening): the
    twin of the TMA configs. Its operands are fixed: A [M, K] and B [N, K], both rows contiguous (NT)."""
    import triton
    import triton.language as tl

    @triton.jit
    def tutorial09_matmul(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_SIZE_M: tl.constexpr, BLOCK_SIZE_N: tl.constexpr,
                          BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr, NUM_SMS: tl.constexpr):
        dtype = c_ptr.dtype.element_ty
        start_pid = tl.program_id(axis=0)
        num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
        num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
        k_tiles = tl.cdiv(K, BLOCK_SIZE_K)
        num_tiles = num_pid_m * num_pid_n
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1],
                                           block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1],
                                           block_shape=[BLOCK_SIZE_N, BLOCK_SIZE_K])
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1],
                                           block_shape=[BLOCK_SIZE_M, BLOCK_SIZE_N // 2])
        num_pid_in_group = GROUP_SIZE_M * num_pid_n
        for tile_id in tl.range(start_pid, num_tiles, NUM_SMS):
            group_id = tile_id // num_pid_in_group
            first_pid_m = group_id * GROUP_SIZE_M
            group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
            pid_m = first_pid_m + (tile_id % group_size_m)
            pid_n = (tile_id % num_pid_in_group) // group_size_m
            offs_am = pid_m * BLOCK_SIZE_M
            offs_bn = pid_n * BLOCK_SIZE_N
            accumulator = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
            for ki in range(k_tiles):
                offs_k = ki * BLOCK_SIZE_K
                a = a_desc.load([offs_am, offs_k])
                b = b_desc.load([offs_bn, offs_k])
                accumulator = tl.dot(a, b.T, accumulator)
            acc = tl.permute(tl.reshape(accumulator, (BLOCK_SIZE_M, 2, BLOCK_SIZE_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(acc)
            c_desc.store([offs_am, offs_bn], acc0.to(dtype))
            c_desc.store([offs_am, offs_bn + BLOCK_SIZE_N // 2], acc1.to(dtype))

    return tutorial09_matmul


def tutorial09_args(M, K, N, dtype):
    meta = dict(device="meta", dtype=dtype)
    return (torch.empty(M, K, **meta), torch.empty(N, K, **meta), torch.empty(M, N, **meta), M, N, K)


def tutorial_args(layout, M, K, N, dtype):
    """The tutorial's arguments for one operand layout: NT = forward (B = Wᵀ), NN = δ W, TN = δᵀ X."""
    meta = dict(device="meta", dtype=dtype)
    a, b = {"NT": (torch.empty(M, K, **meta), torch.empty(N, K, **meta).t()),
            "NN": (torch.empty(M, K, **meta), torch.empty(K, N, **meta)),
            "TN": (torch.empty(K, M, **meta).t(), torch.empty(K, N, **meta))}[layout]
    c = torch.empty(M, N, **meta)
    return (a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride())


def problem_of(label, M, K, N):
    """(rows, columns, contracted) of the matmul a launch computes, for the tutorial twin's arguments."""
    if label.startswith("fwd"):
        return M, N, K  # X Wᵀ: [M, K] [K, N]
    if label.startswith("dW"):
        return N, K, M  # δᵀ X: [N, M] [M, K]
    if label.startswith(("MLP", "dX")):
        return M, K, N  # δ W: [M, N] [N, K]
    return M, N, K


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def configs_for(dense, kernel, pruner, kernel_args, kwargs, arch):
    """The autotune configs the autotuner could pick for this launch on the target (pruned as it prunes)."""
    names = dict(zip(kernel.arg_names, kernel_args))
    budget = SHARED_MEMORY.get(arch, SHARED_MEMORY[80])
    saved = dense._shared_memory_bytes
    dense._shared_memory_bytes = lambda index: budget
    try:
        return pruner(names, **kwargs)
    finally:
        dense._shared_memory_bytes = saved


def config_label(config):
    k = config.kwargs
    split = f" e{k['EPILOGUE_SPLIT']}" if "EPILOGUE_SPLIT" in k else ""  # the forward epilogue's column slices
    tma = " tma" if k.get("TMA", False) else ""  # TMA descriptors, persistent grid
    ws = " ws" if k.get("WARP_SPECIALIZE", False) else ""  # the K loop warp-specialized
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{config.num_warps} s{config.num_stages}{split}{tma}{ws}"


def mma_per_clock(arch: int, tf32: bool = False) -> int:
    """Dense multiply-adds one SM's tensor cores finish per clock: 16-bit operands 2048 on an H100 (sm_90), 1024 on
    an A100 (sm_80); TF32 half of that (NVIDIA's H100 and A100 whitepapers: 989 and 312 dense 16-bit TFLOP/s, 495
    and 156 TF32, at 132 and 108 SMs)."""
    return (2048 if arch >= 90 else 1024) // (2 if tf32 else 1)


def issue_pressure(row, config, products=1, arch=90, tf32=False):
    """Loop instructions per MMA clock (see the docstring); products: tile products per iteration (jvp: 2); arch and
    tf32: the target and whether the products are TF32 (their MMA clocks, mma_per_clock)."""
    k = config.kwargs
    mma_clocks = products * k["BLOCK_M"] * k["BLOCK_N"] * k["BLOCK_K"] / mma_per_clock(arch, tf32)
    return round(row["loop_instr"] * (config.num_warps / 4) / mma_clocks, 2)


def run(arch, only, quick, M, K, N, dtype, progress=print, tf32=False):
    """Compile everything selected for one target: (header dict, rows). tf32: float32 launches with TF32 products,
    as where PyTorch's settings allow them (dense.tf32_allowed)."""
    tri = internals()
    import triton
    import triton.language as tl

    import manualbp
    from manualbp.triton_kernels import dense, jvp

    compiler = Compiler(tri, arch)
    header = dict(triton=triton.__version__, torch=torch.__version__, ptxas=ptxas_version(tri["ptxas"]),
                  python=platform.python_version(), target=f"sm_{arch}", problem=f"Linear {K}->{N}, M={M}",
                  dtype=str(dtype).replace("torch.", ""), notes=list(tri["notes"]),
                  figures="compiler output (no GPU run); no timing")
    tutorial = tutorial_kernel()
    tutorial09 = tutorial09_kernel() if hasattr(tl, "make_tensor_descriptor") else None
    tutorial_rows = {}
    rows = []
    # The launchers decide TMA, packed pairs and the persistent grid from the GPU they run on: here their own
    # rules (dense._tma_capable, dense._packed_pairs) read the target's capability instead, with the TMA configs
    # that MANUALBP_TMA=1 offers included.
    inline_ptx, num_sms, capability = dense._inline_ptx, dense._num_sms, torch.cuda.get_device_capability
    setup_class, reads_k_major, tf32_allowed = dense._MatmulSetup, dense._tf32_reads_k_major, dense.tf32_allowed
    dense._inline_ptx = lambda device: True  # compiled for an NVIDIA target
    dense._num_sms = lambda device: 132  # H100 SXM; the persistent grid's size, not compiled in
    torch.cuda.get_device_capability = lambda device=None: divmod(arch, 10)
    if tf32:  # as on that GPU with TF32 allowed: each float32 launch TF32 (meta tensors are not CUDA ones), and
        # its operands copied K-major where the target's TF32 wgmmas need it (dense._tf32_reads_k_major)
        class TF32Setup(setup_class):
            __slots__ = ()

            def __init__(self, flags, settings):
                super().__init__(flags, settings)
                self.tf32 = True

        dense._MatmulSetup, dense._MATMUL_SETUPS = TF32Setup, {}
        dense._tf32_reads_k_major = lambda device: arch // 10 == 9
        dense.tf32_allowed = lambda: True
    try:
        with manualbp.config.override(tma=True, warp_specialize=True):
            launches = package_launches(dense, jvp, M, K, N, dtype, quick)
    finally:
        dense._inline_ptx, dense._num_sms, torch.cuda.get_device_capability = inline_ptx, num_sms, capability
        dense._MatmulSetup, dense._tf32_reads_k_major, dense._MATMUL_SETUPS = setup_class, reads_k_major, {}
        dense.tf32_allowed = tf32_allowed
    for label, (kernel, args, kwargs, layout, pruner) in launches.items():
        if only and not any(part in label for part in only.split(",")):
            continue
        if tf32 and "INPUT_PRECISION" in kwargs:
            kwargs = dict(kwargs, INPUT_PRECISION="tf32")
        if layout is None:  # an elementwise pass: its one fixed block
            configs = [None]
        else:
            configs = configs_for(dense, kernel, pruner, args, kwargs, arch)
            if quick:  # the first config, the first TMA config where the target has TMA, and the first warp-specialized
                configs = (configs[:1] + [c for c in configs if c.kwargs.get("TMA", False)][:1]
                           + [c for c in configs if c.kwargs.get("WARP_SPECIALIZE", False)][:1])
        for config in configs:
            row = dict(kernel=label, config="fixed block" if config is None else config_label(config))
            launch = dict(kwargs) if config is None else dict(kwargs, **config.kwargs, num_warps=config.num_warps,
                                                              num_stages=config.num_stages)
            if config is None:
                launch.update({k: v for k, v in dense._DELTA_BLOCK.items()})
            start = time.perf_counter()
            try:
                row.update(analyse(*compiler.compile(kernel, args, launch)))
            except Exception as error:  # noqa: BLE001 - report it and go on with the next one
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
            row["compile_s"] = round(time.perf_counter() - start, 1)
            if config is not None and "loop_instr" in row:
                products = 2 if kwargs.get("HAS_TANGENT_X") and kwargs.get("HAS_TANGENT_WEIGHT") else 1
                row["press"] = issue_pressure(row, config, products, arch, tf32)
                tma = config.kwargs.get("TMA", False)  # twin: tutorial 09 (TMA, persistent; NT only), else 03
                tile_label = row["config"].split(" e")[0].removesuffix(" tma")  # no split, no tma: the twin's own
                key = ("NT" if tma else layout, tile_label + (" tma" if tma else ""))
                if key not in tutorial_rows:
                    rows_, cols_, inner_ = problem_of(label, M, K, N)
                    tile = {TUTORIAL_TILE_KEYS[k]: v for k, v in config.kwargs.items() if k in TUTORIAL_TILE_KEYS}
                    tut = dict(kernel=f"tutorial {'09' if tma else '03'} {key[0]}", config=key[1])
                    if tma:
                        twin, twin_args = tutorial09, tutorial09_args(rows_, inner_, cols_, dtype)
                        tile["NUM_SMS"] = 132
                    else:
                        twin, twin_args = tutorial, tutorial_args(layout, rows_, inner_, cols_, dtype)
                    try:
                        # FMA contraction stated as the package's launches state it: Triton 3.10 turns the
                        # default off, which would move the twins' rows but not the package's.
                        tut.update(analyse(*compiler.compile(
                            twin, twin_args, dict(tile, num_warps=config.num_warps, num_stages=config.num_stages,
                                                  **dense.COMPILE_OPTIONS))))
                        tut["press"] = issue_pressure(tut, config, 1, arch, tf32)
                    except Exception as error:  # noqa: BLE001
                        tut["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
                    tutorial_rows[key] = tut
                tut = tutorial_rows[key]
                if tut.get("loop_instr"):
                    row["x_tut"] = round(row["loop_instr"] / tut["loop_instr"], 2)
            rows.append(row)
            progress(format_row(row))
    rows += list(tutorial_rows.values())
    return header, rows


COLUMNS = [  # (title, width, key, format)
    ("kernel", 28, "kernel", "s"), ("config", 27, "config", "s"), ("mma", 17, "mma", "s"), ("A", 2, "A", "s"),
    ("cp.async/TMA/ld", 15, None, None), ("bufs", 5, None, None), ("regs", 4, "regs", "d"),
    ("spill", 5, "spill", "d"), ("smem KiB", 8, None, None), ("ws", 11, None, None), ("loop", 4, "loop_instr", "d"), ("bar", 3, "loop_bar", "d"),
    ("shfl", 4, "loop_shfl", "d"), ("side", 4, "side_loop_instr", "d"), ("x tut", 5, "x_tut", ".2f"), ("press", 5, "press", ".2f"), ("s", 4, "compile_s", ".1f"),
]


def format_row(row):
    if "error" in row:
        return f"{row['kernel'][:28]:28s} {row['config']:27s} ERROR {row['error']}"
    cells = []
    for title, width, key, fmt in COLUMNS:
        if title == "cp.async/TMA/ld":
            value = f"{row['cp_async']}/{row['tma']}/{row['ld_global']}"
        elif title == "bufs":
            value = str(len(row["bufs"]) and int(row["bufs"][0].split("x")[0])) if row["bufs"] else "-"
        elif title == "smem KiB":
            value = f"{row['smem'] / 1024:.0f}"
        elif title == "ws":  # warps launched, registers the partitions asked for
            value = (f"{row['ws_warps']}w {'/'.join(map(str, row['ws_registers']))}" if row.get("ws_partitions")
                     else "-")
        elif row.get(key) is None:
            value = "-"
        else:
            value = format(row[key], fmt)
        cells.append(f"{value[:width]:{'<' if fmt == 's' else '>'}{width}s}")
    return " ".join(cells)


def table(header, rows):
    lines = [f"# compile report: {header['problem']} {header['dtype']}, target {header['target']}, "
             f"triton {header['triton']}, ptxas {header['ptxas']}, torch {header['torch']}",
             f"# {header['figures']}"] + [f"# note: {note}" for note in header["notes"]]
    if "code" in header:
        lines.append(f"# code: {header['code']}")
    titles = " ".join(f"{t:{'<' if f == 's' else '>'}{w}s}" for t, w, _, f in COLUMNS)
    lines += [titles, "-" * len(titles)] + [format_row(row) for row in rows]
    return "\n".join(lines) + "\n"


def summary(rows):
    """Per kernel over its configs: the best issue pressure (and where), the most spill bytes, bar.sync per iteration."""
    kernels = {}
    for row in rows:
        if "error" not in row and not row["kernel"].startswith("tutorial"):
            kernels.setdefault(row["kernel"], []).append(row)
    lines = ["", "# per kernel, over its configs (compiler output)",
             f"{'kernel':28s} {'configs':>7s} {'wgmma':>5s} {'max spill':>9s} {'max bar':>7s} {'max shfl':>8s} "
             f"{'best press':>10s}  best config"]
    for name, group in kernels.items():
        pressed = [r for r in group if r.get("press") is not None]
        best = min(pressed, key=lambda r: r["press"]) if pressed else None
        worst = lambda key: max((r.get(key) or 0) for r in group)  # noqa: E731
        wgmma = "all" if all(r["mma"].startswith("wgmma") for r in group) else (
            "-" if not pressed else "NOT all")
        lines.append(f"{name[:28]:28s} {len(group):7d} {wgmma:>5s} {worst('spill'):9d} {worst('loop_bar'):7d} "
                     f"{worst('loop_shfl'):8d} {best['press'] if best else '-':>10}  {best['config'] if best else ''}")
    return "\n".join(lines) + "\n"


def write(stem, header, rows):
    text = table(header, rows) + summary(rows)
    with open(stem + ".txt", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(dict(header=header, rows=rows), f, indent=1, ensure_ascii=False)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90", help="comma list of compute capabilities (default 90; 80 = A100)")
    parser.add_argument("--only", default="", help="comma list of substrings of kernel names to compile")
    parser.add_argument("--quick", action="store_true",
                        help="the CI subset: four kernels, their first config (and first TMA config) each")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "tf32"],
                        help="tf32: float32 data with TF32 products (where PyTorch's settings allow them)")
    parser.add_argument("--shape", default="8192,1024,4096", help="M,K,N of the layer (default 8192,1024,4096)")
    parser.add_argument("--json", default="", help="write the header and rows as JSON to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--out-dir", default="", help="write compile_report_sm<arch>_triton-<version>.{txt,json} here")
    parser.add_argument("--from-json", default="", help="print (and with --out-dir rewrite) a saved report's table")
    args = parser.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(table(saved["header"], saved["rows"]) + summary(saved["rows"]))
        if args.out_dir:
            write(os.path.join(args.out_dir, os.path.basename(args.from_json)[:-len(".json")]), saved["header"],
                  saved["rows"])
        return 0
    M, K, N = (int(v) for v in args.shape.split(","))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}[args.dtype]
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    results = []
    for arch in (int(a) for a in args.arch.split(",")):
        try:
            header, rows = run(arch, args.only, args.quick, M, K, N, dtype, progress=progress,
                               tf32=args.dtype == "tf32")
            header["dtype"] += " (TF32 products)" if args.dtype == "tf32" else ""
        except Unavailable as reason:
            print(f"compile_report: unavailable: {reason}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(unavailable=str(reason)), f)
            return 0
        print(table(header, rows) + summary(rows), flush=True)
        results.append(dict(header=header, rows=rows))
        if args.out_dir:
            os.makedirs(args.out_dir, exist_ok=True)
            suffix = "" if args.dtype == "bf16" else f"_{args.dtype}"
            write(os.path.join(args.out_dir, f"compile_report_sm{arch}_triton-{header['triton']}{suffix}"), header,
                  rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
