"""SQuAD v1.1's exact match and F1 on hand-worked cases: normalisation (case, punctuation, articles,
whitespace), bag-of-words overlap, the best of several gold answers, the mean in percent."""

from __future__ import annotations

import pytest

from llmkit.training.squad_metrics import exact_match, f1, normalize_answer, squad_scores


@pytest.mark.parametrize("text, normal", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  an   apple,  a pear ", "apple pear"),
    ("Theatre", "theatre"),                 # "the" only as a whole word
    ("U.S.A.", "usa"),
    ("rock-and-roll", "rockandroll"),       # punctuation is removed, not replaced by a space
])
def test_normalisation(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_and_f1_by_hand():
    assert exact_match("the Eiffel tower", "Eiffel Tower.") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    # prediction "eiffel tower paris" vs gold "eiffel tower": overlap 2, precision 2/3, recall 1
    assert f1("Eiffel Tower, Paris", "the Eiffel Tower") == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert f1("in Paris", "Berlin") == 0.0
    # repeated words count as a multiset: "a a b" vs "a b b" → overlap {a:1, b:1} = 2 of 3 each
    assert f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1("the", "a") == 0.0  # both normalise to nothing: no overlap, as v1.1's script scores it


def test_scores_take_the_best_gold_answer_and_average_in_percent():
    golds = {"q1": ["Paris", "the city of Paris"], "q2": ["3 May 1901"], "q3": ["Acme"]}
    predictions = {"q1": "city of Paris", "q2": "May 1901"}  # q3 unanswered: 0
    scores = squad_scores(predictions, golds)
    assert scores["exact_match"] == pytest.approx(100 * 1 / 3)  # q1 equals the second answer after normalising
    q2_f1 = 2 * 1 * (2 / 3) / (1 + 2 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + q2_f1 + 0) / 3)
