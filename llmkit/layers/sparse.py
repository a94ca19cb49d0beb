"""Sparse attention patterns for long context: which keys each query may see.

- Sliding window (local attention; Beltagy et al. 2020, Longformer, arXiv 2004.05150; Mistral 7B):
  query i sees key j when |i - j| < W — in a causal model the W keys i-W+1..i.
- Longformer global tokens: the first G positions see every position and are seen by every position
  (in a causal model, "every position" means every earlier one; later ones still see them).
- BigBird (Zaheer et al. 2020, arXiv 2007.14062): positions grouped into blocks of b; query block q
  sees key block k when |q - k| < W/b, plus the global tokens, plus r random blocks per query block
  drawn from a generator seeded by (attention_seed, q), so the pattern is fixed for a model.

Every pattern is a function of absolute positions (never of where a tensor starts), so a full forward,
a chunked prefill and cached decoding see the same keys. Causal models intersect it with the causal
mask. `Stack.attention_args` calls `pattern_attention_args` once per forward.

The local pattern also has a blocked kernel, `attend_local`: queries are processed in chunks of
LOCAL_CHUNK, each against only the keys its window can reach, so memory grows like T·(chunk + W)
instead of T². Its reference path builds the dense mask from the same rule; tests prove them equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.layers.attention import attend, causal_mask
from llmkit.layers.position import alibi_bias

LOCAL_CHUNK = 128  # queries per block of the local kernel: big enough for fast matmuls, small for memory


def within_window(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """(…, Tq, Tk) bool: |i - j| < window, for positions (…, Tq) and (…, Tk)."""
    return (q_pos[..., :, None] - k_pos[..., None, :]).abs() < window


def pattern_mask(cfg: ModelConfig, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor:
    """(B, Tq, Tk) bool for query positions (B, Tq) and key positions (B, Tk) (B may be 1); causality
    is left to the caller, except that BigBird draws a causal model's random blocks from earlier ones."""
    global_tokens = cfg.attention_global_tokens
    if cfg.attention_pattern == "bigbird":
        size = cfg.attention_block_size
        q_block, k_block = q_pos // size, k_pos // size
        mask = within_window(q_block, k_block, cfg.attention_window // size)
        if cfg.attention_random_blocks:
            table = random_blocks(cfg, int(q_block.max()) + 1, int(k_block.max()) + 1, causal=causal)
            mask |= table.to(q_pos.device)[q_block[:, :, None], k_block[:, None, :]]
    else:
        mask = within_window(q_pos, k_pos, cfg.attention_window)
    if global_tokens:
        mask |= (q_pos[:, :, None] < global_tokens) | (k_pos[:, None, :] < global_tokens)
    return mask


def random_blocks(cfg: ModelConfig, n_query_blocks: int, n_key_blocks: int, *, causal: bool) -> Tensor:
    """(n_query_blocks, n_key_blocks) bool: BigBird's random key blocks for each query block.

    Drawn among blocks outside the window (and, when causal, before the query block), from a generator
    seeded by (attention_seed, query block): a query block's draw never depends on the sequence
    length in a causal model, which keeps cached decoding equal to a full forward."""
    window_blocks = cfg.attention_window // cfg.attention_block_size
    table = torch.zeros(n_query_blocks, n_key_blocks, dtype=torch.bool)
    for q in range(n_query_blocks):
        last = q - window_blocks + 1 if causal else n_key_blocks  # candidates are [0, last) minus the window
        candidates = torch.tensor([k for k in range(max(0, min(last, n_key_blocks)))
                                   if abs(q - k) >= window_blocks], dtype=torch.long)
        if len(candidates):
            generator = torch.Generator().manual_seed(cfg.attention_seed * 1_000_003 + q)
            chosen = candidates[torch.randperm(len(candidates), generator=generator)[:cfg.attention_random_blocks]]
            table[q, chosen] = True
    return table


@dataclass
class LocalWindow:
    """What the local kernel needs instead of a dense (Tq, Tk) mask: the window, causality, the absolute
    index of the first query and of the first key (keys are contiguous and end with the queries),
    and ALiBi slopes when the model has them (the bias is built per block, too)."""

    window: int
    causal: bool
    q_start: int
    k_start: int
    slopes: Tensor | None = None

    def mask_and_bias(self, q_index: Tensor, k_index: Tensor) -> tuple[Tensor, Tensor | None]:
        mask = within_window(q_index, k_index, self.window)
        if self.causal:
            mask &= causal_mask(q_index, k_index)
        bias = alibi_bias(self.slopes, q_index, k_index) if self.slopes is not None else None
        return mask, bias


def attend_local(q: Tensor, k: Tensor, v: Tensor, local: LocalWindow, *, impl: str = "sdpa",
                 scale: float | None = None, dropout: float = 0.0, chunk: int = LOCAL_CHUNK) -> Tensor:
    """Sliding-window attention, q (B, H, Tq, D), k/v (B, Hkv, Tk, D) → (B, H, Tq, D).

    "reference": one dense masked softmax (the readable definition). Otherwise blocked: for each chunk
    of queries i0..i1, only keys i0-W+1..i1 (causal; ..i1+W-1 otherwise) take part, through the fused
    kernel — no (Tq, Tk) tensor exists, so peak memory is linear in the sequence length."""
    Tq, Tk, device = q.shape[-2], k.shape[-2], q.device
    q_index = torch.arange(local.q_start, local.q_start + Tq, device=device)
    k_index = torch.arange(local.k_start, local.k_start + Tk, device=device)
    if impl == "reference":
        mask, bias = local.mask_and_bias(q_index, k_index)
        return attend(q, k, v, mask=mask, bias=bias, impl="reference", scale=scale, dropout=dropout)
    reach_ahead = 0 if local.causal else local.window - 1
    outputs = []
    for start in range(0, Tq, chunk):
        end = min(start + chunk, Tq)
        first = max(local.q_start + start - local.window + 1 - local.k_start, 0)
        last = min(local.q_start + end + reach_ahead - local.k_start, Tk)  # exclusive
        mask, bias = local.mask_and_bias(q_index[start:end], k_index[first:last])
        outputs.append(attend(q[:, :, start:end], k[:, :, first:last], v[:, :, first:last], mask=mask,
                              bias=bias, impl="sdpa", scale=scale, dropout=dropout))
    return torch.cat(outputs, dim=2)


def pattern_attention_args(cfg: ModelConfig, *, causal: bool, offset: int, T: int, key_start: int,
                           key_mask: Tensor | None, slopes: Tensor | None, device) -> dict:
    """Mask, bias and causality for queries at indices offset..offset+T-1 over keys key_start..offset+T-1
    (key_start > 0 when a ring-buffer cache holds only the window).

    The sliding window without padding goes to the blocked kernel as a LocalWindow; every other case
    gets a dense (B, 1, T, Tk) mask over positions (counted from each row's first real token)."""
    if cfg.attention_pattern == "sliding_window" and key_mask is None:
        return dict(bias=None, mask=None, causal=False,
                    local=LocalWindow(cfg.attention_window, causal, offset, key_start, slopes))
    q_index = torch.arange(offset, offset + T, device=device)
    k_index = torch.arange(key_start, offset + T, device=device)
    if key_mask is None:
        q_pos, k_pos = q_index[None], k_index[None]
    else:
        counted = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, offset + T): positions
        q_pos, k_pos = counted[:, q_index], counted[:, k_index]
    mask = pattern_mask(cfg, q_pos, k_pos, causal=causal)  # (B, T, Tk)
    if causal:
        mask &= causal_mask(q_index, k_index)
    if key_mask is not None:
        # padding is never a key; a padded query row would see nothing (NaN softmax), so it sees itself
        mask &= key_mask[:, None, k_index].bool()
        mask |= q_index[:, None] == k_index[None, :]
    bias = alibi_bias(slopes, q_index, k_index) if slopes is not None else None
    return dict(bias=bias, mask=mask[:, None], causal=False, local=None)
