"""TrainConfig: every training knob, with its default and help text in one place.

The CLI builds its flags from these fields (dash-case flags, snake_case fields), and `--config
FILE` (JSON) fills the same fields, rejecting unknown keys by name. Model shape lives in
ModelConfig; a config file may carry it under "model".
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.config import check_field_types
from llmkit.errors import ConfigError


def knob(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    preset: str = knob("gpt2-demo", "model preset (see `llmkit presets`)")
    steps: int = knob(1000, "optimizer steps to train for (total, counting resumed ones)")
    batch_size: int = knob(16, "sequences per micro-batch")
    seq_len: int | None = knob(None, "tokens per sequence (default: the model's context length)")
    grad_accum: int = knob(1, "micro-batches accumulated per optimizer step")
    lr: float = knob(1e-3, "peak learning rate")
    min_lr_ratio: float = knob(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = knob(50, "linear warmup steps (with --time-budget: at most a tenth of the planned steps)")
    schedule: str = knob("auto", "learning rate after warm-up: cosine decay, or wsd (constant, then a linear decay "
                                 "over the last --decay-fraction); auto = wsd with --time-budget, else cosine",
                         choices=("auto", "cosine", "wsd"))
    decay_fraction: float = knob(0.2, "wsd: the share of the steps spent decaying the learning rate")
    weight_decay: float = knob(0.1, "AdamW weight decay (never on norms, biases or embeddings)")
    optimizer: str = knob("adamw", "adamw, or muon: Muon for the hidden 2-D weights (same --lr, matched to "
                                   "AdamW's update size) and AdamW for embeddings, head, norms and biases",
                          choices=("adamw", "muon"))
    beta1: float = knob(0.9, "AdamW beta1")
    beta2: float = knob(0.95, "AdamW beta2")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this (0 = off)")
    device: str = knob("auto", "where to train: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    dtype: str = knob("auto", "compute precision: auto (bf16 autocast where this machine runs it faster — on a "
                              "CPU only with native bf16 and a measured gain — else fp32), fp32 or bf16",
                      choices=("auto", "fp32", "bf16"))
    eval_interval: int = knob(100, "evaluate (and checkpoint) every N steps")
    eval_batches: int = knob(20, "validation batches per evaluation")
    log_interval: int = knob(10, "log train loss every N steps")
    keep_checkpoints: int = knob(2, "complete checkpoints to keep (at least 2)")
    seed: int = knob(1337, "seed for initialisation, data order and dropout")
    vocab_size: int = knob(8192, "tokenizer vocabulary size when one is trained on the data")
    tokenizer_sample_bytes: int = knob(8_000_000, "bytes of the corpus used to train the tokenizer")
    val_fraction: float = knob(0.02, "fraction of files held out for validation")
    skip_nonfinite_steps: int = knob(0, "skip up to K consecutive steps with NaN/Inf loss or "
                                        "gradients instead of stopping at the first")
    time_budget: float | None = knob(None, "minutes for the whole run: the first steps are timed and the step "
                                           "count planned so the schedule, evaluations and last checkpoint fit "
                                           "(--steps is then an upper bound)")
    max_minutes: float | None = knob(None, "stop (and save) after this many minutes of training, even mid-schedule")
    threads: int | None = knob(None, "CPU threads for torch (default: all cores)")
    mlm_masking: str = knob("token", "masked-LM pretraining (encoders): select single tokens, or whole words",
                            choices=("token", "word"))

    def __post_init__(self) -> None:
        check_field_types(self, "TrainConfig")
        positive = ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval",
                    "vocab_size", "tokenizer_sample_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "grad_clip", "warmup_steps", "skip_nonfinite_steps"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 0, got {value}")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ConfigError(f"--seq-len must be > 0, got {self.seq_len}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ConfigError("--min-lr-ratio must be in [0, 1] and --beta1/--beta2 in [0, 1)")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.schedule not in ("auto", "cosine", "wsd"):
            raise ConfigError(f"--schedule must be auto, cosine or wsd, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        for name in ("time_budget", "max_minutes"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 minutes, got {value}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"--threads must be > 0, got {self.threads}")
        if self.device != "auto":  # a device that is not here fails before any data work
            from llmkit.runtime import resolve_device

            resolve_device(self.device)
        if self.mlm_masking not in ("token", "word"):
            raise ConfigError(f"--mlm-masking must be token or word, got {self.mlm_masking!r}")

    @property
    def lr_schedule(self) -> str:
        """The schedule that runs: `auto` is WSD for a budgeted run (its length is known only once
        planned, and WSD's constant phase lets the plan change without touching the past)."""
        return ("wsd" if self.time_budget else "cosine") if self.schedule == "auto" else self.schedule

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a JSON config: TrainConfig fields at the top level, ModelConfig fields under "model"."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    model = data.pop("model", {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown training field(s) {', '.join(unknown)}")
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: \"model\" must be a JSON object of ModelConfig fields")
    return data, model
