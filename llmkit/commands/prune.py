"""`llmkit prune`: remove weights from a model — magnitude, Wanda or SparseGPT; unstructured, 2:4, or
whole attention heads and MLP neurons — optionally fine-tune it briefly with the zeros held, and write
a directory that `llmkit.load` and every `--model` command read (registered by llmkit.cli).

Flags are checked before anything is loaded; the output is built under a temporary name beside --out
and renamed at the end, so a refused or failed run leaves no directory behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _check_flags(args: argparse.Namespace):
    """The scheme and every flag, checked before any model is loaded."""
    from llmkit.errors import ConfigError
    from llmkit.quant.pruning.scheme import PruneScheme
    from llmkit.io.output_dir import check_output_dir

    scheme = PruneScheme.create(args.method, args.pattern, args.sparsity, args.scope)
    check_output_dir(args.out, empty=True)
    if args.calibration_samples < 1:
        raise ConfigError(f"--calibration-samples must be ≥ 1, got {args.calibration_samples}")
    if not scheme.calibrated and args.calibration is not None:
        raise ConfigError("--calibration is read by --method wanda and sparsegpt; magnitude needs none")
    if args.calibration is not None and not Path(args.calibration).exists():
        raise ConfigError(f"--calibration {args.calibration}: no such file or directory")
    if args.finetune_steps < 0:
        raise ConfigError(f"--finetune-steps must be ≥ 0, got {args.finetune_steps}")
    if args.finetune_steps and not args.data:
        raise ConfigError("--finetune-steps needs --data (the text to fine-tune on)")
    if args.data and not args.finetune_steps:
        raise ConfigError("--data is the recovery fine-tune's text; give --finetune-steps N with it")
    for path in args.data or ():
        if not Path(path).exists():
            raise ConfigError(f"--data {path}: no such file or directory")
    train_cfg = None
    if args.finetune_steps:
        from llmkit.training.config import TrainConfig

        steps = args.finetune_steps
        train_cfg = TrainConfig(steps=steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                                warmup_steps=min(10, steps // 10), weight_decay=0.0, optimizer="adamw",
                                eval_interval=steps, eval_batches=10, log_interval=min(10, steps),
                                threads=args.threads, seed=args.seed)
    return scheme, train_cfg


def cmd_prune(args: argparse.Namespace) -> None:
    """Prune --model by --method/--pattern/--sparsity into --out."""
    scheme, train_cfg = _check_flags(args)

    import torch

    import llmkit
    from llmkit.commands.progress import Progress
    from llmkit.commands.quantize import calibration_from_flags, refuse_heads
    from llmkit.quant.pruning.apply import check_prunable, prune_model
    from llmkit.quant.pruning.saved import new_directory, write_pruned
    from llmkit.runtime import set_threads

    set_threads(args.threads)
    progress = Progress()
    started = time.perf_counter()
    lm = llmkit.load(args.model, dtype="fp32")  # on the CPU: masks are chosen from full-precision weights
    check_prunable(lm.model, scheme)
    refuse_heads(lm, "llmkit prune")
    calibration = calibration_from_flags(lm, args, progress) if scheme.calibrated else None

    def on_unit(kind: str, info: dict) -> None:
        progress.say(f"{scheme.method}: {info['name']} ({info['layers']} linear) done, {info['index']}/"
                     f"{info['total']}, {info['seconds']:.1f} s")

    params_before = sum(p.numel() for p in lm.model.parameters())
    with torch.no_grad():
        lm.model, report = prune_model(lm.model, scheme, calibration=calibration, on_event=on_unit)
    pruning = {**scheme.to_json(), **report.to_json(), "finetune_steps": args.finetune_steps}
    out = Path(args.out)
    with new_directory(out) as tmp:
        if train_cfg is None:
            write_pruned(lm, tmp, pruning)
        else:
            from llmkit.quant.pruning.recovery import recovery_finetune

            def on_event(kind: str, info: dict) -> None:
                if kind == "files":
                    progress.say(f"fine-tune data: {info['files']} text files")
                elif kind == "tokens":
                    progress.say(f"fine-tune tokens: {info['train_tokens']:,} train, {info['val_tokens']:,} held out")
                else:
                    progress.on_event(kind, info)

            try:
                recovery_finetune(lm, args.data, tmp, train_cfg, pruning=pruning, hold=not scheme.structured,
                                  on_event=on_event, on_step=progress.on_step)
            finally:
                progress.close()
    kept = f"; {len(report.kept)} left dense (width not a multiple of 4): {', '.join(report.kept[:3])}" \
        if report.kept else ""
    units = (f"; {report.units[0]} of {report.units[1]} {'key/value groups' if scheme.pattern == 'heads' else 'neurons'}"
             f" removed per layer" if report.units else "")
    params_after = sum(p.numel() for p in lm.model.parameters())
    print(f"wrote {out}: {scheme.describe()}, {report.layers} layers, {report.sparsity:.2%} of their weights "
          f"removed{units}{kept}; parameters {params_before / 1e6:.2f}M → {params_after / 1e6:.2f}M "
          f"({'non-zero: ' if not scheme.structured else ''}{report.weights_after / 1e6:.2f}M in the blocks' linear "
          f"layers) [{time.perf_counter() - started:.0f} s]", file=sys.stderr)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `prune` to the `llmkit` parser."""
    from llmkit.quant.calibrate import DEFAULT_SAMPLES
    from llmkit.quant.pruning.scheme import METHODS, PATTERNS, SCOPES
    from llmkit.training.config import FINETUNE_DEFAULTS  # the recovery fine-tune's rate and batch: SFT's

    p = sub.add_parser("prune", help="remove weights, heads or neurons (magnitude, Wanda or SparseGPT)",
                       description="Prune every linear layer of a decoder's transformer blocks (the embedding and "
                                   "LM head are kept); the output directory loads with llmkit.load and runs with "
                                   "any --model command.")
    p.add_argument("--model", required=True, metavar="SRC", help="a model directory or .gguf file")
    p.add_argument("--method", choices=METHODS, default="wanda",
                   help="magnitude (|w|), wanda (|w| × input norm) or sparsegpt (second-order, error feedback) "
                        "(default: wanda)")
    p.add_argument("--pattern", choices=PATTERNS, default="unstructured",
                   help="unstructured, 2:4 (2 of every 4 weights), heads or neurons (whole units: the model "
                        "shrinks) (default: unstructured)")
    p.add_argument("--sparsity", type=float, default=None, metavar="S",
                   help="fraction removed, in (0, 1) (default: 0.5; 0.25 for heads and neurons; 2:4 is 0.5)")
    p.add_argument("--scope", choices=SCOPES, default=None,
                   help="unstructured: compare weights within each output row, each layer, or (magnitude) "
                        "across all layers (default: row)")
    p.add_argument("--calibration", metavar="PATH",
                   help="text files or a directory for wanda/sparsegpt (default: samples the model writes itself)")
    p.add_argument("--calibration-samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"calibration sequences of up to 256 tokens (default: {DEFAULT_SAMPLES})")
    p.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="recovery fine-tune: N steps of next-token training on --data, removed weights held at "
                        "zero (default: 0, none)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text for the recovery fine-tune (files or directories)")
    p.add_argument("--lr", type=float, default=FINETUNE_DEFAULTS["lr"],
                   help=f"fine-tune peak learning rate (default: {FINETUNE_DEFAULTS['lr']:g})")
    p.add_argument("--batch-size", type=int, default=FINETUNE_DEFAULTS["batch_size"], metavar="N",
                   help=f"fine-tune sequences per step (default: {FINETUNE_DEFAULTS['batch_size']})")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="fine-tune sequence length (default: the model's context, at most 256)")
    p.add_argument("--seed", type=int, default=0,
                   help="for the model's own calibration samples and the fine-tune's data order (default: 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: one per core)")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory (must not hold files)")
    p.set_defaults(handler=cmd_prune)
