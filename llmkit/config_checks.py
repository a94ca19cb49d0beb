"""ModelConfig's checks by family (encoders, DeBERTa's positions, encoder-decoders, attention patterns,
recurrent bodies, RoPE scaling), and the derived values they fill in: called by
`ModelConfig.__post_init__`, kept here so that config.py stays the map of fields."""

from __future__ import annotations

import math
from typing import Any

from llmkit.errors import ConfigError


def check_encoder_fields(cfg: Any) -> None:
    for name in ("type_vocab_size", "position_offset", "num_labels"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"ModelConfig.{name} must be >= 0, got {getattr(cfg, name)!r}")
    if cfg.embed_dim is not None and cfg.embed_dim <= 0:
        raise ConfigError(f"ModelConfig.embed_dim must be a positive integer or None, got {cfg.embed_dim!r}")
    if cfg.arch != "encoder" and (cfg.mlm_head is not True or cfg.num_labels):
        raise ConfigError(f"ModelConfig.mlm_head and num_labels need arch='encoder', got {cfg.arch!r}")
    if cfg.position_offset and cfg.position != "learned":
        raise ConfigError(f"ModelConfig.position_offset needs position='learned', got {cfg.position!r}")
    if cfg.conv_kernel and (cfg.arch != "encoder" or cfg.conv_kernel < 0 or cfg.conv_kernel % 2 == 0):
        raise ConfigError(f"ModelConfig.conv_kernel={cfg.conv_kernel} must be odd (0 = none) and needs "
                          f"arch='encoder' (the convolution sees both sides), got {cfg.arch!r}")
    if cfg.add_absolute_positions and cfg.position != "disentangled":
        raise ConfigError(f"ModelConfig.add_absolute_positions needs position='disentangled', got {cfg.position!r}")
    if cfg.position == "disentangled":
        check_disentangled(cfg)


def check_disentangled(cfg: Any) -> None:
    if cfg.arch == "encoder-decoder":  # one relative table per stack is not modelled (nor counted)
        raise ConfigError("ModelConfig.position='disentangled' needs arch='encoder' or 'decoder'")
    if cfg.relative_buckets and cfg.relative_max_distance <= cfg.relative_buckets // 2 + 1:
        # the log part spans (buckets/2, max_distance - 1]: it must not be empty
        raise ConfigError(f"ModelConfig.relative_max_distance={cfg.relative_max_distance} must exceed "
                          f"relative_buckets // 2 + 1 = {cfg.relative_buckets // 2 + 1}")


def check_seq2seq_fields(cfg: Any) -> None:
    if cfg.n_decoder_layers is not None and cfg.n_decoder_layers <= 0:
        raise ConfigError(f"ModelConfig.n_decoder_layers must be a positive integer or None, "
                          f"got {cfg.n_decoder_layers!r}")
    # the bidirectional half of the buckets must still hold an exact and a logarithmic part
    # (DeBERTa's relative_buckets=0 means no buckets: distances are clipped instead)
    if cfg.relative_buckets < 4 and not (cfg.position == "disentangled" and cfg.relative_buckets == 0):
        raise ConfigError(f"ModelConfig.relative_buckets must be >= 4, got {cfg.relative_buckets!r}")
    if cfg.relative_max_distance <= cfg.relative_buckets // 2:
        raise ConfigError(f"ModelConfig.relative_max_distance={cfg.relative_max_distance} must exceed "
                          f"relative_buckets // 2 = {cfg.relative_buckets // 2}")
    if not 0 <= cfg.decoder_start_token_id < cfg.vocab_size:
        raise ConfigError(f"ModelConfig.decoder_start_token_id={cfg.decoder_start_token_id} is not a token id "
                          f"(0..{cfg.vocab_size - 1})")
    if cfg.arch != "encoder-decoder" and (cfg.rescale_head or cfg.final_logits_bias):
        raise ConfigError(f"ModelConfig.rescale_head and final_logits_bias need arch='encoder-decoder', "
                          f"got {cfg.arch!r}")


