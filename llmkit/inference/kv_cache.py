"""The KV cache: keys and values of every past position, so each decode step computes only the
new token's projections (O(T) work per token instead of O(T²) recomputation).

An explicit object passed to the model (not hidden module state): preallocated (L, B, Hkv, T, D)
buffers, and `pos`, the number of positions filled, which the model advances after its layer loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkit.config import ModelConfig


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int | None = None, *,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                   dtype=dtype, device=device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) at pos..pos+T; return everything cached for this layer."""
        end = self.pos + k.shape[2]
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def memory_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
