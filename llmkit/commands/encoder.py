"""Encoder-only (BERT family) subcommands (registered by llmkit.cli.build_parser).

    llmkit embed --model PATH TEXT... [--no-normalize] [--batch-size N] [--device D] [--dtype T] [--threads N]
    llmkit finetune-classifier --model PATH --data FILE.jsonl --out DIR [--labels A,B,...]
                               [--val-data FILE.jsonl] [--max-len T] [training flags]

`embed` prints one JSON object: {"model", "dim", "normalized", "embeddings": [[...], ...]} in the
order of the texts. `finetune-classifier` trains a classification head on `{"text", "label"}`
records and prints a JSON summary with the held-out accuracy; its --out loads with llmkit.load.
"""

from __future__ import annotations

import argparse
import json
import sys

# Fine-tuning settings for a pretrained encoder and a small labelled set (BERT's paper uses lr 2e-5..5e-5
# at base size; a tiny model pretrained for minutes here wants ~3e-3). Every TrainConfig flag overrides them.
FINETUNE_DEFAULTS = dict(steps=100, batch_size=16, lr=1e-4, warmup_steps=10, weight_decay=0.01, eval_interval=50,
                         log_interval=10, val_fraction=0.2)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `embed` and `finetune-classifier` to the `llmkit` parser."""
    from llmkit.cli import add_dataclass_flags
    from llmkit.commands.speed import add_speed_flags
    from llmkit.training.config import TrainConfig

    emb = sub.add_parser("embed", help="sentence embeddings from an encoder (mean pooling), as JSON")
    emb.add_argument("--model", required=True, metavar="PATH",
                     help="an encoder: llmkit run/checkpoint or Hugging Face BERT/RoBERTa/ALBERT directory")
    emb.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed")
    emb.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                     help="L2-normalise each embedding, so dot products are cosines (default: on)")
    emb.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default: 16)")
    add_speed_flags(emb, quantize=False)
    emb.set_defaults(handler=cmd_embed)

    ft = sub.add_parser("finetune-classifier", help="fine-tune an encoder on JSONL {\"text\", \"label\"} records",
                        description="Texts longer than the model's context are truncated to their first tokens "
                                    "(the closing [SEP] kept) and counted in the summary.")
    ft.add_argument("--model", required=True, metavar="PATH", help="the pretrained encoder")
    ft.add_argument("--data", required=True, metavar="FILE", help="JSONL records {\"text\": str, \"label\": str|int}")
    ft.add_argument("--out", required=True, metavar="DIR", help="new output directory (must not hold files)")
    ft.add_argument("--labels", metavar="A,B,...", help="the label set, in order (default: the labels in --data, "
                                                        "sorted); a record with another label is an error")
    ft.add_argument("--val-data", metavar="FILE", help="held-out records (default: --val-fraction of --data)")
    ft.add_argument("--max-len", type=int, metavar="T", help="truncate texts to T tokens (default: the context)")
    add_dataclass_flags(ft, TrainConfig, defaults=FINETUNE_DEFAULTS)
    ft.set_defaults(handler=cmd_finetune_classifier)


def cmd_embed(args: argparse.Namespace) -> None:
    from llmkit.commands.speed import announce, load_with_flags
    from llmkit.errors import ConfigError
    from llmkit.inference.embed import embed_texts, encoder_batch

    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be > 0, got {args.batch_size}")
    lm = load_with_flags(args.model, args)
    announce(lm.runtime)
    vectors = embed_texts(lm.model, lm.tokenizer, args.texts, normalize=args.normalize, batch_size=args.batch_size)
    truncated = encoder_batch(lm.tokenizer, args.texts, lm.model.cfg.max_seq_len)[2]
    if truncated:
        print(f"note: {truncated} text(s) longer than the context were truncated to {lm.model.cfg.max_seq_len} "
              "tokens", file=sys.stderr)
    json.dump({"model": str(args.model), "dim": vectors.shape[1], "normalized": args.normalize,
               "embeddings": vectors.tolist()}, sys.stdout)
    print()


def cmd_finetune_classifier(args: argparse.Namespace) -> None:
    from llmkit.cli import train_config_from
    from llmkit.errors import ConfigError
    from llmkit.training.classify import finetune_classifier

    args.config = None
    cfg, _ = train_config_from(args)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    if labels is not None and len(set(labels)) != len(labels):
        raise ConfigError(f"--labels {args.labels!r} repeats a label")
    if args.max_len is not None and args.max_len <= 1:
        raise ConfigError(f"--max-len must be > 1, got {args.max_len}")

    from llmkit.commands.progress import Progress

    progress = Progress()

    def on_event(kind: str, info: dict) -> None:
        if kind == "data":
            progress.say(f"{info['train']} training and {info['val']} held-out records, labels {info['labels']}"
                         + (f"; {info['truncated']} text(s) truncated to {info['max_len']} tokens"
                            if info["truncated"] else ""))
        else:
            progress.on_event(kind, info)

    try:
        summary = finetune_classifier(args.model, args.data, args.out, cfg, labels=labels, val_path=args.val_data,
                                      max_len=args.max_len, on_event=on_event, on_step=progress.on_step)
    finally:
        progress.close()
    print(json.dumps(summary))
    print(f"saved to {args.out} (metrics.jsonl, checkpoints/); load it with llmkit.load", file=sys.stderr)
