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
from llmkit.layers.disentangled import FirstLayerConv, RelativeEmbeddings
from llmkit.layers.feedforward import build_mlp
from llmkit.layers.linear import Linear
from llmkit.layers.norm import build_norm
from llmkit.layers.sparse import pattern_attention_args
from llmkit.layers.position import (alibi_bias, alibi_slopes, relative_bias, rope_cos_sin, rope_dynamic_inv_freq,
                                    rope_frequencies, sinusoidal_table)


class Embeddings(nn.Module):
    """Token embedding plus, for absolute schemes, a learned or sinusoidal position table.

    The BERT family adds, by config: segment (token type) embeddings, a LayerNorm over the sum,
    RoBERTa's position offset (its table starts at padding_idx + 1 = 2, so position p reads row
    p + offset), and ALBERT's factorised embedding — tables of width embed_dim < d_model, projected
    up to d_model after the norm, which shrinks the vocabulary's parameters by d_model / embed_dim.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        width = cfg.embedding_dim
        self.embed = nn.Embedding(cfg.vocab_size, width)
        self.position_offset = cfg.position_offset
        self.pos_embed = (nn.Embedding(cfg.max_seq_len + cfg.position_offset, width)
                          if cfg.learned_positions else None)
        if cfg.position == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(cfg.max_seq_len, width), persistent=False)
        self.sinusoidal = cfg.position == "sinusoidal"
        self.type_embed = nn.Embedding(cfg.type_vocab_size, width) if cfg.type_vocab_size else None
        self.norm = build_norm(cfg.norm, width, eps=cfg.norm_eps, bias=cfg.bias) if cfg.embed_norm else None
        self.project = Linear(width, cfg.d_model, bias=cfg.bias) if width != cfg.d_model else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: Tensor, positions: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        x = self.embed(input_ids)  # (B, T, E)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + self.position_offset)
        elif self.sinusoidal:
            x = x + self.sinusoid[positions].to(x.dtype)
        if self.type_embed is not None:  # absent token types are all segment 0, as in BERT
            x = x + (self.type_embed(token_type_ids) if token_type_ids is not None else self.type_embed.weight[0])
        if self.norm is not None:
            x = self.norm(x)
        x = self.dropout(x)
        return self.project(x) if self.project is not None else x  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, *, cross_attention: bool = False) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.norm1 = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.attn = Attention(cfg)
        # An encoder-decoder's decoder block attends to the encoder output between self-attention and MLP.
        self.cross_norm = (build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
                           if cross_attention else None)
        self.cross_attn = Attention(cfg) if cross_attention else None
        self.norm2 = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mlp = build_mlp(cfg.mlp, cfg.d_model, cfg.d_ff, bias=cfg.bias, dropout=cfg.dropout)
        # For decoding, the whole block may run as one native call (llmkit/quant/kernels/block.py, set by
        # llmkit/inference/optimize.py): step(x, attn_args) returns the output, or None where it does not apply.
        self.decode_step = None

    def forward(self, x: Tensor, *, memory: Tensor | None = None, memory_mask: Tensor | None = None,
                **attn_args) -> Tensor:
        if self.decode_step is not None and memory is None:
            y = self.decode_step(x, attn_args)
            if y is not None:
                return y
        def cross(h: Tensor) -> Tensor:  # no position bias: T5 and BART cross-attention see keys unordered
            return self.cross_attn(h, memory=memory, mask=memory_mask, cache=attn_args.get("cache"),
                                   layer=attn_args.get("layer", 0))

        if self.pre_norm:  # GPT-2, LLaMA: x + f(norm(x)); the residual stream is never normalised
            x = x + self.attn(self.norm1(x), **attn_args)
            if self.cross_attn is not None:
                x = x + cross(self.cross_norm(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, **attn_args))  # original Transformer, BERT: norm(x + f(x))
        if self.cross_attn is not None:
            x = self.cross_norm(x + cross(x))
        return self.norm2(x + self.mlp(x))


class SharedBlocks(nn.Module):
    """ALBERT's cross-layer sharing: one Block, stored once (as `0`), that iterates as n_layers layers,
    so the Stack's layer loop and `blocks[i]` work unchanged."""

    def __init__(self, block: Block, n_layers: int) -> None:
        super().__init__()
        self.add_module("0", block)
        self.n_layers = n_layers

    def __len__(self) -> int:
        return self.n_layers

    def __getitem__(self, i: int) -> Block:
        if not -self.n_layers <= i < self.n_layers:
            raise IndexError(f"layer {i} of {self.n_layers}")
        return self._modules["0"]

    def __iter__(self):
        return iter([self._modules["0"]] * self.n_layers)


