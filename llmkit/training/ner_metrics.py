"""Entity-level precision, recall and F1 over BIO tag sequences, as CoNLL's conlleval (and seqeval's
default mode) count them.

An entity is a maximal run of tags of one type: `B-X` always opens one; `I-X` continues an open `X`
and otherwise opens a new one (an `I-` with no `B-` before it, or after another type, is still an
entity, as conlleval reads it); `O` closes. Two adjacent `B-X B-X` are two entities. A predicted
entity counts as correct only when its type, first and last word all equal a gold one's. The
scores are micro-averaged over every sentence: precision = correct / predicted, recall =
correct / gold, F1 their harmonic mean (0 when nothing is predicted or nothing is gold).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

Entity = tuple[str, int, int]  # (type, first word, last word), inclusive


def split_tag(tag: str) -> tuple[str, str]:
    """("B"|"I"|"O", type) of one BIO tag ("O" has the type "")."""
    if tag == "O":
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or not kind:
        raise ValueError(f"not a BIO tag: {tag!r} (expected O, B-TYPE or I-TYPE)")
    return prefix, kind


def entities(tags: Sequence[str]) -> list[Entity]:
    """The entities of one sentence's tags, in order."""
    found: list[Entity] = []
    open_kind, open_start = "", -1
    for i, tag in enumerate(tags):
        prefix, kind = split_tag(tag)
        continues = prefix == "I" and kind == open_kind
        if open_kind and not continues:  # B-, O or another type ends the open entity
            found.append((open_kind, open_start, i - 1))
            open_kind = ""
        if prefix != "O" and not continues:
            open_kind, open_start = kind, i
    if open_kind:
        found.append((open_kind, open_start, len(tags) - 1))
    return found


def entity_scores(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision / recall / F1 of predicted entities against gold ones, sentence by sentence,
    and the per-type F1 ("f1_PER", ...) for every type that occurs in either."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    n_gold, n_pred, n_correct = Counter(), Counter(), Counter()
    for gold_tags, pred_tags in zip(gold, predicted):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"a sentence has {len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        g, p = set(entities(gold_tags)), set(entities(pred_tags))
        n_gold.update(e[0] for e in g)
        n_pred.update(e[0] for e in p)
        n_correct.update(e[0] for e in g & p)
    scores = _prf(sum(n_correct.values()), sum(n_pred.values()), sum(n_gold.values()))
    for kind in sorted(set(n_gold) | set(n_pred)):
        scores[f"f1_{kind}"] = _prf(n_correct[kind], n_pred[kind], n_gold[kind])["f1"]
    return scores


def _prf(correct: int, predicted: int, gold: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
