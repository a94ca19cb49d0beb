"""One entry point from a ModelConfig to its module: `cfg.arch` picks which stacks exist."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from llmkit.config import ModelConfig
from llmkit.memory import LOAD_BYTES_PER_PARAM, require_model_memory


def build_model(cfg: ModelConfig) -> nn.Module:
    """A freshly initialised model for `cfg` (decoder-only, encoder-only or encoder-decoder)."""
    require_model_memory(cfg, bytes_per_param=LOAD_BYTES_PER_PARAM)  # one line, not an allocator abort
    if cfg.arch == "encoder":
        from llmkit.models.masked_lm import MaskedLM

        return MaskedLM(cfg)
    if cfg.arch == "encoder-decoder":
        from llmkit.models.seq2seq import Seq2SeqLM

        return Seq2SeqLM(cfg)
    from llmkit.models.causal_lm import CausalLM

    return CausalLM(cfg)


def init_normal(module: nn.Module, *, std: float) -> None:
    """GPT-2/BERT/T5-style init for `model.apply`: N(0, std) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def tie_weights(model: nn.Module) -> nn.Module:
    """Re-share tied parameters after loading (safetensors stores a tied tensor once)."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "zeros_", "ones_", "constant_")


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Build modules without random initialisation, for weights that are loaded right after.

    Random init is most of the time of loading a small model (SmolLM2-135M: 3.5 s of 7.7 s on 2 cores),
    all of it thrown away. Inside this block torch.nn.init's fillers do nothing, so parameters hold
    uninitialised memory: only use it where a strict loader then fills every parameter (ours refuse
    missing tensors). Buffers computed from the config (RoPE, ALiBi, sinusoids) are unaffected.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)
