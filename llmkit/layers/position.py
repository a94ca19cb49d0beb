"""Position information: absolute tables added at the embedding, and relative schemes used inside
attention.

- sinusoidal: Vaswani et al. 2017 §3.5, PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...)
- RoPE: Su et al. 2021 (arXiv 2104.09864), in Hugging Face's half-split `rotate_half` layout so HF
  weights load unpermuted: x·cos + rotate_half(x)·sin with frequencies theta^(-2i/D).
- RoPE scaling, matching transformers' `ROPE_INIT_FUNCTIONS` to fp32 rounding: linear (Chen et al.
  2023, arXiv 2306.15595), dynamic NTK (bloc97/emozilla, reddit r/LocalLLaMA 2023), YaRN (Peng et al.
  2023, arXiv 2309.00071) and Llama 3.1's banded interpolation.
- ALiBi: Press et al. 2021 (arXiv 2108.12409): score(i, j) -= slope_h · |i - j|, geometric slopes.
- T5 relative position bias: Raffel et al. 2019 (arXiv 1910.10683) §2.1: score(i, j) += b_h[bucket(j - i)],
  one learned scalar per head and distance bucket.
"""

import math

import torch
from torch import Tensor

from llmkit.config import ModelConfig


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table.float()


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_frequencies(cfg: ModelConfig) -> tuple[Tensor, float]:
    """(inv_freq (D/2,), attention_scaling) for cfg.rope_scaling; cos and sin are multiplied by the
    second. "dynamic" starts from the plain frequencies and is rescaled per forward by
    `rope_dynamic_inv_freq`."""
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_scaling == "linear":
        # Position interpolation: dividing every frequency by s is the same as feeding position p/s.
        return inv_freq / cfg.rope_factor, 1.0
    if cfg.rope_scaling == "yarn":
        return yarn_frequencies(cfg)
    if cfg.rope_scaling == "llama3":
        return llama3_inv_freq(cfg, inv_freq), 1.0
    return inv_freq, 1.0


def yarn_frequencies(cfg: ModelConfig) -> tuple[Tensor, float]:
    """YaRN "NTK-by-parts": dims that turn many times over the original context keep their frequency
    (they only encode local order), dims that turn less than once are interpolated by the factor,
    and a linear ramp over dim indices blends the two."""
    D, base, factor, context = cfg.head_dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_seq_len

    def dim_making(rotations: float) -> float:  # the dim index that turns `rotations` times over the context
        return D * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_making(cfg.rope_beta_fast), dim_making(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # weight of the original frequency; written as transformers does so fp32 rounding agrees
    wavelength_scale = base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    inv_freq = 1.0 / (factor * wavelength_scale) * (1 - keep) + 1.0 / wavelength_scale * keep
    attention = cfg.rope_attention_factor
    if attention is None:
        # Longer contexts flatten the softmax; YaRN sharpens it back through q·k (cos and sin both scaled).
        attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention


def llama3_inv_freq(cfg: ModelConfig, inv_freq: Tensor) -> Tensor:
    """Llama 3.1: wavelengths longer than context/low_freq_factor are interpolated by the factor, those
    shorter than context/high_freq_factor are kept, and the band between blends the two smoothly."""
    factor, context = cfg.rope_factor, cfg.rope_original_max_seq_len
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)  # 0 at the long edge of the band, 1 at the short edge
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    in_band = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(in_band, blended, scaled)


def rope_dynamic_inv_freq(cfg: ModelConfig, seq_len: Tensor | int) -> Tensor:
    """Dynamic NTK: once seq_len passes the original context, raise the base so the slowest dims stretch
    over seq_len while the fastest barely move; up to the original context, the plain frequencies.

    Computed in fp32 tensors, like transformers' forward, and without a host sync (torch.where, not if).
    """
    D, context, factor = cfg.head_dim, cfg.rope_original_max_seq_len, cfg.rope_factor
    seq_len = torch.as_tensor(seq_len)
    plain = rope_inv_freq(D, cfg.rope_theta).to(seq_len.device)
    base = cfg.rope_theta * (factor * seq_len.float() / context - (factor - 1)) ** (D / (D - 2))
    stretched = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32, device=seq_len.device) / D)
    return torch.where(seq_len > context, stretched, plain)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype, *,
                 scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos/sin for `positions` (B, T) → each (B, 1, T, D), broadcast over heads, times `scale`
    (YaRN's attention factor; applied in fp32 before the cast, as transformers does)."""
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2), computed in fp32 for accuracy
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, D): half-split layout
    return (angles.cos() * scale).to(dtype)[:, None], (angles.sin() * scale).to(dtype)[:, None]


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


def relative_position_bucket(distance: Tensor, *, bidirectional: bool, buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each key-minus-query distance (any shape, long) → same shape, in [0, buckets).

    Bidirectional (encoder): half the buckets for keys after the query, half for keys before it. Causal
    (decoder): a key after the query cannot be seen, so every bucket goes to distances ≤ 0. Within a
    direction, the first half of its buckets hold distances 0, 1, 2, … exactly; the rest cover
    exact..max_distance on a log scale, and farther distances all share the last bucket.
    """
    offset = torch.zeros_like(distance)
    if bidirectional:
        buckets //= 2
        offset = (distance > 0).long() * buckets  # keys to the right use the upper half
        distance = distance.abs()
    else:
        distance = (-distance).clamp(min=0)  # how far back the key is; future keys count as 0 (masked anyway)
    exact = buckets // 2
    # log-spaced: exact at distance `exact`, reaching `buckets` at `max_distance`; truncated like T5 (.long())
    spread = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (buckets - exact)
    far = (exact + spread.long()).clamp(max=buckets - 1)
    return offset + torch.where(distance < exact, distance, far)


def relative_bias(table: Tensor, q_index: Tensor, k_index: Tensor, *, bidirectional: bool,
                  max_distance: int) -> Tensor:
    """Additive attention bias (1, H, Tq, Tk) from the (buckets, H) table, over absolute indices (so
    cached decoding, whose queries start at the cache offset, reads the same buckets as a full pass)."""
    distance = k_index[None, :] - q_index[:, None]  # (Tq, Tk): key minus query, as T5 defines it
    bucket = relative_position_bucket(distance, bidirectional=bidirectional, buckets=table.shape[0],
                                      max_distance=max_distance)
    return table[bucket].permute(2, 0, 1)[None].float()  # (1, H, Tq, Tk)
