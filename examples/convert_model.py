#!/usr/bin/env python
"""Convert a real third-party model to manualbp layers and check that training is unchanged.

Builds a small model of Hugging Face transformers from its config (random weights:
nothing is downloaded), makes a deep copy, and calls

    manualbp.convert(copy, return_report=True)

which turns every plain nn.Linear into a manualbp.Linear that keeps the very same
Parameters (so optimizers and tied weights carry over) and, inside an nn.Sequential,
fuses the activation into it, inside an nn.Sequential or, by the module patterns of
manualbp/patterns.py, inside the model's own blocks (BERT's intermediate layers, a
Llama MLP's gating). It prints that report, then trains
the original and the converted model for a few steps with the same optimizer on
the same batches and prints both losses at every step and their largest difference.
Then ``manualbp.revert`` turns a copy of the trained model back into plain PyTorch
(nn.Linear + activation modules, the original state_dict keys) and checks its loss.
Last, where onnx, onnxscript and onnxruntime are installed, the trained model itself (not
reverted) goes to ONNX with ``torch.onnx.export(..., dynamo=True)``, a dynamic batch axis,
and onnxruntime's logits are compared with PyTorch's on batches of other sizes.

    ctrl   CTRLLMHeadModel (GPT-like): attention projections, nn.Sequential(Linear,
           ReLU, Linear) feed-forward blocks (ReLU fused), lm_head tied to the embedding
    bert   BertForMaskedLM: attention, GELU feed-forward (BertIntermediate: fused by the
           Linear + activation pattern), the decoder tied to the word embedding
    vit    ViTForImageClassification on random 16x16 images
    llama  LlamaForCausalLM: gated SwiGLU MLPs, down(silu(gate(x)) * up(x)); each LlamaMLP
           becomes a manualbp.GatedMLP (the gated pattern), its state_dict keys unchanged

Needs the `examples` extra:  pip install -e ".[examples]"  (transformers).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import sys

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_MISSING_DEPENDENCY = 0, 1, 2, 3
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the exporter needs the first two, the check the third
INSTALL_HINT = 'pip install -e ".[examples]"'
DEFAULT_TOLERANCE = {"float64": 1e-9, "float32": 1e-4}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's line breaks and show every default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_model.py",
        description=__doc__.split("\n\nNeeds")[0],
        formatter_class=_HelpFormatter,
        epilog=(
            f"needs: transformers: {INSTALL_HINT}\n"
            f"exit status: {EXIT_OK} the losses agree; {EXIT_MISMATCH} they (or onnxruntime's logits) differ by "
            f"more than --tolerance or an nn.Linear was left unconverted; {EXIT_USAGE} bad arguments; "
            f"{EXIT_MISSING_DEPENDENCY} transformers is missing"
        ),
    )
    parser.add_argument("--model", default="ctrl", choices=("ctrl", "bert", "vit", "llama"), help="which model to build")
    parser.add_argument("--hidden-size", type=int, default=32, help="model width (a multiple of --heads)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=2, help="attention heads")
    parser.add_argument("--steps", type=int, default=5, help="training steps")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences (or images) per batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help="float64 makes the two runs agree to rounding of the last digits")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the batches")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for PyTorch: one is fastest for tensors this small, and keeps a busy "
                             "machine from slowing the run down many times over")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                        help="manualbp backend for the converted layers; triton on the CPU runs Triton's "
                             "interpreter (TRITON_INTERPRET=1 is set for you): slow, keep the model tiny")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest |loss difference| allowed; None means 1e-9 in float64, 1e-4 in float32")
    parser.add_argument("--quiet-report", action="store_true", help="print only the report's summary line")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("hidden_size", "layers", "heads", "steps", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.hidden_size % args.heads:
        parser.error("--hidden-size must be a multiple of --heads")
    for name, ok, allowed in (  # nan fails every comparison
        ("--lr", 0 < args.lr <= 1, "a number in (0, 1]"),
        ("--seed", 0 <= args.seed <= 2**32 - 1, f"an integer in [0, {2**32 - 1}]"),
        ("--threads", args.threads >= 1, "an integer >= 1"),
        ("--tolerance", args.tolerance is None or 0 < args.tolerance <= 1e-3, "a number in (0, 0.001]"),
    ):
        if not ok:
            parser.error(f"{name} must be {allowed}, got {getattr(args, name[2:])}")
    if args.tolerance is None:
        args.tolerance = DEFAULT_TOLERANCE[args.dtype]
    args.parser = parser
    return args


def require_transformers():
    """Import transformers, or say what to install and exit."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError:
        print(f"convert_model.py needs transformers, which is not installed.\n"
              f"Install the examples' dependencies with:  {INSTALL_HINT}\n"
              f"(or just this one:  pip install transformers)", file=sys.stderr)
        sys.exit(EXIT_MISSING_DEPENDENCY)
    transformers.logging.set_verbosity_error()  # no notes about unset config fields
    return transformers


