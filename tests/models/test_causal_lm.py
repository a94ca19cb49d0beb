"""CausalLM: parameter count, KV-cache decoding == recomputation, left-padded batches == single
prompts, config validation, tied embeddings."""

import pytest
import torch

from llmkit.config import POSITION_KINDS, ModelConfig, preset
from llmkit.errors import ConfigError
from llmkit.inference.generate import generate, left_pad
from llmkit.inference.kv_cache import KVCache
from llmkit.inference.sampling import SamplingParams
from llmkit.models.causal_lm import CausalLM

# fp32 summation order only (chunked prefill, cached decoding, batched vs alone). Worst measured over
# this file: 2.9e-6 / 2.7e-6 / 2.6e-6 (AVX-512 / AVX2 / default): 3.4× below.
ATOL = 1e-5
VOCAB = 97
GREEDY = SamplingParams(temperature=0.0)
KV_LAYOUTS = [4, 2, 1]  # n_kv_heads with n_heads=4: MHA, GQA, MQA


def tiny(position="learned", n_kv_heads=2, **overrides):
    # init_std well above the default so logits are spread out and greedy picks have clear margins
    fields = dict(vocab_size=VOCAB, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                  position=position, init_std=0.2)
    fields.update(overrides)
    return CausalLM(ModelConfig(**fields)).eval()


def count(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parameter count

@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_embeddings=True),
    dict(tie_embeddings=False),
    dict(bias=True),
    dict(bias=False),
    dict(bias=False, qkv_bias=True),
    dict(bias=True, qkv_bias=False),
    dict(norm="layernorm", bias=False),
    dict(position="learned"),
    dict(position="sinusoidal"),
    dict(head_dim=24, n_kv_heads=1),
    dict(d_ff=100, mlp="geglu"),
    dict(mlp="relu"),
], ids=repr)
def test_num_params_matches_module(name, overrides):
    cfg = preset(name, vocab_size=211, **overrides)
    model = CausalLM(cfg)
    assert count(model) == cfg.num_params()
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    embed += cfg.max_seq_len * cfg.d_model if cfg.position == "learned" else 0
    assert count(model.stack) == cfg.num_params(embeddings=False)
    assert cfg.num_params() - cfg.num_params(embeddings=False) == embed


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_num_params_matches_module_post_norm(name):
    """Post-norm stacks have no final norm (Stack uses nn.Identity), so none may be counted."""
    cfg = preset(name, vocab_size=211, norm_position="post")
    assert count(CausalLM(cfg)) == cfg.num_params()


