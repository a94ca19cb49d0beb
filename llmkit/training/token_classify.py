"""Token-classification (NER) fine-tuning: JSONL `{"tokens": [...], "tags": [...]}` → a tagger run.

The pretrained encoder (an llmkit run or a Hugging Face BERT/RoBERTa/ALBERT/DeBERTa/MiniLM
directory) gets a per-token head (llmkit.models.token_heads.TokenClassifier) and is trained with the
one Trainer (llmkit.training.classify.train_encoder_task: the classifier's loop, checkpoints and
resume) on cross-entropy at the first sub-token of every word; a word's other sub-tokens and the
special tokens are ignored (label -100), as in transformers' token-classification recipe. The
held-out records (the fine-tunes' split of the file, llmkit.data.split, or `--val-data`)
are scored after every evaluation interval by entity-level F1 (llmkit.training.ner_metrics), logged
as `val_entity_f1`. The output loads with `llmkit.load(out)`, whose `tag(text)` finds entities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import llmkit
from llmkit.data.ner_records import TaggedSentence, read_tagged, tag_set
from llmkit.data.split import hold_out
from llmkit.errors import ConfigError
from llmkit.inference.token_tasks import encode_words, framing, pad_rows
from llmkit.models.token_heads import TokenClassifier, bare_encoder
from llmkit.runtime import model_device, set_threads, to_device
from llmkit.training.classify import batch_picks, train_encoder_task
from llmkit.training.config import TrainConfig
from llmkit.training import distributed
from llmkit.training.pretrain import check_output_dir
from llmkit.training.ner_metrics import entity_scores

IGNORE = -100  # cross_entropy's ignore_index: sub-tokens after a word's first, special tokens, padding


def joined(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The words as one text with single spaces, and each word's characters in it."""
    spans, at = [], 0
    for word in words:
        spans.append((at, at + len(word)))
        at += len(word) + 1
    return " ".join(words), spans


class TaggedData:
    """Tokenized sentences with a target at each word's first token; batches are a pure function of
    their index (exact resume)."""

    def __init__(self, tokenizer, sentences: list[TaggedSentence], labels: list[str], max_len: int,
                 batch_size: int, seed: int) -> None:
        self.sentences, self.batch_size, self.seed = sentences, batch_size, seed
        self.pad_id = tokenizer.pad_id or 0
        backend = framing(tokenizer)
        self.encoded = [encode_words(backend, *joined(s.words), max_len) for s in sentences]
        self.targets = []
        for s, enc in zip(sentences, self.encoded):
            target = [IGNORE] * len(enc.ids)
            for tag, token in zip(s.tags, enc.first_token):
                if token is not None:
                    target[token] = labels.index(tag)
            self.targets.append(target)
        self.truncated = sum(e.truncated for e in self.encoded)

    def rows(self, picks: Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ids, mask = pad_rows([self.encoded[i].ids for i in picks], self.pad_id)
        types, _ = pad_rows([self.encoded[i].types for i in picks], 0)
        targets, _ = pad_rows([self.targets[i] for i in picks], IGNORE)
        return ids, mask, types, targets

    def batch(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.rows(batch_picks(len(self.sentences), index, self.batch_size, self.seed))


def token_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, float]]:
    ids, mask, types, targets = batch
    logits = model(ids, mask, types).float()
    labelled = targets != IGNORE
    accuracy = float((logits.detach().argmax(-1) == targets)[labelled].float().mean()) if labelled.any() else 0.0
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    return loss, {"tokens": int(mask.sum()), "token_accuracy": accuracy}


@torch.inference_mode()
def evaluate_tagger(model: nn.Module, data: TaggedData, *, per_type: bool = False) -> dict[str, float]:
    """Held-out loss at labelled tokens and entity-level precision / recall / F1 over words (a word
    cut off by the context length counts as tagged O)."""
    total, count, predicted = 0.0, 0, []
    for start in range(0, len(data.sentences), 32):
        picks = range(start, min(start + 32, len(data.sentences)))
        ids, mask, types, targets = to_device(data.rows(picks), model_device(model))
        logits = model(ids, mask, types).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"))
        count += int((targets != IGNORE).sum())
        best = logits.argmax(-1).cpu()
        for row, i in enumerate(picks):
            predicted.append([model.labels[int(best[row, t])] if t is not None else "O"
                              for t in data.encoded[i].first_token])
    scores = entity_scores([s.tags for s in data.sentences], predicted)
    out = {"val_loss": total / max(count, 1), "val_entity_f1": scores["f1"], "val_precision": scores["precision"],
           "val_recall": scores["recall"]}
    if per_type:
        out.update({f"val_{k}": v for k, v in scores.items() if k.startswith("f1_")})
    return out


def finetune_tokens(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                    labels: Sequence[str] | None = None, val_path: str | Path | None = None,
                    max_len: int | None = None, resume: bool = False, on_step: Callable[[dict], None] | None = None,
                    on_event: Callable[[str, dict[str, Any]], None] | None = None,
                    fsdp: bool = False) -> dict[str, Any]:
    """Fine-tune; returns a summary (labels, sentence counts, truncated sentences, final held-out scores)."""
    from llmkit.training.finetune import fingerprint_of

    emit = on_event or (lambda kind, info: None)
    out = check_output_dir(out_dir, resume=resume, empty=True)
    distributed.check_split(cfg.grad_accum, fsdp=fsdp, command="finetune-tokens")  # under torchrun: before any work
    sentences = read_tagged(data_path, labels)
    label_names = list(labels) if labels else tag_set(sentences)
    if val_path is not None:
        train, val = sentences, read_tagged(val_path, label_names)
    else:
        train, val = hold_out(sentences, cfg.val_fraction, cfg.seed, source=str(data_path), unit="sentence",
                              alternative="pass --val-data")
    if len(label_names) < 2:
        raise ConfigError(f"{data_path}: needs at least 2 labels, found {label_names}")
    lm = llmkit.load(model_path)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = TokenClassifier(bare_encoder(lm.model.float()), label_names)
    if isinstance(lm.model, TokenClassifier) and lm.model.labels == label_names:  # go on training its head
        model.classifier.load_state_dict(lm.model.classifier.state_dict())
    max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    train_data = TaggedData(lm.tokenizer, train, label_names, max_len, cfg.batch_size, cfg.seed)
    val_data = TaggedData(lm.tokenizer, val, label_names, max_len, cfg.batch_size, cfg.seed)
    truncated = train_data.truncated + val_data.truncated
    emit("data", {"train": len(train), "val": len(val), "labels": label_names, "truncated": truncated,
                  "max_len": max_len})
    fingerprint = {"kind": "finetune-tokens", "labels": label_names, "max_len": max_len,
                   "data": fingerprint_of([(s.words, s.tags) for s in train], [(s.words, s.tags) for s in val]),
                   "model_config": model.cfg.non_default_fields(), "tokenizer": lm.tokenizer.fingerprint(),
                   "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    state = train_encoder_task(model, lm.tokenizer, out, cfg, loss_fn=token_loss, get_batch=train_data.batch,
                               evaluate=lambda m: evaluate_tagger(m, val_data),
                               meta={"task": model.task_json(), "started_from": str(model_path)},
                               fingerprint=fingerprint, resume=resume, on_step=on_step, on_event=emit,
                               fsdp=fsdp)
    final = evaluate_tagger(model.eval(), val_data, per_type=True)
    return {"labels": label_names, "train_sentences": len(train), "val_sentences": len(val), "truncated": truncated,
            "steps": state.step, **final}
