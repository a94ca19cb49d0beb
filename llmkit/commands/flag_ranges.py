"""Ranges of the command line's numbers, checked once for every command before it runs.

TrainConfig and PPOConfig knobs carry their own `range=` (llmkit/training/config.py), applied here to
any flag of the same name (`--threads` of `generate` too); the other numeric flags get an upper bound
below, and every float must be finite: `--threads 100000` crashed torch, `--max-minutes nan` was
accepted, `--max-new-tokens 10**12` would allocate for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from llmkit.errors import ConfigError

# Upper bounds of the numeric flags that are not TrainConfig/PPOConfig knobs (those carry their own
# ranges, applied here too by flag name): past them a value is a typo or an attack, not a setting.
FLAG_LIMITS = {"max_new_tokens": 1 << 20, "top_k": 1 << 22, "num_beams": 256, "max_len": 1 << 24, "factor": 1024,
               "finetune_steps": 10**9, "lora_rank": 1 << 16, "train_examples": 10**7, "test_examples": 10**7}


def check_flag_ranges(args: argparse.Namespace) -> None:
    """Every number given on the command line is finite and inside its range, checked before any
    command runs (so before any file is written)."""
    from llmkit.training.config import TrainConfig, check_range
    from llmkit.training.ppo import PPOConfig

    knobs = {f.name: f.metadata["range"] for cls in (TrainConfig, PPOConfig) for f in dataclasses.fields(cls)
             if "range" in f.metadata}
    for name, value in vars(args).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = "--" + name.replace("_", "-")
        if name in knobs:
            check_range(flag, value, knobs[name])
        elif isinstance(value, float):
            check_range(flag, value, (-math.inf, math.inf))  # finite: NaN and inf mean nothing anywhere
        if name in FLAG_LIMITS and value > FLAG_LIMITS[name]:
            raise ConfigError(f"{flag} must be at most {FLAG_LIMITS[name]:,}, got {value:,}")
        if isinstance(value, int) and abs(value) >= 1 << 63:
            raise ConfigError(f"{flag} is out of range, got {value}")


# CPython's argparse (3.11) drops a value of exactly `--` given as `--flag=--` and leaves that flag an empty
# list, which no command expects (`llmkit explain attention --top=--` compared a list with a number: an
# internal error; the server's explain views, which build `--flag=value` from their query, answered 500).
DROPPED = "--"


def dropped_value_message(flag: str) -> str:
    return f"{flag}: '--' cannot be a value here (argparse reads it as the end of the options)"


def check_no_dropped_values(argv: list[str]) -> None:
    """Refuse `--flag=--` among the options (before a bare `--`), before argparse turns it into an empty list."""
    for arg in argv:
        if arg == "--":
            return
        flag, equals, value = arg.partition("=")
        if arg.startswith("--") and equals and value == DROPPED:
            raise ConfigError(dropped_value_message(flag))
