"""Which weights to remove: scores and masks for one matrix, or for many at once.

A mask is a boolean tensor the shape of the weight, True where the weight is kept.

- Magnitude: score |w|, the oldest criterion (Han et al. 2015).
- Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models",
  arXiv:2306.11695): score |w_ij| · ‖x_j‖₂, the weight times the L2 norm of its input over the
  calibration tokens, compared within each output row (the paper's best grouping). A weight on an
  input channel that carries large activations matters more than its size alone says.
- Patterns: per row (exactly round(s·K) of each row's K weights removed), per layer (round(s·N·K) of
  the matrix), global (round(s·total) across every pruned matrix, by one threshold: magnitude only,
  since other scores are not comparable across layers), and N:M (2:4: the 2 lowest-scored of every 4
  consecutive weights of a row, the pattern sparse tensor cores run).
"""

from __future__ import annotations

import torch
from torch import Tensor


class InputNorms:
    """‖x_j‖₂ per input channel over every calibration row: Wanda's activation statistic."""

    def __init__(self, in_features: int) -> None:
        self.squares = torch.zeros(in_features, dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.squares += (x * x).sum(0)

    def value(self) -> Tensor:
        return self.squares.sqrt().float()


def scores(weight: Tensor, input_norms: Tensor | None) -> Tensor:
    """|w|, times the input channel's norm where one is given (Wanda)."""
    s = weight.detach().float().abs()
    return s if input_norms is None else s * input_norms[None, :]


def _drop_lowest(scores_2d: Tensor, count: int) -> Tensor:
    """Keep-mask of `scores_2d` (R, C) with exactly `count` lowest entries of each row removed."""
    keep = torch.ones_like(scores_2d, dtype=torch.bool)
    if count:
        keep.scatter_(1, scores_2d.topk(count, dim=1, largest=False).indices, False)
    return keep


def row_mask(s: Tensor, sparsity: float, *, count: int | None = None) -> Tensor:
    """Exactly round(sparsity·K) (or `count`) weights of each row removed, the lowest-scored."""
    return _drop_lowest(s, round(sparsity * s.shape[1]) if count is None else count)


def layer_mask(s: Tensor, sparsity: float) -> Tensor:
    """Exactly round(sparsity·N·K) weights of the matrix removed, the lowest-scored."""
    return _drop_lowest(s.reshape(1, -1), round(sparsity * s.numel())).view(s.shape)


def n_m_mask(s: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """N:M sparsity: in every m consecutive weights of a row, the m − n lowest-scored removed."""
    rows, cols = s.shape
    assert cols % m == 0, f"{cols} columns are not a multiple of {m}"
    return _drop_lowest(s.reshape(-1, m), m - n).view(rows, cols)


def global_masks(all_scores: dict[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One threshold over every matrix: the round(sparsity·total) lowest scores removed wherever they are
    (exact when no two scores tie at the threshold, as with real-valued weights)."""
    flat = torch.cat([s.reshape(-1) for s in all_scores.values()])
    count = round(sparsity * flat.numel())
    if count == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in all_scores.items()}
    threshold = flat.kthvalue(count).values
    return {name: s > threshold for name, s in all_scores.items()}


def unstructured_mask(s: Tensor, pattern: str, sparsity: float, scope: str) -> Tensor:
    """The keep-mask of one matrix for pattern "unstructured" (scope row or layer) or "2:4"."""
    if pattern == "2:4":
        return n_m_mask(s)
    return row_mask(s, sparsity) if scope == "row" else layer_mask(s, sparsity)
