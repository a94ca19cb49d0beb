"""The blocked kernel with an attention mask by row (transformers' Longformer and BigBird conventions):
padding, globals the mask marks 2, BigBird's last block and Longformer's global projections, against the
rule written as one dense masked softmax. Parity with transformers itself: tests/io/test_hf_longformer_bigbird.py."""

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.layers.attention import attend
from llmkit.layers.sparse import GlobalProjections, PatternBlocks, attend_local, pattern_attention_args

# fp32 summation order only (blocks vs one softmax); the same bound as test_sparse_attention.py's
ATOL = 1e-5
CONFIGS = {
    "longformer": dict(attention_pattern="longformer", attention_window=3, attention_global_projections=True),
    "bigbird": dict(attention_pattern="bigbird", attention_window=8, attention_block_size=4,
                    attention_global_tokens=4, attention_global_last_block=True, attention_random_blocks=1),
}


def encoder_config(name: str) -> ModelConfig:
    return ModelConfig(arch="encoder", vocab_size=50, d_model=32, n_heads=4, max_seq_len=128, **CONFIGS[name])


def masked_batch(T: int):
    """(2, T): row 0 full, row 1 padded after 2T/3; each row marks its own two global positions."""
    key_mask = torch.ones(2, T, dtype=torch.long)
    key_mask[1, 2 * T // 3:] = 0
    key_mask[0, [5, T - 9]] = 2
    key_mask[1, [1, T // 2]] = 2
    return key_mask


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [4, 9, 128])
def test_blocks_with_a_mask_by_row_equal_the_dense_rule(name, chunk):
    cfg, T = encoder_config(name), 45
    key_mask = masked_batch(T)
    args = pattern_attention_args(cfg, causal=False, offset=0, T=T, key_start=0, key_mask=key_mask, slopes=None,
                                  device="cpu")
    blocks = args["local"]
    assert isinstance(blocks, PatternBlocks) and args["mask"] is None  # blocked even though padded
    q, k, v = torch.randn(2, 4, T, 8), torch.randn(2, 4, T, 8), torch.randn(2, 4, T, 8)
    dense = attend_local(q, k, v, blocks, impl="reference")
    blocked = attend_local(q, k, v, blocks, chunk=chunk)
    # with global projections a global query's row is recomputed afterwards (GlobalQueries): only the others count
    rows = ~(key_mask == 2) if cfg.attention_global_projections else torch.ones(2, T, dtype=torch.bool)
    torch.testing.assert_close(blocked.transpose(1, 2)[rows], dense.transpose(1, 2)[rows], atol=ATOL, rtol=0)
    # the rule itself, row by row
    index = torch.arange(T)
    mask, _ = blocks.with_table(T, T).mask_and_bias(index, index)  # (2, 1, T, T)
    assert mask[0, 0, 5].all() and mask[0, 0, :, T - 9].all()  # row 0's marked globals see and are seen by all
    if name == "longformer":  # (BigBird's random block might reach it)
        assert not mask[1, 0, 20, 5]  # row 0's global 5 is an ordinary key in row 1, out of 20's window
    assert not mask[1, 0, 0, 2 * T // 3:].any()  # padding is never a key
    if name == "bigbird":  # the last block (44 // 4 = 11: positions 44..) is global
        assert mask[0, 0, 20, 44] and mask[0, 0, 44].all()


def test_global_projections_replace_only_the_global_rows():
    cfg, T = encoder_config("longformer"), 30
    key_mask = masked_batch(T)
    args = pattern_attention_args(cfg, causal=False, offset=0, T=T, key_start=0, key_mask=key_mask, slopes=None,
                                  device="cpu")
    proj = GlobalProjections(cfg)
    x, y = torch.randn(2, T, 32), torch.randn(2, 4, T, 8)
    out = args["global_queries"].attend(y, x, proj, scale=None, impl="reference")
    rows = (key_mask == 2)
    torch.testing.assert_close(out[~rows[:, None, :].expand(2, 4, T)], y[~rows[:, None, :].expand(2, 4, T)])
    # each global row: softmax over its row's real keys through the global projections
    for b, t in rows.nonzero().tolist():
        q = proj.q_proj(x[b, t]).view(1, 4, 1, 8)
        k = proj.k_proj(x[b]).view(T, 4, 8).transpose(0, 1)[None]
        v = proj.v_proj(x[b]).view(T, 4, 8).transpose(0, 1)[None]
        expected = attend(q, k, v, mask=key_mask[b].bool(), impl="reference")[0, :, 0]
        torch.testing.assert_close(out[b, :, t], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides,fragment", [
    (dict(attention_pattern="longformer", attention_window=3, attention_global_projections=True, arch="decoder",
          attention_global_tokens=1), "attention_global_projections needs"),
    (dict(attention_pattern="bigbird", attention_window=8, attention_block_size=4, attention_global_last_block=True),
     "attention_global_last_block needs"),
    (dict(arch="encoder", attention_pattern="longformer", attention_window=3, attention_dense_up_to=20),
     "attention_dense_up_to needs"),
])
def test_config_keeps_the_transformers_settings_where_they_mean_something(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(d_model=32, n_heads=4, **overrides)




@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_batches_with_marked_globals_never_score_t_by_t(name, monkeypatch):
    """512 tokens, 2 rows (one padded), globals chosen by the mask, different by row: every score block the
    kernel computes (window chunks, chunks holding a global query, the global rows) is at most 128 × T,
    never T × T. (tests/layers/test_sparse_attention.py measures what that means in MB: the dense rule took
    ~265 MB at 4,096 tokens, the blocks a few.)"""
    import llmkit.layers.sparse as sparse

    cfg, T = encoder_config(name).replace(max_seq_len=512), 512
    key_mask = masked_batch(T)
    largest = []

    def recording_attend(q, k, *args, **kwargs):
        largest.append(q.shape[-2] * k.shape[-2])
        return attend(q, k, *args, **kwargs)

    monkeypatch.setattr(sparse, "attend", recording_attend)
    args = pattern_attention_args(cfg, causal=False, offset=0, T=T, key_start=0, key_mask=key_mask, slopes=None,
                                  device="cpu")
    q, k, v, x = torch.randn(2, 4, T, 8), torch.randn(2, 4, T, 8), torch.randn(2, 4, T, 8), torch.randn(2, T, 32)
    y = attend_local(q, k, v, args["local"])
    if "global_queries" in args:
        y = args["global_queries"].attend(y, x, GlobalProjections(cfg), scale=None, impl="sdpa")
    assert not y.isnan().any() and len(largest) >= T // 128
    assert max(largest) <= 128 * T
