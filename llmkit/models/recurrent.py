"""The linear-time bodies of a causal LM (`cfg.body` "rwkv" or "mamba"): pre-norm residual blocks
around the mixers of llmkit/layers/recurrent.py, and the final norm.

They take the place of the Transformer `Stack` inside `CausalLM` (same embeddings, same LM head,
same training and generation loops); instead of a KV cache they read and update a `StateCache`
whose size does not depend on the sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.inference.state_cache import StateCache
from llmkit.layers.norm import build_norm
from llmkit.layers.recurrent import (MambaMixer, RWKVChannelMix, RWKVTimeMix, mamba_state_shapes,
                                     rwkv_state_shapes)


class RWKVBlock(nn.Module):
    """x + time_mix(norm1(x)), then x + channel_mix(norm2(x))."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm1 = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.time_mix = RWKVTimeMix(cfg, layer)
        self.norm2 = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.channel_mix = RWKVChannelMix(cfg, layer)

    def forward(self, x: Tensor, state: dict[str, Tensor] | None, mask: Tensor | None) -> Tensor:
        x = x + self.time_mix(self.norm1(x), state, mask)
        return x + self.channel_mix(self.norm2(x), state, mask)


class MambaBlock(nn.Module):
    """x + mixer(norm(x)): Mamba has no separate MLP; the mixer's gate and expansion play its part."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
        self.mixer = MambaMixer(cfg)

    def forward(self, x: Tensor, state: dict[str, Tensor] | None, mask: Tensor | None) -> Tensor:
        return x + self.mixer(self.norm(x), state, mask)


class RecurrentStack(nn.Module):
    """N RWKV or Mamba blocks and the final norm. RWKV-4 also normalises the embeddings first."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        block = RWKVBlock if cfg.body == "rwkv" else MambaBlock
        self.input_norm = (build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)
                           if cfg.body == "rwkv" else nn.Identity())
        self.blocks = nn.ModuleList(block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = build_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)

    def reset_recurrent_parameters(self) -> None:
        """The mixers' own initialisation (decays, mixes, A, Δ), applied after the generic one."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_recurrent_parameters"):
                module.reset_recurrent_parameters()

    def forward(self, x: Tensor, *, mask: Tensor | None = None, cache: StateCache | None = None) -> Tensor:
        x = self.input_norm(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache.layer(i) if cache is not None else None, mask)
        return self.final_norm(x)

    def new_state(self, batch: int, *, device: torch.device | str = "cpu") -> StateCache:
        shapes = rwkv_state_shapes(self.cfg) if self.cfg.body == "rwkv" else mamba_state_shapes(self.cfg)
        return StateCache(shapes, self.cfg.n_layers, batch, device=device)
