"""Encoder-only (BERT family) subcommands (registered by llmkit.cli.build_parser).

    llmkit embed --model PATH TEXT... [--no-normalize] [--batch-size N] [--device D] [--dtype T] [--threads N]
    llmkit finetune-classifier --model PATH --data FILE.jsonl --out DIR [--labels A,B,...]
                               [--val-data FILE.jsonl] [--max-len T] [--resume] [training flags]

`embed` prints one JSON object: {"model", "dim", "normalized", "embeddings": [[...], ...]} in the
order of the texts. `finetune-classifier` trains a classification head on `{"text", "label"}`
records and prints a JSON summary with the held-out accuracy; its --out loads with llmkit.load.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add `embed` and `finetune-classifier` to the `llmkit` parser."""
    from llmkit.commands.encoder_tasks import add_encoder_task_flags
    from llmkit.commands.speed import add_speed_flags

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
    add_encoder_task_flags(ft, data_help="JSONL records {\"text\": str, \"label\": str|int}", unit="records")
    ft.add_argument("--labels", metavar="A,B,...", help="the label set, in order (default: the labels in --data, "
                                                        "sorted); a record with another label is an error")
    ft.add_argument("--max-len", type=int, metavar="T", help="truncate texts to T tokens (default: the context)")
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
    from llmkit.commands.encoder_tasks import parse_labels, run_encoder_task
    from llmkit.training.classify import finetune_classifier

    def describe(info: dict) -> str:
        return (f"{info['train']} training and {info['val']} held-out records, labels {info['labels']}"
                + (f"; {info['truncated']} text(s) truncated to {info['max_len']} tokens" if info["truncated"] else ""))

    run_encoder_task(args, finetune_classifier, describe, labels=parse_labels(args))
