"""The KV cache: keys and values of every past position, so each decode step computes only the
new token's projections (O(T) work per token instead of O(T²) recomputation).

An explicit object passed to the model (not hidden module state): preallocated (L, B, Hkv, T, D)
buffers, and `pos`, the number of positions filled, which the model advances after its layer loop.

A sliding-window model (cfg.attention_pattern == "sliding_window") gets a `RingKVCache` instead: it
keeps only the last `attention_window` positions, overwriting the oldest, so its memory stays
constant however long generation runs. `key_start` tells the model the absolute index of the first
key it returns (0 for the full cache).

`Int8KVCache` (`--kv-cache int8`) stores keys and values as int8 codes with one scale per head and
position (max|k|/127 over the head's D values, kept beside the codes in float32): about a quarter of
the fp32 bytes (half of bf16's), for long prompts. Each vector comes back within half a step
(scale/2) of what was stored; `update` returns the dequantised history.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from llmkit.config import ModelConfig


class KVCache:
    key_start = 0  # absolute index of the first key `update` returns: the full cache starts at 0

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0
        self._views: tuple | None = None

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int | None = None, *,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
              int8: bool = False) -> "KVCache":
        """The cache `cfg` needs: a ring buffer of the window for a sliding-window model (full precision:
        it holds only the window), else full, with int8 codes if asked."""
        max_len = max_len or cfg.max_seq_len
        if cfg.attention_pattern == "sliding_window" and cfg.attention_window < max_len:
            return RingKVCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.attention_window, cfg.head_dim,
                               dtype=dtype, device=device)
        kind = Int8KVCache if int8 else KVCache
        return kind(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype=dtype, device=device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) at pos..pos+T; return everything cached for this layer."""
        T = k.shape[2]
        end = self.pos + T
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        keys, values = self.layer_views()
        keys[layer].narrow(2, self.pos, T).copy_(k)
        values[layer].narrow(2, self.pos, T).copy_(v)
        return keys[layer].narrow(2, 0, end), values[layer].narrow(2, 0, end)

    def layer_views(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Per-layer (B, Hkv, max_len, D) views of the buffers, made once (and again if a subclass
        replaces the buffers, as beam search's reorder does): indexing the 5-d buffer afresh costs
        more than the copy it leads to, ~60 times a token."""
        if self._views is None or self._views[0] is not self.k or self._views[1] is not self.v:
            self._views = (self.k, self.v, self.k.unbind(0), self.v.unbind(0))
        return self._views[2], self._views[3]

    def advance(self, n: int) -> None:
        self.pos += n

    def memory_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    # ---- rows that come and go (llmkit/inference/rows.py keeps a batch's buffers and moves rows) ----

    def buffers(self) -> dict[str, Tensor]:
        """The per-position tensors, each (L, B, Hkv, T, ·): batch on dim 1, time on dim 3."""
        return {"k": self.k, "v": self.v}

    def over(self, buffers: dict[str, Tensor], pos: int) -> "KVCache":
        """A cache of this kind that reads and writes `buffers` (views into a larger store, say the first
        rows of a continuous batch) with `pos` positions filled; shares storage, allocates nothing."""
        view = copy.copy(self)
        for name, tensor in buffers.items():
            setattr(view, name, tensor)
        view.max_len, view.pos, view._views = buffers["k"].shape[3], pos, None
        return view


class RingKVCache(KVCache):
    """Keys and values of the last `window` positions only: position p lives in slot p mod window.

    `update` returns the cached window in time order followed by the new positions (a sliding-window
    query at i needs keys i-window+1..i, all of which are there), then stores the newest `window` of
    them. Any number of positions can be decoded; memory is (L, B, Hkv, window, D) throughout.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, window: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(n_layers, batch, n_kv_heads, window, head_dim, dtype=dtype, device=device)
        self.window = window

    @property
    def key_start(self) -> int:
        """Absolute index of the oldest cached position (the first key `update` returns)."""
        return max(0, self.pos - self.window)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T, filled = k.shape[2], min(self.pos, self.window)
        # time order: slots from the oldest position's slot onwards, wrapping around
        order = (torch.arange(self.pos - filled, self.pos, device=k.device) % self.window)
        keys = torch.cat([self.k[layer, :, :, order], k], dim=2)
        values = torch.cat([self.v[layer, :, :, order], v], dim=2)
        keep = min(T, self.window)  # only the newest `window` new positions can ever be needed again
        slots = torch.arange(self.pos + T - keep, self.pos + T, device=k.device) % self.window
        self.k[layer, :, :, slots] = k[:, :, T - keep:]
        self.v[layer, :, :, slots] = v[:, :, T - keep:]
        return keys, values


class Int8KVCache(KVCache):
    """Keys and values as int8 codes, one float32 scale per (layer, batch row, head, position)."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=torch.int8, device=device)
        self.v = torch.zeros(shape, dtype=torch.int8, device=device)
        self.k_scale = torch.zeros(shape[:-1] + (1,), dtype=torch.float32, device=device)
        self.v_scale = torch.zeros_like(self.k_scale)
        self.dtype, self.max_len, self.pos = dtype, max_len, 0
        self._views = None

    @staticmethod
    def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
        """(…, D) → int8 codes and the (…, 1) scale max|x|/127, rounding to nearest."""
        scale = x.detach().float().abs().amax(-1, keepdim=True) / 127
        codes = (x.float() / torch.where(scale > 0, scale, torch.ones_like(scale))).round().clamp(-127, 127)
        return codes.to(torch.int8), scale

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T = k.shape[2]
        end = self.pos + T
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        out = []
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            c, s = self.quantize(x)
            codes[layer, :, :, self.pos:end] = c
            scales[layer, :, :, self.pos:end] = s
            out.append((codes[layer, :, :, :end].float() * scales[layer, :, :, :end]).to(x.dtype))
        return out[0], out[1]

    def memory_bytes(self) -> int:
        return 2 * (self.k.numel() + self.k_scale.numel() * self.k_scale.element_size())

    def buffers(self) -> dict[str, Tensor]:
        return {"k": self.k, "v": self.v, "k_scale": self.k_scale, "v_scale": self.v_scale}