def build(args, transformers, torch):
    """(model, description, make_batch(generator) -> (inputs, targets), loss_fn(logits, targets)) for --model."""
    width, vocab, length = args.hidden_size, 64, 12
    if args.model == "ctrl":
        config = transformers.CTRLConfig(vocab_size=vocab, n_positions=length, n_embd=width, dff=2 * width,
                                         n_layer=args.layers, n_head=args.heads,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.CTRLLMHeadModel(config)
    elif args.model == "bert":
        config = transformers.BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=args.layers,
                                         num_attention_heads=args.heads, intermediate_size=2 * width,
                                         max_position_embeddings=length, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        model = transformers.BertForMaskedLM(config)
    elif args.model == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                          num_key_value_heads=args.heads, max_position_embeddings=length)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=width,
                                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                        intermediate_size=2 * width, num_labels=5, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)
        model = transformers.ViTForImageClassification(config)

    def make_batch(generator):
        """(model inputs, targets) of one batch."""
        if args.model == "vit":
            pixels = torch.randn(args.batch_size, 3, 16, 16, generator=generator)
            return {"pixel_values": pixels}, torch.randint(0, 5, (args.batch_size,), generator=generator)
        ids = torch.randint(0, vocab, (args.batch_size, length), generator=generator)
        if args.model in ("ctrl", "llama"):
            return {"input_ids": ids}, ids[:, 1:]  # next-token prediction
        targets = torch.full_like(ids, -100)  # masked LM: 3 tokens per sequence hidden behind [MASK] = 0
        positions = torch.randint(0, length, (args.batch_size, 3), generator=generator)
        targets.scatter_(1, positions, ids.gather(1, positions))
        return {"input_ids": ids.scatter(1, positions, 0)}, targets

    def loss_fn(logits, targets):
        # Cross-entropy in the model's dtype: transformers' own loss casts the logits to float32,
        # which would round away the float64 digits this comparison is about.
        if args.model in ("ctrl", "llama"):
            logits = logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 ignore_index=-100)

    data = "3x16x16 images, 5 classes" if args.model == "vit" else f"vocabulary {vocab}, sequences of {length}"
    description = (f"{type(model).__name__} built from a {type(config).__name__}: width {width}, "
                   f"{args.layers} blocks, {args.heads} heads, {data}")
    return model, description, make_batch, loss_fn


