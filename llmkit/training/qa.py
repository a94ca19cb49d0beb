"""Extractive question-answering fine-tuning: SQuAD-format JSON → a span-head run.

The pretrained encoder gets a span head (llmkit.models.token_heads.SpanQA) and is trained with the
one Trainer (llmkit.training.classify.train_encoder_task) on the mean of the start and end
cross-entropies, as transformers' *ForQuestionAnswering computes it. Each question is framed with
its context (`[CLS] question [SEP] context [SEP]`); a context too long for `max_len` is cut into
windows sharing `doc_stride` tokens (llmkit.inference.token_tasks.qa_windows), and every window is
one training row: its target is the answer's first and last token, or position 0 (the first,
special token) when the window does not hold the whole answer. SQuAD 2.0's unanswerable questions
target position 0 in every window, as BERT's run_squad and transformers' run_qa train them; a model
trained on them says "no answer" when the null score beats the best span's by more than
`null_threshold` (default 0.0, transformers' null_score_diff_threshold), which it keeps.
Held out are whole paragraphs (the fine-tunes' split of them, llmkit.data.split, so no held-out
context is seen in training) or `--val-data`; after every evaluation interval their answers — the
best span over all windows, or "no answer" — are scored by SQuAD's exact match and F1
(llmkit.training.squad_metrics), logged as `val_exact_match` and `val_f1`, with the has-answer /
no-answer split and the best threshold's F1 when the held-out questions include unanswerable ones.
The output loads with `llmkit.load(out)`, whose `answer(question, context)` gives the span.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import llmkit
from llmkit.data.split import hold_out
from llmkit.data.squad_records import Question, SquadFile, read_squad
from llmkit.errors import ConfigError, DatasetError
from llmkit.inference.token_tasks import (Window, abstains, best_span, framing, pad_rows, qa_logits, qa_types,
                                           qa_windows)
from llmkit.models.token_heads import SpanQA, bare_encoder
from llmkit.runtime import set_threads
from llmkit.training.classify import batch_picks, train_encoder_task
from llmkit.training.config import TrainConfig
from llmkit.training import distributed
from llmkit.training.pretrain import check_output_dir
from llmkit.training.squad_metrics import best_thresholds, squad_scores


def answer_tokens(window: Window, answers: tuple[tuple[str, int], ...]) -> tuple[int, int]:
    """The window's first and last token of the first answer (text, start), or (0, 0) when the window
    does not hold all of it or there is no answer."""
    if not answers:
        return 0, 0
    text, start = answers[0]
    end = start + len(text)
    inside = [(t, o) for t, o in enumerate(window.offsets) if o is not None and o[1] > o[0]]
    if not inside or inside[0][1][0] > start or inside[-1][1][1] < end:
        return 0, 0
    first = next(t for t, (s, e) in inside if e > start)
    last = next(t for t, (s, e) in reversed(inside) if s < end)
    return (first, last) if first <= last else (0, 0)


class SpanData:
    """Every window of every question, with its answer's token positions; batches are a pure
    function of their index (exact resume)."""

    def __init__(self, tokenizer, squad: SquadFile, questions: list[Question], cfg, max_len: int, stride: int,
                 batch_size: int, seed: int) -> None:
        backend = framing(tokenizer)
        self.questions, self.batch_size, self.seed = questions, batch_size, seed
        self.pad_id = tokenizer.pad_id or 0
        self.windows: list[list[Window]] = []
        self.rows_: list[tuple[list[int], list[int], int, int]] = []
        for q in questions:
            try:
                windows = qa_windows(backend, q.question, q.context, max_len=max_len, stride=stride)
            except ConfigError as exc:
                raise DatasetError(f"{squad.where(q)}: {exc}") from None
            self.windows.append(windows)
            for w in windows:
                self.rows_.append((w.ids, qa_types(cfg, w.types), *answer_tokens(w, q.answers)))
        self.answerless = sum(1 for r in self.rows_ if r[2] == 0)
        self.unanswerable = sum(1 for q in questions if not q.answers)

    def rows(self, picks) -> tuple[Tensor, ...]:
        chosen = [self.rows_[i] for i in picks]
        ids, mask = pad_rows([r[0] for r in chosen], self.pad_id)
        types, _ = pad_rows([r[1] for r in chosen], 0)
        return ids, mask, types, torch.tensor([r[2] for r in chosen]), torch.tensor([r[3] for r in chosen])

    def batch(self, index: int) -> tuple[Tensor, ...]:
        return self.rows(batch_picks(len(self.rows_), index, self.batch_size, self.seed))


def span_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, float]]:
    ids, mask, types, starts, ends = batch
    start_logits, end_logits = (x.float().masked_fill(mask == 0, float("-inf")) for x in model(ids, mask, types))
    loss = (F.cross_entropy(start_logits, starts) + F.cross_entropy(end_logits, ends)) / 2
    hit = (start_logits.detach().argmax(-1) == starts) & (end_logits.detach().argmax(-1) == ends)
    return loss, {"tokens": int(mask.sum()), "span_accuracy": float(hit.float().mean())}


@torch.inference_mode()
def evaluate_reader(model: nn.Module, tokenizer, data: SpanData, max_answer_len: int,
                    null_threshold: float | None = None) -> dict[str, float]:
    """Held-out loss over windows, and SQuAD exact match / F1 (percent) of each question's answer:
    the best span, or "no answer" past `null_threshold`. With unanswerable questions held out, also
    the has-answer / no-answer split and the F1 at the best threshold (SQuAD 2.0's report)."""
    every = qa_logits(model, tokenizer, [w for windows in data.windows for w in windows])  # batched across questions
    total, at, spans, margins, predictions, golds = 0.0, 0, {}, {}, {}, {}
    for q, windows in zip(data.questions, data.windows):
        logits, at = every[at:at + len(windows)], at + len(windows)
        for w, (s, e) in zip(windows, logits):
            first, last = (torch.tensor([t]) for t in answer_tokens(w, q.answers))
            total += float(F.cross_entropy(s[None], first) + F.cross_entropy(e[None], last)) / 2
        span = best_span(windows, logits, q.context, max_answer_len)
        spans[q.qid], margins[q.qid] = span["answer"], span["null_margin"]
        predictions[q.qid] = "" if abstains(span["null_margin"], null_threshold) else span["answer"]
        golds[q.qid] = [a for a, _ in q.answers]
    scores = squad_scores(predictions, golds)
    out = {"val_loss": total / max(at, 1), **{f"val_{k}": v for k, v in scores.items() if not k.endswith("questions")}}
    if data.unanswerable:
        best = best_thresholds(spans, margins, golds)
        out.update(val_best_f1=best["best_f1"], val_best_f1_threshold=best["best_f1_threshold"])
    return out


def finetune_qa(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                val_path: str | Path | None = None, max_len: int | None = None, doc_stride: int | None = None,
                max_answer_len: int = 30, null_threshold: float | None = None, resume: bool = False,
                on_step: Callable[[dict], None] | None = None,
                on_event: Callable[[str, dict[str, Any]], None] | None = None,
                fsdp: bool = False) -> dict[str, Any]:
    """Fine-tune; returns a summary (question and window counts, final held-out exact match and F1).
    `null_threshold` (default 0.0 when the training data has unanswerable questions, else none:
    never abstain) is kept with the model for `answer()`."""
    from llmkit.training.finetune import fingerprint_of

    emit = on_event or (lambda kind, info: None)
    out = check_output_dir(out_dir, resume=resume, empty=True)
    distributed.check_split(cfg.grad_accum, fsdp=fsdp, command="finetune-qa")  # under torchrun: before any work
    squad = read_squad(data_path)
    if val_path is not None:
        val_squad = read_squad(val_path)
        train, val = squad.questions, val_squad.questions
    else:
        by_paragraph: dict[int, list[Question]] = {}
        for q in squad.questions:
            by_paragraph.setdefault(q.paragraph, []).append(q)
        train_groups, val_groups = hold_out(list(by_paragraph.values()), cfg.val_fraction, cfg.seed,
                                            source=str(data_path), unit="paragraph", alternative="pass --val-data")
        train = [q for group in train_groups for q in group]
        val = [q for group in val_groups for q in group]
        val_squad = squad
    if max_answer_len < 1:
        raise ConfigError(f"--max-answer-len must be at least 1, got {max_answer_len}")
    if null_threshold is not None and not math.isfinite(null_threshold):
        raise ConfigError(f"--null-threshold must be a finite number, got {null_threshold}")
    if all(not q.answers for q in train):
        raise DatasetError(f"{data_path}: no answerable question to learn answer spans from")
    lm = llmkit.load(model_path)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    encoder = bare_encoder(lm.model.float())
    max_len = min(max_len or 384, encoder.cfg.max_seq_len)
    stride = min(128, max_len // 3) if doc_stride is None else doc_stride
    if not 0 <= stride < max_len:
        raise ConfigError(f"--doc-stride must be in [0, max length {max_len}), got {stride}")
    if null_threshold is None and any(not q.answers for q in train):
        null_threshold = 0.0
    elif null_threshold is None and isinstance(lm.model, SpanQA):
        null_threshold = lm.model.settings.get("null_threshold")
    model = SpanQA(encoder, {"max_len": max_len, "doc_stride": stride, "max_answer_len": max_answer_len,
                             "null_threshold": null_threshold})
    if isinstance(lm.model, SpanQA):  # go on training its head
        model.qa_outputs.load_state_dict(lm.model.qa_outputs.state_dict())
    train_data = SpanData(lm.tokenizer, squad, train, model.cfg, max_len, stride, cfg.batch_size, cfg.seed)
    val_data = SpanData(lm.tokenizer, val_squad, val, model.cfg, max_len, stride, cfg.batch_size, cfg.seed)
    emit("data", {"train": len(train), "val": len(val), "train_windows": len(train_data.rows_),
                  "val_windows": len(val_data.rows_), "answerless": train_data.answerless,
                  "unanswerable": train_data.unanswerable, "max_len": max_len, "doc_stride": stride})
    fingerprint = {"kind": "finetune-qa", "settings": model.task_json(),
                   "data": fingerprint_of([(q.question, q.context, q.answers) for q in train],
                                          [(q.question, q.context, q.answers) for q in val]),
                   "model_config": model.cfg.non_default_fields(), "tokenizer": lm.tokenizer.fingerprint(),
                   "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    state = train_encoder_task(model, lm.tokenizer, out, cfg, loss_fn=span_loss, get_batch=train_data.batch,
                               evaluate=lambda m: evaluate_reader(m, lm.tokenizer, val_data, max_answer_len,
                                                                  null_threshold),
                               meta={"task": model.task_json(), "started_from": str(model_path)},
                               fingerprint=fingerprint, resume=resume, on_step=on_step, on_event=emit,
                               fsdp=fsdp)
    final = evaluate_reader(model.eval(), lm.tokenizer, val_data, max_answer_len, null_threshold)
    return {"train_questions": len(train), "val_questions": len(val), "train_windows": len(train_data.rows_),
            "val_windows": len(val_data.rows_), "train_unanswerable": train_data.unanswerable,
            "val_unanswerable": val_data.unanswerable, "null_threshold": null_threshold, "max_len": max_len,
            "doc_stride": stride, "steps": state.step, **final}
