"""Launch plans: what a kernel launch of one role needs beyond its tensors, computed once and cached.

The interface every launcher goes through (dense.py's matmuls, δ pass and activation pass, jvp.py's jvp; a
persistent kernel per role plugs in the same way, with a make() of its own):

    launch.run(role, options, args, M, N, make, *make_args)
        role      "forward", "grad_x", "grad_weight", "grad_below" (the MLP's fused δ), "matmul", "delta",
                  "activation", "jvp": which kernel and tile list serve the launch
        options   the launcher's hashable choices: every input of its flags (activation, what is read and written),
                  the sizes' tuning buckets, the settings that change the kernel, the device
        args      the kernel's runtime arguments in its order (tensors and ints), outputs already allocated
        M, N      the output's size, for the grid
        make      make(*make_args) is called on the first launch of a key only: dict(fn=, constexprs=, grid=, tuner=,
                  ...) for build() (a function and its arguments rather than a closure made on every call)

A warm call is one dict lookup of the call's exact values and the launch; the first call of a key tunes (where it
has a tuner), compiles, launches and records a Plan. In detail: the launchers of one (role, options, number of
args) put their tensors at the same positions (a _Layout, found by one lookup); the call's exact values -- its ints,
M and N, and per tensor its dtype, device index and address modulo 16 -- are looked up in that layout's table of
calls already seen (``_Layout.warm``), which gives the plan and the grid (the questions, the lookup and the launch
are code generated for the layout: ``_Layout.call``). Only a call not seen before computes the
plan key (:func:`specialization`) and finds or builds its Plan; the table holds at most WARM_CALLS entries a layout
(then starts afresh), so shapes that vary cost a key computation per new shape, never unbounded memory.

args are a kernel's runtime arguments in its order (tensors and ints); the key folds in, per argument, what
Triton compiles a kernel for (a tensor's dtype and 16-byte alignment; an int's being 1, its divisibility by 16 and
its width: :func:`specialization`), so every call of one key can run the kernel compiled for the first. A Plan
holds the constexprs (flags and tile), the grid rule and one of three launchers, chosen once by what the
installed Triton offers (3.3 through 3.9):

    compiled     the CompiledKernel's own launcher (``kernel.run``, what ``JITFunction.run`` ends with), given the
                 tensors as their addresses (``data_ptr()`` ints: Triton's C launcher then asks the driver nothing
                 per pointer, cuPointerGetAttribute, which manualbp's own device checks make redundant), the
                 constexprs after them, on the current stream; where a launch hook is set (a profiler), the
                 CompiledKernel's public ``kernel[grid](*args)`` instead, which builds the hooks' metadata
    jit          ``JITFunction.run`` with the plan's constexprs (binder, cache lookup, launch): where the compiled
                 launcher cannot be reached (another backend, an internal that moved)
    interpreted  Triton's interpreter (TRITON_INTERPRET=1): the interpreted kernel's ``run`` with the constexprs, on
                 tensors; everything before it (key, lookup, arguments, grid) is the GPU's path, so the CPU tests
                 exercise it

Kernels launch on their tensors' GPU: where that is not the current device (cuda:1), run() makes it current for
the launch (``_on_device``), so launchers need no device guard. A warm call therefore tunes nothing and compiles
nothing (on the compiled launcher it asks nothing but the current device and stream); nothing in it reads a tensor's value (no host-device synchronisation), and its outputs
come from PyTorch's caching allocator (the launchers' torch.empty), so a warm step can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Optional

import torch
import triton

_Tensor = torch.Tensor
WARM_CALLS = 1024  # exact calls remembered per layout (_Layout.warm) before it starts afresh


class _Plans(dict):
    """(role, options, specialization(args)) -> Plan. clear() also forgets the calls each layout has seen, whose
    table points at plans: a cleared store builds every plan again."""

    def clear(self) -> None:
        _LAYOUTS.clear()
        super().clear()


PLANS: dict = _Plans()
_LAYOUTS: dict = {}  # (role, options, len(args)) -> _Layout


def specialization(args: tuple) -> tuple:
    """Per argument, what Triton specialises a kernel on, or something finer: a tensor's dtype and whether its
    data is 16-byte aligned; an int's being 1, its divisibility by 16 and its width (32 bits, 64). And each
    tensor's device: tensors on another device than the plan's get a key of their own, whose first launch goes
    through Triton's own pointer checks (a clear error), never through a plan's addresses."""
    return tuple([(a.dtype, a.get_device(), a.data_ptr() & 15 == 0) if isinstance(a, _Tensor)
                  else (a == 1, a & 15 == 0, -2147483648 <= a < 2147483648) for a in args])  # ints


class _Layout:
    """Where one (role, options, number of args)'s tensors sit among its args, and the calls of it seen so far.

    Launchers pass one tensor in several slots (an output in the slots of inputs a kernel does not read): the
    layout asks each tensor of the first call once, at its first position, and a later call checks that the same
    positions hold the same tensor objects (``is``).
    ``warm``: the exact values of a call (:meth:`exact`) -> (its Plan, and its launch: the grid, and the compiled
    launcher's parts where the plan has one). Every value a plan's key is made of is in there, or something finer
    (the address modulo 16 for the alignment; each int itself), so a call found here has the plan the key
    computation would have given.

    ``exact`` and ``call`` (the warm call: exact values, lookup, launch) are generated for the layout, as Triton
    generates its own binder: each argument unpacked by position, each distinct tensor asked its address, dtype
    and device by one C call each (methods and attribute: cheaper than the same descriptors called, callgrind), no
    loop, and the compiled launcher called with the values in place.
    """

    __slots__ = ("positions", "repeats", "warm", "exact", "call")

    def __init__(self, args: tuple):
        self.positions = _tensor_positions(args)
        self.warm = {}
        self.exact, self.call, self.repeats = _generated(args, self.positions, self.warm)

    def shared_as_first(self, exact: tuple) -> bool:
        """Whether a call's exact values hold its tensors shared among slots as in the layout's first call."""
        return all(exact[len(exact) - self.repeats:]) if self.repeats else True

    def remember(self, exact: tuple, plan: "Plan", M: int, N: int) -> None:
        """A call's exact values -> its plan, grid and compiled launcher's parts (None: the plan has none): the
        launcher, the grid's first two sizes, the kernel, its metadata, the constexprs after the runtime arguments,
        the GPU."""
        if len(self.warm) >= WARM_CALLS:
            self.warm.clear()
        grid, launcher = plan.grid(M, N), None
        if plan.kind == "compiled":
            _, call, function, metadata = plan.compiled
            rows, columns = grid[0], grid[1] if len(grid) > 1 else 1
            launcher = (call, rows, columns, function, metadata, plan.tail, plan.device_index)
        self.warm[exact] = (plan, grid, launcher)


def _generated(args: tuple, positions: tuple, warm: dict):
    """A layout's exact(args, M, N) and call(args, M, N) (the _Layout docstring), as Python source made for its
    positions and compiled once; and its number of repeats. exact -> the exact values: one flat tuple of the ints, M,
    N, per distinct tensor its dtype, then its device index, then its address modulo 16, last whether each repeat
    is its first's tensor. call -> the Plan launched, or None where the call was not seen before (or an int sits
    where the layout has a tensor)."""
    first = {}  # id -> the first position of that tensor
    for i in positions:
        first.setdefault(id(args[i]), i)
    distinct = sorted(first.values())
    repeats = [i for i in positions if first[id(args[i])] != i]
    names = [f"t{i}" if i in positions else f"i{i}" for i in range(len(args))]
    ints = [names[i] for i in range(len(args)) if i not in positions]
    addresses = [f"p{i}" for i in distinct]
    values = ", ".join([*ints, "M", "N", *(f"t{i}.dtype" for i in distinct),
                        *(f"t{i}.get_device()" for i in distinct), *(f"p{i} & 15" for i in distinct),
                        *(f"t{i} is t{first[id(args[i])]}" for i in repeats)])
    # each slot's launcher value: a tensor's address (that of its first slot), an int itself
    launched = ", ".join(f"p{first[id(args[i])]}" if i in positions else names[i] for i in range(len(args)))
    unpack = "".join(f"{name}, " for name in names)
    asked = "".join(f"p{i} = t{i}.data_ptr(); " for i in distinct)
    source = f"""
