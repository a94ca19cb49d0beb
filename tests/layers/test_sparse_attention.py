"""Sparse attention patterns (sliding window, Longformer global tokens, BigBird) and the ring-buffer
KV cache: which keys each query sees, and that every path — dense reference, fused/blocked, cached
decoding — computes the same function."""

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.inference.generate import generate
from llmkit.inference.kv_cache import KVCache, RingKVCache
from llmkit.inference.sampling import SamplingParams
from llmkit.layers.attention import attend, set_attention_impl
from llmkit.layers.position import alibi_bias, alibi_slopes
from llmkit.layers.sparse import (LocalWindow, PatternBlocks, attend_local, pattern_attention_args, pattern_mask,
                                 random_blocks)
from llmkit.models.causal_lm import CausalLM
from llmkit.models.transformer import Stack

# fp32 summation order only (chunked/local vs dense, cached vs full). Worst measured over this file:
# 3.0e-6 / 2.9e-6 / 2.5e-6 (AVX-512 / AVX2 / default): 3.3× below.
ATOL = 1e-5
VOCAB = 61
PATTERNS = {
    "sliding_window": dict(attention_pattern="sliding_window", attention_window=5),
    "longformer": dict(attention_pattern="longformer", attention_window=5, attention_global_tokens=3),
    "bigbird": dict(attention_pattern="bigbird", attention_window=8, attention_block_size=4,
                    attention_global_tokens=4, attention_random_blocks=2),
}


def model_for(pattern, position="rope", n_layers=2, **overrides):
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=512, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                      position=position, init_std=0.2, **{**PATTERNS[pattern], **overrides})
    return CausalLM(cfg).eval()


# ---------------------------------------------------------------- the blocked local kernel