class Stack(nn.Module):
    """N blocks plus (for pre-norm) the final norm; computes positions and masks once."""

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, cross_attention: bool = False,
                 n_layers: int | None = None) -> None:
        super().__init__()
        self.cfg, self.causal = cfg, causal
        n_layers = n_layers or cfg.n_layers  # an encoder-decoder's decoder may have its own depth
        self.blocks = (SharedBlocks(Block(cfg, cross_attention=cross_attention), n_layers) if cfg.share_layers
                       else nn.ModuleList(Block(cfg, cross_attention=cross_attention) for _ in range(n_layers)))
        self.final_norm = (build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
                           if cfg.norm_position == "pre" else nn.Identity())
        if cfg.position == "rope":
            # A plain fp32 attribute, not a buffer: `model.to(torch.bfloat16)` must not round the
            # frequencies (angles at position 10^4 would be off by whole radians).
            self.inv_freq, self.rope_scale = rope_frequencies(cfg)
        if cfg.position == "alibi":
            self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)
        if cfg.position == "relative":  # T5: one (buckets, heads) table per stack, shared by its layers
            self.relative_bias = nn.Embedding(cfg.relative_buckets, cfg.n_heads)
        if cfg.position == "disentangled":  # DeBERTa: one table of relative embeddings, shared by its layers
            self.relative_embed = RelativeEmbeddings(cfg)
        self.conv = FirstLayerConv(cfg) if cfg.conv_kernel else None  # DeBERTa v2 xlarge's, after layer 0

    def forward(self, x: Tensor, positions: Tensor, *, key_mask: Tensor | None = None, cache=None,
                memory: Tensor | None = None, memory_mask: Tensor | None = None) -> Tensor:
        """`memory` (B, S, C): the encoder output that cross-attention blocks read; `memory_mask`
        (B, 1, 1, S) bool, its real positions."""
        args = self.attention_args(x, positions, key_mask=key_mask, offset=cache.pos if cache else 0,
                                   key_start=getattr(cache, "key_start", 0))  # > 0: a ring buffer holds the window
        if memory is not None:
            args.update(memory=memory, memory_mask=memory_mask)
        embedded = x
        for i, block in enumerate(self.blocks):
            x = block(x, cache=cache, layer=i, **args)
            if i == 0 and self.conv is not None:
                x = self.conv(embedded, x, key_mask)
        return self.final_norm(x)

    def attention_args(self, x: Tensor, positions: Tensor, *, key_mask: Tensor | None, offset: int,
                       key_start: int = 0) -> dict:
        """RoPE, bias and mask for queries at buffer indices offset..offset+T-1 over keys 0..offset+T-1."""
        T, device = x.shape[1], x.device
        if self.cfg.attention_pattern != "full":  # sliding window, global tokens, BigBird
            rope = self.rope(positions, x.dtype) if self.cfg.position == "rope" else None
            return dict(rope=rope, **pattern_attention_args(
                self.cfg, causal=self.causal, offset=offset, T=T, key_start=key_start, key_mask=key_mask,
                slopes=self.slopes if self.cfg.position == "alibi" else None, device=device))
        q_index = torch.arange(offset, offset + T, device=device)
        k_index = torch.arange(offset + T, device=device)
        rope = self.rope(positions, x.dtype) if self.cfg.position == "rope" else None
        # ALiBi uses buffer indices: with left padding, distances between real tokens are unchanged.
        bias = alibi_bias(self.slopes, q_index, k_index) if self.cfg.position == "alibi" else None
        if self.cfg.position == "relative":
            bias = relative_bias(self.relative_bias.weight, q_index, k_index, bidirectional=not self.causal,
                                 max_distance=self.cfg.relative_max_distance)
        mask, causal = None, self.causal
        if key_mask is not None:
            # A padded query row would see no key at all (NaN softmax): let every query see itself.
            visible = key_mask[:, None, None, :].bool() | (q_index[:, None] == k_index[None, :])
            mask = visible & causal_mask(q_index, k_index) if causal else visible  # (B, 1, T, Tk)
            causal = False
        elif causal and T == 1:
            causal = False  # one new query sees every cached key
        if self.cfg.position == "disentangled":  # each layer projects the table with its own q/k projections
            return dict(rope=rope, bias=bias, mask=mask, causal=causal, relative=self.relative_embed(q_index, k_index))
        return dict(rope=rope, bias=bias, mask=mask, causal=causal)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv_freq = self.inv_freq.to(positions.device)
        if self.cfg.rope_scaling == "dynamic":
            # Frequencies follow the longest sequence in this forward, as in transformers. With a KV cache
            # `positions` are only the new ones, and cached keys keep the rotation they were stored with,
            # so past the original context cached decoding drifts from a full recompute (transformers too).
            inv_freq = rope_dynamic_inv_freq(self.cfg, positions.max() + 1)
        return rope_cos_sin(positions, inv_freq, dtype, scale=self.rope_scale)
