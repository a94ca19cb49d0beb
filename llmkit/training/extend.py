"""Context extension of a trained RoPE model: the library side of `llmkit extend`.

A model trained at context L is turned into one for L·F by changing only configuration — the RoPE
frequencies are rescaled (layers/position.py), no weight changes shape:
- linear: position interpolation (Chen et al. 2023): position p is fed as p/F, so every angle the
  model meets stays inside the range it was trained on; needs a short fine-tune to adapt.
- ntk: dynamic NTK (ModelConfig.rope_scaling "dynamic"): the RoPE base grows with the sequence once
  it passes L; nothing changes within L, so it works without fine-tuning.
- yarn: YaRN (Peng et al. 2023): interpolate only the slow dimensions, keep the fast ones, and sharpen
  the softmax; good zero-shot, better after a short fine-tune.
The short fine-tune is ordinary next-token training of the loaded model (training/pretrain.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llmkit.config import ModelConfig
from llmkit.errors import CheckpointError, ConfigError
from llmkit.io.checkpoint import load_tensors, read_json, save_checkpoint
from llmkit.io.weights import load_model_tensors, model_tensors
from llmkit.models.build import build_model, tie_weights
from llmkit.training.pretrain import run_config_json

METHODS = {"linear": "linear", "ntk": "dynamic", "yarn": "yarn"}  # CLI name → ModelConfig.rope_scaling


def extended_config(cfg: ModelConfig, factor: float, method: str) -> ModelConfig:
    """`cfg` with context max_seq_len·factor and the RoPE scaling of `method`."""
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not (math.isfinite(factor) and factor > 1):
        raise ConfigError(f"--factor must be a number > 1, got {factor}")
    if cfg.position != "rope":
        raise ConfigError(f"extend rescales RoPE, but this model has position={cfg.position!r} "
                          f"(ALiBi and sliding-window models need no extension)")
    if cfg.rope_scaling != "none":
        raise ConfigError(f"this model is already extended (rope_scaling={cfg.rope_scaling!r}, factor "
                          f"{cfg.rope_factor:g}); extend the original model with the total factor")
    return cfg.replace(max_seq_len=round(cfg.max_seq_len * factor), rope_scaling=METHODS[method],
                       rope_factor=float(factor), rope_original_max_seq_len=cfg.max_seq_len)


def load_llmkit_checkpoint(path: str | Path) -> tuple[Path, ModelConfig, dict[str, torch.Tensor]]:
    """(checkpoint dir, config, weights) of a `llmkit train` output or checkpoint directory."""
    from llmkit.api import resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    meta = read_json(ckpt / "config.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{ckpt / 'config.json'}: not an llmkit checkpoint (no \"model\" object); "
                              f"extend reads llmkit checkpoints")
    if not (ckpt / "tokenizer.json").is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.json next to the weights")
    cfg = ModelConfig.from_dict(meta["model"], where=str(ckpt / "config.json"))
    return ckpt, cfg, load_tensors(ckpt / "model.safetensors")


def save_extended(out: str | Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], tokenizer_file: Path,
                  *, source: Path) -> Path:
    """Write the extended model (no fine-tune) as out/checkpoints/step-00000000, loadable like any
    `llmkit train` output; the checkpoint is written atomically (a crash leaves no half model)."""
    model = build_model(cfg)
    load_model_tensors(model, tensors, where=str(source / "model.safetensors"))  # shapes are unchanged
    tie_weights(model)
    meta = run_config_json(cfg, extended_from={"path": str(source), "max_seq_len": cfg.rope_original_max_seq_len,
                                               "method": cfg.rope_scaling, "factor": cfg.rope_factor})
    return save_checkpoint(Path(out) / "checkpoints", 0, tensors={"model.safetensors": model_tensors(model)},
                           json_files={"config.json": meta}, copy_files={"tokenizer.json": tokenizer_file})
