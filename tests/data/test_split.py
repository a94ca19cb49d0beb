"""The fine-tunes' one held-out split rule (llmkit.data.split): how many, which, and tiny data."""

from __future__ import annotations

import pytest

from llmkit.data.split import held_out_count, hold_out
from llmkit.errors import DatasetError


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.2, 0.5, 0.9])
def test_count_order_and_disjointness(fraction):
    for n in range(2, 60):
        items = [f"r{i}" for i in range(n)]
        train, val = hold_out(items, fraction, seed=3, source="data.jsonl")
        assert len(val) == min(max(1, round(n * fraction)), n - 1) == held_out_count(n, fraction)
        assert sorted(train + val, key=items.index) == items and not set(train) & set(val)
        assert train == sorted(train, key=items.index) and val == sorted(val, key=items.index)  # file order kept


def test_the_seed_decides_which_items_and_repeats_them():
    items = list(range(50))
    first = hold_out(items, 0.2, seed=7, source="x")
    assert hold_out(items, 0.2, seed=7, source="x") == first
    assert any(hold_out(items, 0.2, seed=s, source="x")[1] != first[1] for s in range(8, 12))


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_items_is_one_error_naming_the_data(n):
    with pytest.raises(DatasetError, match=rf"^data\.jsonl: {n} paragraphs?; holding some out for evaluation needs "
                                           r"at least 2 \(or pass --val-data\)$"):
        hold_out(list(range(n)), 0.1, seed=0, source="data.jsonl", unit="paragraph", alternative="pass --val-data")
