"""RoPE scaling (linear, dynamic NTK, YaRN, llama3) against transformers' LlamaRotaryEmbedding, the
position-interpolation identity, cached decoding with YaRN, and the config checks."""

import math

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.inference.kv_cache import KVCache
from llmkit.layers.position import rope_cos_sin, rope_dynamic_inv_freq, rope_frequencies, rope_inv_freq
from llmkit.models.causal_lm import CausalLM
from llmkit.models.transformer import Stack

HEAD_DIM, CONTEXT = 16, 64  # CONTEXT: the "pretraining" length the scaling extends

# (kind, our extra fields, transformers' extra rope_parameters)
VARIANTS = [
    ("linear", {}, {}),
    ("dynamic", {}, {}),
    ("yarn", {}, {}),
    ("yarn", dict(rope_beta_fast=16.0, rope_beta_slow=2.0, rope_truncate=False),
     dict(beta_fast=16.0, beta_slow=2.0, truncate=False)),
    ("yarn", dict(rope_attention_factor=1.25), dict(attention_factor=1.25)),
    ("llama3", {}, dict(low_freq_factor=1.0, high_freq_factor=4.0)),
    ("llama3", dict(rope_low_freq_factor=2.0, rope_high_freq_factor=8.0), dict(low_freq_factor=2.0, high_freq_factor=8.0)),
]
POSITIONS = {
    "inside": torch.stack([torch.arange(0, 40), torch.arange(20, 60)]),  # all below CONTEXT
    "beyond": torch.stack([torch.arange(0, 40), torch.arange(200, 240)]),  # up to ~4x CONTEXT
}


def ours(kind, factor, extra, theta=10000.0):
    # dynamic reads its original context from max_seq_len (transformers: max_position_embeddings);
    # yarn/llama3 models advertise the extended length and name the original one separately.
    max_len = CONTEXT if kind == "dynamic" else int(CONTEXT * factor)
    return ModelConfig(d_model=4 * HEAD_DIM, n_heads=4, n_kv_heads=2, n_layers=1, position="rope", rope_theta=theta,
                       max_seq_len=max_len, rope_scaling=kind, rope_factor=factor,
                       rope_original_max_seq_len=None if kind == "dynamic" else CONTEXT, **extra)


def hf_rotary(kind, factor, extra, theta=10000.0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = dict(rope_type=kind, rope_theta=theta, factor=factor, **extra)
    if kind in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = CONTEXT
    cfg = LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                      max_position_embeddings=CONTEXT if kind == "dynamic" else int(CONTEXT * factor),
                      rope_parameters=params)
    return LlamaRotaryEmbedding(cfg)


def our_cos_sin(cfg, positions):
    inv_freq, scale = rope_frequencies(cfg)
    if cfg.rope_scaling == "dynamic":
        inv_freq = rope_dynamic_inv_freq(cfg, positions.max() + 1)
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32, scale=scale)
    return cos[:, 0], sin[:, 0]


# cos/sin against transformers (here and below): the same fp32 ops, 0.0 measured (AVX-512 / AVX2 / default);
# 1e-6 leaves room for a few ulps (1.2e-7 at 1) from a different libm.
@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize("factor", [2.0, 5.0])
@pytest.mark.parametrize("kind,extra,hf_extra", VARIANTS, ids=lambda v: repr(v) if isinstance(v, dict) else v)
def test_scaled_rope_matches_transformers(kind, extra, hf_extra, factor, where):
    pytest.importorskip("transformers")
    positions = POSITIONS[where]
    # A fresh module per call: transformers' dynamic frequencies are state that only grows.
    hf_cos, hf_sin = hf_rotary(kind, factor, hf_extra)(torch.zeros(1), positions)
    cos, sin = our_cos_sin(ours(kind, factor, extra), positions)
    torch.testing.assert_close(cos, hf_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, hf_sin, atol=1e-6, rtol=0)

    plain_cos, _ = rope_cos_sin(positions, rope_inv_freq(HEAD_DIM, 10000.0), torch.float32)
    changed = (cos - plain_cos[:, 0]).abs().max().item() > 1e-3
    # dynamic NTK leaves RoPE untouched until the sequence outgrows the original context
    assert changed == (kind != "dynamic" or where == "beyond")


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_stack_applies_the_scaled_rope(kind):
    """The model's Stack (not just the helpers) produces transformers' cos/sin, attention factor included."""
    pytest.importorskip("transformers")
    hf_extra = dict(low_freq_factor=1.0, high_freq_factor=4.0) if kind == "llama3" else {}
    positions = POSITIONS["beyond"]
    hf_cos, hf_sin = hf_rotary(kind, 4.0, hf_extra)(torch.zeros(1), positions)
    cos, sin = Stack(ours(kind, 4.0, {})).rope(positions, torch.float32)
    torch.testing.assert_close(cos[:, 0], hf_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, 0], hf_sin, atol=1e-6, rtol=0)


