"""DeBERTa's disentangled attention (He et al. 2020, arXiv 2006.03654, §3.1; v2's log buckets, §A).

A token is its content and, separately, its relative position. Beside the content·content score,
query i also scores the embedding of its distance to key j (content→position, "c2p") and key j
scores the embedding of that distance from i's side (position→content, "p2c"):

    score(i, j) = (q_i·k_j + q_i·P^k_δ(i,j) + k_j·P^q_δ(i,j)) / √(D·terms)

where δ(i, j) is the bucket of i - j and P^k, P^q project one shared table of relative embeddings
through each layer's key and query projections (or separate ones). The two extra terms reach
`attend` as an additive bias, so the one attention kernel (reference or fused) does the rest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.layers.linear import Linear
from llmkit.layers.norm import build_norm


def log_bucket(distance: Tensor, *, buckets: int, max_distance: int) -> Tensor:
    """DeBERTa v2's bucket of each signed distance (long, any shape): itself within ±buckets/2, then
    logarithmic, so that ±(max_distance - 1) lands on ±(buckets - 1); the sign is kept.

    The float steps follow DeBERTa's own order (fp32 log of |d|/half over the fp32 log of the span, then
    ceil), since a different rounding moves a distance that falls on a bucket edge to the next bucket.
    """
    half = buckets // 2
    magnitude = distance.abs()
    safe = torch.where(magnitude > half, magnitude, torch.full_like(magnitude, half))  # no log(0) in masked-out lanes
    span = torch.log(torch.tensor((max_distance - 1) / half))
    far = torch.ceil(torch.log(safe / half) / span * (half - 1)) + half
    return torch.where(magnitude <= half, distance, far.long() * distance.sign())


def relative_index(q_index: Tensor, k_index: Tensor, cfg: ModelConfig) -> Tensor:
    """(Tq, Tk) row of the relative table for each query/key pair: bucket(i - j) + span, clipped."""
    distance = q_index[:, None] - k_index[None, :]  # query minus key, as DeBERTa defines it
    if cfg.relative_buckets:
        distance = log_bucket(distance, buckets=cfg.relative_buckets, max_distance=cfg.relative_max_distance)
    span = cfg.relative_span
    return (distance + span).clamp(0, 2 * span - 1)


class RelativeEmbeddings(nn.Module):
    """The table of 2·span relative-position embeddings that every layer shares, with its LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.table = nn.Embedding(2 * cfg.relative_span, cfg.d_model)
        self.norm = (build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
                     if cfg.relative_embed_norm else None)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, q_index: Tensor, k_index: Tensor) -> tuple[Tensor, Tensor]:
        """(the embeddings (2·span, C), the (Tq, Tk) index into them), once per forward."""
        table = self.table.weight if self.norm is None else self.norm(self.table.weight)
        return self.dropout(table), relative_index(q_index, k_index, self.cfg)


class DisentangledScores(nn.Module):
    """The c2p and p2c score terms of one attention layer, and its own position projections when the
    layer does not share its query/key projections with the positions."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c2p, self.p2c = cfg.content_to_position, cfg.position_to_content
        # every term is a sum of D products: dividing by √(D·terms) keeps the total's variance that of one
        self.scale = 1.0 / math.sqrt(cfg.head_dim * (1 + self.c2p + self.p2c))
        out = cfg.n_heads * cfg.head_dim
        separate = not cfg.share_position_projections
        self.pos_k_proj = Linear(cfg.d_model, out, bias=cfg.qkv_bias) if separate and self.c2p else None
        self.pos_q_proj = Linear(cfg.d_model, out, bias=cfg.qkv_bias) if separate and self.p2c else None

    def heads(self, x: Tensor) -> Tensor:
        """(2S, h·D) → (H, 2S, D); GQA's h key heads each serve H/h query heads, as in attend."""
        x = x.view(x.shape[0], -1, self.head_dim).transpose(0, 1)
        return x.repeat_interleave(self.n_heads // x.shape[0], dim=0) if x.shape[0] != self.n_heads else x

    def forward(self, q: Tensor, k: Tensor, relative: Tensor, index: Tensor, *, q_proj: nn.Module,
                k_proj: nn.Module) -> Tensor:
        """q (B, H, Tq, D), k (B, Hkv, Tk, D), relative (2S, C), index (Tq, Tk) → scores (B, H, Tq, Tk),
        already scaled. `q_proj`/`k_proj` are the layer's, used for positions when shared."""
        B, H, Tq, Tk = q.shape[0], self.n_heads, q.shape[2], k.shape[2]
        relative = relative.to(q.dtype)
        scores = None
        if self.c2p:  # query i against the key-projected embedding of distance δ(i, j)
            proj = self.pos_k_proj if self.pos_k_proj is not None else k_proj
            c2p = q @ self.heads(proj(relative)).transpose(-1, -2)  # (B, H, Tq, 2S): every query, every distance
            scores = c2p.gather(-1, index.expand(B, H, Tq, Tk))
        if self.p2c:  # key j against the query-projected embedding of the same distance δ(i, j)
            proj = self.pos_q_proj if self.pos_q_proj is not None else q_proj
            if k.shape[1] != H:  # GQA: each key head serves H/Hkv query heads
                k = k.repeat_interleave(H // k.shape[1], dim=1)
            p2c = k @ self.heads(proj(relative)).transpose(-1, -2)  # (B, H, Tk, 2S)
            p2c = p2c.gather(-1, index.t().expand(B, H, Tk, Tq)).transpose(-1, -2)  # (B, H, Tq, Tk)
            scores = p2c if scores is None else scores + p2c
        if scores is None:  # neither term: the relative table is unused
            return torch.zeros(B, H, Tq, Tk, dtype=q.dtype, device=q.device)
        return scores * self.scale


CONV_ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
                    "relu": F.relu}


class FirstLayerConv(nn.Module):
    """DeBERTa v2's convolution (xlarge, xxlarge): a width-k convolution over the embedding output, its
    activation added to the first layer's output, then a LayerNorm; local n-gram features beside
    attention. Padded positions are zeroed on the way in, as DeBERTa's embeddings are, so a real token
    next to padding sees the zeros it would see at the end of an unpadded text."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        k = cfg.conv_kernel
        self.conv = nn.Conv1d(cfg.d_model, cfg.d_model, k, padding=(k - 1) // 2, bias=cfg.bias)
        self.act = CONV_ACTIVATIONS[cfg.conv_activation]
        self.norm = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, embedded: Tensor, first: Tensor, key_mask: Tensor | None) -> Tensor:
        """embedded, first (B, T, C): the stack's input and its first layer's output → (B, T, C)."""
        real = key_mask[..., None].to(embedded.dtype) if key_mask is not None else None  # (B, T, 1)
        if real is not None:
            embedded = embedded * real
        out = self.conv(embedded.transpose(1, 2)).transpose(1, 2)  # (B, C, T) for Conv1d, back to (B, T, C)
        if real is not None:
            out = out * real
        return self.norm(first + self.act(self.dropout(out)))
