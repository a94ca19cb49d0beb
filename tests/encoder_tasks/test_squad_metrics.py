"""SQuAD's exact match and F1 on hand-worked cases: normalisation (case, punctuation, articles,
whitespace), bag-of-words overlap, the best of several gold answers, the mean in percent (v1.1);
unanswerable questions, the has-answer / no-answer split and the best no-answer threshold (v2.0's
evaluate-v2.0.py definitions)."""

from __future__ import annotations

import pytest

from llmkit.training.squad_metrics import best_thresholds, exact_match, f1, normalize_answer, squad_scores


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


GOLDS = {"h1": ["Paris"], "h2": ["3 May 1901", "May 1901"], "n1": [], "n2": []}  # n1, n2: unanswerable


def test_v2_scores_unanswerable_questions_and_split_them_out():
    predictions = {"h1": "paris", "h2": "1901", "n1": "", "n2": "Lima"}
    scores = squad_scores(predictions, GOLDS)
    # h1 right; h2 "1901" vs "may 1901": precision 1, recall 1/2 → F1 2/3 (vs "3 may 1901" only 1/2);
    # n1 abstains rightly (1, 1); n2 answers an unanswerable question (0, 0)
    h2 = 2 * 1 * (1 / 2) / (1 + 1 / 2)
    assert scores["exact_match"] == pytest.approx(100 * 2 / 4) and scores["f1"] == pytest.approx(100 * (2 + h2) / 4)
    assert scores["has_answer_exact_match"] == pytest.approx(50) and scores["has_answer_f1"] == pytest.approx(
        100 * (1 + h2) / 2)
    assert scores["no_answer_exact_match"] == scores["no_answer_f1"] == pytest.approx(50)
    assert scores["has_answer_questions"] == scores["no_answer_questions"] == 2
    assert "has_answer_f1" not in squad_scores({"q": "x"}, {"q": ["x"]})  # v1.1 data: nothing to split
    # a gold answer that normalises to nothing is dropped; with none left, only "no answer" is right
    assert squad_scores({"q": "a"}, {"q": ["The"]})["f1"] == 100.0
    assert squad_scores({"q": "Paris"}, {"q": ["The"]})["f1"] == 0.0


def test_best_threshold_follows_find_best_thresh():
    spans = {"h1": "paris", "h2": "1901", "n1": "Lima", "n2": "Lima"}  # every question's best span
    margins = {"h1": -2.0, "h2": -1.5, "n2": -1.0, "n1": 1.0}  # null score minus the best span's
    best = best_thresholds(spans, margins, GOLDS)
    # all "no answer": 2 of 4 right; answering in rising margin: h1 +1 → 3, h2 +F1 2/3 → 3.67 (best F1,
    # threshold -1.5), n2 −1, n1 −1. Exact match: h2 adds 0, so its best stays 3 at threshold −2.
    assert best["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4) and best["best_f1_threshold"] == -1.5
    assert best["best_exact_match"] == pytest.approx(75) and best["best_exact_match_threshold"] == -2.0
    at_best = {q: "" if margins[q] > best["best_f1_threshold"] else spans[q] for q in GOLDS}
    assert squad_scores(at_best, GOLDS)["f1"] == pytest.approx(best["best_f1"])  # the same score, recomputed
    # nothing beats abstaining everywhere: the threshold lies below every margin
    only_none = best_thresholds({"n1": "x", "n2": "y"}, {"n1": 0.5, "n2": 2.0}, {"n1": [], "n2": []})
    assert only_none["best_f1"] == 100.0 and only_none["best_f1_threshold"] < 0.5
