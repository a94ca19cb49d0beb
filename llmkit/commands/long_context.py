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
import dataclasses
import sys

# The fine-tune's knobs that extend takes (llmkit.training.config.EXTEND_FINETUNE_DEFAULTS has their
# defaults); --finetune-steps is its --steps, and its evaluation and logging follow the step count.
# (--grad-accum: under torchrun a step's micro-batches are dealt out over the ranks, so N ranks need N.)
FINETUNE_KNOBS = ("seq_len", "batch_size", "grad_accum", "lr", "warmup_steps", "eval_batches", "device", "dtype",
                  "threads", "seed")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this area's subcommands to the `llmkit` parser."""
    from llmkit.commands.training_flags import add_fsdp_flag, add_training_knobs
    from llmkit.training.config import EXTEND_FINETUNE_DEFAULTS, TrainConfig

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
    add_training_knobs(p, defaults=EXTEND_FINETUNE_DEFAULTS, config_file=False,
                       skip=tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in FINETUNE_KNOBS))
    add_fsdp_flag(p)
    p.set_defaults(handler=cmd_extend)


def cmd_extend(args: argparse.Namespace) -> None:
    from llmkit.commands.pretraining import cmd_train
    from llmkit.commands.training_flags import fsdp_requested, training_config
    from llmkit.errors import ConfigError
    from llmkit.training import distributed
    from llmkit.training.extend import extended_config, load_llmkit_checkpoint, save_extended
    from llmkit.training.pretrain import check_output_dir

    if args.finetune_steps < 0:
        raise ConfigError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    if args.finetune_steps and not args.data:
        raise ConfigError("--finetune-steps needs --data (the text to fine-tune on)")
    given = [name for name in ("data", "exclude", "fsdp") if getattr(args, name)] + [
        name for name in args.training_knobs.names if hasattr(args, name)]  # (knob flags are unset unless given)
    if given and not args.finetune_steps:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"{flags}: settings of the fine-tune; give --finetune-steps N with them")
    train_cfg = training_config(args)  # its flags checked before anything is read
    fsdp = fsdp_requested(args)
    ckpt, cfg, tensors = load_llmkit_checkpoint(args.model)
    new_cfg = extended_config(cfg, args.factor, args.method)
    out = check_output_dir(args.out, resume=False, empty=True)
    distributed.checked_before_written()  # under torchrun: every rank checked --out before rank 0 writes
    print(f"extending {ckpt}: context {cfg.max_seq_len} → {new_cfg.max_seq_len} "
          f"({args.method}, factor {args.factor:g})", file=sys.stderr)
    if not args.finetune_steps:
        if distributed.world().main:  # (under torchrun, with nothing to train, rank 0 alone writes)
            path = save_extended(out, new_cfg, tensors, ckpt / "tokenizer.json", source=ckpt)
            print(f"saved to {path}", file=sys.stderr)
        return
    steps = args.finetune_steps
    knobs = {name: getattr(train_cfg, name) for name in (*FINETUNE_KNOBS, "weight_decay")}
    train_args = argparse.Namespace(
        data=args.data, out=str(out), tokenizer=str(ckpt / "tokenizer.json"), config=None, resume=False, fsdp=fsdp,
        exclude=args.exclude, **{**knobs, "steps": steps, "seq_len": train_cfg.seq_len or new_cfg.max_seq_len,
                                 "warmup_steps": min(train_cfg.warmup_steps, steps), "eval_interval": steps,
                                 "log_interval": min(10, steps)})
    cmd_train(train_args, model_fields=new_cfg.to_dict(), init_tensors=tensors)
