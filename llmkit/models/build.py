"""One entry point from a ModelConfig to its module: `cfg.arch` picks which stacks exist."""

from __future__ import annotations

from torch import nn

from llmkit.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model for `cfg` (decoder-only, encoder-only or encoder-decoder)."""
    if cfg.arch == "encoder":
        from llmkit.models.masked_lm import MaskedLM

        return MaskedLM(cfg)
    if cfg.arch == "encoder-decoder":
        from llmkit.models.seq2seq import Seq2SeqLM

        return Seq2SeqLM(cfg)
    from llmkit.models.causal_lm import CausalLM

    return CausalLM(cfg)


def tie_weights(model: nn.Module) -> nn.Module:
    """Re-share tied parameters after loading (safetensors stores a tied tensor once)."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
