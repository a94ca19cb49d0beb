"""Sequence-classification fine-tuning of an encoder: JSONL `{"text", "label"}` → a classifier checkpoint.

The pretrained encoder (an llmkit run or a Hugging Face BERT directory) gets a classification head
(`ModelConfig.num_labels`, mean pooling over real tokens → linear) and is trained with the one
Trainer on cross-entropy (its checkpoints, so `resume` continues a run exactly). The fine-tunes'
held-out split of the records (llmkit.data.split), or a separate file, is held out and its
accuracy logged as `val_accuracy` in metrics.jsonl. The output directory is an ordinary llmkit run:
`llmkit.load(out)` gives the model; the label names are in its checkpoint's config.json
(`classifier_labels`). Texts longer than the model's context are truncated to their first tokens
(see llmkit.inference.embed) and counted.
"""

from __future__ import annotations

import contextlib
import random
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import llmkit
from llmkit.data.split import hold_out
from llmkit.errors import CheckpointError, ConfigError, DatasetError
from llmkit.inference.embed import encoder_batch
from llmkit.io.run_dir import hold_run_dir
from llmkit.io.checkpoint import read_json
from llmkit.io.weights import model_tensors
from llmkit.models.masked_lm import MaskedLM
from llmkit.tokenizer import Tokenizer
from llmkit.training import distributed
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer, TrainState
from llmkit.training.pretrain import check_output_dir, run_config_json, run_trainer
from llmkit.runtime import model_device, set_threads, to_device


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    where: str  # "file:line"


def read_examples(path: str | Path, labels: Sequence[str] | None = None) -> list[Example]:
    """Records of a JSONL file; a missing/empty text, a missing label or one outside `labels` is an error
    naming file:line. Labels may be strings or integers (kept as their text)."""
    from llmkit.data.records import iter_jsonl

    out = []
    for where, obj in iter_jsonl(path):
        text, label = obj.get("text"), obj.get("label")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: field 'text' must be a non-empty string"
                               + ("" if "text" in obj else " (missing)"))
        if label is None:
            raise DatasetError(f"{where}: missing field 'label'")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DatasetError(f"{where}: field 'label' must be a string or an integer, got {label!r}")
        if labels is not None and str(label) not in labels:
            raise DatasetError(f"{where}: unknown label {str(label)!r} (known: {', '.join(labels)})")
        out.append(Example(text, str(label), where))
    if not out:
        raise DatasetError(f"{path}: no records")
    return out


def classifier_from(base: MaskedLM, num_labels: int) -> MaskedLM:
    """A copy of `base` with a freshly initialised `num_labels`-way head (replacing any old one)."""
    model = MaskedLM(base.cfg.replace(num_labels=num_labels))
    state = {k: v for k, v in model_tensors(base).items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]  # tied below
    assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
    model.tie_weights()
    return model


def classifier_labels(path: str | Path) -> list[str]:
    """The label names of a fine-tuned classifier (a finetune-classifier output or its checkpoint)."""
    from llmkit.api import resolve_checkpoint

    labels = read_json(resolve_checkpoint(path) / "config.json").get("labels")
    if not isinstance(labels, list):
        raise CheckpointError(f"{path}: not a classifier (its config.json has no labels)")
    return labels