def test_yarn_original_context_defaults_to_max_seq_len_as_transformers_does():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM,
                                          max_position_embeddings=128,
                                          rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0)))
    cfg = ModelConfig(d_model=64, n_heads=4, position="rope", max_seq_len=128, rope_scaling="yarn", rope_factor=4.0)
    assert cfg.rope_original_max_seq_len == 128
    positions = torch.arange(500)[None]
    hf_cos, hf_sin = hf(torch.zeros(1), positions)
    cos, sin = our_cos_sin(cfg, positions)
    torch.testing.assert_close(cos, hf_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, hf_sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("s", [2, 3, 4])
def test_linear_scaling_is_position_interpolation(s):
    """RoPE with linear factor s at position s·p is plain RoPE at position p."""
    cfg = ours("linear", float(s), {})
    p = torch.arange(0, 50)[None]
    scaled, _ = rope_frequencies(cfg)
    cos, sin = rope_cos_sin(s * p, scaled, torch.float32)
    plain_cos, plain_sin = rope_cos_sin(p, rope_inv_freq(HEAD_DIM, cfg.rope_theta), torch.float32)
    # angles ≤ 49 rad rounded twice (θ/s, then ×s·p): ≤ ~5e-6 in fp32; 8.9e-7 measured (AVX-512 / AVX2 / default)
    torch.testing.assert_close(cos, plain_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, plain_sin, atol=1e-5, rtol=0)
    # and not at position p itself
    assert (rope_cos_sin(p, scaled, torch.float32)[0] - plain_cos).abs().max() > 1e-2


def tiny_llama(**rope):
    cfg = ModelConfig(vocab_size=97, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp="swiglu",
                      norm="rmsnorm", bias=False, position="rope", init_std=0.2, **rope)
    return CausalLM(cfg).eval()


def cached_and_full(model, T, prefill=5):
    ids = torch.randint(0, 97, (2, T))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(model.cfg, 2, T)
        steps = [model(ids[:, :prefill], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(prefill, T)]
    return torch.cat(steps, dim=1), full


# Cached vs full decoding below: fp32 summation order only. Measured: yarn 3.3e-6 / 3.7e-6 / 3.9e-6, dynamic
# 3.3e-6 / 3.3e-6 / 4.6e-6 (AVX-512 / AVX2 / default): 1e-5 is ≥ 2.2× the worst (attention kernels, not RoPE).
def test_yarn_model_cached_decoding_equals_recomputation():
    # 40 tokens over an original context of 16: decoding runs well past where YaRN changes anything
    model = tiny_llama(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=16)
    cached, full = cached_and_full(model, 40)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)

    plain = tiny_llama()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        assert (plain(ids) - model(ids)).abs().max() > 1e-3  # the scaling reaches the logits


def test_dynamic_model_cached_decoding_equals_recomputation_within_original_context():
    """Up to the original context dynamic NTK is plain RoPE, so caching is exact there (beyond it, cached
    keys keep older frequencies: transformers' known caveat, which llmkit shares)."""
    model = tiny_llama(rope_scaling="dynamic", rope_factor=4.0, rope_original_max_seq_len=24)
    cached, full = cached_and_full(model, 24)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- config

ROPE = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=1, position="rope")


@pytest.mark.parametrize("overrides,field", [
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(rope_scaling="yarn", position="learned"), "rope_scaling"),
    (dict(rope_scaling="yarn", rope_factor=0.5), "rope_factor"),
    (dict(rope_scaling="linear", rope_factor=float("inf")), "rope_factor"),
    (dict(rope_factor=float("nan")), "rope_factor"),
    (dict(rope_factor="2"), "rope_factor"),
    (dict(rope_scaling="dynamic", rope_original_max_seq_len=0), "rope_original_max_seq_len"),
    (dict(rope_original_max_seq_len=1.5), "rope_original_max_seq_len"),
    (dict(rope_scaling="yarn", rope_factor=2.0, rope_attention_factor=-1.0), "rope_attention_factor"),
    (dict(rope_beta_fast=0.0), "rope_beta_fast"),
    (dict(rope_beta_slow=float("inf")), "rope_beta_slow"),
    (dict(rope_truncate="no"), "rope_truncate"),
    (dict(rope_low_freq_factor=-1.0), "rope_low_freq_factor"),
    (dict(rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=4.0, rope_high_freq_factor=4.0),
     "rope_high_freq_factor"),
    (dict(rope_scaling="dynamic", rope_factor=2.0, d_model=8, n_heads=4), "head_dim"),  # D/(D-2) at D=2
], ids=repr)
def test_config_rejects_bad_rope_scaling(overrides, field):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**ROPE, **overrides})
    message = str(info.value)
    assert field in message and "\n" not in message


@pytest.mark.parametrize("kind,expected", [("none", None), ("linear", None), ("dynamic", 256), ("yarn", 256),
                                           ("llama3", 256)])
def test_config_derives_original_context_and_round_trips(kind, expected):
    cfg = ModelConfig(**ROPE, max_seq_len=256, rope_scaling=kind, rope_factor=2.0)
    assert cfg.rope_original_max_seq_len == expected
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.num_params() == ModelConfig(**ROPE, max_seq_len=256).num_params()


def test_yarn_default_attention_factor():
    _, scale = rope_frequencies(ModelConfig(**ROPE, rope_scaling="yarn", rope_factor=8.0))
    assert scale == pytest.approx(0.1 * math.log(8.0) + 1.0)
    assert rope_frequencies(ModelConfig(**ROPE, rope_scaling="yarn", rope_factor=1.0))[1] == 1.0
