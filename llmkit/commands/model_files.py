"""`llmkit convert`, `llmkit tokenizer train` and `llmkit presets`: the files around a model (another
format, a tokenizer) and the list of model presets."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    conv = sub.add_parser("convert", help="export a model as a Hugging Face directory")
    conv.add_argument("--model", required=True, metavar="SRC",
                      help="a training output, checkpoint or Hugging Face directory")
    conv.add_argument("--out", required=True, metavar="DIR", help="new output directory (must not hold files)")
    conv.add_argument("--to", choices=("hf",), default="hf", help="output format (default: hf)")
    conv.set_defaults(handler=cmd_convert)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command",
                                                                             required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    tok_train.add_argument("--data", nargs="+", required=True, metavar="PATH")
    tok_train.add_argument("--vocab-size", type=int, default=8192)
    tok_train.add_argument("--out", required=True, metavar="DIR")
    tok_train.set_defaults(handler=cmd_tokenizer_train)

    sub.add_parser("presets", help="list model presets").set_defaults(handler=cmd_presets)


def cmd_convert(args: argparse.Namespace) -> None:
    """Write a model (llmkit run/checkpoint or Hugging Face directory) in another format."""
    import llmkit
    from llmkit.io.hf import save_hf
    from llmkit.io.output_dir import check_output_dir
    from llmkit.quant.saved import refuse_export

    check_output_dir(args.out, empty=True)  # before the model is read (save_hf checks again as it writes)
    lm = llmkit.load(args.model)
    refuse_export(lm.model, args.model)  # a `llmkit quantize` output: one line, nothing written
    out = save_hf(lm.model, lm.tokenizer, args.out, prefix_ids=lm.prefix_ids, eos_ids=lm.eos_ids,
                  chat_template=lm.chat_template)
    model_type = json.loads((out / "config.json").read_text(encoding="utf-8"))["model_type"]
    print(f"wrote a Hugging Face {model_type} model to {out}", file=sys.stderr)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from llmkit.data.corpus import find_text_files, read_text_file
    from llmkit.errors import CheckpointError
    from llmkit.io.output_dir import check_output_dir
    from llmkit.tokenizer import Tokenizer

    check_output_dir(args.out, empty=True)  # a new directory: a tokenizer is never written over another
    files, skipped = find_text_files(args.data)
    tokenizer = Tokenizer.train((read_text_file(f) for f in files), args.vocab_size)
    try:
        path = tokenizer.save(args.out)
    except OSError as exc:  # a read-only file system, or the place changed while training ran
        raise CheckpointError(f"{args.out}: cannot write the tokenizer ({exc.strerror or exc})") from None
    print(f"trained on {len(files)} files; vocab {tokenizer.vocab_size}; saved {path}", file=sys.stderr)


def cmd_presets(args: argparse.Namespace) -> None:
    from llmkit.config import PRESETS, preset

    for name in PRESETS:
        cfg = preset(name)
        mixing = (f"heads={cfg.n_heads}/{cfg.n_kv_heads} {cfg.position}" if cfg.body == "transformer" else
                  f"{cfg.body} state={cfg.ssm_state}" if cfg.body == "mamba" else cfg.body)
        print(f"{name:14s} {cfg.num_params() / 1e6:8.2f}M  d_model={cfg.d_model} layers={cfg.n_layers} "
              f"{mixing} {cfg.norm} {cfg.mlp if cfg.body == 'transformer' else ''}".rstrip())
