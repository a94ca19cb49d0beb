"""Hugging Face Longformer (`model_type: longformer`; transformers' LongformerModel, LongformerForMaskedLM).

Longformer (Beltagy et al. 2020, arXiv 2004.05150) is RoBERTa with sparse self-attention: each token sees
the tokens at most attention_window / 2 positions away on each side, and global tokens — those the input
marks (`global_attention_mask`, or 2 in `attention_mask`) — see, and are seen by, every token. Global
queries, and the keys and values they read, go through their own projections (query_global, key_global,
value_global); the other tokens read global keys through the ordinary ones. In llmkit that is
attention_pattern="longformer" with attention_window = attention_window / 2 + 1 (llmkit counts the keys
fewer than W positions away), no fixed global tokens (the mask chooses them) and
attention_global_projections; loading and export go through hf_encoder, like RoBERTa's. transformers pads
each input to a multiple of attention_window, which changes nothing for the real tokens, so llmkit does not.
"""

from __future__ import annotations

from typing import Any

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, ModelFormatError
from llmkit.io.hf_config import MAX_POSITIONS
from llmkit.io.hf_encoder import ROBERTA, EncoderFamily

_GLOBAL = tuple((f"encoder.layer.{{}}.attention.self.{hf}_global.{{}}",
                 f"stack.blocks.{{}}.attn.global_proj.{ours}.{{}}")
                for hf, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")))
LONGFORMER = EncoderFamily("longformer.", "lm_head.", (*ROBERTA.names, *_GLOBAL), ROBERTA.ignored)


def attention_window(data: dict, where: str) -> int:
    """transformers' attention_window (one even value, or one per layer) as llmkit's window."""
    value = data.get("attention_window", 512)
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 2 or v > MAX_POSITIONS
                         for v in values):
        raise ModelFormatError(f"{where}: attention_window={value!r} must be a positive even integer per layer")
    if len(set(values)) != 1:
        raise ModelFormatError(f"{where}: attention_window={value!r} differs by layer (llmkit has one window)")
    return values[0] // 2 + 1


def longformer_config_from_hf(data: dict, where: str, *, mlm_head: bool) -> ModelConfig:
    """Translate a Longformer config.json: RoBERTa's fields (checked there), then the attention pattern."""
    from llmkit.io.hf_encoder import encoder_config_from_hf

    window = attention_window(data, where)
    if data.get("onnx_export", False) not in (False, None):
        raise ModelFormatError(f"{where}: onnx_export={data['onnx_export']!r} is not supported (llmkit needs False)")
    roberta = encoder_config_from_hf({**data, "model_type": "roberta"}, where, mlm_head=mlm_head)
    try:
        return roberta.replace(attention_pattern="longformer", attention_window=window,
                               attention_global_projections=True)
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def longformer_config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json for transformers' Longformer: RoBERTa's (checked there) with the window; the pattern
    must be Longformer's own (global projections, globals from the mask, window ≥ 2)."""
    from llmkit.io.hf_encoder import encoder_config_to_hf

    wants = dict(attention_global_projections=True, attention_global_tokens=0)
    for name, wanted in wants.items():
        if getattr(cfg, name) != wanted:
            raise ModelFormatError(f"cannot export to Hugging Face longformer: {name}={getattr(cfg, name)!r} "
                                   f"(it needs {wanted!r})")
    if cfg.attention_window < 2 or not cfg.position_offset:
        raise ModelFormatError(f"cannot export to Hugging Face longformer: attention_window={cfg.attention_window} "
                               f"and position_offset={cfg.position_offset} (it needs ≥ 2 and ≥ 1)")
    base = cfg.replace(attention_pattern="full", attention_window=None, attention_global_projections=False)
    out = encoder_config_to_hf(base, dtype=dtype)
    head = "LongformerForMaskedLM" if cfg.mlm_head else "LongformerModel"
    del out["position_embedding_type"]
    return {**out, "architectures": [head], "model_type": "longformer",
            "attention_window": 2 * (cfg.attention_window - 1)}