def check_in_onnxruntime(args, model, make_batch, generator, torch, label="the trained model"):
    """Export ``model`` to ONNX (dynamo=True, the batch axis dynamic) and run it in onnxruntime.

    Returns the largest |logits (PyTorch) - logits (onnxruntime)| over a batch of one and a
    batch of twice --batch-size, or None where the ONNX packages are not installed.
    """
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(f"\nONNX export skipped: {', '.join(missing)} not installed (pip install {' '.join(ONNX_PACKAGES)})")
        return None
    import logging
    import tempfile
    import warnings

    import onnxruntime

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # notes about torchvision operators it skips

    def batch():
        inputs, _ = make_batch(generator)
        (value,) = inputs.values()  # input_ids or pixel_values
        return value.to(getattr(torch, args.dtype)) if value.is_floating_point() else value

    (name,) = make_batch(torch.Generator().manual_seed(0))[0]

    class Logits(torch.nn.Module):
        """The model's logits from its one input, as a tensor (ONNX has no ModelOutput)."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, value):
            return self.model(**{name: value}).logits

    logits = Logits().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notes inside the exporter
        exported = torch.onnx.export(logits, (batch(),), dynamo=True,
                                     dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.onnx")
        exported.save(path)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for value in (batch()[:1], torch.cat([batch(), batch()])):
        (result,) = session.run(None, {session.get_inputs()[0].name: value.numpy()})
        with torch.no_grad():
            worst = max(worst, (torch.from_numpy(result) - logits(value)).abs().max().item())
    operators = sorted({node.op_type for node in exported.model_proto.graph.node})
    print(f"\nONNX: torch.onnx.export(dynamo=True) of {label}, batch axis dynamic; "
          f"{len(exported.model_proto.graph.node)} nodes ({', '.join(operators)}); "
          f"|logits (PyTorch) - logits (onnxruntime)| at batch sizes 1 and {2 * args.batch_size} = {worst:.3e}")
    return worst


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors run only in Triton's interpreter
    transformers = require_transformers()
    import torch
    from torch import nn

    import manualbp

    torch.set_num_threads(max(1, args.threads))
    dtype = getattr(torch, args.dtype)
    try:
        backend = manualbp.backends.resolve(args.backend, torch.device("cpu"), dtype)
    except RuntimeError as error:
        args.parser.error(str(error))

    torch.manual_seed(args.seed)
    original, description, make_batch, loss_fn = build(args, transformers, torch)
    original = original.to(dtype).train()
    converted = copy.deepcopy(original)
    # Optimizers first: convert keeps each Parameter object, so one created before it stays valid.
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr) for m in (original, converted)]
    linears_before = sum(type(m) is nn.Linear for m in converted.modules())
    _, report = manualbp.convert(converted, backend=args.backend, return_report=True)

    print(f"transformers {transformers.__version__}: {description}")
    print(f"random weights, {args.dtype}, {sum(p.numel() for p in original.parameters()):,} parameters; "
          f"manualbp backend: {backend}\n")
    print(str(report).splitlines()[0] if args.quiet_report else report)
    left = sum(type(m) is nn.Linear for m in converted.modules())
    fused = sum(r.fused is not None for r in report.replaced)
    print(f"\nnn.Linear before: {linears_before}; after: {left}; manualbp.Linear: "
          f"{sum(isinstance(m, manualbp.Linear) for m in converted.modules())} ({fused} with a fused activation)")
    # Output projections tied to the input embedding: convert keeps the Parameter, so the tie survives.
    tied = {"ctrl": ("lm_head", "transformer.w"),
            "bert": ("cls.predictions.decoder", "bert.embeddings.word_embeddings")}
    if args.model in tied:
        head, embedding = (converted.get_submodule(name) for name in tied[args.model])
        print(f"tied weights kept: {tied[args.model][0]}.weight is {tied[args.model][1]}.weight: "
              f"{head.weight is embedding.weight}")

    print(f"\ntraining both for {args.steps} steps: AdamW lr {args.lr}, batch {args.batch_size}, the same batches")
    print(f"{'step':>4}  {'loss (original)':>22}  {'loss (converted)':>22}  {'|difference|':>12}")
    generator = torch.Generator().manual_seed(args.seed)
    worst = 0.0
    for step in range(1, args.steps + 1):
        inputs, targets = make_batch(generator)
        inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        losses = []
        for model, optimizer in zip((original, converted), optimizers):
            loss = loss_fn(model(**inputs).logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        difference = abs(losses[0] - losses[1])
        worst = max(worst, difference)
        print(f"{step:>4}  {losses[0]:>22.15f}  {losses[1]:>22.15f}  {difference:>12.3e}")
    parameters = max((a - b).abs().max().item() for a, b in zip(original.parameters(), converted.parameters()))

    # Shipping: back to plain PyTorch (nn.Linear + the activation modules, the original state_dict keys).
    reverted, revert_report = manualbp.revert(converted, inplace=False, return_report=True)
    left_manualbp = sum(isinstance(m, (manualbp.Linear, manualbp.MLP)) for m in reverted.modules())
    same_keys = list(reverted.state_dict()) == list(original.state_dict())
    inputs, targets = make_batch(generator)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    with torch.no_grad():
        losses = [loss_fn(model(**inputs).logits, targets).item() for model in (converted, reverted)]
    reverted_difference = abs(losses[0] - losses[1])
    print(f"\n{str(revert_report).splitlines()[0]}; manualbp modules left: {left_manualbp}; "
          f"state_dict keys of the original: {same_keys}; |loss (converted) - loss (reverted)| on a new batch = "
          f"{reverted_difference:.3e}")

    # Shipping without reverting: the trained model itself to ONNX, checked in onnxruntime.
    state = generator.get_state()
    onnx_difference = check_in_onnxruntime(args, converted.eval(), make_batch, generator, torch)
    onnx_tolerance = args.tolerance
    if args.model == "llama" and onnx_difference is not None:
        # Llama's RMSNorm computes in float32 whatever the model's dtype, and onnxruntime's float32 ops round
        # differently from PyTorch's: the original model's own difference, on the same batches, is the yardstick.
        baseline = check_in_onnxruntime(args, original.eval(), make_batch, generator.set_state(state), torch,
                                        label="the original model, for comparison")
        onnx_tolerance = max(args.tolerance, 2 * baseline)

    ok = (worst <= args.tolerance and left == 0 and len(report.replaced) > 0 and left_manualbp == 0 and same_keys
          and reverted_difference <= args.tolerance and (onnx_difference is None or onnx_difference <= onnx_tolerance))
    print(f"\nmax |loss difference| = {worst:.3e} (tolerance {args.tolerance:g}); "
          f"max |parameter difference| after training = {parameters:.3e}: {'OK' if ok else 'MISMATCH'}")
    return EXIT_OK if ok else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
