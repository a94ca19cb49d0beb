"""Where a command writes: the one rule for its --out, and the one writer of the config.json that every
llmkit model directory holds (a checkpoint of any training command, a quantised or pruned export).

Two kinds of output, one rule with a mode:

    a run directory (training: train, sft, reward, dpo, ppo, finetune-seq2seq) may already exist and is
        resumed with --resume; without it, it must not already hold checkpoints.
    a new directory (`empty=True`: quantize, prune, convert, tokenizer train, and the commands whose
        directory is the model itself: the encoder fine-tunes, extend) must not exist yet or be empty, so
        nothing is ever written over (a run of this kind that can resume may resume there).

Either way: --out is not a file nor under one, and the nearest folder that exists is writable. The
check creates nothing, so a refused command leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import ConfigError
from llmkit.io.checkpoint import list_checkpoints

if TYPE_CHECKING:
    from llmkit.config import ModelConfig


def check_output_dir(out_dir: str | Path, resume: bool = False, *, empty: bool = False) -> Path:
    """`out_dir` checked before any work is done (see the module docstring): a run directory, or with
    `empty` a new one. Returns it as a Path."""
    out_dir = Path(out_dir)
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if existing == out_dir and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: exists and is not a directory; choose another --out")
    if not existing.is_dir():
        raise ConfigError(f"--out {out_dir}: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out_dir}: {existing} is not writable")
    if resume:
        return out_dir
    if empty and out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir}: already exists and is not empty; choose another --out")
    if list_checkpoints(out_dir / "checkpoints"):
        raise ConfigError(f"{out_dir}: already holds checkpoints; pass --resume to continue, or choose another --out")
    return out_dir


def run_config_json(model_cfg: "ModelConfig", **extra: Any) -> dict[str, Any]:
    """A model directory's config.json: what `llmkit.load` reads (format, version, the model's config),
    and what a command adds for it (chat settings, labels, a task head, where a run started from, how
    it was trained, quantised or pruned)."""
    import llmkit

    return {"format": "llmkit", "version": llmkit.__version__, "model": model_cfg.to_dict(), **extra}


def write_config_json(directory: Path, meta: dict[str, Any]) -> Path:
    """config.json of an export built in `directory` (a temporary one, renamed when complete; a
    checkpoint's is written by llmkit.io.checkpoint.save_checkpoint, in the same form)."""
    path = directory / "config.json"
    path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
