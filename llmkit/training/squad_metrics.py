"""Exact match and F1 of extractive answers, as the official SQuAD evaluation scripts (v1.1 and
v2.0) define them.

Both compare normalised text: lower-cased, ASCII punctuation removed, the articles "a", "an",
"the" removed as whole words, and runs of whitespace collapsed to single spaces. Exact match is
1 when the normalised prediction equals a normalised gold answer. F1 is over the bag of
whitespace-separated words: overlap = the multiset intersection's size, precision = overlap /
predicted words, recall = overlap / gold words (0 when nothing overlaps). A question with several
gold answers takes the best score over them; the data set's score is the mean over questions, in
percent as SQuAD reports it.

SQuAD 2.0 adds questions without an answer (an empty gold list) and predictions of "no answer"
(the empty string). v2.0's script drops gold answers that normalise to nothing and scores a
question left with none as unanswerable: exact match and F1 are both 1 when the prediction
normalises to nothing too, else 0 — on v1.1 data this differs from v1.1's script only for a
question whose every gold answer normalises to nothing (v1.1 gives F1 0 to any prediction there).
It reports the has-answer and no-answer questions apart (`has_answer_*`, `no_answer_*`), and
`best_thresholds` finds the no-answer threshold that would have scored best, as its
find_best_thresh does.
"""

from __future__ import annotations

import re
import string
from collections import Counter
import math
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


def question_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction against a question's gold answers, by v2.0's rules."""
    golds = [a for a in answers if normalize_answer(a)]
    if not golds:  # unanswerable: right only when the prediction is "no answer" too
        right = float(not normalize_answer(prediction))
        return right, right
    return max(exact_match(prediction, a) for a in golds), max(f1(prediction, a) for a in golds)


def squad_scores(predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent over the questions of `golds` (question id → gold answers,
    an empty list for an unanswerable question); a question without a prediction scores 0. When
    the golds hold both kinds, also `has_answer_*` / `no_answer_*` (exact match, F1, the number of
    questions), v2.0's HasAns / NoAns split (which v2.0 prints even for one kind; v1.1 data gets none)."""
    if not golds:
        raise ValueError("no questions to score")
    scores = {qid: question_scores(predictions[qid], answers) if qid in predictions else (0.0, 0.0)
              for qid, answers in golds.items()}
    out = _means(scores.values())
    has_answer = [qid for qid, answers in golds.items() if answers]
    for name, group in (("has_answer", has_answer), ("no_answer", [q for q in golds if not golds[q]])):
        if group and len(group) < len(golds):
            em, f = _means(scores[q] for q in group).values()
            out.update({f"{name}_exact_match": em, f"{name}_f1": f, f"{name}_questions": len(group)})
    return out


def _means(scores) -> dict[str, float]:
    scores = list(scores)
    return {"exact_match": 100.0 * sum(e for e, _ in scores) / len(scores),
            "f1": 100.0 * sum(f for _, f in scores) / len(scores)}


def best_thresholds(span_predictions: Mapping[str, str], null_margins: Mapping[str, float],
                    golds: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """The exact match and F1 (percent) at the best no-answer threshold, and those thresholds:
    {"best_exact_match", "best_exact_match_threshold", "best_f1", "best_f1_threshold"}. A question
    is answered "no answer" when its null margin (the no-answer score minus the best span's) is
    above the threshold, else by its best span (`span_predictions`). v2.0's find_best_thresh: start
    with every question unanswered, then answer them in order of rising margin, keeping the best
    total; a threshold below every margin (all unanswered) when nothing beats that."""
    if not golds:
        raise ValueError("no questions to score")
    order = sorted((q for q in golds if q in null_margins), key=lambda q: null_margins[q])
    start = math.nextafter(min((null_margins[q] for q in order), default=0.0), -math.inf)
    out = {}
    for index, name in enumerate(("exact_match", "f1")):
        total = best = float(sum(1 for answers in golds.values() if not answers))
        threshold = start
        for qid in order:
            prediction = span_predictions.get(qid, "")
            if golds[qid]:  # answering gains its score (the no-answer guess scored 0)
                total += question_scores(prediction, golds[qid])[index]
            elif prediction:  # answering an unanswerable question loses its point (v2.0 tests the raw text)
                total -= 1
            if total > best:
                best, threshold = total, null_margins[qid]
        out[f"best_{name}"], out[f"best_{name}_threshold"] = 100.0 * best / len(golds), threshold
    return out
