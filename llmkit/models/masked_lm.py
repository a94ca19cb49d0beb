"""Encoder-only model (BERT, RoBERTa, ALBERT, DeBERTa): embeddings → bidirectional Stack → heads.

`model(input_ids, attention_mask=None, token_type_ids=None)` returns masked-LM logits (B, T, vocab),
as transformers' BertForMaskedLM does; `model.hidden_states(...)` returns the encoder's last hidden
states (B, T, d_model) for embeddings. The MLM head is BERT's: dense → activation → LayerNorm →
a decoder tied to the token embedding, plus its own bias. A config with `num_labels > 0` also has a
sequence-classification head over mean-pooled hidden states (`model.classify(...)`).

`attention_mask` marks real tokens (1) and padding (0); padding is usually on the right. Positions
are 0..T-1 whatever the padding, as in BERT, so a right-padded text sees exactly the positions it
would see alone.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.models.build import init_normal
from llmkit.errors import ConfigError
from llmkit.layers.feedforward import ACTIVATIONS
from llmkit.layers.linear import Linear
from llmkit.layers.norm import build_norm
from llmkit.models.transformer import Embeddings, Stack


class MLMTransform(nn.Module):
    """BERT's prediction-head transform: dense (d_model → embed width), activation, LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = Linear(cfg.d_model, cfg.embedding_dim, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.mlp]
        self.norm = build_norm(cfg.norm, cfg.embedding_dim, eps=cfg.norm_eps, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.act(self.dense(x)))


class MaskedLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.arch == "encoder", f"MaskedLM needs arch='encoder', got {cfg.arch!r}"
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.stack = Stack(cfg, causal=False)
        if cfg.mlm_head:
            self.head_transform = MLMTransform(cfg)
            self.lm_head = Linear(cfg.embedding_dim, cfg.vocab_size, bias=True)
        if cfg.num_labels:
            self.classifier_dropout = nn.Dropout(cfg.dropout)
            self.classifier = Linear(cfg.d_model, cfg.num_labels, bias=True)
        self.apply(partial(init_normal, std=cfg.init_std))
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings and self.cfg.mlm_head:
            self.lm_head.weight = self.embeddings.embed.weight

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:
        """The last layer's hidden states (B, T, d_model)."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len and self.cfg.learned_positions:
            raise ConfigError(f"input of {T} tokens is longer than the model's context ({self.cfg.max_seq_len})")
        if attention_mask is not None:
            assert attention_mask.shape == (B, T), "attention_mask must be (B, T)"
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embeddings(input_ids, positions, token_type_ids)
        return self.stack(x, positions, key_mask=attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """Masked-LM logits (B, T, vocab)."""
        if not self.cfg.mlm_head:
            raise ConfigError("this encoder has no masked-LM head (a bare BertModel, e.g. a sentence-embedding "
                              "model); use model.hidden_states(...) or llmkit.embed")
        h = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return self.lm_head(self.head_transform(h))

    def classify(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None) -> Tensor:
        """Sequence-classification logits (B, num_labels) from the mean of the real tokens' states."""
        if not self.cfg.num_labels:
            raise ConfigError("this encoder has no classification head (ModelConfig.num_labels is 0)")
        pooled = mean_pool(self.hidden_states(input_ids, attention_mask, token_type_ids), attention_mask)
        return self.classifier(self.classifier_dropout(pooled))


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, T, C) → (B, C): the mean over real tokens (Sentence-BERT's pooling), padding excluded."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = (attention_mask > 0).to(hidden.dtype).unsqueeze(-1)  # (B, T, 1); a global token (2) counts once
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def sentence_embeddings(model: MaskedLM, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                        normalize: bool = True) -> Tensor:
    """Pooled sentence embeddings (B, d_model): mean pooling, then optional L2 normalisation so that a
    dot product is the cosine similarity."""
    pooled = mean_pool(model.hidden_states(input_ids, attention_mask), attention_mask)
    return F.normalize(pooled, p=2, dim=-1) if normalize else pooled
