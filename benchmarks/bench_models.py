"""Benchmark: the MLP blocks of transformers models, as manualbp.convert() fuses them, against eager and compile.

    python benchmarks/bench_models.py                        # GPU: realistic widths, 8192 tokens, bf16
    python benchmarks/bench_models.py --blocks llama,phi3 --impls eager,manualbp
    TRITON_INTERPRET=1 python benchmarks/bench_models.py     # CPU: tiny widths, float32, Triton's interpreter

Each block is built from its transformers config (random weights, no download), dropout off (so that its float64
copy computes the same function), in training mode:

    block   what runs                                                      GPU d -> h     convert() makes it
    bert    BertLayer's feed-forward: BertIntermediate (dense, GELU), then  768 -> 3072    dense + gelu fused;
            BertOutput (dense, dropout, LayerNorm of the residual)                         output.dense a Linear
    gpt2    GPT2MLP: Conv1D, NewGELU (tanh GELU in separate ops), Conv1D    768 -> 3072    c_fc + gelu_tanh fused
    llama   LlamaMLP, Llama-7B's: down(silu(gate(x)) * up(x))               4096 -> 11008  manualbp.GatedMLP
    gemma   GemmaMLP, Gemma-2B's: the same with tanh GELU                   2048 -> 16384  manualbp.GatedMLP
    phi3    Phi3MLP, Phi-3-mini's: one gate_up_proj, chunked                3072 -> 8192   patterns.GatedBlock

The implementations, one block's weights for all: eager (the unconverted block), compile (torch.compile of it,
default mode) and manualbp (manualbp.convert(block, backend="triton"); a block whose activation convert does not
fuse is reported as a failure, not timed). Each is measured forward+backward: block(x).backward(G), x of shape
[batch, seq, d] requiring grad, gradients cleared before every call; timed by bench_dense.time_cases (GPU:
triton.testing.do_bench; CPU: the implementations take turns, PyTorch on one thread). Columns as bench_dense's:
median time (p20, p80), TFLOP/s (the matmuls only: 6·M·d·h per product, two products, three for the gated
blocks), speedup vs eager and vs compile, the bytes kept for backward (manualbp.saved_bytes: the storages
saved_tensors_hooks sees, beyond the input and the parameters, counted the same way for every implementation; no
peak memory), and the largest error against a float64 copy of the block (max |ours - exact| / max |exact| over
the output, ∂C/∂x and every parameter's gradient; the tensor where it is largest in the `worst` column, CHECK
where it is over 4x eager's).

On the CPU the timings mean nothing (the interpreter runs manualbp's kernels): the run checks the harness, the
saved bytes and the errors. Its CSV is written only when asked (--tag or --out-dir); on a GPU always,
benchmarks/results/bench_models_<card>.csv, with a PNG of manualbp's speedups beside it.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Dict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_dense beside this file, however it is run
import bench_dense  # noqa: E402

import manualbp  # noqa: E402

IMPLS = ("eager", "compile", "manualbp")
MODE = "fwd+bwd"
GPU_SHAPE, CPU_SHAPE = (4, 2048), (3, 29)  # x is [batch, seq, d]: 8192 tokens; 87 in the interpreter
# d -> h: the models' own widths on a GPU, tiny ones of about the same ratio (and odd sizes) on the CPU
WIDTHS = {
    "bert": ((768, 3072), (24, 96)),
    "gpt2": ((768, 3072), (24, 96)),
    "llama": ((4096, 11008), (32, 86)),
    "gemma": ((2048, 16384), (16, 128)),
    "phi3": ((3072, 8192), (24, 64)),
}
GATED = ("llama", "gemma", "phi3")  # three products (gate, up, down); the others two


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


class BertFeedForward(nn.Module):
    """BertLayer's feed-forward (BertLayer.feed_forward_chunk): output(intermediate(x), x)."""

    def __init__(self, config):
        super().__init__()
        bert = _transformers().models.bert.modeling_bert
        self.intermediate = bert.BertIntermediate(config)
        self.output = bert.BertOutput(config)

    def forward(self, x):
        return self.output(self.intermediate(x), x)


def build_block(name: str, d: int, h: int) -> nn.Module:
    """The unconverted block `name` at width d -> h, dropout off, float32, on the default device."""
    t = _transformers()
    if name == "bert":
        return BertFeedForward(t.BertConfig(hidden_size=d, intermediate_size=h, hidden_dropout_prob=0.0))
    if name == "gpt2":
        return t.models.gpt2.modeling_gpt2.GPT2MLP(h, t.GPT2Config(n_embd=d, resid_pdrop=0.0))
    if name == "llama":
        return t.models.llama.modeling_llama.LlamaMLP(t.LlamaConfig(hidden_size=d, intermediate_size=h))
    if name == "gemma":
        return t.models.gemma.modeling_gemma.GemmaMLP(t.GemmaConfig(hidden_size=d, intermediate_size=h))
    if name == "phi3":
        return t.models.phi3.modeling_phi3.Phi3MLP(t.Phi3Config(hidden_size=d, intermediate_size=h))
    raise ValueError(name)


