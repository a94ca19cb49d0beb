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

transformers' Longformer and BigBird (encoders; tests/io/test_hf_longformer_bigbird.py) are settings of the
same rule: globals are also the positions the attention mask marks 2 (Longformer's convention) and the
block holding the last position (BigBird's last block, `attention_global_last_block`); Longformer's global
queries, and the keys and values they read, have their own projections (`GlobalProjections`); a BigBird
sequence of at most `attention_dense_up_to` tokens attends fully, as transformers falls back to full attention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.layers.attention import attend, causal_mask
from llmkit.layers.linear import Linear
from llmkit.layers.position import alibi_bias

LOCAL_CHUNK = 128  # queries per block of the local kernel: big enough for fast matmuls, small for memory


def within_window(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """(…, Tq, Tk) bool: |i - j| < window, for positions (…, Tq) and (…, Tk)."""
    return (q_pos[..., :, None] - k_pos[..., None, :]).abs() < window


def global_flags(cfg: ModelConfig, pos: Tensor, index: Tensor, seq_len: int, marks: Tensor | None = None) -> Tensor:
    """(B, n) bool: which of these positions (B, n) at buffer indices (n,) are global — the first
    attention_global_tokens, those the attention mask marks 2 (`marks`), and with attention_global_last_block
    the block holding the sequence's last index (seq_len - 1), as transformers' BigBird pads to whole blocks."""
    flags = pos < cfg.attention_global_tokens
    if marks is not None:
        flags = flags | marks
    if cfg.attention_global_last_block:
        size = cfg.attention_block_size
        flags = flags | (index // size == (seq_len - 1) // size)
    return flags


def pattern_mask(cfg: ModelConfig, q_pos: Tensor, k_pos: Tensor, *, causal: bool,
                 table: Tensor | None = None, q_global: Tensor | None = None,
                 k_global: Tensor | None = None) -> Tensor:
    """(B, Tq, Tk) bool for query positions (B, Tq) and key positions (B, Tk) (B may be 1); causality
    is left to the caller, except that BigBird draws a causal model's random blocks from earlier ones.
    `table`: BigBird's random blocks for the whole sequence, when the keys given are only some of its
    keys (the blocked kernel); by default drawn for the blocks these positions span. `q_global`/`k_global`:
    which queries and keys are global (`global_flags`); by default the first attention_global_tokens."""
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
    if q_global is None:
        q_global, k_global = q_pos < cfg.attention_global_tokens, k_pos < cfg.attention_global_tokens
    return mask | q_global[:, :, None] | k_global[:, None, :]


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
    where queries and keys start (absolute indices), ALiBi slopes, BigBird's random-block table for the
    whole sequence (drawn once per forward, so every chunk reads the same draw as the dense mask), the
    sequence's length (where BigBird's last block is; 0: where the keys end) and, for a bidirectional model
    given an attention mask, which positions are real and which it marks global, (B, seq_len) bool each:
    then the mask is per row, (B, 1, Tq, Tk), for a chunk's queries only."""

    cfg: ModelConfig
    causal: bool
    q_start: int
    k_start: int
    slopes: Tensor | None = None
    table: Tensor | None = None
    seq_len: int = 0
    real: Tensor | None = None
    marks: Tensor | None = None

    def with_table(self, q_end: int, k_end: int) -> "PatternBlocks":
        cfg, blocks = self.cfg, replace(self, seq_len=self.seq_len or k_end)
        if cfg.attention_pattern != "bigbird" or not cfg.attention_random_blocks or self.table is not None:
            return blocks
        size = cfg.attention_block_size
        return replace(blocks, table=random_blocks(cfg, (q_end - 1) // size + 1, (k_end - 1) // size + 1,
                                                   causal=self.causal))

    def mask_and_bias(self, q_index: Tensor, k_index: Tensor) -> tuple[Tensor, Tensor | None]:
        seq_len, marks = self.seq_len or self.k_start + len(k_index), self.marks
        q_global = global_flags(self.cfg, q_index[None], q_index, seq_len, None if marks is None else marks[:, q_index])
        k_global = global_flags(self.cfg, k_index[None], k_index, seq_len, None if marks is None else marks[:, k_index])
        mask = pattern_mask(self.cfg, q_index[None], k_index[None], causal=self.causal, table=self.table,
                            q_global=q_global, k_global=k_global)
        if self.causal:
            mask &= causal_mask(q_index, k_index)
        if self.real is not None:  # padding is never a key; a padded query sees itself (not NaN)
            mask = (mask & self.real[:, None, k_index]) | (q_index[:, None] == k_index[None, :])
        bias = alibi_bias(self.slopes, q_index, k_index) if self.slopes is not None else None
        return (mask[:, None] if self.real is not None or marks is not None else mask[0]), bias

    def reach(self, q_index: Tensor, n_keys: int) -> slice | Tensor:
        """The keys (positions in the key tensor) some query of q_index may see — a superset is harmless,
        the mask decides: the window around the chunk, the global tokens, the chunk's random blocks; every
        key when the chunk holds a global query (those see all), unless global queries have their own
        projections (their rows are recomputed by GlobalQueries, whatever this chunk gives them)."""
        cfg = self.cfg
        q_first, q_last = int(q_index[0]), int(q_index[-1])
        k_end = self.k_start + n_keys
        end = min(q_last + 1, k_end) if self.causal else k_end
        last_block = ((self.seq_len or k_end) - 1) // cfg.attention_block_size * cfg.attention_block_size
        marked = None if self.marks is None else self.marks.any(0).cpu()  # global in some row
        holds_global = (q_first < cfg.attention_global_tokens
                        or (cfg.attention_global_last_block and q_last >= last_block)
                        or (marked is not None and bool(marked[q_first:q_last + 1].any())))
        if holds_global and not cfg.attention_global_projections:
            return slice(0, end - self.k_start)
        seen = torch.zeros(k_end, dtype=torch.bool)
        seen[:cfg.attention_global_tokens] = True
        if marked is not None:
            seen |= marked[:k_end]
        if cfg.attention_global_last_block:
            seen[last_block:] = True
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


class GlobalProjections(nn.Module):
    """transformers' Longformer: the query, key and value projections that global queries use (its
    query_global, key_global, value_global). The other queries read global keys through the ordinary ones."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)


@dataclass
class GlobalQueries:
    """Which queries are global, per row (B or 1, T) bool, and which keys are real (B, T) bool (None: all)."""

    rows: Tensor
    keys: Tensor | None

    def attend(self, y: Tensor, x: Tensor, proj: GlobalProjections, *, scale: float | None, impl: str,
               dropout: float = 0.0) -> Tensor:
        """y (B, H, T, D) with every global query's row replaced by its attention over all real keys through
        the global projections of x (B, T, C). Only global rows are computed: (B, H, G, T) scores, G the
        most global queries of a row — memory linear in T."""
        B, T, C = x.shape
        rows = self.rows.expand(B, T)
        counts = rows.sum(1)
        G = int(counts.max())
        if G == 0:
            return y
        H, Hkv, D = proj.n_heads, proj.n_kv_heads, proj.head_dim
        # each row's global positions first, in order (then its other positions, whose rows stay as they are)
        order = torch.sort((~rows).int(), dim=1, stable=True).indices[:, :G]  # (B, G)
        q = proj.q_proj(x.gather(1, order[..., None].expand(B, G, C))).view(B, G, H, D).transpose(1, 2)
        k = proj.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        v = proj.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        mask = None if self.keys is None else self.keys[:, None, None, :]
        out = attend(q, k, v, mask=mask, scale=scale, impl=impl, dropout=dropout)  # (B, H, G, D)
        index = order[:, None, :, None].expand(B, H, G, D)
        is_global = (torch.arange(G, device=x.device)[None] < counts[:, None])[:, None, :, None]
        return y.scatter(2, index, torch.where(is_global, out.to(y.dtype), y.gather(2, index)))


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
    (key_start > 0 when a ring-buffer cache holds only the window); with global projections, which
    queries are global (`global_queries`, for Attention). `key_mask` (B, offset+T): 0 padding, 1 a real
    token, 2 a global one (transformers' Longformer convention).

    Without padding every pattern goes to the blocked kernel (a LocalWindow, or PatternBlocks for
    Longformer and BigBird), and so does a padded bidirectional Longformer or BigBird (the blocks mask by
    row); a padded causal batch, or a padded sliding window, gets a dense (B, 1, T, Tk) mask over positions
    (counted from each row's first real token, so they differ by row) — quadratic only in a padded
    prefill, since a decoding step has T = 1."""
    seq_len = offset + T
    q_index = torch.arange(offset, seq_len, device=device)
    k_index = torch.arange(key_start, seq_len, device=device)
    real = None if key_mask is None else key_mask > 0
    if seq_len <= cfg.attention_dense_up_to:  # transformers' BigBird: a short sequence attends fully
        mask = None if real is None else (real[:, None, None, k_index] | (q_index[:, None] == k_index[None, :]))
        return dict(bias=dense_alibi(slopes, q_index, k_index), mask=mask, causal=causal, local=None)
    if key_mask is None or (not causal and cfg.attention_pattern != "sliding_window"):
        # a bidirectional model's positions are its indices, padded or not: the blocks take the mask by row
        marks = None if key_mask is None else key_mask == 2
        local = (LocalWindow(cfg.attention_window, causal, offset, key_start, slopes)
                 if cfg.attention_pattern == "sliding_window" else
                 PatternBlocks(cfg, causal, offset, key_start, slopes, seq_len=seq_len, real=real, marks=marks))
        extra = {}
        if cfg.attention_global_projections:  # (encoders only: never the dense path below)
            rows = global_flags(cfg, q_index[None], q_index, seq_len, None if marks is None else marks[:, q_index])
            extra["global_queries"] = GlobalQueries(rows if real is None else rows & real[:, q_index],
                                                    None if real is None else real[:, k_index])
        return dict(bias=None, mask=None, causal=False, local=local, **extra)
    counted = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, offset + T): positions
    q_pos, k_pos = counted[:, q_index], counted[:, k_index]
    marks = key_mask == 2
    q_global = global_flags(cfg, q_pos, q_index, seq_len, marks[:, q_index])
    k_global = global_flags(cfg, k_pos, k_index, seq_len, marks[:, k_index])
    mask = pattern_mask(cfg, q_pos, k_pos, causal=causal, q_global=q_global, k_global=k_global)  # (B, T, Tk)
    if causal:
        mask &= causal_mask(q_index, k_index)
    # padding is never a key; a padded query row would see nothing (NaN softmax), so it sees itself
    mask &= real[:, None, k_index]
    mask |= q_index[:, None] == k_index[None, :]
    return dict(bias=dense_alibi(slopes, q_index, k_index), mask=mask[:, None], causal=False, local=None)


def dense_alibi(slopes: Tensor | None, q_index: Tensor, k_index: Tensor) -> Tensor | None:
    """ALiBi's (H, Tq, Tk) bias for the dense paths (the blocked kernel builds it per chunk instead)."""
    return alibi_bias(slopes, q_index, k_index) if slopes is not None else None
