"""AWQ: scale each input channel of a weight by how large its activations are before rounding, so the
weights that multiply large inputs (the salient ones) lose less to the rounding.

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(arXiv:2306.00978), section 3.2. With s = mean|x|^α per input channel (normalised so its largest and
smallest values straddle 1), the layer computes Q(W · diag(s)) · (x / s); α is searched on a grid in
[0, 1] per layer for the smallest output error on the calibration inputs. α = 0 is s = 1, plain
round-to-nearest, so on those inputs AWQ is never worse than RTN. llmkit divides x by s at run time
(the layer's `act_scale`) rather than folding 1/s into the preceding norm or layer: one elementwise
division per product, and the same code for every layer (o_proj and down_proj have no norm before them).
The paper's second search, clipping each group's range, is not done.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkit.layers.quantized import QuantizedWeight, WeightFormat, dequantize_weight, quantize_weight

GRID = 20  # α ∈ {0, 1/20, …, 1}, as the paper's search
MAX_ROWS = 2048  # calibration input rows kept per layer for the search (the LM head: 2048 × vocab products per α)


class InputSample:
    """Mean |x| per input channel over every calibration row, and a seeded sample of rows for the search."""

    def __init__(self, in_features: int, *, max_rows: int = MAX_ROWS, seed: int = 0) -> None:
        self.abs_sum = torch.zeros(in_features, dtype=torch.float64)
        self.count, self.max_rows = 0, max_rows
        self.rows: list[Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0).double()
        self.count += x.shape[0]
        self.rows.append(x)
        kept = torch.cat(self.rows)
        if kept.shape[0] > self.max_rows:
            kept = kept[torch.randperm(kept.shape[0], generator=self.generator)[:self.max_rows]]
        self.rows = [kept]

    def mean_abs(self) -> Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    def matrix(self) -> Tensor:
        return torch.cat(self.rows)


def awq_quantize(weight: Tensor, sample: InputSample, fmt: WeightFormat, *, grid: int = GRID) -> QuantizedWeight:
    """Codes of W·diag(s) with the searched s as the layer's input divisor (`act_scale`)."""
    W = weight.detach().float()
    X = sample.matrix()
    reference = X @ W.t()
    mean_abs = sample.mean_abs().clamp(min=1e-8)
    best: tuple[float, QuantizedWeight] | None = None
    for step in range(grid + 1):
        s = mean_abs.pow(step / grid)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
        codes, scale, offset = quantize_weight(W * s, fmt)
        out = (X / s) @ dequantize_weight(codes, scale, offset).t()
        error = float((out - reference).pow(2).mean())
        if best is None or error < best[0]:
            best = (error, QuantizedWeight(codes, scale, offset, act_scale=None if step == 0 else s))
    assert best is not None
    return best[1]
