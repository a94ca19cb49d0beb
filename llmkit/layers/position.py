"""Position information: absolute tables added at the embedding, and relative schemes used inside
attention.

- sinusoidal: Vaswani et al. 2017 §3.5, PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)
- RoPE: Su et al. 2021 (arXiv 2104.09864), in Hugging Face's half-split `rotate_half` layout so HF
  weights load unpermuted: x·cos + rotate_half(x)·sin with frequencies theta^(-2i/D).
- ALiBi: Press et al. 2021 (arXiv 2108.12409): score(i, j) -= slope_h · |i - j|, geometric slopes.
"""

import math

import torch
from torch import Tensor


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table.float()


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for `positions` (B, T) → each (B, 1, T, D), broadcast over heads."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2), computed in fp32 for accuracy
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D): half-split layout
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate q or k (B, H, T, D) by their positions."""
    return x * cos + rotate_half(x) * sin


def alibi_slopes(n_heads: int) -> Tensor:
    """Per-head slopes: 2^(-8i/n) for n a power of two; otherwise the slopes of the closest lower
    power of two followed by every other slope of the next power of two (the paper's code)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, q_index: Tensor, k_index: Tensor) -> Tensor:
    """Additive bias (1, H, Tq, Tk) = -slope · |i - j|, over the *absolute* query and key indices.

    Building it from q_index = cache offset + arange(Tq) (not arange(Tq)) is what keeps cached
    decoding right: a bias built over the query length alone is the classic ALiBi cache bug.
    """
    distance = (q_index[:, None] - k_index[None, :]).abs().float()  # (Tq, Tk)
    return (-slopes[:, None, None] * distance)[None]
