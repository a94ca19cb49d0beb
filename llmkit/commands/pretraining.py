"""`llmkit train` (pretraining, any family) and `llmkit demo` (the embedded default: train on this
Python's standard library, then sample)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from llmkit.commands.training_flags import add_dataclass_flags, add_fsdp_flag

DEFAULT_OUT = "runs/demo"
# The demo's training settings, chosen by measuring held-out bits per byte after a fixed wall-clock
# budget on 2 CPU cores (see the README): a learning rate tuned for a short run, and a 5-minute budget
# whose step count is planned on the machine it runs on (--steps is only an upper bound); precision
# is `auto` (bf16 autocast only where this machine measures it faster).
DEMO_DEFAULTS = dict(preset="llama-demo", depth="auto", vocab_size=4096, steps=100_000, time_budget=5.0, lr=1e-3,
                     warmup_steps=20, eval_interval=50, eval_batches=10, batch_size=16)
DEMO_PROMPTS = ("def ", "import os\n\n", "class Cache:\n    def __init__(self")


def register(sub) -> None:
    train = sub.add_parser("train", help="pretrain on text: next-token prediction, or masked-LM / denoising with --arch bert|t5|bart")
    train_flags(train)
    train.set_defaults(handler=cmd_train)
    demo = sub.add_parser("demo", help="the embedded default: train on the Python stdlib, then sample")
    train_flags(demo, demo=True)
    demo.set_defaults(handler=cmd_demo)


def train_flags(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    """train's flags; the demo's are the same TrainConfig fields with its own defaults and no inputs."""
    from llmkit.training.config import TrainConfig

    if not demo:
        p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                       help="text files or directories (read recursively; every UTF-8 file counts)")
        p.add_argument("--tokenizer", metavar="DIR", help="use this tokenizer (default: train one on the data)")
        p.add_argument("--config", metavar="FILE", help="JSON file of training fields (+ \"model\": {...})")
        p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        p.add_argument("--exclude", action="append", metavar="NAME",
                       help="skip directories with this name while reading --data (repeatable)")
        from llmkit.training.pretrain import ARCH_PRESETS

        p.add_argument("--arch", choices=tuple(ARCH_PRESETS),
                       help="model family: its default preset, and its objective (bert: masked-LM)")
        add_fsdp_flag(p)
    p.add_argument("--out", default=DEFAULT_OUT if demo else None, required=not demo, metavar="DIR",
                   help="output directory" + (f" (default: {DEFAULT_OUT})" if demo else ""))
    # (the demo samples text, so its model is a decoder: masked-LM masking has nothing to select)
    add_dataclass_flags(p, TrainConfig, defaults=DEMO_DEFAULTS if demo else None,
                        skip=("mlm_masking",) if demo else ())


def train_config_from(args: argparse.Namespace):
    from llmkit.training.config import TrainConfig, load_config_file

    values, model = load_config_file(args.config) if args.config else ({}, {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})  # flags override the file
    return TrainConfig(**values), model


def cmd_train(args: argparse.Namespace, *, exclude: tuple[str, ...] = (), model_fields: dict | None = None,
              init_tensors: dict | None = None) -> Path:
    """`model_fields` override the preset and config file; `init_tensors` are starting weights (the
    short fine-tune of `llmkit extend` trains a loaded, extended model through here)."""
    from llmkit.training.pretrain import pretrain

    cfg, model_overrides = train_config_from(args)
    model_overrides = {**model_overrides, **(model_fields or {})}
    if getattr(args, "arch", None):  # the family's default preset; the objective follows its arch
        from llmkit.training.pretrain import preset_for_arch

        cfg.preset = preset_for_arch(args.arch, cfg.preset, explicit="preset" in vars(args))
    from llmkit.commands.progress import Progress

    progress = Progress()

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "files":
            skipped = ", ".join(f"{n} {k}" for k, n in info["skipped"].items() if n)
            progress.say(f"corpus: {info['files']} text files" + (f" (skipped: {skipped})" if skipped else ""))
        elif kind == "tokenizer":
            progress.say(f"training a BPE tokenizer (vocab {info['vocab_size']}) on "
                         f"{info['sample_bytes'] / 1e6:.0f} MB of the corpus …")
        elif kind == "tokens":
            progress.say(f"tokens: {info['train_tokens']:,} train, {info['val_tokens']:,} validation")
        else:
            progress.on_event(kind, info)

    try:
        pretrain(args.data, args.out, cfg, model_overrides=model_overrides, tokenizer_path=args.tokenizer,
                 resume=args.resume, exclude=(*(getattr(args, "exclude", None) or ()), *exclude),
                 on_event=on_event, on_step=progress.on_step, init_tensors=init_tensors,
                 fsdp=getattr(args, "fsdp", False))
    finally:
        progress.close()
    print(f"saved to {args.out} (metrics.jsonl, loss.png, checkpoints/)", file=sys.stderr)
    return Path(args.out)


def cmd_demo(args: argparse.Namespace) -> None:
    """The embedded default: train on this interpreter's standard library, then sample from it."""
    import llmkit
    from llmkit.plots import read_metrics

    stdlib = sysconfig.get_paths()["stdlib"]
    args.data, args.tokenizer, args.config, args.resume = [stdlib], None, None, True
    started = time.perf_counter()
    cmd_train(args, exclude=("site-packages", "__pycache__"))
    rows = read_metrics(Path(args.out) / "metrics.jsonl")
    last = [r for r in rows if "val_loss" in r][-1]
    print(f"\nvalidation (held-out stdlib files): loss {last['val_loss']:.4f} nats/token, "
          f"perplexity {last['val_ppl']:.2f}, {last.get('val_bpb', float('nan')):.3f} bits/byte "
          f"[{time.perf_counter() - started:.0f} s]")
    print(f"loss curve: {Path(args.out) / 'loss.png'}")
    lm = llmkit.load(args.out)
    for i, prompt in enumerate(DEMO_PROMPTS):
        text = lm.generate(prompt, max_new_tokens=96, temperature=0.8, top_k=50, seed=i)
        print(f"\n--- sample {i + 1} (prompt {prompt!r}) ---\n{prompt}{text}")
