"""Exact match and F1 of extractive answers, as the official SQuAD v1.1 evaluation defines them.

Both compare normalised text: lower-cased, ASCII punctuation removed, the articles "a", "an",
"the" removed as whole words, and runs of whitespace collapsed to single spaces. Exact match is
1 when the normalised prediction equals a normalised gold answer. F1 is over the bag of
whitespace-separated words: overlap = the multiset intersection's size, precision = overlap /
predicted words, recall = overlap / gold words (0 when nothing overlaps). A question with several
gold answers takes the best score over them; the data set's score is the mean over questions, in
percent as SQuAD reports it.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    lowered = text.lower()
    no_punctuation = "".join(c for c in lowered if c not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", no_punctuation).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    overlap = sum((Counter(predicted) & Counter(wanted)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(wanted)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over the questions of `golds` (question id → gold answers);
    a question without a prediction scores 0."""
    if not golds:
        raise ValueError("no questions to score")
    em = f = 0.0
    for qid, answers in golds.items():
        predicted = predictions.get(qid)
        if predicted is None:
            continue
        em += max(exact_match(predicted, a) for a in answers)
        f += max(f1(predicted, a) for a in answers)
    return {"exact_match": 100.0 * em / len(golds), "f1": 100.0 * f / len(golds)}
