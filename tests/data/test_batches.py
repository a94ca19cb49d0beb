"""Training batches are a pure function of (seed, index) and visit every window once per epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmkit.data.batches import TokenBatches, eval_batches
from llmkit.errors import DatasetError

SEQ = 8


def _tokens(n: int) -> np.ndarray:
    # Distinct values, so a window is identified by its first token.
    return np.arange(n, dtype=np.uint16)


def _window_of(x_row: torch.Tensor) -> int:
    return int(x_row[0]) // SEQ


def test_batch_is_pure_function() -> None:
    a = TokenBatches(_tokens(1001), SEQ, 4, seed=7)
    b = TokenBatches(_tokens(1001), SEQ, 4, seed=7)
    later = [a.batch(i) for i in (5, 0, 40, 5)]  # out of order, repeated
    for i, (x, y) in zip((5, 0, 40, 5), later):
        bx, by = b.batch(i)
        assert torch.equal(x, bx) and torch.equal(y, by)


def test_shapes_dtype_and_shift() -> None:
    batches = TokenBatches(_tokens(500), SEQ, 3, seed=0)
    x, y = batches.batch(2)
    assert x.shape == y.shape == (3, SEQ)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # the window's extra token
    assert all(int(r[0]) % SEQ == 0 for r in x)  # rows start on window boundaries


def test_every_window_once_per_epoch() -> None:
    n_tokens = 8 * 37 + 1  # exactly 37 windows
    batches = TokenBatches(_tokens(n_tokens), SEQ, 5, seed=3)
    n = batches.num_windows
    assert n == 37
    seen: list[int] = []
    index = 0
    while len(seen) < 3 * n:  # three epochs; batches straddle epoch boundaries
        x, _ = batches.batch(index)
        seen += [_window_of(r) for r in x]
        index += 1
    for epoch in range(3):
        assert sorted(seen[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n : 2 * n]  # a fresh shuffle each epoch


def test_batch_larger_than_corpus() -> None:
    batches = TokenBatches(_tokens(8 * 3 + 1), SEQ, 7, seed=1)
    x, _ = batches.batch(0)
    windows = [_window_of(r) for r in x]
    assert sorted(windows[:3]) == [0, 1, 2] and sorted(windows[3:6]) == [0, 1, 2]


def test_seeds_differ() -> None:
    a = TokenBatches(_tokens(4001), SEQ, 8, seed=0).batch(0)[0]
    b = TokenBatches(_tokens(4001), SEQ, 8, seed=1).batch(0)[0]
    assert not torch.equal(a, b)


def test_too_short_corpus() -> None:
    with pytest.raises(DatasetError, match=r"corpus has 8 tokens, fewer than seq_len\+1 = 9"):
        TokenBatches(_tokens(8), SEQ, 2, seed=0)
    with pytest.raises(DatasetError):
        eval_batches(_tokens(3), SEQ, 2)
    TokenBatches(_tokens(9), SEQ, 2, seed=0).batch(0)  # exactly one window is enough


def test_eval_batches_in_order() -> None:
    tokens = _tokens(8 * 10 + 5)  # 10 windows, a tail that is not a whole window
    batches = list(eval_batches(tokens, SEQ, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    windows = [_window_of(r) for x, _ in batches for r in x]
    assert windows == list(range(10))
    for x, y in batches:
        assert torch.equal(x[:, 1:], y[:, :-1])
    limited = list(eval_batches(tokens, SEQ, 4, max_batches=2))
    assert len(limited) == 2 and torch.equal(limited[1][0], batches[1][0])