def make(_warm_get):
    def exact(args, M, N):
        ({unpack}) = args
        {asked}
        return ({values},)

    def call(args, M, N):
        ({unpack}) = args
        try:
            {asked}
            values = ({values},)
        except AttributeError:  # an int where this layout has a tensor: not a call of this layout
            return None
        hit = _warm_get(values)
        if hit is None:
            return None
        plan, grid, launcher = hit
        enter, leave = _HOOKS.launch_enter_hook, _HOOKS.launch_exit_hook  # None (Triton 3.3), a HookChain (3.4+)
        if (launcher is None or Plan.launch is not _PLAN_LAUNCH or not (  # or a hook set (Triton's own chains
                (enter is None or (not enter.calls if enter is _ENTER else _no_calls(enter)))  # asked directly)
                and (leave is None or (not leave.calls if leave is _EXIT else _no_calls(leave))))):
            return _launch_slowly(plan, args, ({launched},), grid, M, N)
        compiled, rows, columns, function, metadata, tail, device_index = launcher
        if device_index is not None and device_index != torch.cuda.current_device():  # another GPU than the current
            return _launch_slowly(plan, args, ({launched},), grid, M, N)
        plan.launches += 1
        compiled(rows, columns, 1, _raw_stream(device_index), function, metadata, None, None, None, {launched},
                 *tail)
        return plan

    return exact, call
