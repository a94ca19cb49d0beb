"""Hugging Face BigBird (`model_type: big_bird`; transformers' BigBirdModel, BigBirdForMaskedLM).

BigBird (Zaheer et al. 2020, arXiv 2007.14062) is BERT (same weight names, under `bert.`) with
block-sparse attention in blocks of block_size: each query block sees its own and the neighbouring block
on each side, the first and the last block (global: they see, and are seen by, every token) and
num_random_blocks random blocks. In llmkit that is attention_pattern="bigbird" with attention_window =
2 · block_size, attention_global_tokens = block_size, attention_global_last_block (the block holding the
last token: transformers pads to whole blocks) and attention_dense_up_to = (5 + 2 · num_random_blocks) ·
block_size, the length up to which transformers falls back to full attention. `attention_type:
original_full` is plain BERT attention.

Where llmkit cannot equal transformers: the random blocks. In eval mode transformers draws none: its
random-block table is all zeros, so each query block re-reads the first block num_random_blocks more
times (the first block's keys weigh 1 + num_random_blocks in the softmax); in training mode it draws them
per head and per layer from numpy's global generator. llmkit's pattern is one boolean rule shared by
every head and layer, with real random blocks (`random_blocks`, seeded): it equals transformers exactly
with num_random_blocks = 0, and for num_random_blocks > 0 keeps the paper's meaning instead.
"""

from __future__ import annotations

from typing import Any

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, ModelFormatError
from llmkit.io.hf_config import MAX_POSITIONS, _value
from llmkit.io.hf_encoder import BERT

BIGBIRD = BERT  # BigBird's weight names are BERT's (the MLM head too); block-sparse attention adds none


def bigbird_config_from_hf(data: dict, where: str, *, mlm_head: bool) -> ModelConfig:
    """Translate a BigBird config.json: BERT's fields (checked there), then the attention pattern."""
    from llmkit.io.hf_encoder import encoder_config_from_hf

    kind = _value(data, "attention_type", where, str, default="block_sparse")
    if kind not in ("block_sparse", "original_full"):
        raise ModelFormatError(f"{where}: attention_type {kind!r} is not supported (block_sparse or original_full)")
    if data.get("rescale_embeddings", False) not in (False, None):
        raise ModelFormatError(f"{where}: rescale_embeddings={data['rescale_embeddings']!r} is not supported "
                               "(llmkit needs False)")
    bert = encoder_config_from_hf({**data, "model_type": "bert", "hidden_act": data.get("hidden_act", "gelu_new")},
                                  where, mlm_head=mlm_head)
    fields: dict[str, Any] = dict(qkv_bias=_value(data, "use_bias", where, bool, default=True))
    if kind == "block_sparse":
        size = _value(data, "block_size", where, int, default=64, lo=1, hi=MAX_POSITIONS)
        randoms = _value(data, "num_random_blocks", where, int, default=3, lo=0, hi=1 << 16)
        fields.update(attention_pattern="bigbird", attention_block_size=size, attention_window=2 * size,
                      attention_global_tokens=size, attention_global_last_block=True,
                      attention_random_blocks=randoms, attention_dense_up_to=(5 + 2 * randoms) * size)
    try:
        return bert.replace(**fields)
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def bigbird_config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json for transformers' BigBird (block_sparse): BERT's (checked there) with the blocks; the
    pattern must be BigBird's own (see the module docstring)."""
    from llmkit.io.hf_encoder import encoder_config_to_hf

    size, randoms = cfg.attention_block_size, cfg.attention_random_blocks
    wants = dict(attention_window=2 * size, attention_global_tokens=size, attention_global_last_block=True,
                 attention_dense_up_to=(5 + 2 * randoms) * size, position_offset=0)
    for name, wanted in wants.items():
        if getattr(cfg, name) != wanted:
            raise ModelFormatError(f"cannot export to Hugging Face big_bird: {name}={getattr(cfg, name)!r} "
                                   f"(it needs {wanted!r})")
    base = cfg.replace(attention_pattern="full", attention_window=None, attention_global_tokens=0,
                       attention_global_last_block=False, attention_random_blocks=0, attention_dense_up_to=0,
                       qkv_bias=True)
    out = encoder_config_to_hf(base, dtype=dtype)
    del out["position_embedding_type"]
    return {**out, "architectures": ["BigBirdForMaskedLM" if cfg.mlm_head else "BigBirdModel"],
            "model_type": "big_bird", "attention_type": "block_sparse", "block_size": size,
            "num_random_blocks": randoms, "use_bias": cfg.qkv_bias, "rescale_embeddings": False}