def check_attention_pattern(cfg: Any) -> None:
    pattern, window = cfg.attention_pattern, cfg.attention_window
    for name in ("attention_global_tokens", "attention_random_blocks", "attention_seed", "attention_dense_up_to"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"ModelConfig.{name} must be >= 0, got {getattr(cfg, name)!r}")
    if cfg.attention_block_size <= 0:
        raise ConfigError(f"ModelConfig.attention_block_size must be > 0, got {cfg.attention_block_size!r}")
    if window is not None and window <= 0:
        raise ConfigError(f"ModelConfig.attention_window must be a positive integer or None, got {window!r}")
    for name, wanted in (("attention_global_projections", "longformer"), ("attention_global_last_block", "bigbird"),
                         ("attention_dense_up_to", "bigbird")):
        if getattr(cfg, name) and (pattern != wanted or cfg.arch != "encoder"):  # they read the whole sequence
            raise ConfigError(f"ModelConfig.{name} needs attention_pattern={wanted!r} and arch='encoder'")
    if pattern == "full":
        if window is not None or cfg.attention_global_tokens or cfg.attention_random_blocks:
            raise ConfigError("ModelConfig.attention_window/attention_global_tokens/attention_random_blocks "
                              "need attention_pattern='sliding_window', 'longformer' or 'bigbird'")
        return
    if cfg.body != "transformer":
        raise ConfigError(f"ModelConfig.attention_pattern={pattern!r} needs body='transformer', got {cfg.body!r}")
    if cfg.position in ("relative", "disentangled"):  # T5's and DeBERTa's terms are built on the dense path only
        raise ConfigError(f"ModelConfig.attention_pattern={pattern!r} does not support position={cfg.position!r}")
    if window is None:
        raise ConfigError(f"ModelConfig.attention_pattern={pattern!r} needs attention_window")
    if pattern == "sliding_window" and (cfg.attention_global_tokens or cfg.attention_random_blocks):
        raise ConfigError("ModelConfig.attention_pattern='sliding_window' takes no global tokens or random "
                          "blocks; use 'longformer' or 'bigbird'")
    # an encoder's globals may all come from its attention mask (2 = global, as transformers' Longformer)
    if pattern == "longformer" and ((not cfg.attention_global_tokens and cfg.arch != "encoder")
                                    or cfg.attention_random_blocks):
        raise ConfigError("ModelConfig.attention_pattern='longformer' needs attention_global_tokens >= 1 "
                          "(an encoder's may come from its attention mask) and no random blocks (use 'bigbird')")
    if pattern == "bigbird" and window % cfg.attention_block_size:
        raise ConfigError(f"ModelConfig.attention_window={window} must be a multiple of "
                          f"attention_block_size={cfg.attention_block_size} for 'bigbird'")


def check_recurrent_fields(cfg: Any) -> None:
    for name in ("ssm_state", "ssm_conv", "ssm_expand"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {getattr(cfg, name)!r}")
    for name in ("ssm_dt_rank", "rwkv_attention_dim"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise ConfigError(f"ModelConfig.{name} must be a positive integer or None, got {getattr(cfg, name)!r}")
    if cfg.body == "transformer":
        return
    if cfg.arch != "decoder":
        raise ConfigError(f"ModelConfig.body={cfg.body!r} needs arch='decoder', got {cfg.arch!r}")
    if cfg.position != "none":  # the recurrence itself orders the tokens
        raise ConfigError(f"ModelConfig.body={cfg.body!r} needs position='none', got {cfg.position!r}")
    if cfg.norm_position != "pre":
        raise ConfigError(f"ModelConfig.body={cfg.body!r} needs norm_position='pre', got {cfg.norm_position!r}")
    if cfg.body == "mamba" and cfg.ssm_dt_rank is None:
        object.__setattr__(cfg, "ssm_dt_rank", math.ceil(cfg.d_model / 16))
    if cfg.body == "rwkv" and cfg.rwkv_attention_dim is None:
        object.__setattr__(cfg, "rwkv_attention_dim", cfg.d_model)


def check_rope_scaling(cfg: Any) -> None:
    if cfg.position != "rope":
        raise ConfigError(f"ModelConfig.rope_scaling={cfg.rope_scaling!r} needs position='rope', "
                          f"got {cfg.position!r}")
    if cfg.rope_factor < 1:
        raise ConfigError(f"ModelConfig.rope_factor must be >= 1 with rope_scaling, got {cfg.rope_factor!r}")
    if cfg.rope_scaling == "dynamic" and cfg.head_dim <= 2:  # NTK's exponent D/(D-2)
        raise ConfigError(f"ModelConfig.head_dim={cfg.head_dim} must be > 2 for rope_scaling='dynamic'")
    if cfg.rope_scaling == "llama3" and cfg.rope_high_freq_factor <= cfg.rope_low_freq_factor:
        raise ConfigError(f"ModelConfig.rope_high_freq_factor={cfg.rope_high_freq_factor} must exceed "
                          f"rope_low_freq_factor={cfg.rope_low_freq_factor}")
    if cfg.rope_original_max_seq_len is None and cfg.rope_scaling != "linear":
        # transformers' default too: dynamic reads max_position_embeddings, yarn/llama3 fall back to it
        object.__setattr__(cfg, "rope_original_max_seq_len", cfg.max_seq_len)
