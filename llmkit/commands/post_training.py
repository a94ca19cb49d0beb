"""`llmkit sft | reward | score | dpo`: post-training subcommands (registered by llmkit.cli.build_parser).

The training commands take the fine-tuning knobs (TrainConfig flags less the pretraining-only ones,
--config, --resume) with defaults suited to fine-tuning (llmkit.training.config), plus the adapter
(--lora-*) and length (--overlength) options, and --fsdp under torchrun.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def _add_training_flags(p: argparse.ArgumentParser, *, data_help: str, defaults: dict[str, Any]) -> None:
    from llmkit.commands.training_flags import add_fsdp_flag, add_training_knobs
    from llmkit.data.chat_examples import OVERLENGTH_POLICIES
    from llmkit.training.config import PRETRAINING_ONLY

    p.add_argument("--model", required=True, metavar="PATH",
                   help="the starting model: a run, checkpoint, Hugging Face directory or .gguf file")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help=data_help)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--overlength", choices=OVERLENGTH_POLICIES, default="truncate",
                   help="records longer than --seq-len: cut the tail (dropping those left with no response "
                        "token), drop them, or stop with an error (default: truncate)")
    add_skip_bad_lines_flag(p)
    p.add_argument("--lora-rank", type=int, default=0, metavar="N",
                   help="train rank-N LoRA adapters instead of every weight (0 = off; merged on load/export)")
    p.add_argument("--lora-alpha", type=float, default=16.0, metavar="X", help="LoRA scale numerator (default: 16)")
    p.add_argument("--lora-targets", default="q_proj,v_proj", metavar="NAMES",
                   help="comma-separated linear layers to adapt (default: q_proj,v_proj)")
    add_training_knobs(p, defaults=defaults, skip=PRETRAINING_ONLY, config_file=True)
    add_fsdp_flag(p)


def add_skip_bad_lines_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad-lines", type=int, default=0, metavar="N",
                   help="drop up to N bad lines of the JSONL file (invalid JSON, missing or wrong fields), printing "
                        "each one's file:line; one more stops the run (default: 0, the first stops it)")


def print_skipped(skipped: list[str], say: Callable[[str], None]) -> None:
    for error in skipped:
        say(f"warning: skipped bad line {error}")


def _options(args: argparse.Namespace):
    """(TrainConfig, LoraConfig | None) from the flags and --config file."""
    from llmkit.commands.training_flags import training_config
    from llmkit.errors import ConfigError
    from llmkit.layers.lora import LoraConfig

    cfg = training_config(args)
    if args.lora_rank < 0:
        raise ConfigError(f"--lora-rank must be ≥ 0, got {args.lora_rank}")
    lora = None
    if args.lora_rank:
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=targets)
    return cfg, lora


def _progress() -> tuple[Callable[[str, dict[str, Any]], None], Callable[[dict], None], Callable[[], None]]:
    """on_event, on_step and close for a run: one line per preparation stage, then the shared
    training progress (llmkit/commands/progress.py)."""
    from llmkit.commands.progress import Progress

    progress = Progress()
    say = progress.say

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "records":
            print_skipped(info.get("skipped", []), say)
            say(f"data: {info['summary']}")
            if info["unknown_keys"]:
                keys = ", ".join(f"{k} ({n})" for k, n in sorted(info["unknown_keys"].items()))
                say(f"warning: ignored unknown field(s): {keys}")
        elif kind == "lengths":
            counts = ", ".join(f"{n} {why}" for why, n in info["counts"].items())
            say(f"examples: {info['examples']} (tokens p50 {info['p50']}, p95 {info['p95']}, max {info['max']})"
                + (f"; {counts}" if counts else ""))
        elif kind == "pairs":
            counts = ", ".join(f"{n} {why}" for why, n in info["counts"].items() if n)
            say(f"pairs: {info['pairs']}" + (f" (dropped or cut: {counts})" if counts else ""))
        elif kind == "split":
            say(f"split: {info['train']} train, {info['val']} held out" + (" (packed)" if info.get("packed") else ""))
        elif kind == "lora":
            say(f"LoRA: rank {info['rank']}, alpha {info['alpha']:g} on {info['layers']} layers; "
                f"{info['trainable']:,} trainable parameters")
        else:
            progress.on_event(kind, info)

    return on_event, progress.on_step, progress.close


def _run(args: argparse.Namespace, train: Callable, **extra: Any) -> None:
    from llmkit.commands.training_flags import fsdp_requested

    cfg, lora = _options(args)
    fsdp = fsdp_requested(args)
    on_event, on_step, close = _progress()
    try:
        train(args.model, args.data, args.out, cfg, lora=lora, overlength=args.overlength, resume=args.resume,
              skip_bad_lines=args.skip_bad_lines, on_event=on_event, on_step=on_step, fsdp=fsdp, **extra)
    finally:
        close()
    print(f"saved to {args.out} (metrics.jsonl, loss.png, checkpoints/)", file=sys.stderr)


def cmd_sft(args: argparse.Namespace) -> None:
    from llmkit.training.sft import sft

    _run(args, sft, packing=args.pack)


def cmd_reward(args: argparse.Namespace) -> None:
    from llmkit.training.preference import train_reward_model

    _run(args, train_reward_model)


def cmd_dpo(args: argparse.Namespace) -> None:
    from llmkit.training.preference import dpo

    _run(args, dpo, beta=args.beta)


def cmd_score(args: argparse.Namespace) -> None:
    import torch

    from llmkit.commands.speed import announce, place
    from llmkit.data.chat_examples import render_prompt_response
    from llmkit.errors import GenerationError
    from llmkit.models.heads import load_reward_model
    from llmkit.runtime import resolve_device

    resolve_device(args.device)  # an absent device is the one error line, before anything is read
    rm, lm = load_reward_model(args.model)
    example = render_prompt_response(lm, args.prompt, args.response, "--prompt/--response")
    if len(example.ids) > rm.cfg.max_seq_len:
        raise GenerationError(f"--prompt and --response are {len(example.ids)} tokens, longer than the reward "
                              f"model's context ({rm.cfg.max_seq_len})")
    runtime = place(rm, args, rows=len(example.ids))
    announce(runtime)
    with torch.inference_mode():
        reward = float(rm(torch.tensor([example.ids], device=runtime.device))[0])
    print(f"{reward:.6f}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add sft, reward, score and dpo to the `llmkit` parser."""
    from llmkit.training.config import DPO_DEFAULTS, FINETUNE_DEFAULTS

    sft = sub.add_parser("sft", help="supervised fine-tuning on chat / instruction records (loss on replies only)")
    _add_training_flags(sft, defaults=FINETUNE_DEFAULTS, data_help='JSONL: {"instruction", "input"?, "output"} '
                        'or {"messages": [{"role", "content"}, ...]} per line')
    sft.add_argument("--pack", action="store_true", help="pack short examples into full-length rows")
    sft.set_defaults(handler=cmd_sft)

    prefs_help = 'JSONL: {"prompt", "chosen", "rejected"} per line'
    reward = sub.add_parser("reward", help="train a reward model on preference pairs (Bradley–Terry)")
    _add_training_flags(reward, defaults=FINETUNE_DEFAULTS, data_help=prefs_help)
    reward.set_defaults(handler=cmd_reward)

    dpo = sub.add_parser("dpo", help="direct preference optimisation against the frozen starting model")
    _add_training_flags(dpo, defaults=DPO_DEFAULTS, data_help=prefs_help)
    dpo.add_argument("--beta", type=float, default=0.1, help="DPO temperature β (default: 0.1)")
    dpo.set_defaults(handler=cmd_dpo)

    score = sub.add_parser("score", help="print a reward model's score of a response to a prompt")
    score.add_argument("--model", required=True, metavar="RM", help="a `llmkit reward` output or checkpoint")
    score.add_argument("--prompt", required=True, help="the user's prompt")
    score.add_argument("--response", required=True, help="the response to score")
    from llmkit.commands.speed import add_speed_flags

    add_speed_flags(score, quantize=False)
    score.set_defaults(handler=cmd_score)