"""
    scope = {}
    exec(compile(source, f"<launch.py: a layout of {len(args)} arguments, tensors at {positions}>", "exec"),
         globals(), scope)  # the module's own globals: what tests and benchmarks replace there reaches these
    exact, call = scope["make"](warm.get)
    return exact, call, len(repeats)


def _launch_slowly(plan: "Plan", args: tuple, values: tuple, grid: tuple, M: int, N: int) -> "Plan":
    """A warm call's launch other than the compiled launcher's with no hook set, on the current GPU: Plan.launch
    replaced (a benchmark records or stubs the warm launches), a launch hook set (a profiler), a plan without a
    compiled launcher, tensors on another GPU than the current one."""
    with _on_device(plan.device_index):
        if Plan.launch is not _PLAN_LAUNCH:
            plan.launch(args, M, N)
            return plan
        plan.launches += 1
        plan.fire(args, values, grid)
    return plan


# A kernel launches on the current CUDA device: launch.py makes it the tensors' device where it is not (cuda:1),
# so the launchers need no device guard of their own (entering one cost every launch a context manager's calls).
_NOT_SWITCHED = contextlib.nullcontext()


def _on_device(index: Optional[int]):
    """A context that makes GPU index the current device, where it is not (None, -1: not a GPU)."""
    if index is None or index < 0 or index == torch.cuda.current_device():
        return _NOT_SWITCHED
    return torch.cuda.device(index)


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler): None (Triton 3.3) or a HookChain without calls (3.4+) is none."""
    enter, leave = _HOOKS.launch_enter_hook, _HOOKS.launch_exit_hook
    return not ((enter is None or _no_calls(enter)) and (leave is None or _no_calls(leave)))


def _no_calls(hook) -> bool:
    """Whether a launch hook that is not None calls nothing: a HookChain without calls (a function always calls)."""
    return not getattr(hook, "calls", True)


def _tensor_positions(args: tuple) -> tuple:
    return tuple(i for i, a in enumerate(args) if isinstance(a, _Tensor))


def run(role: str, options: tuple, args: tuple, M: int, N: int, make: Callable[..., dict], *make_args) -> "Plan":
    """Launch a kernel of this role through its plan (module docstring); returns the plan."""
    layout = _LAYOUTS.get((role, options, len(args)))
    if layout is not None:
        plan = layout.call(args, M, N)
        if plan is not None:
            return plan
    return _first_call(role, options, args, M, N, make, make_args)


def _first_call(role: str, options: tuple, args: tuple, M: int, N: int, make: Callable[..., dict],
                make_args: tuple) -> "Plan":
    """A call whose exact values run() has not seen: its plan found by key, or built (which launches); then
    remembered for the calls like it."""
    layout_key = (role, options, len(args))
    layout = _LAYOUTS.get(layout_key)
    if layout is None:
        layout = _LAYOUTS[layout_key] = _Layout(args)
    elif layout.positions != _tensor_positions(args):
        raise TypeError(f"launch.run({role!r}): tensors at positions {_tensor_positions(args)} of the arguments, "
                        f"where earlier calls with these options had them at {layout.positions}")
    key = (role, options, specialization(args))
    plan = PLANS.get(key)
    with _on_device(args[layout.positions[0]].get_device() if layout.positions else None):  # on the tensors' GPU
        if plan is None:
            plan = build(key, role, args=args, **make(*make_args))
        else:
            plan.launch(args, M, N)
    exact = layout.exact(args, M, N)
    if layout.shared_as_first(exact):  # tensors shared among slots as in the layout's first call: all of them asked
        layout.remember(exact, plan, M, N)
    return plan


def _hooks_source():
    """Where this Triton keeps its launch hooks: triton.knobs.runtime (3.4+) or CompiledKernel (3.3)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return knobs.runtime
    from triton.compiler.compiler import CompiledKernel

    return CompiledKernel


_HOOKS = _hooks_source()
_ENTER, _EXIT = _HOOKS.launch_enter_hook, _HOOKS.launch_exit_hook  # Triton's own chains (3.4+), None on 3.3


# The current CUDA stream's handle, as Triton's own driver reads it (torch's C call)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _addresses(args: tuple) -> list:
    """args with each tensor replaced by its address: the compiled launcher's runtime values."""
    return [a.data_ptr() if isinstance(a, _Tensor) else a for a in args]


