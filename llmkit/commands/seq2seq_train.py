"""Training subcommands for encoder-decoder models: `finetune-seq2seq` and `seq2seq-demo`.

(`llmkit train --arch t5|bart` pretrains with span corruption / text infilling through `train`.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llmkit.commands.progress import Progress

DEMO_OUT = "runs/seq2seq-demo"
# The demo's settings, measured (README): a T5 v1.1-style model of 0.3M parameters (2+2 layers, width
# 64) spells held-out numbers exactly after 400 steps (93%) to 1000 steps (100%). One thread: at this
# size a second one buys little, and on a busy machine two threads spin-wait on each other.
DEMO_DEFAULTS = dict(preset="t5v11-tiny", steps=800, batch_size=64, lr=3e-3, warmup_steps=50, eval_interval=200,
                     eval_batches=4, log_interval=25, vocab_size=512, max_minutes=10.0, weight_decay=0.01, threads=1)
# The demo makes its own task: its held-out numbers are --test-examples (no --val-fraction), its pairs are
# encoded whole at the model's context (no --seq-len), and its tokenizer is trained on the answers only
# (no --tokenizer-sample-bytes); the preset sets the size (no --depth), and it is no masked LM.
DEMO_SKIP = ("val_fraction", "seq_len", "tokenizer_sample_bytes", "depth", "mlm_masking")


def cmd_finetune_seq2seq(args: argparse.Namespace) -> None:
    """Fine-tune an encoder-decoder model on a JSONL of source/target (or instruction) records."""
    from llmkit.commands.training_flags import fsdp_requested, training_config
    from llmkit.training.seq2seq_finetune import finetune_seq2seq

    cfg = training_config(args)
    fsdp = fsdp_requested(args)
    progress = Progress()

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "data":
            cut = [f"{info[k]} {k.split('_')[1]}" for k in ("truncated_sources", "truncated_targets") if info[k]]
            progress.say(f"data: {info['train']} training and {info['val']} held-out records"
                         + (f"; truncated to {info['context']} tokens: {', '.join(cut)}" if cut else ""))
        else:
            progress.on_event(kind, info)

    try:
        finetune_seq2seq(args.model, args.data, args.out, cfg, resume=args.resume, on_event=on_event,
                         on_step=progress.on_step, fsdp=fsdp)
    finally:
        progress.close()
    print(f"saved to {args.out} (metrics.jsonl, loss.png, checkpoints/)", file=sys.stderr)


def cmd_seq2seq_demo(args: argparse.Namespace) -> None:
    """Train an encoder-decoder from scratch to spell numbers in words; print held-out exact match."""
    from llmkit.commands.training_flags import training_config
    from llmkit.training.seq2seq_demo import run_demo

    cfg = training_config(args)
    progress = Progress()

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "data":
            source, target = info["example"]
            progress.say(f"task: spell numbers in words ({source!r} → {target!r}); {info['train']} training "
                         f"examples, {info['test']} held-out numbers never seen in training")
        else:
            progress.on_event(kind, info)

    try:
        result = run_demo(args.out, cfg, n_train=args.train_examples, n_test=args.test_examples,
                          on_event=on_event, on_step=progress.on_step)
    finally:
        progress.close()
    for source, expected, predicted in result.examples:
        mark = "ok " if predicted == expected else "ERR"
        print(f"{mark} {source:>7} → {predicted}" + ("" if predicted == expected else f"   (expected: {expected})"))
    print(f"\nexact match on {result.total} held-out numbers: {result.correct}/{result.total} = "
          f"{100 * result.exact_match:.1f}% [{result.seconds:.0f} s]")
    print(f"model: {args.out} (try: llmkit generate --model {args.out} --prompt 40721 --temperature 0)")


def register(sub: argparse._SubParsersAction) -> None:
    from llmkit.commands.training_flags import add_fsdp_flag, add_training_knobs
    from llmkit.training.config import PRETRAINING_ONLY, SEQ2SEQ_FINETUNE_DEFAULTS

    ft = sub.add_parser("finetune-seq2seq", help="fine-tune an encoder-decoder (T5/BART) on source/target JSONL")
    ft.add_argument("--model", required=True, metavar="PATH", help="an llmkit encoder-decoder run or checkpoint")
    ft.add_argument("--data", required=True, metavar="FILE",
                    help='JSONL: {"source", "target"} or {"instruction", "input"?, "output"} per line')
    ft.add_argument("--out", required=True, metavar="DIR", help="output directory")
    ft.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    add_training_knobs(ft, defaults=SEQ2SEQ_FINETUNE_DEFAULTS, skip=PRETRAINING_ONLY, config_file=True)
    add_fsdp_flag(ft)
    ft.set_defaults(handler=cmd_finetune_seq2seq)

    demo = sub.add_parser("seq2seq-demo", help="train a tiny T5 from scratch to spell numbers; report exact match")
    demo.add_argument("--out", default=DEMO_OUT, metavar="DIR", help=f"output directory (default: {DEMO_OUT})")
    demo.add_argument("--train-examples", type=int, default=20000, help="synthetic training pairs (default: 20000)")
    demo.add_argument("--test-examples", type=int, default=500, help="held-out numbers (default: 500)")
    add_training_knobs(demo, defaults=DEMO_DEFAULTS, skip=DEMO_SKIP, config_file=False)
    demo.set_defaults(handler=cmd_seq2seq_demo)
