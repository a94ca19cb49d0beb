"""GPTQ: quantise a weight column by column, feeding each column's rounding error forward into the
columns not yet quantised so the layer's output on the calibration inputs moves as little as possible.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv:2210.17323), Algorithm 1. For a layer y = W x with calibration inputs X (K × n),
the output error ‖W X − Ŵ X‖² has Hessian H = 2 X Xᵀ / n (the same for every output row). Quantising
column j leaves error e = (w_j − ŵ_j) / [H⁻¹]_jj, which the other unquantised columns absorb through
the j-th row of the upper Cholesky factor of H⁻¹; the updates are applied lazily, within a block of 128
columns at once and to the rest of the matrix once per block. Group scales are set when their first
column is reached, from the weights as updated so far. Columns are taken in order (no act-order).

The Hessian, its damped inverse factor and the column sweep with error feedback are shared with
SparseGPT (llmkit/quant/pruning/sparsegpt.py), which runs the same sweep with "set to zero" in place
of "round to a code".
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from llmkit.layers.quantized import QuantizedWeight, WeightFormat, decode, encode, group_params, stored_params

BLOCK = 128
DAMPING = 0.01  # λ, as a fraction of the mean of diag(H): keeps H invertible where inputs are (nearly) collinear

# choose(col, w, upcoming) → the new values of column `col`, given its values w as updated so far and
# upcoming(n), the n columns from `col` on as updated so far (for choices made over several columns).
ColumnChoice = Callable[[int, Tensor, Callable[[int], Tensor]], Tensor]


class Hessian:
    """Accumulates H = 2 X Xᵀ / n over batches of a layer's inputs (rows of x are the n samples)."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.sum += x.t() @ x
        self.rows += x.shape[0]

    def value(self) -> Tensor:
        return (2 * self.sum / max(self.rows, 1)).float()


def inverse_hessian_factor(W: Tensor, hessian: Tensor, damping: float = DAMPING) -> Tensor:
    """The upper Cholesky factor of (H + λI)⁻¹. Inputs that are always 0 cannot matter: their weights
    in `W` are set to 0 (in place) and their diagonal entries to 1, so H stays invertible."""
    K = W.shape[1]
    H = hessian.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damping * H.diagonal().mean() * torch.eye(K)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def sweep_columns(W: Tensor, Hinv: Tensor, choose: ColumnChoice, *, block: int = BLOCK) -> Tensor:
    """W (N, K) with each column replaced, in order, by choose(...)'s values, each column's error
    (w − q) / [H⁻¹]_jj fed into the columns after it (within the block at once, beyond it per block)."""
    W = W.clone()
    K = W.shape[1]
    for start in range(0, K, block):
        end = min(start + block, K)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        errors = torch.zeros_like(W1)
        for i in range(end - start):
            q = choose(start + i, W1[:, i], lambda n, i=i: torch.cat([W1[:, i:], W[:, end:]], 1)[:, :n])
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q  # exactly the chosen values (the update leaves them up to rounding)
            errors[:, i] = err
        W[:, start:end] = W1
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return W


def gptq_quantize(weight: Tensor, hessian: Tensor, fmt: WeightFormat, *, block: int = BLOCK,
                  damping: float = DAMPING) -> QuantizedWeight:
    """Codes and bf16 scales of `weight` (N, K) chosen against `hessian` (K, K)."""
    W = weight.detach().float().clone()
    N, K = W.shape
    assert K % fmt.group == 0, f"in_features {K} is not a multiple of the group size {fmt.group}"
    Hinv = inverse_hessian_factor(W, hessian, damping)
    codes = torch.zeros(N, K)
    scales = torch.zeros(N, K // fmt.group, dtype=torch.bfloat16)
    offsets = torch.zeros_like(scales)
    group: dict[str, Tensor] = {}  # the current group's unrounded scale and minimum

    def choose(col: int, w: Tensor, upcoming: Callable[[int], Tensor]) -> Tensor:
        g = col // fmt.group
        if col % fmt.group == 0:  # this group's scale, from its columns as updated so far
            group["scale"], group["minimum"] = group_params(upcoming(fmt.group), fmt.bits, fmt.symmetric)
            scales[:, g], offsets[:, g] = stored_params(group["scale"], group["minimum"], fmt.bits)
        q = encode(w[:, None], group["scale"], group["minimum"], fmt.bits, fmt.symmetric)[:, 0]
        codes[:, col] = q
        # the error against the weight the layer will really hold (bf16 scale and offset)
        return decode(q[:, None], scales[:, g], offsets[:, g], fmt.bits)[:, 0]

    sweep_columns(W, Hinv, choose, block=block)
    dtype = torch.int8 if fmt.bits == 8 else torch.uint8
    return QuantizedWeight(codes.to(dtype), scales, offsets)
