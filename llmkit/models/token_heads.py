"""Per-token heads on any encoder: token classification (NER) and extractive QA spans.

Both read the encoder's last hidden states, as transformers' `*ForTokenClassification` and
`*ForQuestionAnswering` do: a token classifier is dropout → Linear(d_model, labels) at every
position; a span head is Linear(d_model, 2) whose two outputs are each position's start and end
logits. The body is any encoder-only model with `cfg` and `hidden_states(ids, mask, token_types)`
(BERT, RoBERTa, ALBERT, MiniLM, DeBERTa): it is held, not subclassed, so a new encoder family needs
nothing here. Its MLM head, if it had one, is dropped when a task model is made (`from_encoder`).

In an llmkit checkpoint the body's tensors are under `encoder.` and the head's under its
transformers name (`classifier.`, `qa_outputs.`); config.json keeps the body's ModelConfig under
"model" and the head under "task" (`task_json()`), from which `task_model` rebuilds it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

from torch import Tensor, nn

from llmkit.errors import CheckpointError, ConfigError
from llmkit.layers.linear import Linear
from llmkit.models.build import init_normal

TOKEN_CLASSIFICATION, QUESTION_ANSWERING = "token-classification", "question-answering"
# What a span head remembers for answering later (its training settings); transformers' defaults
# for directories that do not say (run_qa.py: 384 tokens, stride 128, answers of up to 30 tokens).
# null_threshold: None never answers "no answer" (SQuAD v1.1); a number is SQuAD 2.0's null score
# margin above which it does (llmkit.inference.token_tasks.best_span).
QA_DEFAULTS = {"max_len": 384, "doc_stride": 128, "max_answer_len": 30, "null_threshold": None}


class _EncoderTask(nn.Module):
    task = ""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if getattr(encoder.cfg, "arch", None) != "encoder":
            raise ConfigError(f"a {self.task} head needs an encoder-only model (BERT family); this one is "
                              f"arch={encoder.cfg.arch!r}")
        self.encoder, self.cfg = encoder, encoder.cfg
        self.dropout = nn.Dropout(encoder.cfg.dropout)

    def _init_head(self, head: nn.Module) -> None:
        head.apply(partial(init_normal, std=self.cfg.init_std))

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:
        return self.encoder.hidden_states(input_ids, attention_mask, token_type_ids)

    def tie_weights(self) -> None:
        if hasattr(self.encoder, "tie_weights"):
            self.encoder.tie_weights()


class TokenClassifier(_EncoderTask):
    """`model(ids, mask, types)` → (B, T, labels) logits; `labels[i]` names output i."""
    task = TOKEN_CLASSIFICATION

    def __init__(self, encoder: nn.Module, labels: Sequence[str]) -> None:
        super().__init__(encoder)
        if len(labels) < 1 or len(set(labels)) != len(labels):
            raise ConfigError(f"token labels must be distinct and at least one, got {list(labels)!r:.200}")
        self.labels = list(labels)
        self.classifier = Linear(self.cfg.d_model, len(self.labels), bias=True)
        self._init_head(self.classifier)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        return self.classifier(self.dropout(self.hidden_states(input_ids, attention_mask, token_type_ids)))

    def task_json(self) -> dict[str, Any]:
        return {"kind": self.task, "labels": list(self.labels)}


class SpanQA(_EncoderTask):
    """`model(ids, mask, types)` → (start_logits, end_logits), each (B, T)."""
    task = QUESTION_ANSWERING

    def __init__(self, encoder: nn.Module, settings: dict[str, Any] | None = None) -> None:
        super().__init__(encoder)
        self.settings = {**QA_DEFAULTS, **(settings or {})}
        self.settings["max_len"] = min(self.settings["max_len"], self.cfg.max_seq_len)
        self.qa_outputs = Linear(self.cfg.d_model, 2, bias=True)
        self._init_head(self.qa_outputs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # no dropout before qa_outputs: transformers' *ForQuestionAnswering has none
        logits = self.qa_outputs(self.hidden_states(input_ids, attention_mask, token_type_ids))
        start, end = logits.unbind(-1)
        return start, end

    def task_json(self) -> dict[str, Any]:
        return {"kind": self.task, **self.settings}


def bare_encoder(model: nn.Module) -> nn.Module:
    """The encoder body of `model` (a task model's, or the model itself) without its MLM or sequence
    head, as a fresh module holding the same weights."""
    from llmkit.models.build import build_model

    body = getattr(model, "encoder", model)
    cfg = body.cfg
    if getattr(cfg, "arch", None) != "encoder":
        raise ConfigError(f"token classification and QA need an encoder-only model (BERT family); this one is "
                          f"arch={cfg.arch!r}")
    if not cfg.mlm_head and not cfg.num_labels:
        return body
    bare = build_model(cfg.replace(mlm_head=False, num_labels=0))
    missing, _ = bare.load_state_dict(body.state_dict(), strict=False)  # the heads' tensors are left out
    assert not missing, f"encoder body tensors missing: {missing}"
    return bare.to(next(body.parameters()).dtype)


def task_model(encoder: nn.Module, task: Any, *, where: str) -> nn.Module:
    """The task model a checkpoint's "task" object describes, around `encoder` (head uninitialised
    until its tensors are loaded)."""
    if not isinstance(task, dict) or task.get("kind") not in (TOKEN_CLASSIFICATION, QUESTION_ANSWERING):
        raise CheckpointError(f"{where}: \"task\" must be an object with kind {TOKEN_CLASSIFICATION!r} or "
                              f"{QUESTION_ANSWERING!r}")
    try:
        if task["kind"] == TOKEN_CLASSIFICATION:
            labels = task.get("labels")
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise ConfigError("task.labels must be a list of strings")
            return TokenClassifier(encoder, labels)
        settings = {k: task.get(k, v) for k, v in QA_DEFAULTS.items()}
        threshold = settings.pop("null_threshold")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1 << 20 for v in settings.values()):
            raise ConfigError(f"task settings {sorted(settings)} must be integers in [0, 2^20]")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):
            raise ConfigError(f"task setting null_threshold must be a finite number or null, got {threshold!r:.40}")
        return SpanQA(encoder, {**settings, "null_threshold": threshold})
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def head_of(model: nn.Module, task: str, action: str) -> nn.Module:
    """`model` if it is a `task` model; else a one-line error saying how to get one."""
    if getattr(model, "task", None) != task:
        command = "finetune-tokens" if task == TOKEN_CLASSIFICATION else "finetune-qa"
        raise ConfigError(f"{action} needs a {task} model (a `llmkit {command}` output or a transformers "
                          f"*For{'TokenClassification' if task == TOKEN_CLASSIFICATION else 'QuestionAnswering'} "
                          "directory); this one has no such head")
    return model

