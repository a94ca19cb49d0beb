"""Decoder-only language model (GPT-2, LLaMA; RWKV, Mamba): embeddings → causal Stack → LM head.

`cfg.body` picks what sits between embeddings and head: the Transformer Stack, or a linear-time
RecurrentStack (models/recurrent.py) whose decoding state is a fixed-size StateCache.

`model(input_ids)` returns logits (B, T, vocab). For generation, pass a KVCache (`cache=`); the
model advances `cache.pos` after the layer loop. `attention_mask` (B, T_total) marks real tokens
(1) and left padding (0) for batches of prompts with different lengths.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.models.build import init_normal
from llmkit.inference.kv_cache import KVCache
from llmkit.layers.linear import Linear
from llmkit.models.transformer import Embeddings, Stack


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        if cfg.body == "transformer":
            self.stack = Stack(cfg, causal=True)
        else:
            from llmkit.models.recurrent import RecurrentStack

            self.stack = RecurrentStack(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.apply(partial(init_normal, std=cfg.init_std))
        # GPT-2's scaled init: residual projections shrink with depth so the stream's variance stays put.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
                if cfg.zero_init_residual:
                    nn.init.zeros_(p)
        if cfg.body != "transformer":
            self.stack.reset_recurrent_parameters()

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embeddings.embed.weight

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None,
                positions: Tensor | None = None, cache=None, last_only: bool = False) -> Tensor:
        """Logits (B, T, vocab); with `last_only`, (B, 1, vocab) for the last position only — all a
        generation step reads, and the vocabulary projection of a long prompt is not cheap."""
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask, positions=positions, cache=cache)
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)
        if self.cfg.logit_softcap:
            cap = self.cfg.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def hidden_states(self, input_ids: Tensor, *, attention_mask: Tensor | None = None,
                      positions: Tensor | None = None, cache=None) -> Tensor:
        B, T = input_ids.shape
        offset = cache.pos if cache is not None else 0
        if self.cfg.body != "transformer":
            return self._recurrent_hidden_states(input_ids, attention_mask, cache)
        if attention_mask is not None:
            assert attention_mask.shape == (B, offset + T), "attention_mask must cover cached and new tokens"
        if positions is None:
            positions = default_positions(B, T, offset, attention_mask, input_ids.device)
        assert int(positions.max()) < self.cfg.max_seq_len or self.cfg.position in ("rope", "alibi", "none"), \
            f"position {int(positions.max())} is past max_seq_len={self.cfg.max_seq_len}"
        x = self.embeddings(input_ids, positions)
        x = self.stack(x, positions, key_mask=attention_mask, cache=cache)
        if cache is not None:
            cache.advance(T)
        return x

    def _recurrent_hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None, cache) -> Tensor:
        """RWKV / Mamba: no positions (the recurrence orders tokens); of the mask only the new tokens'
        columns matter, since the past lives in the state."""
        T = input_ids.shape[1]
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        x = self.stack(self.embeddings(input_ids, None), mask=mask, cache=cache)
        if cache is not None:
            cache.advance(T)
        return x

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype, device):
        """The decoding state generation threads through the model: a KV cache for attention, a
        fixed-size StateCache (float32, any `max_len`) for RWKV and Mamba."""
        if self.cfg.body != "transformer":
            return self.stack.new_state(batch, device=device)
        # `kv_cache = "int8"` (set by `--kv-cache int8`): int8 keys and values, a scale per head and position
        return KVCache.empty(self.cfg, batch, max_len, dtype=dtype, device=device,
                             int8=getattr(self, "kv_cache", "full") == "int8")


def default_positions(B: int, T: int, offset: int, attention_mask: Tensor | None, device) -> Tensor:
    """Positions (B, T): offset..offset+T-1, or, with left padding, counted from each row's first
    real token so a padded prompt sees exactly the positions it would see alone."""
    if attention_mask is None:
        return torch.arange(offset, offset + T, device=device).expand(B, T)
    counted = attention_mask.long().cumsum(-1) - 1
    return counted[:, offset:].clamp(min=0)