class ClassificationData:
    """Tokenized examples; training batches are a pure function of their index (exact resume)."""

    def __init__(self, tokenizer: Tokenizer, examples: list[Example], labels: list[str], max_len: int,
                 batch_size: int, seed: int) -> None:
        self.tokenizer, self.examples, self.max_len = tokenizer, examples, max_len
        self.targets = [labels.index(e.label) for e in examples]
        self.batch_size, self.seed = batch_size, seed
        self.truncated = encoder_batch(tokenizer, [e.text for e in examples], max_len)[2]

    def rows(self, picks: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        ids, mask, _ = encoder_batch(self.tokenizer, [self.examples[i].text for i in picks], self.max_len)
        return ids, mask, torch.tensor([self.targets[i] for i in picks])

    def batch(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.rows(batch_picks(len(self.examples), index, self.batch_size, self.seed))


@lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return tuple(order)


def batch_picks(n: int, index: int, batch_size: int, seed: int) -> list[int]:
    """The examples of training batch `index` over `n` examples: example k of the run is number k % n
    of epoch k // n's seeded order, so a batch is a pure function of its index (exact resume)."""
    start = index * batch_size
    return [_epoch_order(n, seed, k // n)[k % n] for k in range(start, start + batch_size)]


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
    ids, mask, targets = batch
    logits = model.classify(ids, mask)
    accuracy = float((logits.detach().argmax(-1) == targets).float().mean())
    return F.cross_entropy(logits.float(), targets), {"tokens": int(mask.sum()), "accuracy": accuracy}


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, data: ClassificationData) -> dict[str, float]:
    total, correct = 0.0, 0
    for start in range(0, len(data.examples), 32):
        ids, mask, targets = to_device(data.rows(range(start, min(start + 32, len(data.examples)))),
                                       model_device(model))
        logits = model.classify(ids, mask).float()  # under the caller's autocast (the Trainer's), if any
        total += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
    return {"val_loss": total / len(data.examples), "val_accuracy": correct / len(data.examples)}


def finetune_classifier(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                        labels: Sequence[str] | None = None, val_path: str | Path | None = None,
                        max_len: int | None = None, resume: bool = False,
                        on_step: Callable[[dict], None] | None = None,
                        on_event: Callable[[str, dict[str, Any]], None] | None = None,
                        fsdp: bool = False) -> dict[str, Any]:
    """Fine-tune (or, with `resume`, continue the run in `out_dir` from its newest checkpoint); returns
    a summary (labels, example counts, truncated texts, final val_accuracy)."""
    from llmkit.training.finetune import fingerprint_of

    emit = on_event or (lambda kind, info: None)
    out = check_output_dir(out_dir, resume=resume, empty=True)
    distributed.check_split(cfg.grad_accum, fsdp=fsdp, command="finetune-classifier")  # under torchrun: before any work
    examples = read_examples(data_path, labels)
    if val_path is not None:
        label_set = list(labels) if labels else sorted({e.label for e in examples})
        train, val = examples, read_examples(val_path, label_set)
    else:
        train, val = hold_out(examples, cfg.val_fraction, cfg.seed, source=str(data_path),
                              alternative="pass --val-data")
    label_names = list(labels) if labels else sorted({e.label for e in examples})
    if len(label_names) < 2:
        raise DatasetError(f"{data_path}: needs at least 2 distinct labels, found {label_names}")
    lm = llmkit.load(model_path)
    if not isinstance(lm.model, MaskedLM):
        raise ConfigError(f"{model_path}: finetune-classifier needs an encoder-only model (BERT family), "
                          f"this one is arch={lm.model.cfg.arch!r}")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = classifier_from(lm.model.float(), len(label_names))
    max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    train_data = ClassificationData(lm.tokenizer, train, label_names, max_len, cfg.batch_size, cfg.seed)
    val_data = ClassificationData(lm.tokenizer, val, label_names, max_len, cfg.batch_size, cfg.seed)
    emit("data", {"train": len(train), "val": len(val), "labels": label_names,
                  "truncated": train_data.truncated + val_data.truncated, "max_len": max_len})
    fingerprint = {"kind": "finetune-classifier", "labels": label_names, "max_len": max_len,
                   "data": fingerprint_of([(e.text, e.label) for e in train], [(e.text, e.label) for e in val]),
                   "model_config": model.cfg.non_default_fields(), "tokenizer": lm.tokenizer.fingerprint(),
                   "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    state = train_encoder_task(model, lm.tokenizer, out, cfg, loss_fn=classification_loss,
                               get_batch=train_data.batch, evaluate=lambda m: evaluate_classifier(m, val_data),
                               meta={"labels": label_names},
                               fingerprint=fingerprint, resume=resume, on_step=on_step, on_event=emit,
                               fsdp=fsdp)
    final = evaluate_classifier(model.eval(), val_data)
    return {"labels": label_names, "train_examples": len(train), "val_examples": len(val),
            "truncated": train_data.truncated + val_data.truncated, "steps": state.step, **final}


# ---- what every encoder fine-tune shares (this one, finetune-tokens, finetune-qa) ----------------------

def train_encoder_task(model: nn.Module, tokenizer: Tokenizer, out: Path, cfg: TrainConfig, *, loss_fn: Callable,
                       get_batch: Callable[[int], Any], evaluate: Callable[[nn.Module], dict[str, float]],
                       meta: dict[str, Any], fingerprint: dict[str, Any] | None = None, resume: bool = False,
                       on_step: Callable[[dict], None] | None = None,
                       on_event: Callable[[str, dict[str, Any]], None] | None = None,
                       fsdp: bool = False) -> TrainState:
    """Run the one Trainer on a fine-tuned encoder in `out` (tokenizer.json, metrics.jsonl, checkpoints
    whose config.json holds the model config and `meta`), resuming there when asked. A run that fails
    leaves no directory it created (Ctrl-C keeps its checkpoint). Under torchrun every rank trains
    (the Trainer deals each step's micro-batches out) and evaluates the same weights on the same
    held-out data, with no collective of its own (with `fsdp` the model is sharded: every rank's
    evaluation runs the same forward passes, so their weight gathers line up); rank 0 alone writes."""
    emit = on_event or (lambda kind, info: None)
    created = not out.exists()
    distributed.checked_before_written()
    main = distributed.world().main
    with hold_run_dir(out) if main else contextlib.nullcontext():  # one writer per run directory (llmkit.io.run_dir)
        try:
            if main:
                tokenizer.save(out)
            trainer = Trainer(model, cfg, loss_fn=loss_fn, get_batch=get_batch, out_dir=out, evaluate=evaluate,
                              checkpoint_json={"config.json": run_config_json(model.cfg, **meta)},
                              checkpoint_files={"tokenizer.json": out / "tokenizer.json"},
                              fingerprint=fingerprint, fsdp=fsdp)
            return run_trainer(trainer, out, resume=resume, emit=emit, on_step=on_step)
        except Exception:
            if created and main:
                shutil.rmtree(out, ignore_errors=True)
            raise
