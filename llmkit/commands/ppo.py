"""`llmkit ppo` (RLHF with PPO) and `llmkit rlhf-demo` (the whole post-training pipeline on a task
with a true score), registered by llmkit.cli.build_parser."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    from llmkit.commands.training_flags import add_dataclass_flags
    from llmkit.commands.post_training import add_skip_bad_lines_flag
    from llmkit.commands.training_flags import add_training_knobs
    from llmkit.training.ppo import NOT_PPO_KNOBS, PPO_TRAIN_DEFAULTS, PPOConfig

    p = sub.add_parser("ppo", help="RLHF: optimise a policy against a reward model or a reward function (PPO)")
    p.add_argument("--policy", required=True, metavar="PATH",
                   help="the model to improve (usually an SFT model): a run, checkpoint or Hugging Face dir")
    p.add_argument("--reward", required=True, metavar="RM|module:function",
                   help="a `llmkit reward` output directory, or a Python function f(prompt, response) -> float "
                        "given as module:function (imported from the working directory or sys.path)")
    p.add_argument("--prompts", required=True, metavar="FILE", help='JSONL, one {"prompt": "..."} per line')
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (loads with llmkit.load)")
    add_skip_bad_lines_flag(p)
    p.add_argument("--plain-prompts", action="store_true",
                   help="feed prompts as plain text (default: as a user turn in the model's chat template)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    # the TrainConfig knobs PPO reads (and --config FILE of them); see llmkit/training/ppo.py
    add_training_knobs(p, defaults=PPO_TRAIN_DEFAULTS, skip=NOT_PPO_KNOBS, config_file=True)
    add_dataclass_flags(p, PPOConfig)
    p.set_defaults(handler=cmd_ppo)

    from llmkit.training.rlhf_demo import DEMO_OUT

    d = sub.add_parser("rlhf-demo", help="the post-training pipeline on arithmetic prompts with a true score: "
                                         "pretrain → SFT → reward model → PPO, and DPO; prints one table")
    d.add_argument("--out", default=DEMO_OUT, metavar="DIR", help=f"output directory (default: {DEMO_OUT})")
    d.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default: 1 — the demo's matrices are too small to gain from more)")
    d.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and sampling (default: 0)")
    d.set_defaults(handler=cmd_rlhf_demo)


def ppo_config_from(args: argparse.Namespace):
    from llmkit.training.ppo import PPOConfig

    return PPOConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PPOConfig) if hasattr(args, f.name)})


def cmd_ppo(args: argparse.Namespace) -> None:
    """Run PPO and save checkpoints, metrics.jsonl and reward_kl.png under --out."""
    from llmkit.commands.progress import Progress
    from llmkit.commands.post_training import print_skipped
    from llmkit.commands.training_flags import training_config
    from llmkit.training.ppo import train_ppo
    from llmkit.training.rlhf_plots import plot_reward_kl

    cfg = training_config(args)  # PPO's defaults, then --config FILE, then the flags given
    ppo = ppo_config_from(args)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # --reward my_rewards:fn finds ./my_rewards.py, as `python -m` would
    progress = Progress(fields=ppo_fields)

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "prompts":
            print_skipped(info["skipped"], progress.say)
            progress.say(f"ppo: {info['prompts']} prompts")
        else:
            progress.on_event(kind, info)

    try:
        trainer = train_ppo(args.policy, args.reward, args.prompts, args.out, cfg, ppo, chat=not args.plain_prompts,
                            resume=args.resume, skip_bad_lines=args.skip_bad_lines, on_event=on_event,
                            on_step=progress.on_step)
    finally:
        progress.close()
    if trainer.world.main:  # under torchrun, rank 0 alone writes
        plot_reward_kl(trainer.metrics_path, trainer.out_dir / "reward_kl.png")
    print(f"saved to {args.out} (metrics.jsonl, reward_kl.png, checkpoints/)", file=sys.stderr)


def ppo_fields(row: dict[str, Any]) -> list[tuple[str, str]]:
    """What a PPO step shows: the mean score of its rollouts, the KL to the reference, response length."""
    return [("score", f"{row['score']:.3f}"), ("kl", f"{row['kl']:.3f}"), ("len", f"{row['response_length']:.1f}")]


def cmd_rlhf_demo(args: argparse.Namespace) -> None:
    """Run (or resume) the pipeline and print its one table."""
    from llmkit.training.rlhf_demo import format_table, run_pipeline

    def on_event(kind: str, info: dict[str, Any]) -> None:
        print(f"[{info.get('elapsed', 0):5.0f} s] {kind}: " +
              ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in info.items() if k != "elapsed"), file=sys.stderr)

    result = run_pipeline(args.out, seed=args.seed, threads=args.threads, on_event=on_event)
    print(format_table(result))