@pytest.mark.parametrize("T,window,chunk", [(50, 5, 16), (50, 1, 7), (33, 40, 8), (64, 16, 64)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_alibi", [False, True])
def test_blocked_local_equals_dense_reference(T, window, chunk, causal, with_alibi):
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
    slopes = alibi_slopes(4) if with_alibi else None
    local = LocalWindow(window, causal, 0, 0, slopes)
    index = torch.arange(T)
    dense_mask = (index[:, None] - index[None, :]).abs() < window
    if causal:
        dense_mask &= index[None, :] <= index[:, None]
    bias = alibi_bias(slopes, index, index) if with_alibi else None
    dense = attend(q, k, v, mask=dense_mask, bias=bias, impl="reference")
    torch.testing.assert_close(attend_local(q, k, v, local, impl="reference"), dense, atol=ATOL, rtol=0)
    torch.testing.assert_close(attend_local(q, k, v, local, chunk=chunk), dense, atol=ATOL, rtol=0)


def test_blocked_local_with_keys_starting_later_equals_the_matching_rows():
    """Queries 30..39 over keys 25..39 (what a ring buffer of 15 returns) = rows 30..39 of the full thing."""
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    full = attend_local(q, k, v, LocalWindow(6, True, 0, 0), impl="reference")
    part = attend_local(q[:, :, 30:], k[:, :, 25:], v[:, :, 25:], LocalWindow(6, True, 30, 25), chunk=4)
    torch.testing.assert_close(part, full[:, :, 30:], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- what each position sees

def test_sliding_window_token_ignores_tokens_before_the_window():
    """One layer: logits at t depend on tokens t-W+1..t only; two layers: on t-2(W-1)..t."""
    W, T, t = 5, 40, 30
    for n_layers in (1, 2):
        model = model_for("sliding_window", n_layers=n_layers)
        reach = n_layers * (W - 1)  # the receptive field grows by W-1 per layer
        ids = torch.randint(0, VOCAB, (1, T))
        outside, inside = ids.clone(), ids.clone()
        outside[0, : t - reach] = (ids[0, : t - reach] + 1) % VOCAB  # every token before the field
        inside[0, t - reach] = (ids[0, t - reach] + 1) % VOCAB  # the oldest token inside it
        with torch.no_grad():
            base, moved_outside, moved_inside = model(ids), model(outside), model(inside)
        # tokens outside the receptive field are never read: 0.0 measured (AVX-512 / AVX2 / default)
        torch.testing.assert_close(moved_outside[0, t], base[0, t], atol=1e-6, rtol=0)
        assert (moved_inside[0, t] - base[0, t]).abs().max() > 1e-4


def test_global_tokens_see_and_are_seen_by_every_position():
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=64, d_model=32, n_layers=1, n_heads=4, init_std=0.2,
                      position="rope", attention_pattern="longformer", attention_window=3, attention_global_tokens=2)
    args = pattern_attention_args(cfg, causal=False, offset=0, T=20, key_start=0, key_mask=None, slopes=None,
                                  device="cpu")
    assert args["mask"] is None and isinstance(args["local"], PatternBlocks)  # blocked: no dense (T, T) mask
    mask, _ = args["local"].mask_and_bias(torch.arange(20), torch.arange(20))  # (20, 20), the rule itself
    assert mask[:2].all() and mask[:, :2].all()  # global rows and columns
    assert not mask[10, 4] and mask[10, 8]  # an ordinary pair: only within the window
    assert int(mask[10].sum()) == 2 + 5  # 2 global keys + |i - j| < 3

    stack = Stack(cfg, causal=False).eval()  # bidirectional: a global token's output reads the far end
    for p in stack.parameters():  # the Stack alone has no model's init; make every weight matter
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 20, 32)
    changed = x.clone()
    changed[0, 19] += torch.randn(32)  # (not a constant: LayerNorm would remove it)
    positions = torch.arange(20)[None]
    with torch.no_grad():
        a, b = stack(x, positions), stack(changed, positions)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4  # the global token sees position 19
    torch.testing.assert_close(a[0, 10], b[0, 10], atol=1e-6, rtol=0)  # a local token does not
    changed = x.clone()
    changed[0, 1] += torch.randn(32)  # a global token is seen by position 19, 18 positions away
    with torch.no_grad():
        assert (stack(changed, positions)[0, 19] - a[0, 19]).abs().max() > 1e-4


def test_causal_global_tokens_are_seen_by_every_later_position():
    model = model_for("longformer", n_layers=1)
    ids = torch.randint(0, VOCAB, (1, 40))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % VOCAB  # global (first 3); position 39 is far outside the window
    with torch.no_grad():
        assert (model(changed)[0, 39] - model(ids)[0, 39]).abs().max() > 1e-4


def test_bigbird_random_blocks_are_seeded_and_causal():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, **PATTERNS["bigbird"])
    table = random_blocks(cfg, 12, 12, causal=True)
    assert torch.equal(table, random_blocks(cfg, 12, 12, causal=True))
    assert not torch.equal(table, random_blocks(cfg.replace(attention_seed=1), 12, 12, causal=True))
    window_blocks = 8 // 4
    for q in range(12):
        chosen = table[q].nonzero().flatten().tolist()
        earlier_outside = max(0, q - window_blocks + 1)  # blocks before the window
        assert len(chosen) == min(2, earlier_outside)
        assert all(k <= q - window_blocks for k in chosen)
    # a causal query block's draw does not depend on how long the sequence is (cached decoding relies on it)
    assert torch.equal(random_blocks(cfg, 12, 30, causal=True)[:, :12], table)


# ---------------------------------------------------------------- reference, fused and cached paths agree

@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_reference_fused_and_cached_paths_agree(pattern, position):
    model = model_for(pattern, position)
    B, T, prefill = 2, 45, 7
    ids = torch.randint(0, VOCAB, (B, T))
    with torch.no_grad():
        fused = model(ids)
        reference = set_attention_impl(model, "reference")(ids)
        set_attention_impl(model, "sdpa")
        cache = KVCache.empty(model.cfg, B, T)
        pieces = [model(ids[:, :prefill], cache=cache)]
        pieces += [model(ids[:, t:t + 3], cache=cache) for t in range(prefill, T, 3)]
    assert isinstance(cache, RingKVCache) == (pattern == "sliding_window")
    torch.testing.assert_close(reference, fused, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(pieces, dim=1), fused, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_really_restrict_attention(pattern):
    """The same weights with attention_pattern='full' give different logits far from the start."""
    model = model_for(pattern)
    dense = CausalLM(model.cfg.replace(attention_pattern="full", attention_window=None, attention_global_tokens=0,
                                       attention_random_blocks=0)).eval()
    dense.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        assert (model(ids)[0, -1] - dense(ids)[0, -1]).abs().max() > 1e-4


# ---------------------------------------------------------------- the ring-buffer cache

@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_ring_buffer_decoding_equals_full_recompute_and_memory_stays_constant(position):
    model = model_for("sliding_window", position)
    T = 60
    ids = torch.randint(0, VOCAB, (1, T))
    cache = KVCache.empty(model.cfg, 1, T)
    assert isinstance(cache, RingKVCache)
    size = cache.memory_bytes()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :12], cache=cache)]  # a prefill longer than the window
        for t in range(12, T):
            steps.append(model(ids[:, t:t + 1], cache=cache))
            assert cache.memory_bytes() == size
    assert cache.pos == T and cache.key_start == T - 5
    assert size == 2 * 2 * 1 * 2 * 5 * 8 * 4  # k and v: layers × batch × kv heads × window × head_dim × fp32
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


