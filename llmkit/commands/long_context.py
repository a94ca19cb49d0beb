"""Long-context subcommands: `llmkit extend` (registered by llmkit.cli.build_parser).

    llmkit extend --model run/ --factor 4 --method linear|ntk|yarn --out run-1k/
                  [--finetune-steps N --data PATH... [--seq-len T] [--lr LR] ...]

writes a model whose context is max_seq_len × factor (RoPE rescaled; see llmkit/training/extend.py).
With --finetune-steps, the extended model is trained for N steps on --data through the one training
loop (`llmkit train` with the loaded weights), which position interpolation needs to recover its
perplexity; the output is then an ordinary training directory (metrics.jsonl, loss.png).
"""

from __future__ import annotations

import argparse
import sys

FINETUNE_DEFAULTS = dict(batch_size=4, lr=1e-4, warmup_steps=5, eval_batches=4, weight_decay=0.0)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `llmkit` parser."""
    p = sub.add_parser("extend", help="make a longer-context model from a trained RoPE model",
                       description="Rescale a trained RoPE model's positions to a context max_seq_len × "
                                   "factor, optionally with a short fine-tune at the longer length.")
    p.add_argument("--model", required=True, metavar="PATH", help="a `llmkit train` output or checkpoint directory")
    p.add_argument("--factor", required=True, type=float, help="context multiplier (> 1)")
    p.add_argument("--method", required=True, choices=("linear", "ntk", "yarn"),
                   help="linear position interpolation, dynamic NTK, or YaRN")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory (must not hold files)")
    p.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="train the extended model for N steps on --data (default: 0, no fine-tune)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text for the fine-tune (files or directories)")
    p.add_argument("--exclude", action="append", metavar="NAME", help="skip directories with this name in --data")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="fine-tune sequence length (default: the extended context)")
    for name, kind in (("batch_size", int), ("lr", float), ("warmup_steps", int), ("eval_batches", int)):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=FINETUNE_DEFAULTS[name],
                       help=f"fine-tune {name.replace('_', ' ')} (default: {FINETUNE_DEFAULTS[name]})")
    from llmkit.runtime import DEVICE_HELP

    p.add_argument("--device", default="auto", help=f"fine-tune device: {DEVICE_HELP} (default: auto)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="fine-tune precision: auto (bf16 autocast only where this machine measures it faster), "
                        "fp32 or bf16 (default: auto)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: one per core)")
    p.add_argument("--seed", type=int, default=1337, help="fine-tune data order (default: 1337)")
    p.set_defaults(handler=cmd_extend)


def cmd_extend(args: argparse.Namespace) -> None:
    from llmkit.cli import cmd_train
    from llmkit.errors import ConfigError
    from llmkit.training.extend import extended_config, load_llmkit_checkpoint, require_empty_dir, save_extended

    if args.finetune_steps < 0:
        raise ConfigError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.finetune_steps and not args.data:
        raise ConfigError("--finetune-steps needs --data (the text to fine-tune on)")
    ckpt, cfg, tensors = load_llmkit_checkpoint(args.model)
    new_cfg = extended_config(cfg, args.factor, args.method)
    out = require_empty_dir(args.out)
    print(f"extending {ckpt}: context {cfg.max_seq_len} → {new_cfg.max_seq_len} "
          f"({args.method}, factor {args.factor:g})", file=sys.stderr)
    if not args.finetune_steps:
        path = save_extended(out, new_cfg, tensors, ckpt / "tokenizer.json", source=ckpt)
        print(f"saved to {path}", file=sys.stderr)
        return
    steps = args.finetune_steps
    train_args = argparse.Namespace(
        data=args.data, out=str(out), tokenizer=str(ckpt / "tokenizer.json"), config=None, resume=False,
        exclude=args.exclude, steps=steps, seq_len=args.seq_len or new_cfg.max_seq_len, batch_size=args.batch_size,
        lr=args.lr, warmup_steps=min(args.warmup_steps, steps), eval_batches=args.eval_batches,
        eval_interval=steps, log_interval=min(10, steps), dtype=args.dtype, device=args.device, threads=args.threads,
        seed=args.seed,
        weight_decay=FINETUNE_DEFAULTS["weight_decay"])
    cmd_train(train_args, model_fields=new_cfg.to_dict(), init_tensors=tensors)
