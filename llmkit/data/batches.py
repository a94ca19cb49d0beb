"""Training and evaluation batches cut from one token stream.

The stream is cut into non-overlapping windows of seq_len + 1 tokens (the last token of a window
is the first of the next). Training batches are a pure function of (seed, index): sample k of the
run is window perm_e[k mod n] of epoch e = k div n, so resuming exactly needs only the step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from llmkit.errors import ConfigError, DatasetError


def _num_windows(tokens: np.ndarray, seq_len: int, batch_size: int) -> int:
    """How many whole windows `tokens` holds; raises when there is not even one."""
    if seq_len < 1:
        raise ConfigError(f"seq_len: {seq_len} must be >= 1")
    if batch_size < 1:
        raise ConfigError(f"batch_size: {batch_size} must be >= 1")
    n = (len(tokens) - 1) // seq_len if len(tokens) else 0
    if n <= 0:
        raise DatasetError(
            f"corpus has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}"
        )
    return n


def _stack(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y LongTensors [B, T] for the given window numbers; y is x shifted left by one."""
    rows = np.stack([tokens[w * seq_len : w * seq_len + seq_len + 1] for w in windows.tolist()])
    block = torch.from_numpy(rows.astype(np.int64))  # int64: embedding and loss want LongTensor
    return block[:, :-1].contiguous(), block[:, 1:].contiguous()


class TokenBatches:
    """Training batches as a pure function of (seed, index): exact resume needs only the step."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self._n = _num_windows(tokens, seq_len, batch_size)
        # A small cache: consecutive batches reuse one epoch's permutation; keeping two covers a
        # batch that straddles an epoch boundary.
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_windows(self) -> int:
        return self._n

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self._n)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def windows(self, index: int) -> np.ndarray:
        """The window numbers that make up batch `index`."""
        if index < 0:
            raise ValueError(f"batch index {index} must be >= 0")
        k = np.arange(index * self.batch_size, (index + 1) * self.batch_size, dtype=np.int64)
        out = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(k // self._n).tolist():
            mask = (k // self._n) == epoch
            out[mask] = self._perm(epoch)[k[mask] % self._n]
        return out

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y LongTensor[batch_size, seq_len] of training batch `index`."""
        return _stack(self.tokens, self.windows(index), self.seq_len)


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, *, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every window in order, batch_size at a time (the last batch may be smaller)."""
    n = _num_windows(tokens, seq_len, batch_size)  # checked now, not at the first next()
    if max_batches is not None and max_batches < 0:
        raise ConfigError(f"max_batches: {max_batches} must be >= 0")
    total = -(-n // batch_size)
    if max_batches is not None:
        total = min(total, max_batches)

    def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(total):
            windows = np.arange(b * batch_size, min(n, (b + 1) * batch_size))
            yield _stack(tokens, windows, seq_len)

    return generate()
