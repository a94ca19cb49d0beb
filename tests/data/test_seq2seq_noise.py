"""T5 span corruption and BART text infilling / sentence permutation (llmkit.data.seq2seq_noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llmkit.data.seq2seq_noise import (bart_noise, corrupted_lengths, permute_sentences, raw_length_for,
                                       reassemble_spans, sentence_end_table, span_corrupt, span_noise_mask,
                                       text_infill)

SENTINELS = list(range(50_000, 50_100))
MASK = -7


def spans_of(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a boolean mask."""
    runs, current = [], 0
    for value in mask.tolist() + [False]:
        if value:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs


@settings(max_examples=150, deadline=None)
@given(length=st.integers(1, 600), seed=st.integers(0, 2**32 - 1))
def test_span_corruption_reassembles_to_the_original(length, seed):
    tokens = list(range(1000, 1000 + length))
    inputs, targets = span_corrupt(tokens, SENTINELS, np.random.default_rng(seed))
    assert reassemble_spans(inputs, targets, SENTINELS) == tokens
    # the lengths are known in advance (EOS counted), so fixed windows make fixed-shape batches
    assert (len(inputs) + 1, len(targets) + 1) == corrupted_lengths(max(length, 2)) or length < 2
    # sentinels appear in order, once each, in both halves
    used = [t for t in inputs if t in SENTINELS]
    assert used == SENTINELS[:len(used)] == [t for t in targets if t in SENTINELS]


def test_span_corruption_noise_density_and_mean_span_length():
    """Over 400 windows of 512 tokens: 15% noise (T5 rounds round(512·0.15) = 77 tokens) in spans of
    mean length 3 ± 0.1, with varied span lengths (not all equal), starting with kept text."""
    rng = np.random.default_rng(0)
    all_spans = []
    for _ in range(400):
        mask = span_noise_mask(512, rng)
        assert mask.sum() == 77 and not mask[0]
        all_spans += spans_of(mask)
    assert abs(77 * 400 / (512 * 400) - 0.15) < 0.002
    assert abs(np.mean(all_spans) - 3.0) < 0.1
    assert min(all_spans) == 1 and max(all_spans) >= 8  # a random segmentation, not fixed-size spans


def test_span_positions_are_spread_over_the_window():
    rng = np.random.default_rng(1)
    hits = sum(span_noise_mask(200, rng).astype(int) for _ in range(2000)) / 2000
    # every position is noise about 15% of the time (first position never: T5 starts with kept text)
    assert hits[0] == 0 and abs(hits[20:180].mean() - 0.15) < 0.01 and hits[20:180].min() > 0.10


def test_raw_length_for_fills_the_context_exactly():
    for max_len in (16, 64, 128, 512):
        raw = raw_length_for(max_len)
        assert max(corrupted_lengths(raw)) <= max_len < max(corrupted_lengths(raw + 1))
    assert raw_length_for(128) > 128  # corruption shortens the input, so windows are longer than it


def test_too_many_spans_for_the_sentinels_is_a_clear_error():
    from llmkit.errors import ConfigError

    with pytest.raises(ConfigError, match="sentinel"):
        span_corrupt(list(range(2000)), SENTINELS[:10], np.random.default_rng(0))


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_text_infilling_masks_exactly_30_percent_in_order(length, seed):
    tokens = list(range(1000, 1000 + length))
    out = text_infill(tokens, MASK, np.random.default_rng(seed))
    kept = [t for t in out if t != MASK]
    assert kept == sorted(kept) and set(kept) <= set(tokens)  # kept tokens stay in order
    assert length - len(kept) == math.ceil(0.3 * length)  # exactly ceil(30%) of the tokens removed
    assert out.count(MASK) >= 1


def test_text_infilling_span_lengths_follow_poisson_3():
    """Removed runs between kept tokens: each non-empty span is one mask, so a run's length is a
    span length. Poisson(3) conditioned on > 0 has mean 3/(1 - e^-3) = 3.157; the trimmed last span
    and the rare merged neighbours pull it down a little: tolerance ±0.15 over ~30 k spans."""
    rng = np.random.default_rng(0)
    removed_runs, inserted, spans = [], 0, 0
    for _ in range(300):
        tokens = list(range(1000))
        out = text_infill(tokens, MASK, rng)
        previous = -1
        for i, t in enumerate(out):
            if t == MASK:
                nxt = next((u for u in out[i + 1:] if u != MASK), 1000)
                gap = nxt - previous - 1
                if gap == 0:
                    inserted += 1
                spans += 1
            else:
                if t - previous - 1 > 0:
                    removed_runs.append(t - previous - 1)
                previous = t
        if previous < 999:
            removed_runs.append(999 - previous)
    assert abs(np.mean(removed_runs) - 3 / (1 - math.exp(-3))) < 0.15
    # zero-length spans (pure insertions) come with probability e^-3 ≈ 5% per span
    assert 0.02 < inserted / spans < 0.08


def test_sentence_permutation_moves_whole_sentences():
    ends = np.zeros(100, dtype=bool)
    ends[[9, 19, 29]] = True  # token ids 9, 19, 29 end sentences
    tokens = [1, 2, 9, 3, 4, 5, 19, 6, 29, 7, 8]
    sentences = [(1, 2, 9), (3, 4, 5, 19), (6, 29), (7, 8)]
    orders = set()
    for seed in range(40):
        out = permute_sentences(tokens, ends, np.random.default_rng(seed))
        assert sorted(out) == sorted(tokens)
        pieces, i = [], 0
        while i < len(out):  # cut the output back into sentences; each must be an original one
            match = next(s for s in sentences if tuple(out[i:i + len(s)]) == s)
            pieces.append(match)
            i += len(match)
        orders.add(tuple(pieces))
    assert len(orders) > 10  # 4! = 24 orders possible


def test_sentence_end_table_and_bart_noise_is_seeded():
    table = sentence_end_table(["Hello", " world.", "\n", "?", " x", "!  "])
    assert table.tolist() == [False, True, True, True, False, True]
    tokens = list(range(200))
    ends = np.zeros(200, dtype=bool)
    ends[::17] = True
    a = bart_noise(tokens, MASK, ends, np.random.default_rng(5))
    b = bart_noise(tokens, MASK, ends, np.random.default_rng(5))
    c = bart_noise(tokens, MASK, ends, np.random.default_rng(6))
    assert a == b and a != c
    assert len(tokens) - len([t for t in a if t != MASK]) == 60
