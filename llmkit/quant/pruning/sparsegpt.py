"""SparseGPT: remove weights column by column, feeding each removed weight's loss into the weights not
yet visited, so the layer's output on the calibration inputs moves as little as possible.

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(arXiv:2301.00774), Algorithm 1. It is GPTQ's sweep (llmkit/quant/gptq.py: the same Hessian
H = 2XXᵀ/n, the same damped inverse factor, the same column blocks with error feedback) with
"set to zero" in place of "round to a code". The mask is chosen as the sweep goes (adaptive mask
selection), by the OBS saliency w² / [H⁻¹]_jj² of the weights as updated so far: for unstructured
sparsity once per block of 128 columns, exactly the right count in each row of the block (so every
row ends with exactly round(s·K) zeros, as Wanda compares); for 2:4 once per 4 columns. Given whole
columns to remove (structured pruning: a head's or neuron's input to o_proj or down_proj), the sweep
zeroes them and the columns after each absorb its loss.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from llmkit.quant.gptq import BLOCK, DAMPING, inverse_hessian_factor, sweep_columns
from llmkit.quant.pruning.masks import n_m_mask, row_mask


def sparsegpt_prune(weight: Tensor, hessian: Tensor, *, pattern: str = "unstructured", sparsity: float = 0.5,
                    drop_columns: Tensor | None = None, block: int = BLOCK, damping: float = DAMPING) -> Tensor:
    """`weight` (N, K) pruned by `pattern` ("unstructured" at `sparsity` per row, "2:4", or "columns":
    the True entries of `drop_columns` (K,)) and updated against `hessian` (K, K); float32."""
    W = weight.detach().float().clone()
    N, K = W.shape
    Hinv = inverse_hessian_factor(W, hessian, damping)
    diag = Hinv.diagonal()
    keep = torch.ones(N, K, dtype=torch.bool)
    if pattern == "columns":
        assert drop_columns is not None and drop_columns.shape == (K,)
        keep[:, drop_columns] = False

    def saliency(upcoming: Callable[[int], Tensor], col: int, width: int) -> Tensor:
        return upcoming(width) ** 2 / diag[col:col + width][None, :] ** 2

    def choose(col: int, w: Tensor, upcoming: Callable[[int], Tensor]) -> Tensor:
        if pattern == "unstructured" and col % block == 0:
            width = min(block, K - col)
            # counts rounded cumulatively, so each row's total is exactly round(sparsity·K)
            count = round(sparsity * (col + width)) - round(sparsity * col)
            keep[:, col:col + width] = row_mask(saliency(upcoming, col, width), sparsity, count=count)
        elif pattern == "2:4" and col % 4 == 0:
            keep[:, col:col + 4] = n_m_mask(saliency(upcoming, col, 4))
        return torch.where(keep[:, col], w, torch.zeros_like(w))

    assert pattern != "2:4" or (K % 4 == 0 and block % 4 == 0)
    return sweep_columns(W, Hinv, choose, block=block)
