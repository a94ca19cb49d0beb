"""GPTQ: quantise a weight column by column, feeding each column's rounding error forward into the
columns not yet quantised so the layer's output on the calibration inputs moves as little as possible.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv:2210.17323), Algorithm 1. For a layer y = W x with calibration inputs X (K × n),
the output error ‖W X − Ŵ X‖² has Hessian H = 2 X Xᵀ / n (the same for every output row). Quantising
column j leaves error e = (w_j − ŵ_j) / [H⁻¹]_jj, which the other unquantised columns absorb through
the j-th row of the upper Cholesky factor of H⁻¹; the updates are applied lazily, within a block of 128
columns at once and to the rest of the matrix once per block. Group scales are set when their first
column is reached, from the weights as updated so far. Columns are taken in order (no act-order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkit.layers.quantized import QuantizedWeight, WeightFormat, decode, encode, group_params, stored_params

BLOCK = 128
DAMPING = 0.01  # λ, as a fraction of the mean of diag(H): keeps H invertible where inputs are (nearly) collinear


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


def gptq_quantize(weight: Tensor, hessian: Tensor, fmt: WeightFormat, *, block: int = BLOCK,
                  damping: float = DAMPING) -> QuantizedWeight:
    """Codes and bf16 scales of `weight` (N, K) chosen against `hessian` (K, K)."""
    W = weight.detach().float().clone()
    N, K = W.shape
    assert K % fmt.group == 0, f"in_features {K} is not a multiple of the group size {fmt.group}"
    H = hessian.float().clone()
    dead = H.diagonal() == 0  # an input that is always 0: its weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damping * H.diagonal().mean() * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(N, K)
    scales = torch.zeros(N, K // fmt.group, dtype=torch.bfloat16)
    offsets = torch.zeros_like(scales)
    for start in range(0, K, block):
        end = min(start + block, K)
        W1, Hinv1 = W[:, start:end].clone(), Hinv[start:end, start:end]
        errors = torch.zeros_like(W1)
        for i in range(end - start):
            col = start + i
            g = col // fmt.group
            if col % fmt.group == 0:  # this group's scale, from its columns as updated so far
                current = torch.cat([W1[:, i:], W[:, end:]], 1)[:, :fmt.group]
                scale, minimum = group_params(current, fmt.bits, fmt.symmetric)
                scales[:, g], offsets[:, g] = stored_params(scale, minimum, fmt.bits)
            w = W1[:, i]
            q = encode(w[:, None], scale, minimum, fmt.bits, fmt.symmetric)[:, 0]
            codes[:, col] = q
            # the error against the weight the layer will really hold (bf16 scale and offset)
            err = (w - decode(q[:, None], scales[:, g], offsets[:, g], fmt.bits)[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            errors[:, i] = err
        W[:, end:] -= errors @ Hinv[start:end, end:]
    dtype = torch.int8 if fmt.bits == 8 else torch.uint8
    return QuantizedWeight(codes.to(dtype), scales, offsets)
