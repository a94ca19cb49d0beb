"""The TrainConfig flags of the fine-tuning commands (sft, reward, dpo, finetune-*, extend).

Each command registers only the knobs it reads (TrainConfig's fields less the ones named in `skip`,
such as the pretraining-only ones), each with one default: its command's (llmkit.training.config),
shown in --help. `training_config` builds the run's TrainConfig from those defaults, then the
--config file (where the command has one), then the flags given; tests/cli/test_flags_read.py
checks that every flag is read.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Knobs:
    """A command's share of TrainConfig: its own defaults (for a field it has no flag for, the value it
    always runs with), and the fields it has no flag for."""
    defaults: dict[str, Any]
    skip: tuple[str, ...]
    config_file: bool

    @property
    def names(self) -> list[str]:
        from llmkit.training.config import TrainConfig

        return [f.name for f in dataclasses.fields(TrainConfig) if f.name not in self.skip]


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, defaults: dict | None = None,
                        skip: tuple[str, ...] = ()) -> None:
    """One `--dash-case` flag per dataclass field not in `skip`, its default and help taken from the
    field (or from `defaults`, which a subcommand such as `demo` uses to change them)."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base = f.type.replace(" | None", "") if isinstance(f.type, str) else f.type.__name__
        kind = {"int": int, "float": float, "str": str}[base]
        default = defaults.get(f.name, f.default)
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                            choices=f.metadata.get("choices"), help=f.metadata.get("help", "") + shown,
                            metavar=None if f.metadata.get("choices") else
                            f.metadata.get("metavar") or {"int": "N", "float": "X"}.get(base, "NAME"))
    if defaults:
        parser.set_defaults(**defaults)


def add_training_knobs(p: argparse.ArgumentParser, *, defaults: dict[str, Any], skip: tuple[str, ...],
                       config_file: bool) -> None:
    """One flag per TrainConfig field not in `skip`, its --help default taken from `defaults`, and
    with `config_file` a --config FILE of the same fields."""
    from llmkit.training.config import TrainConfig

    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in skip]
    knobs = Knobs(dict(defaults), tuple(skip), config_file)  # a default of a skipped knob is a fixed setting
    # The same fields with this command's defaults: add_dataclass_flags shows them in --help, while the
    # flags themselves stay unset unless given (argparse.SUPPRESS), so a --config file can still set them.
    view = dataclasses.make_dataclass("TrainConfigFlags", [
        (f.name, f.type, dataclasses.field(default=defaults.get(f.name, f.default), metadata=f.metadata))
        for f in dataclasses.fields(TrainConfig) if f.name in names])
    if config_file:
        p.add_argument("--config", metavar="FILE", help="JSON file of training fields (flags override it)")
    add_dataclass_flags(p, view)
    p.set_defaults(training_knobs=knobs)


def training_config(args: argparse.Namespace):
    """The TrainConfig of a run: the command's defaults, then its --config file, then the flags given."""
    from llmkit.errors import ConfigError
    from llmkit.training.config import TrainConfig, load_config_file

    knobs: Knobs = args.training_knobs
    values: dict[str, Any] = {}
    if knobs.config_file and args.config:
        values, model_fields = load_config_file(args.config)
        if model_fields:
            raise ConfigError(f"{args.config}: \"model\" fields cannot change when fine-tuning an existing model")
        fixed = sorted(set(values) & set(knobs.skip))
        if fixed:
            raise ConfigError(f"{args.config}: {', '.join(fixed)}: not a setting of `llmkit {args.command}`")
    flags = {name: getattr(args, name) for name in knobs.names if hasattr(args, name)}
    return TrainConfig(**{**knobs.defaults, **values, **flags})


def add_fsdp_flag(p: argparse.ArgumentParser) -> None:
    """--fsdp, for the commands whose model the one Trainer can shard (not PPO: each rank samples its own
    share of a rollout, so the ranks' forward passes do not line up as FSDP's gathers need)."""
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state over the ranks "
                        "(FSDP2) instead of a full replica on each (DDP)")


def fsdp_requested(args: argparse.Namespace) -> bool:
    """--fsdp, refused in one line before any work when no torchrun ranks are there to shard over."""
    from llmkit.training import distributed

    if args.fsdp and not distributed.launched_by_torchrun():
        raise distributed.fsdp_needs_ranks(args.command)
    return args.fsdp
