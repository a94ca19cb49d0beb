"""`--draft PATH` for generate, chat and serve: speculative decoding with a smaller model that shares the
model's tokenizer (llmkit/inference/speculative.py). The draft guesses a few tokens, the model checks them
all in one forward and keeps those it would have chosen itself, so a greedy answer is exactly the one
the model gives alone, only sooner. No `register`: this module only adds flags to other commands.
"""

from __future__ import annotations

import argparse
import copy

MAX_DRAFT_TOKENS = 16  # past a handful the guesses are rarely all right; a bound keeps the check forward small
PROBE_TEXT = "The quick brown fox, 12 ünïcödé words: <|im_end|>\n"  # two tokenizers that agree here agree enough


def add_draft_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", metavar="PATH",
                   help="a smaller model with the same tokenizer (model directory or .gguf) that guesses the next "
                        "tokens for the model to check in one forward: speculative decoding, greedy answers only, "
                        "unchanged but faster (Transformer decoders)")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                   help=f"the draft's guesses per round, 1 to {MAX_DRAFT_TOKENS} (default: 4)")
    p.add_argument("--draft-quantize", choices=("auto", "none", "int4"), default=None,
                   help="the draft's weights: int4 makes each guess cheaper (default: as --quantize)")


def check_draft_flags(args: argparse.Namespace, *, greedy_only: bool) -> None:
    """Before anything loads. `greedy_only`: the command makes one answer with the sampling flags, which
    must then be greedy (a server instead speculates for the greedy requests among many)."""
    from llmkit.errors import ConfigError

    if args.draft is None:
        return
    if not 1 <= args.draft_tokens <= MAX_DRAFT_TOKENS:
        raise ConfigError(f"--draft-tokens must be in [1, {MAX_DRAFT_TOKENS}], got {args.draft_tokens}")
    if getattr(args, "no_kv_cache", False):
        raise ConfigError("--draft needs the KV cache (drop --no-kv-cache)")
    if getattr(args, "num_beams", 1) != 1:
        raise ConfigError("--draft speeds up greedy decoding, not beam search (drop --num-beams or --draft)")
    if greedy_only:
        plain = dict(temperature=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        changed = [f"--{name.replace('_', '-')} {getattr(args, name):g}" for name, value in plain.items()
                   if getattr(args, name) != value]
        if changed:
            raise ConfigError(f"--draft keeps the model's greedy answer, so it needs --temperature 0 and no "
                              f"penalties; got {', '.join(changed)}")


def load_draft(args: argparse.Namespace, lm):
    """The draft model (an nn.Module) for `lm`, loaded with the same device, precision and thread flags
    (its weights int4 if --draft-quantize says so), or None without --draft. ConfigError if it cannot
    draft for `lm`: not a Transformer decoder, or another tokenizer."""
    from llmkit.commands.speed import load_for_generation
    from llmkit.errors import ConfigError

    if args.draft is None:
        return None
    flags = copy.copy(args)
    flags.quantize = args.draft_quantize or getattr(args, "quantize", "none")
    flags.kv_cache = "full"
    draft = load_for_generation(args.draft, flags)
    for role, model in (("the model", lm), ("--draft", draft)):
        if model.config.arch != "decoder" or model.config.body != "transformer":
            raise ConfigError(f"{args.draft if model is draft else lm.path}: speculative decoding needs Transformer "
                              f"decoders, and {role} is arch={model.config.arch!r}, body={model.config.body!r}")
    ours, theirs = lm.tokenizer, draft.tokenizer
    if ours.vocab_size != theirs.vocab_size or ours.encode(PROBE_TEXT) != theirs.encode(PROBE_TEXT):
        raise ConfigError(f"--draft {args.draft}: its tokenizer is not the model's ({theirs.vocab_size} against "
                          f"{ours.vocab_size} tokens, or other ids for the same text); a draft must share it")
    if draft.config.vocab_size != lm.config.vocab_size:
        raise ConfigError(f"--draft {args.draft}: its output layer has {draft.config.vocab_size} rows, the "
                          f"model's {lm.config.vocab_size}")
    return draft.model
