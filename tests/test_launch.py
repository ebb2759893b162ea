"""The launch path (triton_kernels/launch.py): one cached plan per role and key, warm calls that tune, compile and
synchronise nothing, the compiled launcher given addresses; and CUDA graphs over a warm step.

On the CPU the kernels run through Triton's interpreter, whose launches go through the same plans (key, lookup,
arguments, grid); the compiled launcher is checked with a stub GPU kernel. The CUDA-graph and reduce-overhead tests
need a GPU.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
import triton

import manualbp
from manualbp import backends
from manualbp.triton_kernels import dense, gated, launch
from checks import assert_close_to_float64, compare_with_pytorch, torch_dense

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# What reads a tensor's value on the host (a host-device synchronisation on a GPU), as the profiler names it
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal",
              "aten::allclose", "aten::masked_select", "aten::unique", "aten::_unique2")


def require_triton(dtype=torch.float32):
    reason = backends.triton_unavailable_reason(DEVICE, dtype)
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")


def step(model, x, grad):
    """One forward+backward; returns the output and every gradient, detached."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    out.backward(grad)
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


def models():
    torch.manual_seed(0)
    return {
        "Linear relu": manualbp.Linear(40, 24, activation="relu", backend="triton"),
        "Linear gelu": manualbp.Linear(40, 24, activation="gelu", backend="triton"),
        "MLP tanh recompute": manualbp.MLP([40, 24, 40], activation="tanh", recompute=True, backend="triton"),
    }


