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

Every pattern also has a blocked kernel, `attend_local`: queries are processed in chunks of
LOCAL_CHUNK, each against only the keys it can reach — its window, the global tokens, its random
blocks (all keys for a chunk holding a global query) — so no (T, T) tensor exists and memory grows
like T·(chunk + W + G + r·b) instead of T². Within a chunk the mask is the same rule on the gathered
keys; the reference path builds the dense mask from it; tests prove them equal.
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


def pattern_mask(cfg: ModelConfig, q_pos: Tensor, k_pos: Tensor, *, causal: bool,
                 table: Tensor | None = None) -> Tensor:
    """(B, Tq, Tk) bool for query positions (B, Tq) and key positions (B, Tk) (B may be 1); causality
    is left to the caller, except that BigBird draws a causal model's random blocks from earlier ones.
    `table`: BigBird's random blocks for the whole sequence, when the keys given are only some of its
    keys (the blocked kernel); by default drawn for the blocks these positions span."""
    global_tokens = cfg.attention_global_tokens
    if cfg.attention_pattern == "bigbird":
        size = cfg.attention_block_size
        q_block, k_block = q_pos // size, k_pos // size
        mask = within_window(q_block, k_block, cfg.attention_window // size)
        if cfg.attention_random_blocks:
            if table is None:
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
    key_blocks = torch.arange(n_key_blocks)
    for q in range(n_query_blocks):
        last = q - window_blocks + 1 if causal else n_key_blocks  # candidates are [0, last) minus the window
        candidates = key_blocks[(key_blocks < last) & ((q - key_blocks).abs() >= window_blocks)]
        if len(candidates):
            generator = torch.Generator().manual_seed(cfg.attention_seed * 1_000_003 + q)
            chosen = candidates[torch.randperm(len(candidates), generator=generator)[:cfg.attention_random_blocks]]
            table[q, chosen] = True
    return table


@dataclass
class LocalWindow:
    """What the blocked kernel needs instead of a dense (Tq, Tk) mask for a sliding window: the window,
    causality, the absolute index of the first query and of the first key (keys are contiguous and end
    with the queries), and ALiBi slopes when the model has them (the bias is built per block, too)."""

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

    def reach(self, q_index: Tensor, n_keys: int) -> slice | Tensor:
        """The keys (positions in the key tensor) queries q_index can see: one contiguous run."""
        first = max(int(q_index[0]) - self.window + 1 - self.k_start, 0)
        ahead = 0 if self.causal else self.window - 1
        return slice(first, min(int(q_index[-1]) + 1 + ahead - self.k_start, n_keys))


@dataclass
class PatternBlocks:
    """Longformer's and BigBird's patterns for the blocked kernel: the model's pattern settings, causality,
    where queries and keys start (absolute indices), ALiBi slopes, and BigBird's random-block table for
    the whole sequence (drawn once per forward, so every chunk reads the same draw as the dense mask)."""

    cfg: ModelConfig
    causal: bool
    q_start: int
    k_start: int
    slopes: Tensor | None = None
    table: Tensor | None = None

    def with_table(self, q_end: int, k_end: int) -> "PatternBlocks":
        cfg = self.cfg
        if cfg.attention_pattern != "bigbird" or not cfg.attention_random_blocks or self.table is not None:
            return self
        size = cfg.attention_block_size
        table = random_blocks(cfg, (q_end - 1) // size + 1, (k_end - 1) // size + 1, causal=self.causal)
        return PatternBlocks(cfg, self.causal, self.q_start, self.k_start, self.slopes, table)

    def mask_and_bias(self, q_index: Tensor, k_index: Tensor) -> tuple[Tensor, Tensor | None]:
        mask = pattern_mask(self.cfg, q_index[None], k_index[None], causal=self.causal, table=self.table)[0]
        if self.causal:
            mask &= causal_mask(q_index, k_index)
        bias = alibi_bias(self.slopes, q_index, k_index) if self.slopes is not None else None
        return mask, bias

    def reach(self, q_index: Tensor, n_keys: int) -> slice | Tensor:
        """The keys (positions in the key tensor) some query of q_index may see — a superset is harmless,
        the mask decides: the window around the chunk, the global tokens, the chunk's random blocks; every
        key when the chunk holds a global query (those see all)."""
        cfg = self.cfg
        q_first, q_last = int(q_index[0]), int(q_index[-1])
        k_end = self.k_start + n_keys
        end = min(q_last + 1, k_end) if self.causal else k_end
        if q_first < cfg.attention_global_tokens:
            return slice(0, end - self.k_start)
        seen = torch.zeros(k_end, dtype=torch.bool)
        seen[:cfg.attention_global_tokens] = True
        if cfg.attention_pattern == "bigbird":
            size, blocks = cfg.attention_block_size, cfg.attention_window // cfg.attention_block_size
            q_first_block, q_last_block = q_first // size, q_last // size
            seen[max(q_first_block - blocks + 1, 0) * size:(q_last_block + blocks) * size] = True
            if self.table is not None:
                chosen = self.table[q_first_block:q_last_block + 1].any(0).nonzero().flatten()
                for block in chosen.tolist():
                    seen[block * size:(block + 1) * size] = True
        else:
            seen[max(q_first - cfg.attention_window + 1, 0):q_last + cfg.attention_window] = True
        seen[end:] = False
        return seen[self.k_start:].nonzero().flatten()


def attend_local(q: Tensor, k: Tensor, v: Tensor, local: LocalWindow | PatternBlocks, *, impl: str = "sdpa",
                 scale: float | None = None, dropout: float = 0.0, chunk: int = LOCAL_CHUNK) -> Tensor:
    """Sparse attention by blocks, q (B, H, Tq, D), k/v (B, Hkv, Tk, D) → (B, H, Tq, D).

    "reference": one dense masked softmax (the readable definition). Otherwise blocked: each chunk of
    queries attends, through the fused kernel, to only the keys `local.reach` says it can see (a
    contiguous run for a sliding window; window + global tokens + random blocks for Longformer and
    BigBird), masked by the same rule — no (Tq, Tk) tensor exists, so peak memory is linear in the
    sequence length."""
    Tq, Tk, device = q.shape[-2], k.shape[-2], q.device
    if isinstance(local, PatternBlocks):
        local = local.with_table(local.q_start + Tq, local.k_start + Tk)
    q_index = torch.arange(local.q_start, local.q_start + Tq, device=device)
    k_index = torch.arange(local.k_start, local.k_start + Tk, device=device)
    if impl == "reference":
        mask, bias = local.mask_and_bias(q_index, k_index)
        return attend(q, k, v, mask=mask, bias=bias, impl="reference", scale=scale, dropout=dropout)
    outputs = []
    for start in range(0, Tq, chunk):
        end = min(start + chunk, Tq)
        keys = local.reach(q_index[start:end].cpu(), Tk)
        if isinstance(keys, Tensor):  # scattered keys: gather them (a copy of the reachable rows only)
            keys = keys.to(device)
            k_part, v_part = k.index_select(2, keys), v.index_select(2, keys)
        else:
            k_part, v_part = k[:, :, keys], v[:, :, keys]
        mask, bias = local.mask_and_bias(q_index[start:end], k_index[keys])
        outputs.append(attend(q[:, :, start:end], k_part, v_part, mask=mask, bias=bias, impl="sdpa",
                              scale=scale, dropout=dropout))
    return torch.cat(outputs, dim=2)


def pattern_attention_args(cfg: ModelConfig, *, causal: bool, offset: int, T: int, key_start: int,
                           key_mask: Tensor | None, slopes: Tensor | None, device) -> dict:
    """Mask, bias and causality for queries at indices offset..offset+T-1 over keys key_start..offset+T-1
    (key_start > 0 when a ring-buffer cache holds only the window).

    Without padding every pattern goes to the blocked kernel (a LocalWindow, or PatternBlocks for
    Longformer and BigBird); a padded batch gets a dense (B, 1, T, Tk) mask over positions (counted from
    each row's first real token, so they differ by row) — quadratic only in a padded prefill, since
    a decoding step has T = 1."""
    if key_mask is None:
        local = (LocalWindow(cfg.attention_window, causal, offset, key_start, slopes)
                 if cfg.attention_pattern == "sliding_window" else
                 PatternBlocks(cfg, causal, offset, key_start, slopes))
        return dict(bias=None, mask=None, causal=False, local=local)
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
