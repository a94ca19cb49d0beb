"""The decoding state of an encoder-decoder: the decoder's self-attention KV cache, which grows by one
position per step, plus each decoder layer's cross-attention keys/values over the encoder output,
which never change during a request and so are projected once, on the first step, and reused.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.inference.kv_cache import KVCache


class Seq2SeqCache(KVCache):
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(cfg.decoder_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype=dtype, device=device)
        self.memory: list[tuple[Tensor, Tensor] | None] = [None] * cfg.decoder_layers

    def memory_kv(self, layer: int, memory: Tensor, project: Callable[[Tensor], tuple[Tensor, Tensor]],
                  ) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s cross-attention (k, v) of `memory`, computed by `project` on first use only."""
        if self.memory[layer] is None:
            self.memory[layer] = project(memory)
        return self.memory[layer]

    def reorder(self, rows: Tensor, *, memory: bool = True) -> None:
        """Row i continues from old row rows[i] (beam search keeps, drops and duplicates hypotheses).
        memory=False keeps the cross-attention keys/values as they are: right when rows only move
        among rows that share one encoder output (the beams of one source), and it saves a copy."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        if memory:
            self.memory = [None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.memory]

    def cross_buffers(self) -> dict[str, Tensor]:
        """The cross-attention keys and values of every layer, stacked: (L, B, Hkv, S, D) each."""
        assert all(kv is not None for kv in self.memory), "cross-attention keys are made on the first decode"
        return {"cross_k": torch.stack([kv[0] for kv in self.memory]),
                "cross_v": torch.stack([kv[1] for kv in self.memory])}

    def over(self, buffers: dict[str, Tensor], pos: int) -> "Seq2SeqCache":
        view = super().over({"k": buffers["k"], "v": buffers["v"]}, pos)
        view.memory = list(zip(buffers["cross_k"].unbind(0), buffers["cross_v"].unbind(0)))
        return view

    def memory_bytes(self) -> int:
        cross = sum(t.numel() * t.element_size() for kv in self.memory if kv is not None for t in kv)
        return super().memory_bytes() + cross