def test_sliding_window_generation_with_and_without_cache_agree_past_the_window():
    model = model_for("sliding_window")
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (9, 3)]  # left padding in the batch
    greedy = SamplingParams(temperature=0.0)
    cached = generate(model, prompts, max_new_tokens=30, params=greedy, use_cache=True)
    recomputed = generate(model, prompts, max_new_tokens=30, params=greedy, use_cache=False)
    alone = [generate(model, [p], max_new_tokens=30, params=greedy)[0] for p in prompts]
    assert [len(x) for x in cached] == [30, 30]
    assert cached == recomputed == alone


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("overrides,fragment", [
    (dict(attention_window=4), "need attention_pattern"),
    (dict(attention_pattern="sliding_window"), "needs attention_window"),
    (dict(attention_pattern="sliding_window", attention_window=0), "attention_window"),
    (dict(attention_pattern="sliding_window", attention_window=4, attention_global_tokens=2), "longformer"),
    (dict(attention_pattern="longformer", attention_window=4), "attention_global_tokens"),
    (dict(attention_pattern="bigbird", attention_window=10, attention_block_size=4), "multiple"),
    (dict(attention_pattern="dilated", attention_window=4), "attention_pattern"),
])
def test_config_rejects_bad_patterns(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(d_model=32, n_heads=4, **overrides)


def test_patterns_add_no_parameters():
    base = ModelConfig(d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB)
    for overrides in PATTERNS.values():
        cfg = base.replace(**overrides)
        assert cfg.num_params() == base.num_params() == sum(p.numel() for p in CausalLM(cfg).parameters())


def test_hugging_face_export_of_patterns():
    """A LLaMA-style sliding window is a Mistral config; Longformer/BigBird patterns have no Hugging Face
    decoder equivalent, and exporting them as LLaMA would silently change the model: refused."""
    from llmkit.errors import ModelFormatError
    from llmkit.io.hf_config import config_to_hf

    cfg = ModelConfig(d_model=32, n_heads=4, position="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                      **PATTERNS["sliding_window"])
    out = config_to_hf(cfg)
    assert (out["model_type"], out["architectures"], out["sliding_window"]) == ("mistral", ["MistralForCausalLM"], 5)
    for name in ("longformer", "bigbird"):
        with pytest.raises(ModelFormatError, match=f"attention_pattern='{name}'"):
            config_to_hf(cfg.replace(**PATTERNS[name]))
    assert config_to_hf(cfg.replace(attention_pattern="full", attention_window=None))["model_type"] == "llama"


# ---------------------------------------------------------------- Longformer and BigBird by blocks

def dense_pattern_attention(q, k, v, cfg, *, causal, q_start=0, slopes=None):
    """The documented rule as one dense masked softmax: pattern_mask ∩ causal, over every key."""
    q_index, k_index = torch.arange(q_start, q_start + q.shape[2]), torch.arange(k.shape[2])
    mask = pattern_mask(cfg, q_index[None], k_index[None], causal=causal)[0]
    if causal:
        mask &= k_index[None, :] <= q_index[:, None]
    bias = alibi_bias(slopes, q_index, k_index) if slopes is not None else None
    return attend(q, k, v, mask=mask, bias=bias, impl="reference")


@pytest.mark.parametrize("pattern", ["longformer", "bigbird"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [4, 7, 16, 128])
@pytest.mark.parametrize("with_alibi", [False, True])
def test_blocked_patterns_equal_the_dense_rule(pattern, causal, chunk, with_alibi):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, **PATTERNS[pattern])
    T = 61  # not a multiple of the block size or of any chunk
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 2, T, 8), torch.randn(2, 2, T, 8)
    slopes = alibi_slopes(4) if with_alibi else None
    dense = dense_pattern_attention(q, k, v, cfg, causal=causal, slopes=slopes)
    blocks = PatternBlocks(cfg, causal, 0, 0, slopes)
    torch.testing.assert_close(attend_local(q, k, v, blocks, impl="reference"), dense, atol=ATOL, rtol=0)
    torch.testing.assert_close(attend_local(q, k, v, blocks, chunk=chunk), dense, atol=ATOL, rtol=0)


@pytest.mark.parametrize("pattern", ["longformer", "bigbird"])
def test_blocked_patterns_for_later_queries_equal_the_matching_rows(pattern):
    """Queries 37..60 over keys 0..60 (a cached prefill's second piece) = rows 37..60 of the full thing."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, **PATTERNS[pattern])
    q, k, v = torch.randn(1, 4, 61, 8), torch.randn(1, 2, 61, 8), torch.randn(1, 2, 61, 8)
    full = dense_pattern_attention(q, k, v, cfg, causal=True)
    part = attend_local(q[:, :, 37:], k, v, PatternBlocks(cfg, True, 37, 0), chunk=5)
    torch.testing.assert_close(part, full[:, :, 37:], atol=ATOL, rtol=0)


def test_a_chunk_reaches_only_its_window_globals_and_random_blocks():
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_heads=4, attention_pattern="bigbird", attention_window=8,
                      attention_block_size=4, attention_global_tokens=4, attention_random_blocks=1)
    blocks = PatternBlocks(cfg, False, 0, 0).with_table(400, 400)
    reached = blocks.reach(torch.arange(200, 204), 400).tolist()  # query block 50
    drawn = blocks.table[50].nonzero().flatten().tolist()
    expected = [*range(4), *range(196, 208), *(j for b in drawn for j in range(4 * b, 4 * b + 4))]
    assert reached == sorted(set(expected)) and len(reached) <= 4 + 12 + 4
    assert blocks.reach(torch.arange(0, 4), 400) == slice(0, 400)  # global queries see every key


MEMORY_PROBE = """
import sys, torch
from llmkit.config import ModelConfig
from llmkit.layers.sparse import pattern_attention_args, attend_local
from llmkit.layers.attention import attend
torch.set_num_threads(1)
T = 4096
cfg = ModelConfig(vocab_size=64, d_model=64, n_heads=4, max_seq_len=T, attention_pattern=sys.argv[1],
                  attention_window=64, attention_block_size=32, attention_global_tokens=8,
                  attention_random_blocks=2 if sys.argv[1] == "bigbird" else 0)
q, k, v = (torch.randn(1, 4, T, 16) for _ in range(3))
args = pattern_attention_args(cfg, causal=False, offset=0, T=T, key_start=0, key_mask=None, slopes=None, device="cpu")
def status_kb(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current RSS
before = status_kb("VmRSS:")
if sys.argv[2] == "blocked":
    attend_local(q, k, v, args["local"])
else:  # the same rule as one dense (T, T) mask: what these patterns cost before the blocked kernel
    index = torch.arange(T)
    mask, _ = args["local"].with_table(T, T).mask_and_bias(index, index)
    attend(q, k, v, mask=mask)
print(status_kb("VmHWM:") - before)
"""


@pytest.mark.parametrize("pattern", ["longformer", "bigbird"])
def test_blocked_patterns_never_hold_a_dense_mask(pattern):
    """At 4,096 tokens the dense mask and its float scores take ~300 MB; the blocks take a few MB."""
    import subprocess
    import sys

    def peak_kb(mode):
        run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, pattern, mode], capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    blocked, dense = peak_kb("blocked"), peak_kb("dense")
    assert dense > 150_000, dense  # (B·H·T² float scores alone are 268 MB: the probe does measure them)
    assert blocked < dense / 8, (blocked, dense)
