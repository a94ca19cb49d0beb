"""Hugging Face GPT-1 (`model_type: openai-gpt`, transformers' OpenAIGPTLMHeadModel) in and out.

GPT-1 (Radford et al. 2018) is GPT-2's layers in the original Transformer's order: post-norm blocks,
norm(x + attention(x)) then norm(x + MLP(x)), so no final norm; learned positions, no embedding
norm, a 4·d MLP with tanh-GELU (transformers' `afn: "gelu"` is the tanh approximation) and a head
tied to the token embedding. Its weights are GPT-2's Conv1D layout under other names, read and
written through hf_weights' checks like GPT-2's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, ModelFormatError
from llmkit.io.hf_config import MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH, _value
from llmkit.io.hf_weights import Family, plan_weights, read_weights
from llmkit.io.weights import load_model_tensors
from llmkit.models.build import skip_init
from llmkit.models.causal_lm import CausalLM

GPT1 = Family("transformer.", (
    ("tokens_embed.weight", "embeddings.embed.weight"), ("positions_embed.weight", "embeddings.pos_embed.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("h.{}.ln_1.{}", "stack.blocks.{}.norm1.{}"), ("h.{}.ln_2.{}", "stack.blocks.{}.norm2.{}"),
    ("h.{}.attn.c_attn.{}", "stack.blocks.{}.attn.qkv_proj.{}"),  # q/k/v fused, split by hf_weights
    ("h.{}.attn.c_proj.{}", "stack.blocks.{}.attn.o_proj.{}"),
    ("h.{}.mlp.c_fc.{}", "stack.blocks.{}.mlp.up_proj.{}"), ("h.{}.mlp.c_proj.{}", "stack.blocks.{}.mlp.down_proj.{}"),
), conv1d=r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")

# transformers' OpenAIGPT activations; its "gelu" is gelu_new, the tanh approximation. SiLU has no
# ungated MLP in llmkit.
ACTIVATIONS = {"gelu": "gelu_tanh", "relu": "relu"}


def gpt1_config_from_hf(data: dict, where: str) -> ModelConfig:
    d = _value(data, "n_embd", where, int, lo=1, hi=MAX_WIDTH)
    heads = _value(data, "n_head", where, int, lo=1, hi=d)
    if d % heads:
        raise ModelFormatError(f"{where}: n_embd={d} is not divisible by n_head={heads}")
    act = _value(data, "afn", where, str, default="gelu")
    if act not in ACTIVATIONS:
        raise ModelFormatError(f"{where}: afn {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    try:
        return ModelConfig(
            vocab_size=_value(data, "vocab_size", where, int, lo=1, hi=MAX_WIDTH),
            max_seq_len=_value(data, "n_positions", where, int, default=512, lo=1, hi=MAX_POSITIONS),
            d_model=d, n_layers=_value(data, "n_layer", where, int, lo=1, hi=MAX_LAYERS), n_heads=heads,
            d_ff=4 * d, mlp=ACTIVATIONS[act], norm="layernorm", norm_position="post", position="learned",
            norm_eps=_value(data, "layer_norm_epsilon", where, float, default=1e-5, lo=1e-30), bias=True,
            qkv_bias=True, tie_embeddings=_value(data, "tie_word_embeddings", where, bool, default=True), dropout=0.0)
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def gpt1_config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json for OpenAIGPTLMHeadModel; a one-line error naming the first field that does not fit."""
    wants = dict(norm="layernorm", norm_position="post", position="learned", bias=True, qkv_bias=True,
                 n_kv_heads=cfg.n_heads, d_ff=4 * cfg.d_model, embed_norm=False, attention_pattern="full",
                 qk_norm=False, logit_softcap=0.0)
    if cfg.mlp not in ("gelu_tanh", "relu"):
        wants["mlp"] = "gelu_tanh"
    for name, wanted in wants.items():
        if getattr(cfg, name) != wanted:
            raise ModelFormatError(f"cannot export to Hugging Face openai-gpt: {name}={getattr(cfg, name)!r} "
                                   f"(it needs {wanted!r})")
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ModelFormatError(f"cannot export to Hugging Face openai-gpt: head_dim={cfg.head_dim} × "
                               f"n_heads={cfg.n_heads} != d_model={cfg.d_model}")
    return dict(architectures=["OpenAIGPTLMHeadModel"], model_type="openai-gpt", vocab_size=cfg.vocab_size,
                n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                afn={"gelu_tanh": "gelu", "relu": "relu"}[cfg.mlp], layer_norm_epsilon=cfg.norm_eps,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings,
                dtype=dtype)


def load_hf_gpt1(directory: Path, data: dict):
    """An openai-gpt directory as an HFModel: the CausalLM (eval, float32) with its tokenizer."""
    from llmkit.io.hf import HFModel, load_tokenizer

    cfg = gpt1_config_from_hf(data, str(directory / "config.json"))
    plan = plan_weights(directory, cfg, GPT1)  # every name and shape checked before any tensor is read
    tokenizer, prefix_ids, eos_ids = load_tokenizer(directory, data, cfg.vocab_size)
    with skip_init():  # load_model_tensors fills every parameter or refuses the file
        model = CausalLM(cfg)
    load_model_tensors(model, read_weights(plan, GPT1), where=str(directory))
    model.tie_weights()
    return HFModel(model.eval(), tokenizer, prefix_ids, eos_ids)
