"""transformers' `*ForTokenClassification` and `*ForQuestionAnswering` heads, in and out, for any
encoder family whose body llmkit reads (the family's loader calls these; see llmkit.io.hf_encoder).

Their files are the family's body under its prefix (`bert.`, `roberta.`, `albert.`, `deberta.`,
no pooler) plus the head, unprefixed: `classifier.{weight,bias}` (labels × hidden) or
`qa_outputs.{weight,bias}` (2 × hidden). Which head a directory has is what config.json's
`architectures` says; the token labels are its `id2label` (`label2id` is written too). A span
head's answering settings (llmkit's max length, doc stride, longest answer) travel under the
config key `llmkit_task`, which transformers keeps and ignores. Other heads (sequence
classification over the pooler, multiple choice) are refused in one line: llmkit's classifier pools
differently (llmkit.models.masked_lm).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from llmkit.errors import ModelFormatError
from llmkit.models.token_heads import QA_DEFAULTS, QUESTION_ANSWERING, TOKEN_CLASSIFICATION

HEADS = {TOKEN_CLASSIFICATION: "classifier", QUESTION_ANSWERING: "qa_outputs"}
SUFFIXES = {TOKEN_CLASSIFICATION: "ForTokenClassification", QUESTION_ANSWERING: "ForQuestionAnswering"}
MAX_LABELS = 1 << 16


def task_from_hf(data: dict, where: str) -> dict[str, Any] | None:
    """The task head config.json describes (llmkit's "task" object), or None for a body or MLM model."""
    archs = data.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    if arch.endswith(SUFFIXES[QUESTION_ANSWERING]):
        saved = data.get("llmkit_task")
        settings = {k: v for k, v in saved.items() if k in QA_DEFAULTS} if isinstance(saved, dict) else {}
        return {"kind": QUESTION_ANSWERING, **settings}
    if arch.endswith(SUFFIXES[TOKEN_CLASSIFICATION]):
        return {"kind": TOKEN_CLASSIFICATION, "labels": _labels(data, where)}
    if "For" in arch and not arch.endswith("ForMaskedLM") and not arch.endswith("ForPreTraining"):
        raise ModelFormatError(f"{where}: {arch} is not supported (llmkit reads the encoder alone, *ForMaskedLM, "
                               "*ForTokenClassification and *ForQuestionAnswering)")
    return None


def _labels(data: dict, where: str) -> list[str]:
    """The label names in id order, from id2label ({"0": "O", ...}); LABEL_i when it is absent."""
    id2label = data.get("id2label")
    if id2label is None:
        n = data.get("num_labels", 2)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LABELS:
            raise ModelFormatError(f"{where}: num_labels must be an integer in [1, {MAX_LABELS}], got {n!r:.40}")
        return [f"LABEL_{i}" for i in range(n)]
    if not isinstance(id2label, dict) or not 1 <= len(id2label) <= MAX_LABELS:
        raise ModelFormatError(f"{where}: id2label must be an object of 1 to {MAX_LABELS} labels")
    ids = {str(i) for i in range(len(id2label))}
    if set(id2label) != ids:
        raise ModelFormatError(f"{where}: id2label's keys must be the ids 0..{len(id2label) - 1}")
    labels = [id2label[str(i)] for i in range(len(id2label))]
    if not all(isinstance(x, str) and x for x in labels) or len(set(labels)) != len(labels):
        raise ModelFormatError(f"{where}: id2label's names must be distinct non-empty strings")
    return labels


def is_head_tensor(name: str) -> bool:
    """Whether an llmkit (or transformers) tensor name belongs to a token or span head."""
    return name.split(".", 1)[0] in HEADS.values()


def body_name(name: str) -> str:
    """A task model's body tensor name as the bare encoder calls it."""
    return name.removeprefix("encoder.")


def hf_task_config(model: nn.Module, body_architecture: str) -> dict[str, Any]:
    """config.json fields that make a body's config (architectures "BertModel", ...) the task model's."""
    task = model.task_json()
    base = body_architecture.removesuffix("ForMaskedLM").removesuffix("Model")
    out: dict[str, Any] = {"architectures": [base + SUFFIXES[task["kind"]]]}
    if task["kind"] == TOKEN_CLASSIFICATION:
        out["id2label"] = {str(i): label for i, label in enumerate(task["labels"])}
        out["label2id"] = {label: i for i, label in enumerate(task["labels"])}
    else:
        out["llmkit_task"] = {k: task[k] for k in QA_DEFAULTS}
    return out
