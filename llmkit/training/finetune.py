"""What SFT, reward-model training and DPO share: the starting model, the output directory, and one
call into the training loop (their held-out split is every fine-tune's: llmkit.data.split).

A fine-tuning run starts from any model `llmkit.load` reads (a run, a checkpoint, a Hugging Face
directory, a GGUF file) and writes checkpoints like `llmkit train` does — config.json with the
model config under "model", tokenizer.json, model.safetensors — plus what the starting model needs
to chat the same way afterwards ("chat": template, prefix and EOS ids, special-token names), and,
for LoRA runs, the adapter settings (see llmkit/io/finetuned.py). Everything about the data is
checked before the output directory is created, so bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import llmkit
from llmkit.errors import ConfigError
from llmkit.io.finetuned import chat_info_json
from llmkit.layers.lora import LoraConfig, apply_lora
from llmkit.training import distributed
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer, TrainState
from llmkit.io.run_dir import hold_run_dir
# (check_output_dir: sft, reward and dpo check their --out as finetune.check_output_dir)
from llmkit.training.pretrain import check_output_dir, run_config_json, run_trainer  # noqa: F401
from llmkit.runtime import set_threads

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class FinetuneRun:
    """One run's fixed parts, gathered before training starts."""
    lm: Any  # the starting llmkit.LanguageModel (tokenizer, chat template, prefix/EOS ids)
    model: nn.Module  # what is trained (the LM itself, or a RewardModel built from it)
    cfg: TrainConfig
    out_dir: Path
    kind: str  # "sft", "reward", "dpo": recorded in config.json
    data_fingerprint: str
    lora: LoraConfig | None = None
    heads: tuple[str, ...] = ()  # extra modules whose tensors `llmkit.load` sets aside
    fsdp: bool = False  # under torchrun: shard the model over the ranks (FSDP2) instead of DDP's replicas


def load_start_model(path: str | Path, cfg: TrainConfig, *, kind: str, fsdp: bool = False) -> Any:
    """The starting model, in float32 and train mode (bf16 is autocast, never stored weights), once the
    run's split over torchrun's ranks is checked (`kind`: the command, for the error)."""
    set_threads(cfg.threads)
    distributed.check_split(cfg.grad_accum, fsdp=fsdp, command=kind)  # under torchrun: before any work
    lm = llmkit.load(path)
    lm.model.float().train()
    return lm


def context_length(lm: Any, cfg: TrainConfig) -> int:
    limit = lm.model.cfg.max_seq_len
    if cfg.seq_len is not None and cfg.seq_len > limit:
        raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the model's context ({limit})")
    return cfg.seq_len or limit


def maybe_lora(model: nn.Module, lora: LoraConfig | None, emit: Event, *, seed: int) -> None:
    """Adapters on `model` when asked, initialised from `seed`, not from whatever state the global
    generator was left in: a LoRA run under torchrun then starts from one process's adapters (without
    this, DPO with LoRA on two ranks drifted 1e-3 from one process within 4 steps)."""
    if lora is None:
        return
    torch.manual_seed(seed)
    names = apply_lora(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit("lora", {"layers": len(names), "trainable": trainable, "rank": lora.rank, "alpha": lora.alpha})


def fingerprint_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_meta(run: FinetuneRun) -> dict[str, Any]:
    chat = chat_info_json(run.lm)
    if run.lm.chat_template is None:  # llmkit's default template ends each turn with <|end|>
        end = run.lm.tokenizer.token_to_id("<|end|>")
        if end is not None and end not in chat["eos_ids"]:
            chat["eos_ids"].append(end)
    meta = run_config_json(run.lm.model.cfg, chat=chat, trained_with=run.kind, started_from=str(run.lm.path))
    if run.lora is not None:
        meta["lora"] = run.lora.to_dict()
    if run.heads:
        meta["heads"] = list(run.heads)
    return meta


def train(run: FinetuneRun, *, loss_fn: Callable, get_batch: Callable[[int], Any],
          evaluate: Callable[[nn.Module], dict[str, float]] | None, resume: bool,
          on_event: Event | None = None, on_step: Callable[[dict], None] | None = None) -> TrainState:
    """Create the output directory and run the training loop (resuming when asked)."""
    emit = on_event or (lambda kind, info: None)
    out = run.out_dir
    main = distributed.world().main  # under torchrun, rank 0 alone writes (llmkit/training/distributed.py)
    with hold_run_dir(out) if main else contextlib.nullcontext():  # one writer per run directory
        if main:
            run.lm.tokenizer.save(out)
        torch.manual_seed(run.cfg.seed)
        trainer = Trainer(
            run.model, run.cfg, loss_fn=loss_fn, get_batch=get_batch, out_dir=out, evaluate=evaluate,
            checkpoint_json={"config.json": checkpoint_meta(run)},
            checkpoint_files={"tokenizer.json": out / "tokenizer.json"},
            fingerprint={"kind": run.kind, "model_config": run.lm.model.cfg.non_default_fields(),
                         "data": run.data_fingerprint, "tokenizer": run.lm.tokenizer.fingerprint(),
                         "batch_size": run.cfg.batch_size, "grad_accum": run.cfg.grad_accum,
                         "lora": run.lora.to_dict() if run.lora else None},
            fsdp=run.fsdp)
        return run_trainer(trainer, out, resume=resume, emit=emit, on_step=on_step)