def converted(block: nn.Module) -> tuple:
    """(a copy of block converted by manualbp.convert on the triton backend, what it fused); a ValueError where
    convert fused no activation or left a module alone: that row would time something else than the fusion."""
    model, report = manualbp.convert(copy.deepcopy(block), backend="triton", return_report=True)
    fused = [f"{r.pattern}({r.activation})" for r in report.replaced if r.pattern]
    if not fused or report.skipped:
        raise ValueError(f"convert() did not fuse the block's activation:\n{report}")
    return model, "; ".join(fused)


def outputs_and_grads(model: nn.Module, x, grad_out) -> Dict[str, torch.Tensor]:
    """One call's output, ∂C/∂x and every parameter's gradient (by name), fresh."""
    own = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the same Parameters, their own names
    for p in own.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    out = model(x)
    out.backward(grad_out)
    return {"output": out.detach(), "x": x.grad, **{name: p.grad for name, p in own.named_parameters()}}


def max_rel_error(model: nn.Module, exact: nn.Module, x, grad_out) -> tuple:
    """(the largest max |ours - exact| / max |exact| over the output and the gradients, where it is)."""
    ours = outputs_and_grads(model, x, grad_out)
    theirs = outputs_and_grads(exact, x.double(), grad_out.double())
    if set(ours) != set(theirs):
        raise ValueError(f"other parameters than the float64 copy's: {sorted(set(ours) ^ set(theirs))}")
    errors = {name: (ours[name].double() - value).abs().max().item() / (value.abs().max().item() or 1.0)
              for name, value in theirs.items()}
    worst = max(errors, key=lambda name: (errors[name] != errors[name], errors[name]))  # a NaN before any number
    return errors[worst], worst


def prepare(impl: str, block: nn.Module, exact: nn.Module, x, grad_out, flops: float) -> tuple:
    """(bench_dense.Case for impl on block, what convert fused: '' for eager and compile); exact: block in float64."""
    fused = ""
    if impl == "eager":
        model = block
    elif impl == "compile":
        model = torch.compile(copy.deepcopy(block))
    else:
        model, fused = converted(block)
    x = x.detach().requires_grad_(True)
    reset = [x, *model.parameters()]
    fn = lambda: model(x).backward(grad_out)  # noqa: E731

    def saved_mib() -> float:
        return manualbp.saved_bytes(model, x, count_inputs=False) / 2**20

    case = bench_dense.Case(fn, reset, flops, lambda: float("nan"), saved_mib,  # no peak memory here
                            lambda: max_rel_error(model, exact, x, grad_out))
    return case, fused


def count_flops(name: str, tokens: int, d: int, h: int) -> float:
    """The matmuls' FLOPs forward+backward: 6·M·d·h per weight (forward 2·M·d·h, backward twice that), two
    weights, three in the gated blocks (gate, up, down; Phi-3's gate_up_proj counts as two)."""
    return 3 * 2 * tokens * d * h * (3 if name in GATED else 2)


def plot(rows, path) -> None:
    plt = bench_dense.pyplot(path)
    wanted = [r for r in rows if r["impl"] == "manualbp"]
    if plt is None or not wanted:
        return
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(wanted)), 4))
    xs = range(len(wanted))
    ax.bar([i - 0.2 for i in xs], [r["speedup_vs_eager"] for r in wanted], width=0.4, label="vs eager")
    ax.bar([i + 0.2 for i in xs], [r["speedup_vs_compile"] for r in wanted], width=0.4, label="vs torch.compile")
    labels = [f"{r['block']} {r['dims']}\n{r['dtype']}" for r in wanted]
    bench_dense.finish_bar_plot(fig, ax, xs, labels, "speedup (fwd+bwd, higher is better)",
                                f"converted blocks on {wanted[0]['device']}", path, fontsize=7)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default=",".join(WIDTHS), help=f"comma list of {list(WIDTHS)}, in this order")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {list(IMPLS)}")
    parser.add_argument("--dtype", default=None, choices=list(bench_dense.DTYPES),
                        help="bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--rep-ms", type=float, default=None, help="time spent timing each block (ms)")
    parser.add_argument("--out-dir", default=None, help="where the CSV goes (default: benchmarks/results/)")
    parser.add_argument("--tag", default=None, help="file name stem (default: from the device name)")
    args = parser.parse_args(argv)
    blocks = bench_dense.check_choices(parser, "block", args.blocks, WIDTHS)
    impls = bench_dense.check_choices(parser, "impl", args.impls, IMPLS)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_models: no CUDA GPU; set TRITON_INTERPRET=1 to run manualbp's kernels through the interpreter")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype_name = args.dtype or ("bf16" if cuda else "fp32")
    dtype = bench_dense.DTYPES[dtype_name]
    torch.set_float32_matmul_precision("high" if dtype_name == "fp32-tf32" else "highest")
    threads = torch.get_num_threads()
    if not cuda:  # tiny ops on a busy machine wait for the pool's other threads: over 100x slower (measured)
        torch.set_num_threads(1)
    try:
        return _run(args, blocks, impls, cuda, device, dtype_name, dtype)
    finally:
        torch.set_num_threads(threads)


