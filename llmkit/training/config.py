"""TrainConfig: every training knob, with its default and help text in one place.

The CLI builds its flags from these fields (dash-case flags, snake_case fields), and `--config
FILE` (JSON) fills the same fields, rejecting unknown keys by name. Model shape lives in
ModelConfig; a config file may carry it under "model".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.config import check_field_types
from llmkit.errors import ConfigError
from llmkit.io.safe_json import read_json
from llmkit.training.sizing import parse_depth


def knob(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its help text; `range=(lo, hi)` bounds a number, inclusive."""
    return field(default=default, metadata={"help": help, **extra})


def check_range(flag: str, value: Any, bounds: tuple[float, float]) -> None:
    """One flag or config value: a finite number within `bounds` (inclusive), else a one-line ConfigError."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = bounds
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {value}")
    if not lo <= value <= hi:
        raise ConfigError(f"{flag} must be in [{lo:,}, {hi:,}], got {value:,}")


def check_ranges(obj: Any) -> None:
    """check_range for every field of a dataclass of knobs (TrainConfig, PPOConfig) that has a range."""
    for f in dataclasses.fields(obj):
        if "range" in f.metadata:
            check_range("--" + f.name.replace("_", "-"), getattr(obj, f.name), f.metadata["range"])


@dataclass
class TrainConfig:
    preset: str = knob("gpt2-demo", "model preset (see `llmkit presets`)")
    depth: str | None = knob(None, "the size dial: N layers of width 64·N with 64-wide heads, in the preset's family; "
                                   "auto = the deepest model that sees enough tokens in --time-budget at this "
                                   "machine's measured speed (default: the preset's own size)", metavar="N|auto")
    steps: int = knob(1000, "optimizer steps to train for (total, counting resumed ones)", range=(1, 10**9))
    batch_size: int = knob(16, "sequences per micro-batch", range=(1, 1 << 16))
    seq_len: int | None = knob(None, "tokens per sequence (default: the model's context length)", range=(1, 1 << 24))
    grad_accum: int = knob(1, "micro-batches accumulated per optimizer step", range=(1, 1 << 16))
    lr: float = knob(1e-3, "peak learning rate", range=(0, 1e3))
    min_lr_ratio: float = knob(0.1, "final learning rate as a fraction of the peak", range=(0, 1))
    warmup_steps: int = knob(50, "linear warmup steps (with --time-budget: at most a tenth of the planned steps)",
                              range=(0, 10**9))
    schedule: str = knob("auto", "learning rate after warm-up: cosine decay, or wsd (constant, then a linear decay "
                                 "over the last --decay-fraction); auto = wsd with --time-budget, else cosine",
                         choices=("auto", "cosine", "wsd"))
    decay_fraction: float = knob(0.2, "wsd: the share of the steps spent decaying the learning rate",
                                 range=(0, 1))
    weight_decay: float = knob(0.1, "AdamW weight decay (never on norms, biases or embeddings)", range=(0, 1e3))
    optimizer: str = knob("adamw", "adamw, or muon: Muon for the hidden 2-D weights (same --lr, matched to "
                                   "AdamW's update size) and AdamW for embeddings, head, norms and biases",
                          choices=("adamw", "muon"))
    beta1: float = knob(0.9, "AdamW beta1", range=(0, 1))
    beta2: float = knob(0.95, "AdamW beta2", range=(0, 1))
    grad_clip: float = knob(1.0, "clip the global gradient norm to this (0 = off)", range=(0, 1e9))
    device: str = knob("auto", "where to train: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    dtype: str = knob("auto", "compute precision: auto (bf16 autocast where this machine runs it faster — on a "
                              "CPU only with native bf16 and a measured gain — else fp32), fp32 or bf16",
                      choices=("auto", "fp32", "bf16"))
    eval_interval: int = knob(100, "evaluate (and checkpoint) every N steps", range=(1, 10**9))
    eval_batches: int = knob(20, "validation batches per evaluation", range=(1, 10**6))
    log_interval: int = knob(10, "log train loss every N steps", range=(1, 10**9))
    keep_checkpoints: int = knob(2, "complete checkpoints to keep (at least 2)", range=(1, 1000))
    seed: int = knob(1337, "seed for initialisation, data order and dropout", range=(0, 2**32 - 1))
    vocab_size: int = knob(8192, "tokenizer vocabulary size when one is trained on the data", range=(1, 1 << 20))
    tokenizer_sample_bytes: int = knob(8_000_000, "bytes of the corpus used to train the tokenizer",
                                       range=(1, 1 << 32))
    val_fraction: float = knob(0.02, "fraction held out for validation: of the text files (train), of the records "
                                     "(fine-tunes: at least one; llmkit/data/split.py)", range=(0, 1))
    skip_nonfinite_steps: int = knob(0, "skip up to K consecutive steps with NaN/Inf loss or "
                                        "gradients instead of stopping at the first", range=(0, 10**6))
    time_budget: float | None = knob(None, "minutes for the whole run: the first steps are timed and the step "
                                           "count planned so the schedule, evaluations and last checkpoint fit "
                                           "(--steps is then an upper bound)", range=(0, 10**6))
    max_minutes: float | None = knob(None, "stop (and save) after this many minutes of training, even mid-schedule",
                                     range=(0, 10**6))
    threads: int | None = knob(None, "CPU threads for torch (default: all cores)", range=(1, 1024))
    mlm_masking: str = knob("token", "masked-LM pretraining (encoders): select single tokens, or whole words",
                            choices=("token", "word"))

    def __post_init__(self) -> None:
        check_field_types(self, "TrainConfig")
        check_ranges(self)  # every number finite and inside its knob's range, before anything runs
        if parse_depth(self.depth) == "auto" and self.time_budget is None:
            raise ConfigError("--depth auto sizes the model to the time: it needs --time-budget")
        # the open ends that an inclusive range cannot say
        if self.val_fraction in (0, 1):
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.beta1 == 1 or self.beta2 == 1:
            raise ConfigError(f"--beta1 and --beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.decay_fraction == 0:
            raise ConfigError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        for name in ("time_budget", "max_minutes"):
            if getattr(self, name) == 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 minutes, got 0")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.schedule not in ("auto", "cosine", "wsd"):
            raise ConfigError(f"--schedule must be auto, cosine or wsd, got {self.schedule!r}")
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
    data = read_json(path, what="config file", error=ConfigError)  # bounded: no FIFO, depth, size, digits
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


# ---- fine-tuning: which knobs a fine-tune has, and their defaults (one place) ----------------------

# Knobs that only shape a model trained from scratch (its preset and size, the tokenizer trained on the
# corpus, the masked-LM objective): a fine-tune starts from a trained model and has none of them.
PRETRAINING_ONLY = ("preset", "depth", "vocab_size", "tokenizer_sample_bytes", "mlm_masking")

# A fine-tune moves a trained model a little: a lower peak learning rate than pretraining, a short
# warm-up, no weight decay towards zero, an evaluation every 50 steps, and a larger held-out share than
# a text corpus needs so that a small record file still gets one (llmkit.data.split). Each family below
# changes only what its reason names; every other knob keeps TrainConfig's default, and each command's
# --help shows the value it runs with.
FINETUNE_DEFAULTS = dict(steps=200, lr=1e-4, warmup_steps=10, weight_decay=0.0, batch_size=8, eval_interval=50,
                         eval_batches=10, log_interval=10, val_fraction=0.1)
# `llmkit dpo`: its loss compares the policy with the frozen starting model; a lower rate keeps the two close.
DPO_DEFAULTS = dict(FINETUNE_DEFAULTS, lr=2e-5)
# `finetune-classifier`, `finetune-tokens`, `finetune-qa`: a labelled set is small, so a fifth is held out;
# batches of 16 short texts; BERT's light weight decay (0.01). A tiny model pretrained for minutes here
# wants ~3e-3 (docs/encoder-models.md); every flag overrides these.
ENCODER_FINETUNE_DEFAULTS = dict(FINETUNE_DEFAULTS, steps=100, batch_size=16, weight_decay=0.01, val_fraction=0.2)
# `finetune-seq2seq`: the decoder learns a new mapping from source to target (not a nudge of its text),
# so more steps at a higher rate; batch size and weight decay stay pretraining's.
SEQ2SEQ_FINETUNE_DEFAULTS = dict(FINETUNE_DEFAULTS, steps=300, lr=5e-4, warmup_steps=20, batch_size=16,
                                 weight_decay=0.1)
# `llmkit extend --finetune-steps N`: long sequences (the extended context), so small batches, a 5-step
# warm-up and 4 evaluation batches; its steps, evaluation and logging follow N.
EXTEND_FINETUNE_DEFAULTS = dict(batch_size=4, lr=1e-4, warmup_steps=5, eval_batches=4, weight_decay=0.0)
