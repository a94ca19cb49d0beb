"""The Transformer body shared by every family: embeddings, Block (pre- or post-norm) and Stack.

The Stack turns (positions, padding, cache offset) into what attention needs — RoPE cos/sin, an
ALiBi bias, a boolean mask — once per forward, and shares them across layers, as T5 and
x-transformers do. Blocks never count layers or advance the cache: the model does that.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.layers.attention import Attention, causal_mask
from llmkit.layers.feedforward import build_mlp
from llmkit.layers.norm import build_norm
from llmkit.layers.position import (alibi_bias, alibi_slopes, rope_cos_sin, rope_dynamic_inv_freq, rope_frequencies,
                                    sinusoidal_table)


class Embeddings(nn.Module):
    """Token embedding plus, for absolute schemes, a learned or sinusoidal position table."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False)
        self.sinusoidal = cfg.position == "sinusoidal"
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed(input_ids)  # (B, T, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        elif self.sinusoidal:
            x = x + self.sinusoid[positions].to(x.dtype)
        return self.dropout(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.norm2 = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = build_mlp(cfg.mlp, cfg.d_model, cfg.d_ff, bias=cfg.bias, dropout=cfg.dropout)

    def forward(self, x: Tensor, **attn_args) -> Tensor:
        if self.pre_norm:  # GPT-2, LLaMA: x + f(norm(x)); the residual stream is never normalised
            x = x + self.attn(self.norm1(x), **attn_args)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, **attn_args))  # original Transformer, BERT: norm(x + f(x))
        return self.norm2(x + self.mlp(x))


class Stack(nn.Module):
    """N blocks plus (for pre-norm) the final norm; computes positions and masks once."""

    def __init__(self, cfg: ModelConfig, *, causal: bool = True) -> None:
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = (build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
                           if cfg.norm_position == "pre" else nn.Identity())
        if cfg.position == "rope":
            # A plain fp32 attribute, not a buffer: `model.to(torch.bfloat16)` must not round the
            # frequencies (angles at position 10^4 would be off by whole radians).
            self.inv_freq, self.rope_scale = rope_frequencies(cfg)
        if cfg.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)

    def forward(self, x: Tensor, positions: Tensor, *, key_mask: Tensor | None = None, cache=None) -> Tensor:
        args = self.attention_args(x, positions, key_mask=key_mask, offset=cache.pos if cache else 0)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache, layer=i, **args)
        return self.final_norm(x)

    def attention_args(self, x: Tensor, positions: Tensor, *, key_mask: Tensor | None, offset: int) -> dict:
        """RoPE, bias and mask for queries at buffer indices offset..offset+T-1 over keys 0..offset+T-1."""
        T, device = x.shape[1], x.device
        q_index = torch.arange(offset, offset + T, device=device)
        k_index = torch.arange(offset + T, device=device)
        rope = self.rope(positions, x.dtype) if self.cfg.position == "rope" else None
        # ALiBi uses buffer indices: with left padding, distances between real tokens are unchanged.
        bias = alibi_bias(self.slopes, q_index, k_index) if self.cfg.position == "alibi" else None
        mask, causal = None, self.causal
        if key_mask is not None:
            # A padded query row would see no key at all (NaN softmax): let every query see itself.
            visible = key_mask[:, None, None, :].bool() | (q_index[:, None] == k_index[None, :])
            mask = visible & causal_mask(q_index, k_index) if causal else visible  # (B, 1, T, Tk)
            causal = False
        elif causal and T == 1:
            causal = False  # one new query sees every cached key
        return dict(rope=rope, bias=bias, mask=mask, causal=causal)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv_freq = self.inv_freq.to(positions.device)
        if self.cfg.rope_scaling == "dynamic":
            # Frequencies follow the longest sequence in this forward, as in transformers. With a KV cache
            # `positions` are only the new ones, and cached keys keep the rotation they were stored with,
            # so past the original context cached decoding drifts from a full recompute (transformers too).
            inv_freq = rope_dynamic_inv_freq(self.cfg, positions.max() + 1)
        return rope_cos_sin(positions, inv_freq, dtype, scale=self.rope_scale)