@pytest.mark.parametrize("name", list(models()))
def test_a_warm_step_reuses_its_plans(name, monkeypatch):
    """The first step builds one plan per launch key; the same step again builds none (no tuning, no compiling:
    build() is where both happen), launches through the plans it found, and gives the same bits."""
    require_triton()
    model = models()[name].to(DEVICE)
    x, grad = torch.randn(37, 40, device=DEVICE), torch.randn(37, 24 if name.startswith("Linear") else 40,
                                                               device=DEVICE)
    launch.PLANS.clear()
    first = step(model, x, grad)
    plans = dict(launch.PLANS)
    assert plans, "the first step recorded its launches' plans"
    launched = {key: plan.launches for key, plan in plans.items()}

    def no_build(*args, **kwargs):
        raise AssertionError(f"a warm step built a plan: {args[:2]}")

    monkeypatch.setattr(launch, "build", no_build)
    second = step(model, x, grad)
    assert launch.PLANS == plans, "the warm step found every plan it needed"
    assert all(plan.launches > launched[key] for key, plan in plans.items()), "every plan launched again, warm"
    assert all(plan.kind == ("interpreted" if dense.is_interpreted() else "compiled") for plan in plans.values()), \
        f"launchers: {[plan.kind for plan in plans.values()]}"
    for index, (a, b) in enumerate(zip(first, second)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{name}: output/gradient {index}\n{m}")
    roles = {plan.role for plan in plans.values()}
    expected = {"forward", "grad_x", "grad_weight"} if name.startswith("Linear") else {"forward", "grad_below"}
    assert expected <= roles, f"{name}: roles {sorted(roles)}"


def _launched(fn) -> list:
    """The plans a call of fn launched: those it built and the warm ones."""
    before = {key: plan.launches for key, plan in launch.PLANS.items()}
    fn()
    return [plan for key, plan in launch.PLANS.items() if key not in before or plan.launches > before[key]]


@pytest.mark.parametrize("change", ["delta_prologue off", "activation", "frozen weight"])
def test_a_warm_layer_follows_settings_activation_and_requires_grad(change):
    """What a call's launches depend on beyond its tensors -- the settings, the activation, what requires grad --
    reaches the launches of a warm layer: after warm gelu steps, a δ pass (delta_prologue off), relu, or a frozen
    weight launch plans of their own choice, with results within PyTorch's own error against float64."""
    require_triton()
    torch.manual_seed(4)
    x, weight, bias = torch.randn(37, 40, device=DEVICE), torch.randn(24, 40, device=DEVICE) / 6, torch.randn(
        24, device=DEVICE)
    grad = torch.randn(37, 24, device=DEVICE)
    gelu = manualbp.get_activation("gelu").kernel_id
    for _ in range(2):
        warm = _launched(lambda: compare_with_pytorch(x, weight, bias, "gelu", grad, "triton"))
    assert sorted(plan.role for plan in warm) == ["forward", "grad_weight", "grad_x"], "the warm gelu step"
    assert all(plan.launches > 0 for plan in warm), "... launched warm"
    if change == "delta_prologue off":
        with manualbp.config.override(delta_prologue=False):
            plans = _launched(lambda: compare_with_pytorch(x, weight, bias, "gelu", grad, "triton"))
        assert sorted(plan.role for plan in plans) == ["delta", "forward", "matmul", "matmul"], \
            f"δ by a pass, then two plain matmuls: {[plan.role for plan in plans]}"
    elif change == "activation":
        plans = _launched(lambda: compare_with_pytorch(x, weight, bias, "relu", grad, "triton"))
        relu = manualbp.get_activation("relu").kernel_id
        assert {plan.constexprs["ACTIVATION"] for plan in plans if plan.role != "grad_weight"} == {relu}, \
            "relu's plans (∂C/∂W's δ is stored by the ∂C/∂X launch: no activation of its own)"
        assert not {plan for plan in plans if plan.role != "grad_weight"} & set(warm), \
            "none of gelu's forward and ∂C/∂X plans (the plain δᵀ X launch is the same plan for both)"
    else:
        leaves = [x.clone().requires_grad_(True), weight.clone(), bias.clone().requires_grad_(True)]
        plans = _launched(lambda: manualbp.functional.linear(*leaves, "gelu", backend="triton").backward(grad))
        roles = sorted(plan.role for plan in plans)
        assert roles == ["delta", "forward", "matmul"], \
            f"Z kept: δ and ∂C/∂b by a pass, ∂C/∂X a plain matmul, no ∂C/∂W: {roles}"
        assert [plan for plan in plans if plan.role == "forward"][0] not in warm, "the forward keeps Z: its own plan"
        exact = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
        theirs = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        torch_dense(*exact, "gelu").backward(grad.double())
        torch_dense(*theirs, "gelu").backward(grad)
        for index in (0, 2):
            assert_close_to_float64(f"frozen weight: gradient {index}", leaves[index].grad, theirs[index].grad,
                                    exact[index].grad)
        assert leaves[1].grad is None, "no gradient for the frozen weight"


@pytest.mark.parametrize("change", ["autotune off", "tma on", "warp specialization on", "float64"])
def test_a_matmuls_cached_setup_follows_settings_and_dtype(change):
    """What _launch_matmul caches per flags (_MatmulSetup: kernel, options, TMA and TF32 questions) follows a
    config.set() and a dtype made after warm calls: the next forward launches a plan of its own, with results within
    PyTorch's own error against float64; back to the old settings, the warm plan again."""
    require_triton(torch.float64 if change == "float64" else torch.float32)
    torch.manual_seed(5)
    x, weight, bias = torch.randn(9, 40, device=DEVICE), torch.randn(24, 40, device=DEVICE) / 6, torch.randn(
        24, device=DEVICE)
    gelu = manualbp.get_activation("gelu").kernel_id

    def forward(x, weight, bias):
        return dense.linear_forward(x, weight, bias, gelu, 0.0, False)[0]

    for _ in range(2):
        warm = _launched(lambda: forward(x, weight, bias))
    assert [plan.role for plan in warm] == ["forward"] and warm[0].launches > 0, "the warm forward"
    if change == "float64":
        x, weight, bias = x.double(), weight.double(), bias.double()
        dense.fp64_dot_supported(x.device)  # its probe, a launch of its own, first
        plans = _launched(lambda: forward(x, weight, bias))
    else:
        setting = {"autotune off": dict(autotune=False), "tma on": dict(tma=True),
                   "warp specialization on": dict(tma=True, warp_specialize=True)}[change]
        with manualbp.config.override(**setting):
            plans = _launched(lambda: forward(x, weight, bias))
            setups = [s for s in dense._MATMUL_SETUPS.values() if s.settings is manualbp.config.get()]
            assert setups, f"{change}: a setup made under the new settings"
            if change == "tma on":
                assert all(s.tma for s in setups), "tma on: the setup asks about TMA"
    assert len(plans) == 1, f"{change}: one launch: {plans}"
    if change != "tma on":  # TMA changes the plan only where a TMA config may run (dense._tma_capable); the
        # warp-specialization setting is in the plan's options wherever it is
        assert plans[0] not in warm and plans[0].launches == 0, f"{change}: a plan of its own, built on this call"
    exact = torch_dense(x.double(), weight.double(), bias.double(), "gelu")
    theirs = torch_dense(x, weight, bias, "gelu")
    assert_close_to_float64(f"{change}: forward", forward(x, weight, bias), theirs, exact)
    if change != "float64":
        again = _launched(lambda: forward(x, weight, bias))
        assert again == warm, f"{change}: the old settings again, the warm plan again"


def gated_models():
    torch.manual_seed(8)
    hooked = manualbp.GatedMLP(40, 24, "gelu_tanh", backend="triton")
    hooked.up_proj.register_forward_hook(lambda module, inputs, output: output)  # the gating alone
    return {
        "GatedMLP silu bias": manualbp.GatedMLP(40, 24, "silu", bias=True, backend="triton"),
        "GatedMLP relu recompute": manualbp.GatedMLP(40, 24, "relu", recompute=True, backend="triton"),
        "GatedMLP gating alone": hooked,
    }


GATED_ROLES = {"GatedMLP silu bias": {"gated_forward", "gated_grad_x", "gated_grad_weight"},
               "GatedMLP relu recompute": {"gated_forward", "gated_grad_x", "gated_grad_weight"},
               "GatedMLP gating alone": {"gated_gate"}}


@pytest.mark.parametrize("name", list(gated_models()))
def test_a_warm_gated_step_builds_no_plan_closure_or_layout(name, monkeypatch):
    """The gated layer's launchers on the dense layer's launch path: a warm GatedMLP step finds every launch in its
    layout's table of calls seen (no key computed, no plan built, no new layout), hands launch.run a module-level
    make (no closure made per call), enters no device guard and asks no setting but config.get() (the autotune and
    TF32 questions once per setup); the same bits as the cold step."""
    require_triton()
    model = gated_models()[name].to(DEVICE)
    x, grad = torch.randn(37, 40, device=DEVICE), torch.randn(37, 40, device=DEVICE)
    launch.PLANS.clear()
    first = step(model, x, grad)
    plans, layouts = dict(launch.PLANS), dict(launch._LAYOUTS)
    assert GATED_ROLES[name] <= {plan.role for plan in plans.values()}, f"{name}: roles {plans}"
    launched = {key: plan.launches for key, plan in plans.items()}
    real_run, makes = launch.run, []

    def run(role, options, args, M, N, make, *make_args):
        makes.append((role, make))
        return real_run(role, options, args, M, N, make, *make_args)

    def refuse(what):
        def refused(*args, **kwargs):
            raise AssertionError(f"{name}: a warm step called {what}")
        return refused

    asked = []  # (what, the module that asked): the dense layer's own launchers may ask, the gated layer's not

    def recorded(what, real):
        def record(*args, **kwargs):
            asked.append((what, sys._getframe(1).f_globals["__name__"]))
            return real(*args, **kwargs)
        return record

    monkeypatch.setattr(launch, "run", run)
    for what in ("build", "_first_call", "specialization"):
        monkeypatch.setattr(launch, what, refuse(what))
    for what in ("_device_guard", "autotune_enabled", "tf32_allowed"):
        monkeypatch.setattr(dense, what, recorded(what, getattr(dense, what)))
    second = step(model, x, grad)
    monkeypatch.undo()
    assert not [(what, who) for what, who in asked if who == gated.__name__], f"{name}: the gated launchers asked"
    assert launch.PLANS == plans and launch._LAYOUTS == layouts, f"{name}: no plan, no layout made"
    assert all(plan.launches > launched[key] for key, plan in plans.items()), f"{name}: every plan launched warm"
    gated_makes = [(role, make) for role, make in makes if role.startswith("gated_")]
    assert {role for role, _ in gated_makes} == GATED_ROLES[name], f"{name}: the gated launches {gated_makes}"
    for role, make in makes:
        assert make.__closure__ is None and "<locals>" not in make.__qualname__, \
            f"{name}: {role} launched with a closure {make.__qualname__}"
    for index, (a, b) in enumerate(zip(first, second)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{name}: output/gradient {index}\n{m}")


def test_a_gated_launch_follows_a_config_change():
    """What the gated launchers cache per flags (gated._Setup: the plan options, the constexpr flags) is made again
    when config.set() replaces the settings: after warm GatedMLP steps, a step with autotune off launches plans of
    its own for the forward, ∂C/∂X and ∂C/∂W (built on that step), with the same bits (the interpreter's tile is
    fixed either way; on a GPU the untuned tile); back to the old settings, the warm plans again."""
    require_triton()
    model = gated_models()["GatedMLP silu bias"].to(DEVICE)
    x, grad = torch.randn(37, 40, device=DEVICE), torch.randn(37, 40, device=DEVICE)
    roles = GATED_ROLES["GatedMLP silu bias"]

    def gated_plans(fn):
        return [plan for plan in _launched(fn) if plan.role in roles]

    for _ in range(2):
        warm = gated_plans(lambda: step(model, x, grad))
    assert {plan.role for plan in warm} == roles and all(plan.launches > 0 for plan in warm), "the warm step"
    results = []
    with manualbp.config.override(autotune=False):
        plans = gated_plans(lambda: results.append(step(model, x, grad)))
        setups = [s for s in gated._SETUPS.values() if s.settings is manualbp.config.get()]
    assert {s.flags.get("ACTIVATION") for s in setups} == {manualbp.get_activation("silu").kernel_id}, \
        f"setups made under the new settings: {setups}"
    assert {plan.role for plan in plans} == roles, f"autotune off: {[plan.role for plan in plans]}"
    assert not set(plans) & set(warm) and all(plan.launches == 0 for plan in plans), \
        "plans of their own, built on this step"
    if dense.is_interpreted():
        for index, (a, b) in enumerate(zip(step(model, x, grad), results[0])):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"autotune off: output/gradient {index}")
    assert gated_plans(lambda: step(model, x, grad)) == warm, "the old settings again, the warm plans again"


def test_every_matmul_output_is_a_new_contiguous_tensor(monkeypatch):
    """dense._launch_matmul does not ask its outputs' strides (out, z, δ stored by ∂C/∂X): every launcher gives it
    new contiguous ones. Checked on every matmul launch of Linear and MLP steps (relu, gelu, a frozen weight, the δ
    pass, the MLP's fused and per-layer backward, recompute), whatever the input's strides."""
    require_triton()
    real, seen = dense._launch_matmul, []

    def checked(a, b, out, **kwargs):
        for name in ("out", "z", "delta_out"):
            t = out if name == "out" else kwargs.get(name)
            if t is not None:
                seen.append(name)
                assert t.stride() == (t.shape[1], 1), f"{kwargs.get('role')}: {name} strides {t.stride()}"
        return real(a, b, out, **kwargs)

    monkeypatch.setattr(dense, "_launch_matmul", checked)
    torch.manual_seed(7)
    x = torch.randn(40, 37, device=DEVICE)[:, 3:].t()  # [34, 40], neither row- nor column-contiguous
    for activation in ("relu", "gelu"):
        for frozen in (False, True):
            layer = manualbp.Linear(40, 24, activation=activation, backend="triton").to(DEVICE)
            layer.weight.requires_grad_(not frozen)
            layer(x.clone().requires_grad_(True)).sum().backward()
    with manualbp.config.override(delta_prologue=False):
        manualbp.Linear(40, 24, activation="gelu", backend="triton").to(DEVICE)(x).sum().backward()
    for fusion, recompute in ((True, False), (False, False), (True, True)):
        with manualbp.config.override(mlp_fusion=fusion):
            mlp = manualbp.MLP([40, 24, 16, 8], activation="gelu", recompute=recompute, backend="triton").to(DEVICE)
            mlp(x.clone().requires_grad_(True)).sum().backward()
    assert {"out", "z", "delta_out"} <= set(seen), f"outputs checked: {sorted(set(seen))}"


def test_a_forward_reads_the_weight_through_swapped_strides():
    """The forward passes the weight itself as B = Wᵀ (b_transposed: no view made); a weight of any strides,
    here one stored transposed and one a slice, gives the result of its contiguous copy, bitwise."""
    require_triton()
    torch.manual_seed(6)
    x = torch.randn(7, 40, device=DEVICE)
    stored_t = torch.randn(40, 24, device=DEVICE).t()
    sliced = torch.randn(24, 80, device=DEVICE)[:, ::2]
    relu = manualbp.get_activation("relu").kernel_id
    for name, weight in (("stored transposed", stored_t), ("strided slice", sliced)):
        ours = dense.linear_forward(x, weight, None, relu, 0.0, False)[0]
        copy = dense.linear_forward(x, weight.contiguous(), None, relu, 0.0, False)[0]
        torch.testing.assert_close(ours, copy, rtol=0, atol=0, msg=lambda m: f"{name}\n{m}")
        theirs = torch.relu(x @ weight.t())
        exact = torch.relu(x.double() @ weight.double().t())
        assert_close_to_float64(f"{name}: against float64", ours, theirs, exact)


def test_a_warm_step_reads_no_tensor_value():
    """A warm step reads nothing back from its tensors (on a GPU: no host-device synchronisation), as the
    profiler's list of every aten op it ran shows; the same list shows a .item() where there is one."""
    require_triton()
    model = models()["Linear gelu"].to(DEVICE)
    x, grad = torch.randn(37, 40, device=DEVICE), torch.randn(37, 24, device=DEVICE)
    step(model, x, grad)  # cold: plans built
    with torch.autograd.profiler.profile() as profile:
        step(model, x, grad)
    names = {event.name for event in profile.function_events}
    assert any(name.startswith("manualbp::") for name in names), f"the profiler saw the operators: {sorted(names)}"
    assert not names & set(HOST_READS), f"host reads in a warm step: {sorted(names & set(HOST_READS))}"
    with torch.autograd.profiler.profile() as control:
        step(model, x, grad)[0].sum().item()
    assert "aten::_local_scalar_dense" in {event.name for event in control.function_events}, \
        "the profiler does show a host read"


def test_plan_keys_follow_every_kernel_choice():
    """Launches that differ in anything the kernel is compiled for get plans of their own: the activation, a
    16-byte misaligned tensor, a stride of 1 against a transposed one, an int that becomes a multiple of 16."""
    require_triton()
    torch.manual_seed(1)
    x, weight = torch.randn(33, 40, device=DEVICE), torch.randn(24, 40, device=DEVICE)
    launch.PLANS.clear()
    keys = []
    for args in ((x, weight, None, 1), (x, weight, None, 3), (x[:, 1:], weight[:, 1:], None, 1),
                 (x.t().contiguous().t(), weight, None, 1), (x[:32], weight, None, 1)):
        before = set(launch.PLANS)
        a, _ = dense.linear_forward(*args, 0.0, write_z=False)
        new = set(launch.PLANS) - before
        assert len(new) == 1, f"one new plan for {[tuple(t.shape) if t is not None else t for t in args[:3]]}"
        keys.append(new.pop())
        torch.testing.assert_close(a, manualbp.activations.get_activation(["identity", "relu", "leaky_relu",
                                                                             "gelu"][args[3]]).f(args[0] @ args[1].t()),
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"values of {args[3]}\n{m}")
    assert len(set(keys)) == 5, "five keys"
    dense.linear_forward(x, weight, None, 1, 0.0, write_z=False)
    assert set(launch.PLANS) == set(keys), "the first launch again: its plan"


def test_specialization_is_at_least_as_fine_as_tritons():
    """Every call of one key runs the kernel compiled for the key's first call, so two argument lists with one
    key must be ones Triton compiles the same kernel for. Triton's own binder for the sm_90 backend (offline, on CPU
    tensors) gives each argument list's specialisation; arguments varied one at a time as launches vary them:
    tensors 16-byte aligned or not, ints equal to 1, multiples of 16 or not, past 32 bits."""
    from triton.runtime import jit

    if not (hasattr(jit, "create_function_from_signature") and hasattr(triton.compiler, "make_backend")):
        pytest.skip("this Triton has no create_function_from_signature / make_backend (before 3.4)")
    from triton.backends.compiler import GPUTarget

    try:
        backend = triton.compiler.make_backend(GPUTarget("cuda", 90, 32))
    except Exception as error:  # no NVIDIA backend in this Triton build
        pytest.skip(f"no sm_90 backend here: {error}")
    fn = dense._matmul_kernel
    kernel = jit.JITFunction(fn.fn) if not hasattr(fn, "params") else fn  # the interpreter's kernels have none
    binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    runtime = [p.name for p in kernel.params if not p.is_constexpr]
    constexprs = {p.name: (p.default if p.default is not inspect.Parameter.empty else 1) for p in kernel.params
                  if p.is_constexpr}
    constexprs.update(INPUT_PRECISION="ieee", NEGATIVE_SLOPE=0.0)
    storage = torch.zeros(4096, dtype=torch.float16)
    tensors = [storage[0:1024], storage[8:1032], storage[1:1025], storage[3:1027], torch.zeros(64)]
    ints = [1, 16, 17, 32, 0, 48, 3, 2 ** 31 + 16, 2 ** 31 + 1, 2 ** 40]
    base = tuple(tensors[0] if name.endswith("_ptr") else 64 for name in runtime)
    compared = 0
    for position, name in enumerate(runtime):
        seen = {}
        for value in tensors if name.endswith("_ptr") else ints:
            args = base[:position] + (value,) + base[position + 1:]
            _, specialization, _ = binder(*args, **constexprs)
            key = launch.specialization(args)
            if key in seen:
                compared += 1
                assert seen[key] == specialization, f"{name}: one key, two Triton specialisations"
            seen[key] = specialization
    assert compared >= len(runtime), "values sharing a key compared at every argument"


class _Kernel:
    """A stub kernel for launch.run itself: records each launch's grid and arguments (no Triton involved)."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):  # the first launch of a key (build)
        return lambda *args, **constexprs: self.launches.append((grid, args))

    def run(self, *args, grid=None, warmup=False, **constexprs):  # a warm launch of an "interpreted" plan
        self.launches.append((grid, args))


class _Run:
    """launch.run with a stub kernel and a block of 16 x 8, counting how many calls computed a plan key."""

    def __init__(self, monkeypatch):
        self.kernel, self.keys = _Kernel(), 0
        real = launch.specialization

        def counted(args):
            self.keys += 1
            return real(args)

        monkeypatch.setattr(launch, "specialization", counted)
        launch.PLANS.clear()

    def __call__(self, args, M=40, N=24, options=("stub",)):
        def make():
            return dict(fn=self.kernel, constexprs=dict(BLOCK_M=16, BLOCK_N=8), grid=(-(-M // 16), -(-N // 8)),
                        flat=False, interpreted=True, compiled_ok=False)

        return launch.run("stub", options, args, M, N, make)


def _stub_args(out=None, x=None, ints=(40, 24, 48)):
    """A launch's arguments as a launcher builds them: x, out, out again in an unused slot, then ints."""
    x = torch.zeros(64, 64) if x is None else x
    out = torch.zeros(64, 64) if out is None else out
    return (x, out, out, *ints)


def test_a_warm_call_asks_no_key_and_finds_its_plan(monkeypatch):
    """A call like one seen before launches through the plan found for it, without computing the key, on the grid
    of its own M and N; a call of new ints of the same specialisation computes the key once and finds that plan."""
    run = _Run(monkeypatch)
    args = _stub_args()
    first = run(args)
    assert run.keys == 1 and len(launch.PLANS) == 1, "the first call: one key, one plan"
    for _ in range(3):
        assert run(_stub_args()) is first, "the same plan, warm"
    assert run.keys == 1, f"warm calls computed no key ({run.keys} computed)"
    assert first.launches == 3 and len(run.kernel.launches) == 4, "launched every time"
    assert run(_stub_args(ints=(50, 24, 48)), M=50) is first, "another M of the same specialisation: that plan"
    assert run.keys == 2 and run.kernel.launches[-1][0] == (4, 3), f"its own grid: {run.kernel.launches[-1][0]}"
    run(_stub_args(ints=(50, 24, 48)), M=50)
    assert run.keys == 2 and run.kernel.launches[-1][0] == (4, 3), "... remembered, with its grid"
    assert run.kernel.launches[-1][1][3:] == (50, 24, 48), "the call's own arguments"


@pytest.mark.parametrize("change", ["dtype", "alignment", "int equal to 1", "int a multiple of 16",
                                    "int past 32 bits", "device", "options"])
def test_a_warm_call_follows_every_change_the_key_holds(change, monkeypatch):
    """Each thing a plan's key is made of, changed in a call otherwise seen before, reaches the key computation
    (so the plan of that key, a new one where Triton compiles another kernel) instead of the remembered plan."""
    run = _Run(monkeypatch)
    base = run(_stub_args())
    storage = torch.zeros(64 * 64 + 4)
    changed = {
        "dtype": lambda: _stub_args(x=torch.zeros(64, 64, dtype=torch.float64)),
        "alignment": lambda: _stub_args(x=storage[1:1 + 64 * 64].view(64, 64)),
        "int equal to 1": lambda: _stub_args(ints=(40, 1, 48)),
        "int a multiple of 16": lambda: _stub_args(ints=(40, 32, 48)),
        "int past 32 bits": lambda: _stub_args(ints=(40, 24, 2 ** 40 + 48)),
        "device": lambda: _stub_args(),
        "options": lambda: _stub_args(),
    }[change]()
    if change == "device":  # one GPU here at most: the tensors' device index as another GPU's
        monkeypatch.setattr(torch.Tensor, "get_device", lambda t: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # ... and the current one (no switch)
    plan = run(changed, options=("stub", "other") if change == "options" else ("stub",))
    assert run.keys == 2, f"{change}: the key computed again"
    assert plan is not base and len(launch.PLANS) == 2, f"{change}: a plan of its own"
    run(changed, options=("stub", "other") if change == "options" else ("stub",))
    assert run.keys == 2, f"{change}: then remembered"
    if change == "device":
        monkeypatch.undo()  # the real device again (and the counting key function gone: keys no longer counted)
        assert run(_stub_args()) is base, "device: the first call's plan still found warm"
        return
    assert run(_stub_args()) is base and run.keys == 2, f"{change}: the first call's plan still found warm"


def test_tensors_shared_among_slots_otherwise_reach_the_key(monkeypatch):
    """A layout asks each tensor of its first call once: where a later call puts different tensors in slots that
    shared one (here float64 in the unused slot), its key is computed (a plan of its own), every time."""
    run = _Run(monkeypatch)
    x, out = torch.zeros(64, 64), torch.zeros(64, 64)
    base = run((x, out, out, 40, 24, 48))
    apart = (x, out, torch.zeros(64, 64, dtype=torch.float64), 40, 24, 48)
    plan = run(apart)
    assert plan is not base and run.keys == 2, "another dtype in the shared slot: its own plan"
    assert run(apart) is plan and run.keys == 3, "not remembered: the key computed again"
    assert run((x, out, out, 40, 24, 48)) is base and run.keys == 3, "the shared call: warm"


def test_the_calls_remembered_are_bounded_and_cleared_with_the_plans(monkeypatch):
    """At most WARM_CALLS exact calls a layout (shapes that vary cost a key computation each, never unbounded
    memory); PLANS.clear() forgets them, so a cleared store builds its plans again."""
    monkeypatch.setattr(launch, "WARM_CALLS", 3)
    run = _Run(monkeypatch)
    for m in range(20, 30):
        run(_stub_args(ints=(m, 24, 48)), M=m)
    (layout,) = launch._LAYOUTS.values()
    assert 1 <= len(layout.warm) <= 3, f"{len(layout.warm)} calls remembered"
    launch.PLANS.clear()
    assert not launch._LAYOUTS, "layouts forgotten with the plans"
    keys = run.keys
    run(_stub_args(ints=(29, 24, 48)), M=29)
    assert run.keys == keys + 1 and len(launch.PLANS) == 1, "after clear(): the key computed, the plan built again"


def test_the_matmuls_tuning_buckets_remembered_are_bounded(monkeypatch):
    """dense._launch_matmul remembers each (M, N, K)'s tuning buckets; sizes that vary call after call (a sequence
    length) keep at most _MAX_BUCKETS of them, and the buckets stay right after the table starts afresh."""
    monkeypatch.setattr(dense, "_MAX_BUCKETS", 4)
    monkeypatch.setattr(dense, "_BUCKETS", {})
    weight = torch.randn(24, 48, dtype=torch.float64)
    for m in range(1, 12):
        x = torch.randn(m, 48, dtype=torch.float64)
        a, _ = dense.linear_forward(x, weight, None, 0, 0.0, False)
        assert torch.allclose(a, x @ weight.t()), f"the product at M = {m}"
        assert 1 <= len(dense._BUCKETS) <= 4, f"{len(dense._BUCKETS)} sizes remembered after M = {m}"
    assert dense._BUCKETS[(11, 24, 48)] == (64, 64, 64), "the last size's buckets (powers of two, at least 64)"


def test_a_replaced_plan_launch_sees_every_warm_launch(monkeypatch):
    """Benchmarks record or stub the warm launches by replacing Plan.launch (benchmarks/host_breakdown.py): a warm
    call then goes through the replacement, with the plan, its arguments, M and N, and launches nothing itself."""
    run = _Run(monkeypatch)
    plan = run(_stub_args())
    seen = []
    monkeypatch.setattr(launch.Plan, "launch", lambda self, args, M, N: seen.append((self, args[3:], M, N)))
    run(_stub_args(ints=(40, 24, 48)), M=40, N=24)
    assert seen == [(plan, (40, 24, 48), 40, 24)], f"the replacement saw the warm launch: {seen}"
    assert len(run.kernel.launches) == 1, "and nothing else launched it"


def test_a_launcher_that_moves_its_tensors_gets_a_clear_error(monkeypatch):
    """One (role, options) always puts its tensors at the same positions; a call that does not is an error that
    says so, never a launch with an int read as an address."""
    run = _Run(monkeypatch)
    run(_stub_args())
    x = torch.zeros(64, 64)
    for args in ((40, x, x, 40, 24, 48), (x, 7, x, x, 24, 48)):
        with pytest.raises(TypeError, match="tensors at positions"):
            run(args)


class _Compiled:
    """A stub CompiledKernel: its launcher records what it is given."""

    def __init__(self, calls):
        self.calls = calls
        self.function, self.packed_metadata = "function", "metadata"

    def run(self, *args):
        self.calls.append(("launcher", args))

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.calls.append(("runner", grid, args, stream))


def _stub_gpu(monkeypatch, compiled_kernel=None):
    """dense's autotuned GPU path on meta tensors: a stub autotuned kernel (its runs recorded, returning
    compiled_kernel), a stub timer, an H100's shared memory, a 'compiled for NVIDIA' launch, a stream handle."""
    from triton.runtime import jit

    params = jit.JITFunction(dense._forward_kernel.fn).params  # the launches below are forwards
    runs, timings = [], []

    class StubKernel:
        arg_names = [p.name for p in params]

        def __init__(self):
            self.fn = lambda: None
            self.params = params

        def run(self, *args, grid=None, warmup=False, **kwargs):
            runs.append((args, kwargs, warmup))
            return compiled_kernel

    tuner = dense.make_autotuner("_forward_kernel", StubKernel(), cache_results=False,
                                 do_bench=lambda kernel_call, quantiles: (timings.append(1), [1.0] * 3)[1])
    monkeypatch.setattr(dense, "_autotuned_matmul", lambda kernel: tuner)
    monkeypatch.setattr(dense, "_fixed_config", lambda fp64, use_dot: None)
    monkeypatch.setattr(dense, "_shared_memory_bytes", lambda index: 232448)
    monkeypatch.setattr(dense, "_inline_ptx", lambda device: True)
    monkeypatch.setattr(dense, "is_interpreted", lambda: False)
    monkeypatch.setattr(launch, "_raw_stream", lambda index: "the current stream")
    launch.PLANS.clear()
    return params, runs, timings


def test_warm_launches_go_to_the_compiled_launcher_with_addresses(monkeypatch):
    """The first launch of a key goes through the autotuner (which times its configs) and JITFunction.run; every
    warm one goes to the compiled kernel's launcher: the grid of the chosen tile, the current stream, the tensors as
    their data_ptr() ints, then every constexpr of the kernel's signature in order, no launch metadata or hooks;
    nothing tuned, nothing run through JITFunction.run. With a launch hook set (a profiler), the public runner."""
    calls = []
    params, runs, timings = _stub_gpu(monkeypatch, _Compiled(calls))
    meta = dict(device="meta", dtype=torch.float32)
    x, weight, bias = torch.empty(100, 128, **meta), torch.empty(256, 128, **meta), torch.empty(256, **meta)
    dense.linear_forward(x, weight, bias, 1, 0.0, write_z=False)
    tuned = len(timings)
    assert tuned > 0 and len(runs) == 2, f"first launch: timed {tuned} configs, {len(runs)} runs (launch, warmup)"
    assert runs[1][2] is True, "the second run only looked the compiled kernel up (warmup)"
    for _ in range(3):
        dense.linear_forward(x, weight, bias, 1, 0.0, write_z=False)
    assert len(timings) == tuned and len(runs) == 2, "warm launches: no tuning, no JITFunction.run"
    assert [c[0] for c in calls] == ["launcher"] * 3, f"warm launches through the launcher: {calls}"
    args = calls[0][1]
    (run_args, run_kwargs, _) = runs[1]
    n = len(run_args)
    assert args[3:9] == ("the current stream", "function", "metadata", None, None, None), "stream, kernel, no hooks"
    for p, value, given in zip(params[:n], args[9:9 + n], run_args):
        expected = given.data_ptr() if isinstance(given, torch.Tensor) else given
        assert type(value) is int and value == expected, f"{p.name}: {value!r}, expected {expected!r} (an int)"
    for p, value in zip(params[n:], args[9 + n:]):
        assert value == run_kwargs.get(p.name, p.default), f"constexpr {p.name}: {value} vs JITFunction.run's"
    assert len(args) == 9 + len(params), "every parameter of the kernel"
    tile = dict(zip([p.name for p in params], args[9:]))
    assert args[:3] == (-(-100 // tile["BLOCK_M"]) * -(-256 // tile["BLOCK_N"]), 1, 1), f"grid {args[:3]}"

    monkeypatch.setattr(launch._HOOKS, "launch_enter_hook", lambda metadata: None)
    dense.linear_forward(x, weight, bias, 1, 0.0, write_z=False)
    assert calls[-1][0] == "runner" and calls[-1][3] == "the current stream", "a hook set: the public runner"
    assert all(isinstance(a, torch.Tensor) for a in calls[-1][2][:5]), "... given the tensors, which it describes"


def test_a_warm_launch_runs_on_its_tensors_gpu(monkeypatch):
    """The launchers hold no device guard of their own: a warm launch whose plan's GPU is not the current device
    (tensors on cuda:1, say) makes it current for the launch and back; on the current device it switches nothing."""
    calls = []
    _stub_gpu(monkeypatch, _Compiled(calls))
    real_plan = dense._matmul_plan
    monkeypatch.setattr(dense, "_matmul_plan", lambda *args: {**real_plan(*args), "device_index": 1})  # cuda:1's
    current, switches = [1], []

    class Switch:  # torch.cuda.device(index), recorded
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            switches.append(self.index)
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()
            calls.append(("back", current[-1]))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1])
    monkeypatch.setattr(torch.cuda, "device", Switch)
    meta = dict(device="meta", dtype=torch.float32)
    x, weight = torch.empty(100, 128, **meta), torch.empty(256, 128, **meta)
    dense.linear_forward(x, weight, None, 1, 0.0, write_z=False)  # the first launch: builds the plan
    dense.linear_forward(x, weight, None, 1, 0.0, write_z=False)
    assert switches == [] and [c[0] for c in calls] == ["launcher"], f"on the current GPU: no switch ({calls})"
    current[:] = [0]
    dense.linear_forward(x, weight, None, 1, 0.0, write_z=False)
    assert switches == [1], f"another GPU current: switched to the plan's ({switches})"
    assert [c[0] for c in calls[1:]] == ["launcher", "back"] and calls[-1][1] == 0, \
        f"launched on it, then the current device back: {calls[1:]}"


def test_without_a_compiled_launcher_warm_launches_use_jitfunction_run(monkeypatch):
    """Where the compiled kernel lacks what the direct launch calls (another backend, an internal that moved), warm
    launches go through JITFunction.run with the plan's tile and flags: correct on any Triton."""
    params, runs, timings = _stub_gpu(monkeypatch, compiled_kernel=object())
    meta = dict(device="meta", dtype=torch.float32)
    x, weight = torch.empty(100, 128, **meta), torch.empty(256, 128, **meta)
    dense.linear_forward(x, weight, None, 2, 0.1, write_z=True)
    tuned = len(timings)
    dense.linear_forward(x, weight, None, 2, 0.1, write_z=True)
    assert len(timings) == tuned, "no tuning when warm"
    (plan,) = launch.PLANS.values()
    assert plan.kind == "jit", plan.kind
    (first_args, first_kwargs, _), (args, kwargs, warmup) = runs[0], runs[-1]
    assert not warmup and kwargs["ACTIVATION"] == 2 and kwargs["NEGATIVE_SLOPE"] == 0.1, "launched, with the flags"
    assert "BLOCK_M" in kwargs and "num_warps" in kwargs, "... and the chosen tile"


def _graph_model():
    torch.manual_seed(2)
    return manualbp.MLP([256, 512, 256], activation="gelu").to(DEVICE), manualbp.Linear(
        256, 128, activation="relu").to(DEVICE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replays_eager_results():
    """A model of manualbp layers, warmed up (tuned, compiled) on a side stream, captured forward+backward with
    torch.cuda.graph and replayed on new data: the output and every gradient equal eager's on that data."""
    mlp, head = _graph_model()
    model = torch.nn.Sequential(mlp, head)
    x = torch.randn(64, 256, device=DEVICE)
    grad = torch.randn(64, 128, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(model, x, grad)
    torch.cuda.current_stream().wait_stream(side)
    static_x, static_grad = x.clone().requires_grad_(True), grad.clone()
    for p in model.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
        static_out.backward(static_grad)
    new_x, new_grad = torch.randn_like(x), torch.randn_like(grad)
    static_x.data.copy_(new_x)
    static_grad.copy_(new_grad)
    for p in model.parameters():
        p.grad.zero_()
    static_x.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [static_out.detach(), static_x.grad] + [p.grad.clone() for p in model.parameters()]
    eager = step(model, new_x, new_grad)
    for index, (a, b) in enumerate(zip(eager, replayed)):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"graph replay, tensor {index}\n{m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mode='reduce-overhead' (CUDA graphs) needs a CUDA GPU")
def test_reduce_overhead_matches_eager():
    """torch.compile(mode="reduce-overhead") over manualbp layers: its CUDA-graph replays give eager's output and
    gradients, step after step."""
    mlp, head = _graph_model()
    model = torch.nn.Sequential(mlp, head)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    torch._dynamo.reset()
    for index in range(4):  # the first calls record, the later ones replay
        x, grad = torch.randn(64, 256, device=DEVICE), torch.randn(64, 128, device=DEVICE)
        torch.compiler.cudagraph_mark_step_begin()
        got = [t.clone() for t in step(compiled, x, grad)]
        want = step(model, x, grad)
        for tensor, (a, b) in enumerate(zip(want, got)):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"step {index}, tensor {tensor}\n{m}")