def test_tied_embeddings_share_one_tensor():
    tied = CausalLM(preset("gpt2-tiny", vocab_size=50))
    assert tied.lm_head.weight is tied.embeddings.embed.weight
    untied = CausalLM(preset("gpt2-tiny", vocab_size=50, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.embeddings.embed.weight
    assert count(untied) - count(tied) == 50 * 64


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("position", POSITION_KINDS)
@pytest.mark.parametrize("n_kv", KV_LAYOUTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_decoding_equals_recomputation(position, n_kv, chunk):
    model = tiny(position, n_kv)
    B, T, prefill = 2, 17, 5
    ids = torch.randint(0, VOCAB, (B, T))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(model.cfg, B, T)
        pieces = [model(ids[:, :prefill], cache=cache)]
        for start in range(prefill, T, chunk):
            pieces.append(model(ids[:, start:start + chunk], cache=cache))
    assert cache.pos == T
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("position", POSITION_KINDS)
@pytest.mark.parametrize("n_kv", KV_LAYOUTS)
def test_generate_with_and_without_cache_agree(position, n_kv):
    model = tiny(position, n_kv)
    prompt = torch.randint(0, VOCAB, (6,)).tolist()
    cached = generate(model, [prompt], max_new_tokens=24, params=GREEDY, use_cache=True)
    recomputed = generate(model, [prompt], max_new_tokens=24, params=GREEDY, use_cache=False)
    assert len(cached[0]) == 24
    assert cached == recomputed


@pytest.mark.parametrize("overrides", [
    dict(norm_position="post"),
    dict(norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True, position="rope"),
    dict(head_dim=12, position="alibi", n_heads=6, n_kv_heads=3),
], ids=repr)
def test_kv_cache_other_architectures(overrides):
    model = tiny(**overrides)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.empty(model.cfg, 1, 9)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- left-padded batches

PROMPT_LENGTHS = [3, 8, 5, 1]


@pytest.mark.parametrize("position", POSITION_KINDS)
def test_left_padded_batch_logits_equal_single_prompts(position):
    model = tiny(position)
    prompts = [torch.randint(1, VOCAB, (n,)).tolist() for n in PROMPT_LENGTHS]
    ids, mask = left_pad(prompts, pad_id=0)
    assert mask is not None and mask.sum(1).tolist() == PROMPT_LENGTHS
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)[:, -1]
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt]))[:, -1]
            torch.testing.assert_close(batched[row:row + 1], alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("position", POSITION_KINDS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_generates_the_same_tokens(position, use_cache):
    model = tiny(position)
    prompts = [torch.randint(1, VOCAB, (n,)).tolist() for n in PROMPT_LENGTHS]
    batched = generate(model, prompts, max_new_tokens=12, params=GREEDY, use_cache=use_cache)
    alone = [generate(model, [p], max_new_tokens=12, params=GREEDY, use_cache=use_cache)[0] for p in prompts]
    assert all(len(out) == 12 for out in batched)
    assert batched == alone


# ---------------------------------------------------------------- config validation

BASE = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=1)


@pytest.mark.parametrize("overrides,field", [
    (dict(n_heads=5), "d_model"),  # 5 does not divide 32
    (dict(n_kv_heads=3), "n_kv_heads"),  # 3 does not divide 4
    (dict(n_kv_heads=0), "n_kv_heads"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="tanh"), "mlp"),
    (dict(position="xpos"), "position"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(dropout=-0.1), "dropout"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=float("nan")), "dropout"),
    (dict(position="rope", head_dim=7), "head_dim"),
    (dict(position="rope", d_model=36, n_heads=4), "head_dim"),  # 36 / 4 = 9, odd
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=-1), "n_layers"),
    (dict(max_seq_len=True), "max_seq_len"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(init_std=-1.0), "init_std"),
], ids=repr)
def test_config_rejects_bad_values(overrides, field):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**BASE, **overrides})
    message = str(info.value)
    assert field in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides,field", [
    (dict(d_ff=0), "d_ff"),
    (dict(d_ff=-8), "d_ff"),
    (dict(head_dim=0), "head_dim"),
    (dict(head_dim=-8), "head_dim"),
], ids=repr)
def test_config_rejects_non_positive_derived_sizes(overrides, field):
    """d_ff and head_dim, when given, are sizes of linear layers and must be positive integers."""
    with pytest.raises(ConfigError) as info:
        ModelConfig(**{**BASE, **overrides})
    assert field in str(info.value)


def test_config_accepts_valid_odd_head_dim_without_rope():
    cfg = ModelConfig(**{**BASE, "position": "learned", "head_dim": 7})
    assert cfg.head_dim == 7 and cfg.n_kv_heads == 4


def test_from_dict_rejects_unknown_keys_by_name():
    good = ModelConfig(**BASE).to_dict()
    assert ModelConfig.from_dict(good) == ModelConfig(**BASE)
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({**good, "n_head": 4, "hidden_size": 3}, where="model.json")
    message = str(info.value)
    assert "n_head" in message and "hidden_size" in message and "model.json" in message
    assert "\n" not in message


def test_from_dict_wraps_bad_values_with_location():
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({**BASE, "n_kv_heads": 3}, where="cfg.json")
    assert "cfg.json" in str(info.value) and "n_kv_heads" in str(info.value)
