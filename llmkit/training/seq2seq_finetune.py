"""Sequence-to-sequence fine-tuning: a JSONL of source/target records → a fine-tuned checkpoint.

records (validated up front, llmkit.data.seq2seq_records) → the base model and its tokenizer
(`llmkit.load`: an llmkit encoder-decoder run or checkpoint) → the fine-tunes' held-out split
(llmkit.data.split) → the one training loop with the teacher-forced seq2seq loss → out/checkpoints/,
metrics.jsonl, loss.png. The output directory loads with `llmkit.load` like any training run.
Under torchrun every rank reads the same records and split; the Trainer deals each step's
micro-batches out, each rank evaluates the same weights on the same held-out pairs (no collective),
and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path
from typing import Any, Callable

import llmkit
from llmkit.data.seq2seq_records import read_seq2seq_records, tokenize_examples
from llmkit.data.split import hold_out
from llmkit.errors import ConfigError
from llmkit.io.finetuned import chat_info_json
from llmkit.training import distributed
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer, TrainState
from llmkit.io.run_dir import hold_run_dir
from llmkit.training.pretrain import check_output_dir, run_config_json, run_trainer
from llmkit.training.seq2seq import PairBatches, evaluate_seq2seq, seq2seq_loss
from llmkit.runtime import set_threads

Event = Callable[[str, dict[str, Any]], None]


def finetune_seq2seq(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                     resume: bool = False, on_event: Event | None = None,
                     on_step: Callable[[dict], None] | None = None, fsdp: bool = False) -> TrainState:
    """Fine-tune an encoder-decoder model on `data_path`; see the module docstring. `fsdp`: under
    torchrun, shard the model over the ranks (llmkit/training/distributed.py)."""
    out_dir = Path(out_dir)
    emit = on_event or (lambda kind, info: None)
    set_threads(cfg.threads)
    check_output_dir(out_dir, resume=resume)
    distributed.check_split(cfg.grad_accum, fsdp=fsdp, command="finetune-seq2seq")  # under torchrun: before any work
    examples = read_seq2seq_records(data_path)  # every record checked before anything is loaded or written
    lm = llmkit.load(model_path)
    model_cfg, tokenizer = lm.model.cfg, lm.tokenizer
    if model_cfg.arch != "encoder-decoder":
        raise ConfigError(f"{model_path}: a {model_cfg.arch} model; seq2seq fine-tuning needs an encoder-decoder "
                          "(T5 or BART) model")
    context = cfg.seq_len or model_cfg.max_seq_len
    if context > model_cfg.max_seq_len:
        raise ConfigError(f"--seq-len {context} is longer than the model's context ({model_cfg.max_seq_len})")
    train_examples, val_examples = hold_out(examples, cfg.val_fraction, cfg.seed, source=str(data_path))
    train = tokenize_examples(train_examples, tokenizer, max_source_len=context, max_target_len=context)
    val = tokenize_examples(val_examples, tokenizer, max_source_len=context, max_target_len=context)
    emit("data", {"train": len(train_examples), "val": len(val_examples), "context": context,
                  "truncated_sources": train.truncated_sources + val.truncated_sources,
                  "truncated_targets": train.truncated_targets + val.truncated_targets})
    created = not out_dir.exists()
    distributed.checked_before_written()
    main = distributed.world().main  # under torchrun, rank 0 alone writes (llmkit/training/distributed.py)
    with hold_run_dir(out_dir) if main else contextlib.nullcontext():  # one writer per run directory
        try:
            if main:
                tokenizer.save(out_dir)
        except Exception:
            if created and main:
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        start_id = model_cfg.decoder_start_token_id
        batches = PairBatches(train.pairs, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=pad_id, start_id=start_id)
        held_out = PairBatches(val.pairs, batch_size=cfg.batch_size, seed=cfg.seed, pad_id=pad_id, start_id=start_id)
        model = lm.model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        emit("model", {"params": sum(p.numel() for p in model.parameters()), "path": str(lm.path)})
        trainer = Trainer(
            model, cfg, loss_fn=seq2seq_loss, get_batch=batches.batch, out_dir=out_dir,
            evaluate=lambda m: evaluate_seq2seq(m, held_out.in_order(max_batches=cfg.eval_batches)),
            # "chat" keeps the base model's special-token names and EOS ids (a Hugging Face T5's </s>)
            checkpoint_json={"config.json": run_config_json(model_cfg, chat=chat_info_json(lm))},
            checkpoint_files={"tokenizer.json": out_dir / "tokenizer.json"},
            fingerprint={"model_config": model_cfg.non_default_fields(), "base_model": str(lm.path.resolve()),
                         "data": hashlib.sha256(Path(data_path).read_bytes()).hexdigest(),
                         "tokenizer": tokenizer.fingerprint(), "seq_len": context, "batch_size": cfg.batch_size,
                         "grad_accum": cfg.grad_accum, "val_fraction": cfg.val_fraction},
            fsdp=fsdp)
        return run_trainer(trainer, out_dir, resume=resume, emit=emit, on_step=on_step)