class Plan:
    """One key's launch: kernel, constexprs, tile (grid rule) and launcher (module docstring).

    ``grid(M, N)``: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),) for a matmul, at most ``programs`` with a persistent
    config; (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)) for an elementwise pass (``flat`` False).
    """

    __slots__ = ("role", "kind", "fn", "compiled", "constexprs", "tail", "block_m", "block_n", "flat", "programs",
                 "device_index", "launches")

    def __init__(self, role, kind, fn, constexprs, block_m, block_n, flat, programs, compiled=None, tail=(),
                 device_index=None):
        self.role, self.kind, self.fn, self.constexprs = role, kind, fn, constexprs
        self.block_m, self.block_n, self.flat, self.programs = block_m, block_n, flat, programs
        self.compiled, self.tail, self.device_index = compiled, tail, device_index
        self.launches = 0  # warm launches, for tests and benchmarks

    def grid(self, M: int, N: int) -> tuple:
        rows, columns = -(-M // self.block_m), -(-N // self.block_n)
        if not self.flat:
            return rows, columns
        tiles = rows * columns
        return (min(self.programs, tiles) if self.programs else tiles),

    def launch(self, args: tuple, M: int, N: int) -> None:
        """A warm launch: args as run() took them. run() itself calls :meth:`fire` with the addresses and grid it
        has already; where this method is replaced (benchmarks/host_breakdown.py records or stubs every warm
        launch so), run() calls the replacement instead."""
        self.launches += 1
        self.fire(args, _addresses(args), self.grid(M, N))

    def fire(self, args: tuple, values, grid: tuple) -> None:
        """The launch itself: args, values (args with each tensor replaced by its address), the grid."""
        if self.kind == "compiled":
            kernel, launcher, function, metadata = self.compiled
            stream = _raw_stream(self.device_index)
            if not _hooked():
                launcher(grid[0], grid[1] if len(grid) > 1 else 1, 1, stream, function, metadata, None, None, None,
                         *values, *self.tail)
            else:  # a profiler's hooks: the public runner builds their metadata
                kernel[grid + (1,) * (3 - len(grid))](*args, *self.tail, stream=stream)
        else:  # "jit", "interpreted": the kernel's own run, as the autotuner calls it
            self.fn.run(*args, grid=grid, warmup=False, **self.constexprs)


def _compiled_tail(fn, n_args: int, constexprs: dict) -> Optional[tuple]:
    """The values of fn's parameters after its n_args runtime ones (all constexprs), as JITFunction.run passes
    them to the compiled launcher; None where fn does not describe them so."""
    params = getattr(fn, "params", None)
    if params is None or len(params) < n_args:
        return None
    tail = []
    for p in params[n_args:]:
        if not p.is_constexpr:
            return None
        if p.name in constexprs:
            tail.append(constexprs[p.name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            return None
    return tuple(tail)


def compiled_launch_available(kernel) -> bool:
    """Whether a CompiledKernel exposes what Plan's compiled launcher calls (Triton 3.3 through 3.9 do)."""
    return (_raw_stream is not None and all(hasattr(kernel, name) for name in ("run", "function", "packed_metadata"))
            and hasattr(kernel, "__getitem__"))


def build(key, role: str, args: tuple, fn, constexprs: dict, grid: Callable, *, tuner=None, interpreted: bool,
          compiled_ok: bool, flat: bool = True, programs: int = 0, device_index: Optional[int] = None) -> Plan:
    """The first launch of a key, and its Plan (stored in PLANS).

    fn: the JITFunction (or the interpreter's kernel); tuner: its autotuner, which picks the tile on this launch
    (benchmarking its configs where it has no choice for its own key yet), or None with the tile in constexprs.
    grid: this launch's grid, or Triton's grid callable of its meta-parameters (autotuned). flat, programs: the
    grid rule (Plan). compiled_ok: the launch compiles for a GPU whose launcher Plan may call (NVIDIA).
    """
    if tuner is not None:
        tuner[grid](*args, **constexprs)
        config = tuner.best_config
        constexprs = {**constexprs, **config.all_kwargs()}
    else:
        fn[grid](*args, **constexprs)
    block_m, block_n = constexprs["BLOCK_M"], constexprs["BLOCK_N"]
    persistent = programs if constexprs.get("TMA", False) else 0
    kind, compiled, tail = ("interpreted" if interpreted else "jit"), None, ()
    if compiled_ok and not interpreted:
        kernel = fn.run(*args, grid=grid, warmup=True, **constexprs)  # cached: compiles nothing new
        tail = _compiled_tail(fn, len(args), constexprs)
        if tail is not None and compiled_launch_available(kernel):
            getattr(kernel, "_init_handles", lambda: None)()  # loaded already by the launch above; run is then set
            kind, compiled = "compiled", (kernel, kernel.run, kernel.function, kernel.packed_metadata)
    plan = Plan(role, kind, fn, constexprs, block_m, block_n, flat, persistent, compiled, tail or (), device_index)
    PLANS[key] = plan
    return plan


_PLAN_LAUNCH = Plan.launch  # what run() compares against: Plan.launch replaced or not
