"""Entity-level scores on hand-worked cases: conlleval's chunk rules (I- without B-, adjacent
entities, a type change inside a run) and micro-averaged precision / recall / F1."""

from __future__ import annotations

import pytest

from llmkit.training.ner_metrics import entities, entity_scores, split_tag


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),             # I- without B- opens an entity
    (["B-PER", "B-PER"], [("PER", 0, 0), ("PER", 1, 1)]),          # adjacent entities of one type: two
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),  # a type change inside a run splits it
    (["I-ORG", "B-ORG", "I-ORG"], [("ORG", 0, 0), ("ORG", 1, 2)]),
    (["B-DATE", "I-DATE", "I-DATE"], [("DATE", 0, 2)]),            # an entity that runs to the end
    (["O", "O"], []),
])
def test_entities_follow_conlleval(tags, expected):
    assert entities(tags) == expected


def test_scores_are_micro_averaged_over_sentences():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    # sentence 1: PER right, LOC missed; sentence 2: ORG right, PER predicted one word too long, plus a spurious LOC
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC", "B-PER"]]
    predicted[1] = ["B-ORG", "B-LOC", "I-LOC"]
    scores = entity_scores(gold, predicted)
    # gold: PER(0-1), LOC(3), ORG(0), PER(2) = 4; predicted: PER(0-1), ORG(0), LOC(1-2) = 3; correct: 2
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert scores["f1_PER"] == pytest.approx(2 * 1 * 0.5 / 1.5)  # 1 of 1 predicted right, 1 of 2 gold found
    assert scores["f1_LOC"] == 0.0 and scores["f1_ORG"] == 1.0


def test_boundary_errors_count_as_wrong_and_empty_cases_are_zero():
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0
    assert entity_scores([["B-PER", "I-PER"]], [["I-PER", "I-PER"]])["f1"] == 1.0  # same chunk, conlleval's reading
    assert entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


@pytest.mark.parametrize("bad", ["PER", "B-", "X-PER", "b-PER", ""])
def test_malformed_tags_are_refused(bad):
    with pytest.raises(ValueError, match="not a BIO tag"):
        split_tag(bad)
