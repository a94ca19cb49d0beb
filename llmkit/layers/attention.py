"""Scaled dot-product attention (Vaswani et al. 2017) for every variant: MHA, GQA, MQA; causal or
bidirectional; with padding masks, additive biases (ALiBi) and a KV cache.

`attend` is the kernel, in two implementations proven equal in tests:
- "reference": softmax(q·kᵀ/√d + bias + mask) · v, written as a reader expects;
- "sdpa": torch's fused `scaled_dot_product_attention` (the default).
`Attention` is the layer: projections → heads → RoPE → cache → kernel → merge, written once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.layers.disentangled import DisentangledScores
from llmkit.layers.linear import Linear
from llmkit.layers.norm import RMSNorm
from llmkit.layers.position import apply_rope


def causal_mask(q_index: Tensor, k_index: Tensor) -> Tensor:
    """(Tq, Tk) bool, True where query i may see key j (j ≤ i, by absolute index)."""
    return k_index[None, :] <= q_index[:, None]


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Tensor | None = None,
           bias: Tensor | None = None, scale: float | None = None, dropout: float = 0.0,
           impl: str = "sdpa", probe=None) -> Tensor:
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) → (B, H, Tq, D).

    `mask` is bool, broadcastable to (B, H, Tq, Tk), True = may attend. `bias` is added to the
    scores. `causal` aligns the last query with the last key (queries are the newest positions),
    which is the right convention when Tq < Tk during cached decoding. `probe` (reference only) is
    called with the softmax weights (B, H, Tq, Tk) and returns the weights to use (llmkit/explain).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if causal and (Tq != Tk or impl == "reference" or mask is not None or bias is not None):
        offset = torch.arange(Tk - Tq, Tk, device=q.device)
        cm = causal_mask(offset, torch.arange(Tk, device=q.device))
        mask = cm if mask is None else mask & cm
        causal = False
    if impl == "reference":
        return _attend_reference(q, k, v, mask=mask, bias=bias, scale=scale, dropout=dropout, probe=probe)
    assert impl == "sdpa", f"unknown attention impl {impl}"
    if Tq == 1 and q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu" and bias is None \
            and dropout == 0 and not causal:
        return _attend_one_query(q, k, v, mask=mask, scale=scale)
    attn_mask = mask
    if bias is not None:
        attn_mask = bias.to(q.dtype)
        if mask is not None:
            attn_mask = attn_mask.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                          is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _attend_one_query(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, scale: float) -> Tensor:
    """One new query per row (a decode step) in bf16/fp16 on the CPU: torch's fused kernel takes ~4× as
    long as this at 512 cached keys and ~8× at 2,048 (Zen 5, 2 threads: 218 against 78 µs, 876 against
    214), since it tiles for many queries. Each key/value head's G query heads as one (G, D) matrix, the
    sums in fp32 over the cache's own values (more exact than the fused kernel's bf16 path)."""
    B, H, _, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    queries = q.reshape(B, Hkv, H // Hkv, D).float()  # head h = kv·G + g, as repeat_interleave pairs them
    scores = torch.matmul(queries, k.float().transpose(-2, -1)) * scale  # (B, Hkv, G, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask.expand(B, H, 1, Tk).reshape(B, Hkv, H // Hkv, Tk), float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), v.float())  # (B, Hkv, G, D)
    return out.to(q.dtype).reshape(B, H, 1, D)


def _attend_reference(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None, bias: Tensor | None,
                      scale: float, dropout: float, probe=None) -> Tensor:
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA/MQA: each key/value head serves `groups` query heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, Tq, Tk)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = F.dropout(scores.softmax(dim=-1), p=dropout)
    if probe is not None:  # llmkit/explain records the map, or knocks edges or heads out of it
        weights = probe(weights)
    weights = weights.to(v.dtype)
    return weights @ v  # (B, H, Tq, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.impl = "sdpa"
        # llmkit/explain's recorder: a callable given each softmax's weights, consulted only by the
        # "reference" kernel, so the fast path never looks at it. None unless a view is running.
        self.probe = None
        self.scale = None if cfg.scale_attention else 1.0  # None → 1/√head_dim; T5 leaves q·k unscaled
        # For decoding, q/k/v may be fused into one projection (llmkit/inference/optimize.py): one
        # matrix-vector product per layer instead of three. None: the three separate projections.
        self.qkv_proj: nn.Module | None = None
        # QK-norm: RMSNorm over each head's query and key (before RoPE), bounding the attention logits.
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        # DeBERTa: content→position and position→content score terms (llmkit/layers/disentangled.py),
        # with the scale that covers all three terms.
        self.disentangled = None
        if cfg.position == "disentangled":
            self.disentangled = DisentangledScores(cfg)
            self.scale = self.disentangled.scale
        # transformers' Longformer: global queries, and the keys and values they read, have their own
        # projections (llmkit/layers/sparse.py recomputes those rows with them)
        self.global_proj = None
        if cfg.attention_global_projections:
            from llmkit.layers.sparse import GlobalProjections

            self.global_proj = GlobalProjections(cfg)

    def forward(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, bias: Tensor | None = None,
                mask: Tensor | None = None, causal: bool = False, cache=None, layer: int = 0,
                memory: Tensor | None = None, local=None, relative: tuple[Tensor, Tensor] | None = None,
                global_queries=None) -> Tensor:
        """Self-attention over x; or, given `memory` (B, S, C), cross-attention (T5, BART decoders):
        queries from x, keys and values from memory, the encoder output. With a cache, cross-attention
        keys/values are projected once per request (`cache.memory_kv`) and reused at every step.
        `relative`: DeBERTa's shared relative embeddings and their (Tq, Tk) index (Stack.attention_args)."""
        B, T, _ = x.shape
        if memory is not None:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
            k, v = cache.memory_kv(layer, memory, self.project_kv) if cache is not None else self.project_kv(memory)
        else:
            q, k, v = self.project_qkv(x, rope)
            if cache is not None:  # k, v become everything cached so far plus these T positions
                k, v = cache.update(layer, k, v)
        if relative is not None:  # DeBERTa's position terms join the scores as an additive bias
            term = self.disentangled(q, k, *relative, q_proj=self.q_proj, k_proj=self.k_proj)
            bias = term if bias is None else bias + term
        dropout = self.dropout if self.training else 0.0
        if local is not None and self.probe is not None:  # a probe sees the window as one dense map
            mask, bias = local.mask_and_bias(torch.arange(local.q_start, local.q_start + T, device=x.device),
                                             torch.arange(local.k_start, local.k_start + k.shape[-2], device=x.device))
            local = None
        if local is not None:  # sliding window (llmkit/layers/sparse.py): blocked, never a dense (T, T) mask
            from llmkit.layers.sparse import attend_local

            y = attend_local(q, k, v, local, impl=self.impl, scale=self.scale, dropout=dropout)
        else:
            y = attend(q, k, v, causal=causal, mask=mask, bias=bias, impl=self.impl, scale=self.scale,
                       dropout=dropout, probe=self.probe)
        if global_queries is not None:  # Longformer's global rows, through the global projections
            y = global_queries.attend(y, x, self.global_proj, scale=self.scale, impl=self.impl, dropout=dropout)
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, C)
        # (dropout only where it does something: decoding runs this ~30 times a token)
        return self.resid_dropout(y) if self.training and self.dropout else y

    def project_qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries (B, H, T, D), keys and values (B, Hkv, T, D) of x, RoPE applied to q and k."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
            k, v = self.project_kv(x)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            return q, k, v
        qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)
        qk, v = qkv[:, :H + Hkv], qkv[:, H + Hkv:]
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        if rope is not None:  # one rotation for the query and key heads together
            qk = apply_rope(qk, *rope)
        return qk[:, :H], qk[:, H:], v

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, Hkv, T, D) of x (B, T, C)."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v


def set_attention_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every Attention layer of `model` to "reference" or "sdpa" (returns the model)."""
    assert impl in ("reference", "sdpa"), f"unknown attention impl {impl}"
    for module in model.modules():
        if isinstance(module, Attention):
            module.impl = impl
    return model