def _run(args, blocks, impls, cuda, device, dtype_name, dtype) -> int:
    """Measures every block with every impl: the table, the CSV (where asked or on a GPU), the plot."""
    rep_ms = args.rep_ms or (100 if cuda else 300)
    shape = GPU_SHAPE if cuda else CPU_SHAPE
    tokens = shape[0] * shape[1]
    info = bench_dense.header(device, argparse.Namespace(dtypes=dtype_name, modes=MODE, impls=",".join(impls)))
    info["backend"] = "triton"
    print("#   manualbp  the blocks convert()ed on the triton backend" + ("" if cuda else " (Triton's interpreter)"))
    write = cuda or args.tag is not None or args.out_dir is not None
    if write:
        out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(out_dir, exist_ok=True)
        stem = args.tag or bench_dense.device_stem(info["device"])
        writer = bench_dense.CsvRows(os.path.join(out_dir, f"bench_models_{stem}.csv"))
    cols = (f"{'block':6s} {'d -> h':12s} {'dtype':5s} {'impl':9s} {'median ms':>10s} {'p20':>9s} {'p80':>9s} "
            f"{'TFLOP/s':>8s} {'x eager':>8s} {'x compile':>9s} {'saved MiB':>9s} {'rel err':>9s} "
            f"{'/eager':>6s}  worst / fused")
    print(cols)
    print("-" * len(cols))
    rows = []
    for name in blocks:
        d, h = WIDTHS[name][0 if cuda else 1]
        torch.manual_seed(0)
        with device:  # the weights initialised where they run (Llama's widths: 2.0 s on a 2-core CPU)
            block = build_block(name, d, h).to(dtype).train()
        generator = torch.Generator(device).manual_seed(1)
        x = torch.randn(*shape, d, device=device, dtype=dtype, generator=generator)
        grad_out = torch.randn(*shape, d, device=device, dtype=dtype, generator=generator)
        exact = copy.deepcopy(block).double()
        cases, fused = {}, {}
        for impl in impls:
            try:
                cases[impl], fused[impl] = prepare(impl, block, exact, x, grad_out, count_flops(name, tokens, d, h))
                if cuda:
                    cases[impl].fn()  # compile / autotune now, so that a failure is reported per impl
            except Exception as error:  # report and go on: one failing impl must not hide the rest
                cases.pop(impl, None)
                print(f"{name:6s} {d:>5d} -> {h:<5d} {dtype_name:5s} {impl:9s} FAILED: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:160] if str(error) else ''}")
        results = {}
        for impl, (med, p20, p80) in bench_dense.time_cases(cases, device, rep_ms).items():
            case = cases[impl]
            measured = {}
            for key, measure in (("saved_mib", case.saved_mib), ("error", case.error)):
                try:
                    measured[key] = measure()
                except Exception as error:  # torch.compile under saved-tensor hooks, on some versions
                    print(f"{name:6s} {impl:9s} {key}: {type(error).__name__}: {str(error)[:160]}")
                    measured[key] = (float("nan"), "") if key == "error" else float("nan")
            err, worst = measured["error"]
            results[impl] = dict(median_ms=med, p20_ms=p20, p80_ms=p80, tflops=case.flops / med / 1e9,
                                 saved_mib=measured["saved_mib"], max_rel_err=err,
                                 worst=worst)
        del cases, exact
        eager = results.get("eager", {}).get("median_ms")
        eager_err = results.get("eager", {}).get("max_rel_err", float("nan"))
        compiled = results.get("compile", {}).get("median_ms")
        for impl, r in results.items():
            row = dict(info, block=name, m=tokens, dims=f"{d}x{h}", dtype=dtype_name, mode=MODE, impl=impl, **r,
                       speedup_vs_eager=eager / r["median_ms"] if eager else float("nan"),
                       speedup_vs_compile=compiled / r["median_ms"] if compiled else float("nan"),
                       err_vs_eager=r["max_rel_err"] / eager_err if eager_err > 0 else float("nan"),
                       fused=fused[impl])
            rows.append(row)
            if write:
                writer.add(row)
            print(f"{name:6s} {d:>5d} -> {h:<5d} {dtype_name:5s} {impl:9s} {r['median_ms']:10.4f} {r['p20_ms']:9.4f} "
                  f"{r['p80_ms']:9.4f} {r['tflops']:8.3f} {row['speedup_vs_eager']:8.3f} "
                  f"{row['speedup_vs_compile']:9.3f} {r['saved_mib']:9.3f} "
                  f"{r['max_rel_err']:9.2e} {row['err_vs_eager']:6.2f}  {r['worst']}"
                  f"{' / ' + fused[impl] if fused[impl] else ''}{bench_dense._flag(r['max_rel_err'], eager_err)}")
        sys.stdout.flush()
    if write:
        print(f"csv: {writer.path} (+{len(rows)} rows)")
        plot(rows, os.path.splitext(writer.path)[0] + ".png")
    else:
        print("no CSV written on the CPU unless asked: --tag cpu_2core writes "
              "benchmarks/results/bench_models_cpu_2core.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
