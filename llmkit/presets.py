"""Named model presets: plain dicts of ModelConfig fields, one family's defaults spread into each size.

A preset selects field values, never a code path. `preset(name, **overrides)` builds the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmkit.errors import ConfigError

if TYPE_CHECKING:
    from llmkit.config import ModelConfig

_GPT2 = dict(mlp="gelu_tanh", norm="layernorm", position="learned", bias=True, tie_embeddings=True)
# GPT-1 (openai-gpt): GPT-2's layers in the original Transformer's post-norm order, so no final norm.
_GPT1 = dict(_GPT2, norm_position="post")
_BERT = dict(arch="encoder", mlp="gelu", norm="layernorm", norm_position="post", norm_eps=1e-12, position="learned",
             bias=True, tie_embeddings=True, type_vocab_size=2, embed_norm=True)
# DeBERTa v3: BERT's post-norm encoder without absolute positions or token types; attention adds
# content→position and position→content terms over log-bucketed relative distances (256 buckets each
# side reaching 512), one shared relative table with its LayerNorm (layers/disentangled.py).
_DEBERTA = dict(_BERT, norm_eps=1e-7, type_vocab_size=0, position="disentangled", relative_buckets=256,
                relative_max_distance=512)
# Encoder-decoders. T5 v1.0: pre-norm RMSNorm, no biases, ReLU MLP, relative position bias, unscaled
# attention, tied head with the d^-0.5 rescale; v1.1 (Flan-T5): gated-GELU and an untied head. BART:
# post-norm LayerNorm with the embedding LayerNorm, learned positions offset by 2, GELU, logits bias.
_T5 = dict(arch="encoder-decoder", mlp="relu", norm="rmsnorm", norm_position="pre", norm_eps=1e-6,
           position="relative", bias=False, tie_embeddings=True, scale_attention=False, rescale_head=True,
           decoder_start_token_id=0)
_T5V11 = dict(_T5, mlp="geglu", tie_embeddings=False, rescale_head=False)
_BART = dict(arch="encoder-decoder", mlp="gelu", norm="layernorm", norm_position="post", norm_eps=1e-5,
             position="learned", position_offset=2, embed_norm=True, bias=True, tie_embeddings=True,
             final_logits_bias=True, decoder_start_token_id=2)
_LLAMA = dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False, tie_embeddings=False, norm_eps=1e-6)

# Linear-time bodies: no position scheme (the recurrence orders tokens). RWKV-4 as transformers'
# RwkvForCausalLM (LayerNorms, untied head); Mamba as MambaForCausalLM (RMSNorm, no projection biases).
# n_heads is unused by them (1 keeps the head checks trivially true).
_RWKV = dict(body="rwkv", position="none", norm="layernorm", bias=True, tie_embeddings=False, n_heads=1)
_MAMBA = dict(body="mamba", position="none", norm="rmsnorm", bias=False, tie_embeddings=True, n_heads=1)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny sizes for tests: a second or two to build and run
    "gpt2-tiny": dict(_GPT2, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "gpt1-tiny": dict(_GPT1, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "llama-tiny": dict(_LLAMA, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128),
    # the embedded demo's model: sized to learn the most in ~4 minutes on 2 CPU cores
    "gpt2-demo": dict(_GPT2, d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    "llama-demo": dict(_LLAMA, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # the benchmark's config (6 layers, 6 heads, width 384, context 256)
    "gpt2-mini": dict(_GPT2, d_model=384, n_layers=6, n_heads=6, max_seq_len=256),
    "llama-mini": dict(_LLAMA, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=256),
    # encoder-only (BERT family): tiny for tests, demo for `llmkit train --arch bert` on a CPU
    "bert-tiny": dict(_BERT, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "roberta-tiny": dict(_BERT, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, type_vocab_size=1,
                         position_offset=2, norm_eps=1e-5),
    "albert-tiny": dict(_BERT, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, embed_dim=32,
                        share_layers=True, mlp="gelu_tanh"),
    "bert-demo": dict(_BERT, d_model=256, n_layers=4, n_heads=4, max_seq_len=128),
    "deberta-tiny": dict(_DEBERTA, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, relative_buckets=16,
                         relative_max_distance=64),
    # encoder-decoder (T5, BART): tiny for tests, demo for `llmkit train --arch t5|bart` on a CPU
    "t5-tiny": dict(_T5, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "t5v11-tiny": dict(_T5V11, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "bart-tiny": dict(_BART, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "t5-demo": dict(_T5, d_model=128, n_layers=3, n_heads=4, max_seq_len=128),
    "t5v11-demo": dict(_T5V11, d_model=128, n_layers=3, n_heads=4, max_seq_len=128),
    "bart-demo": dict(_BART, d_model=128, n_layers=3, n_heads=4, max_seq_len=128),
    # linear-time bodies: tiny for tests; demo sized to llama-demo's 7.15 M parameters (same untied
    # 8192×256 embeddings; a Mamba block has about half a Transformer block's weights, so 7 of them)
    "rwkv-tiny": dict(_RWKV, d_model=64, n_layers=2, max_seq_len=128),
    "mamba-tiny": dict(_MAMBA, d_model=64, n_layers=2, max_seq_len=128),
    "rwkv-demo": dict(_RWKV, d_model=256, n_layers=4, d_ff=768, max_seq_len=256),
    "mamba-demo": dict(_MAMBA, d_model=256, n_layers=7, max_seq_len=256, tie_embeddings=False),
    # the published shapes
    "gpt1": dict(_GPT1, d_model=768, n_layers=12, n_heads=12, max_seq_len=512, vocab_size=40478),
    "gpt2-small": dict(_GPT2, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, vocab_size=50257),
    "gpt2-medium": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024, vocab_size=50257),
    "deberta-v3-base": dict(_DEBERTA, d_model=768, n_layers=12, n_heads=12, max_seq_len=512, vocab_size=128100),
    "llama-1b": dict(_LLAMA, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                     max_seq_len=2048, vocab_size=32000, rope_theta=500000.0),
}


def preset(name: str, **overrides: Any) -> "ModelConfig":
    """Build a ModelConfig from a named preset, with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    from llmkit.config import ModelConfig  # imported here: config.py re-exports this module

    return ModelConfig.from_dict({**PRESETS[name], **overrides}, where=f"preset {name}")
