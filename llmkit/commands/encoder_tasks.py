"""Per-token encoder fine-tunes (registered by llmkit.cli.build_parser).

    llmkit finetune-tokens --model PATH --data FILE.jsonl --out DIR [--labels O,B-X,I-X,...]
                           [--val-data FILE.jsonl] [--max-len T] [--resume] [training flags]
    llmkit finetune-qa --model PATH --data SQUAD.json --out DIR [--val-data SQUAD.json] [--max-len T]
                       [--doc-stride S] [--max-answer-len N] [--null-threshold X] [--resume] [training flags]

Each prints one JSON summary with the held-out scores (entity F1; SQuAD exact match and F1); the
output directory loads with llmkit.load, whose `tag(text)` / `answer(question, context)` predict.
"""

from __future__ import annotations

import argparse
import json
import sys


# The encoder fine-tunes have --max-len (a second name, --seq-len, would set the same length) and
# score the whole held-out set at each evaluation (so no --eval-batches).
ENCODER_TASK_SKIP = ("seq_len", "eval_batches")


def register(sub: argparse._SubParsersAction) -> None:
    tok = sub.add_parser("finetune-tokens", help="fine-tune an encoder for NER on JSONL {\"tokens\", \"tags\"} records",
                         description="Labels are learned at the first sub-token of each word; held-out sentences "
                                     "are scored by entity-level F1 (conlleval's rules).")
    add_encoder_task_flags(tok, "JSONL records {\"tokens\": [word, ...], \"tags\": [BIO tag, ...]}", unit="sentences")
    tok.add_argument("--labels", metavar="O,B-X,...", help="the tag set, in order (default: O, then B-/I- of every "
                                                           "type in --data, sorted); another tag is an error")
    tok.add_argument("--max-len", type=int, metavar="T", help="cut sentences to T tokens (default: the context)")
    tok.set_defaults(handler=cmd_finetune_tokens)

    qa = sub.add_parser("finetune-qa", help="fine-tune an encoder for extractive QA on SQuAD-format JSON",
                        description="Long contexts are cut into overlapping windows; held-out paragraphs are scored "
                                    "by SQuAD's exact match and F1.")
    add_encoder_task_flags(qa, "SQuAD v1.1 JSON {\"data\": [{\"paragraphs\": [{\"context\", \"qas\": [...]}]}]}",
                           unit="paragraphs")
    qa.add_argument("--max-len", type=int, metavar="T", help="tokens per window, question included "
                                                             "(default: 384, or the context if shorter)")
    qa.add_argument("--doc-stride", type=int, metavar="S", help="context tokens shared by consecutive windows "
                                                                "(default: 128, at most a third of --max-len)")
    qa.add_argument("--max-answer-len", type=int, default=30, metavar="N",
                    help="longest answer in tokens (default: 30)")
    qa.add_argument("--null-threshold", type=float, metavar="X",
                    help="answer \"no answer\" when the null score beats the best span's by more than X, kept with "
                         "the model (default: 0.0 when --data has unanswerable questions, else never)")
    qa.set_defaults(handler=cmd_finetune_qa)


def add_encoder_task_flags(p: argparse.ArgumentParser, data_help: str, *, unit: str) -> None:
    """What every encoder fine-tune (finetune-classifier, -tokens, -qa) takes: the model, the data, the
    output, --val-data, --resume, its training knobs and --fsdp; each command adds --max-len and its own."""
    from llmkit.commands.training_flags import add_fsdp_flag, add_training_knobs
    from llmkit.training.config import ENCODER_FINETUNE_DEFAULTS, PRETRAINING_ONLY

    p.add_argument("--model", required=True, metavar="PATH",
                   help="the pretrained encoder: an llmkit run or a Hugging Face BERT/RoBERTa/ALBERT/DeBERTa directory")
    p.add_argument("--data", required=True, metavar="FILE", help=data_help)
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory (must not hold files, "
                                                               "unless --resume)")
    p.add_argument("--val-data", metavar="FILE", help=f"held-out data (default: --val-fraction of the {unit} of "
                                                      "--data, at least one)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    add_training_knobs(p, defaults=ENCODER_FINETUNE_DEFAULTS, skip=(*PRETRAINING_ONLY, *ENCODER_TASK_SKIP),
                       config_file=False)
    add_fsdp_flag(p)


def parse_labels(args: argparse.Namespace) -> list[str] | None:
    """--labels A,B,...: the label set in order (None: the data's own), each once."""
    from llmkit.errors import ConfigError

    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    if labels is not None and len(set(labels)) != len(labels):
        raise ConfigError(f"--labels {args.labels!r} repeats a label")
    return labels


def run_encoder_task(args: argparse.Namespace, train, describe, **kwargs) -> None:
    """Run an encoder fine-tune with the shared flags, print its JSON summary."""
    from llmkit.commands.progress import Progress
    from llmkit.commands.training_flags import fsdp_requested, training_config
    from llmkit.errors import ConfigError

    cfg = training_config(args)
    fsdp = fsdp_requested(args)
    if args.max_len is not None and args.max_len <= 1:
        raise ConfigError(f"--max-len must be > 1, got {args.max_len}")
    progress = Progress()

    def on_event(kind: str, info: dict) -> None:
        if kind == "data":
            progress.say(describe(info))
        else:
            progress.on_event(kind, info)

    try:
        summary = train(args.model, args.data, args.out, cfg, val_path=args.val_data, max_len=args.max_len,
                        resume=args.resume, on_event=on_event, on_step=progress.on_step, fsdp=fsdp, **kwargs)
    finally:
        progress.close()
    print(json.dumps(summary))
    print(f"saved to {args.out} (metrics.jsonl, checkpoints/); load it with llmkit.load", file=sys.stderr)


def cmd_finetune_tokens(args: argparse.Namespace) -> None:
    from llmkit.training.token_classify import finetune_tokens

    def describe(info: dict) -> str:
        return (f"{info['train']} training and {info['val']} held-out sentences, {len(info['labels'])} labels "
                f"{info['labels']}" + (f"; {info['truncated']} sentence(s) cut to {info['max_len']} tokens"
                                       if info["truncated"] else ""))

    run_encoder_task(args, finetune_tokens, describe, labels=parse_labels(args))


def cmd_finetune_qa(args: argparse.Namespace) -> None:
    from llmkit.training.qa import finetune_qa

    def describe(info: dict) -> str:
        unanswerable = f" ({info['unanswerable']} unanswerable)" if info["unanswerable"] else ""
        return (f"{info['train']} training{unanswerable} and {info['val']} held-out questions in "
                f"{info['train_windows']} + {info['val_windows']} windows of {info['max_len']} tokens (stride "
                f"{info['doc_stride']}); {info['answerless']} training window(s) without the answer")

    run_encoder_task(args, finetune_qa, describe, doc_stride=args.doc_stride, max_answer_len=args.max_answer_len,
                     null_threshold=args.null_threshold)
