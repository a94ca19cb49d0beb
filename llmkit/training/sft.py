"""Supervised fine-tuning on conversations: the pipeline behind `llmkit sft`.

records (llmkit/data/records.py) → rendered with the model's chat template, loss mask on the
assistant's replies, length policy, optional packing (llmkit/data/chat_examples.py) → optional
LoRA → the one training loop with `sft_loss` → checkpoints that load with `llmkit.load`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.data.chat_examples import (IGNORE, Example, length_summary, pack, pad_batch, prepare_examples,
                                       sample_order)
from llmkit.data.records import read_sft_records
from llmkit.data.split import hold_out
from llmkit.errors import DatasetError
from llmkit.layers.lora import LoraConfig
from llmkit.runtime import model_device, to_device
from llmkit.training import finetune
from llmkit.training.config import TrainConfig
from llmkit.training.loop import TrainState

Batch = tuple[Tensor, Tensor, Tensor]


def sft_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """Mean cross-entropy over the supervised (reply) tokens only: position t predicts label t+1."""
    ids, labels, mask = batch
    logits = model(ids)
    targets = labels[:, 1:]
    supervised = int((targets != IGNORE).sum())
    assert supervised > 0, "a batch without supervised tokens (examples are filtered for this)"
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum") / supervised
    return loss, {"tokens": int(mask.sum()), "supervised_tokens": supervised}


@torch.inference_mode()
def evaluate_sft(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, *,
                 max_batches: int) -> dict[str, float]:
    """Held-out loss on reply tokens (nats/token)."""
    total, count = 0.0, 0
    for first in range(0, min(len(examples), max_batches * batch_size), batch_size):
        ids, labels, _ = to_device(pad_batch(examples[first:first + batch_size], pad_id), model_device(model))
        logits = model(ids)  # under the caller's autocast (the Trainer's runtime), if any
        total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"))
        count += int((labels[:, 1:] != IGNORE).sum())
    return {"val_loss": total / max(count, 1)}


def sft(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
        lora: LoraConfig | None = None, overlength: str = "truncate", packing: bool = False,
        resume: bool = False, skip_bad_lines: int = 0,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        on_step: Callable[[dict], None] | None = None, fsdp: bool = False) -> TrainState:
    """Fine-tune the model at `model_path` on the SFT records of `data_path`; see the module docstring.
    `fsdp`: under torchrun, shard the model over the ranks (llmkit/training/distributed.py)."""
    emit = on_event or (lambda kind, info: None)
    out_dir = finetune.check_output_dir(out_dir, resume)
    records, stats = read_sft_records(data_path, skip_bad_lines=skip_bad_lines)  # checked before any model work
    emit("records", {"summary": stats.summary(), "unknown_keys": dict(stats.unknown_keys), "skipped": stats.skipped})
    lm = finetune.load_start_model(model_path, cfg, kind="sft", fsdp=fsdp)
    max_len = finetune.context_length(lm, cfg)
    counts: Counter = Counter()
    examples = prepare_examples(lm, records, max_len, overlength, counts)
    emit("lengths", {"examples": len(examples), "counts": dict(counts),
                     **length_summary([len(e.ids) for e in examples])})
    dropped = sum(n for why, n in counts.items() if why != "truncated")
    if examples and dropped > 0.1 * len(records):
        emit("warning", {"message": f"{dropped} of {len(records)} records were dropped for length "
                                    f"(context {max_len} tokens; see --seq-len, --overlength)"})
    if not examples:
        raise DatasetError(f"0 usable examples in {data_path} ({stats.lines} lines read; dropped: "
                           + ", ".join(f"{n} {why}" for why, n in counts.items()) + f"; context {max_len} tokens)")
    train_examples, val_examples = hold_out(examples, cfg.val_fraction, cfg.seed, source=str(data_path),
                                            unit="usable example")
    if packing:
        train_examples = pack(train_examples, max_len)
    pad_id = lm.tokenizer.pad_id if lm.tokenizer.pad_id is not None else (lm.eos_ids or [0])[0]
    model = lm.model
    finetune.maybe_lora(model, lora, emit, seed=cfg.seed)
    fingerprint = finetune.fingerprint_of([e.ids for e in examples], [e.labels for e in examples], packing, cfg.seed,
                                          cfg.val_fraction)
    run = finetune.FinetuneRun(lm, model, cfg, out_dir, "sft", fingerprint, lora=lora, fsdp=fsdp)

    def get_batch(index: int) -> Batch:
        return pad_batch([train_examples[i] for i in sample_order(len(train_examples), cfg.batch_size, index,
                                                                  cfg.seed)], pad_id)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_sft(m, val_examples, cfg.batch_size, pad_id, max_batches=cfg.eval_batches)

    emit("split", {"train": len(train_examples), "val": len(val_examples), "packed": packing})
    return finetune.train(run, loss_fn=sft_loss, get_batch=get_batch, evaluate=evaluate, resume=resume,
                          on_event=on_event, on_step=on_step)
