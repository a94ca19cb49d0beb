"""DeBERTa's disentangled attention as a configuration of the one Attention: the log buckets against
transformers' own function, reference kernel == fused kernel, padding, parameter counts, and the
config checks. (As a decoder position kind, with GQA and a KV cache, it runs through every
POSITION_KINDS test of tests/layers/test_attention.py and tests/models/test_causal_lm.py.)"""

from __future__ import annotations

import pytest
import torch

from llmkit.config import ModelConfig, preset
from llmkit.errors import ConfigError
from llmkit.layers.attention import set_attention_impl
from llmkit.layers.disentangled import log_bucket, relative_index
from llmkit.models.build import build_model


def tiny(**overrides):
    torch.manual_seed(0)
    model = build_model(preset("deberta-tiny", vocab_size=200, **overrides)).eval()
    with torch.no_grad():  # norms at 1/0 and zero biases would hide a term that is never added
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("buckets,max_distance", [(256, 512), (16, 64), (8, 16), (4, 6), (32, 33)])
def test_log_bucket_equals_transformers(buckets, max_distance):
    deberta = pytest.importorskip("transformers.models.deberta_v2.modeling_deberta_v2")
    distance = torch.arange(-3 * max_distance, 3 * max_distance + 1)
    expected = deberta.make_log_bucket_position(distance, buckets, max_distance).long()
    assert torch.equal(log_bucket(distance, buckets=buckets, max_distance=max_distance), expected)


@pytest.mark.parametrize("buckets,max_distance", [(8, 16), (0, 6)])
def test_relative_index_is_bucketed_shifted_and_clipped(buckets, max_distance):
    cfg = preset("deberta-tiny", relative_buckets=buckets, relative_max_distance=max_distance)
    index = relative_index(torch.arange(40), torch.arange(40), cfg)
    span = cfg.relative_span
    assert index.min() == 0 and index.max() == 2 * span - 1  # both ends reached, nothing outside the table
    assert torch.equal(index.diagonal(), torch.full((40,), span))  # distance 0 is row `span`
    # near the diagonal distances are exact: i - j + span
    assert index[10, 9] == span + 1 and index[9, 10] == span - 1


@pytest.mark.parametrize("overrides", [{}, {"share_position_projections": False}, {"position_to_content": False},
                                       {"content_to_position": False}, {"add_absolute_positions": True},
                                       {"relative_buckets": 0, "relative_max_distance": 8}, {"conv_kernel": 3}])
def test_reference_kernel_equals_fused_with_padding(overrides):
    model = tiny(**overrides)
    ids = torch.randint(4, 200, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    with torch.no_grad():
        fused = model(ids, attention_mask=mask)
        reference = set_attention_impl(model, "reference")(ids, attention_mask=mask)
        alone = model(ids[1:, :17])
    # fp32, summation order only (fused kernel vs matmul/softmax): measured 7.2e-7 / 6.0e-7 (AVX-512 / AVX2)
    assert torch.allclose(fused, reference, atol=1e-5)
    assert torch.allclose(fused[1, :17], alone[0], atol=1e-5)  # right padding leaves real tokens alone


def test_position_terms_change_the_scores():
    """With both terms off, position enters nowhere: permuting the tokens permutes the outputs."""
    ids = torch.randint(4, 200, (1, 12))
    perm = torch.randperm(12)
    for terms, invariant in (({"content_to_position": False, "position_to_content": False}, True), ({}, False)):
        model = tiny(**terms)
        with torch.no_grad():
            out, permuted = model(ids), model(ids[:, perm])
        assert torch.allclose(out[:, perm], permuted, atol=1e-5) == invariant, terms


@pytest.mark.parametrize("overrides", [{}, {"share_position_projections": False}, {"content_to_position": False},
                                       {"relative_embed_norm": False}, {"add_absolute_positions": True},
                                       {"relative_buckets": 0}, {"tie_embeddings": False}, {"mlm_head": False},
                                       {"type_vocab_size": 2, "num_labels": 3}, {"conv_kernel": 5},
                                       {"arch": "decoder", "type_vocab_size": 0, "embed_norm": False, "n_kv_heads": 2,
                                        "share_position_projections": False, "add_absolute_positions": True}])
def test_num_params_matches_the_module(overrides):
    model = tiny(**overrides)
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())
    if model.cfg.arch == "decoder":  # the relative table belongs to the stack, not the embeddings
        assert model.cfg.num_params(embeddings=False) == sum(p.numel() for p in model.stack.parameters())


@pytest.mark.parametrize("overrides,message", [
    ({"arch": "encoder-decoder"}, "needs arch='encoder' or 'decoder'"),
    ({"conv_kernel": 2}, "conv_kernel=2 must be odd"),
    ({"conv_kernel": 3, "arch": "decoder", "type_vocab_size": 0, "embed_norm": False}, "needs arch='encoder'"),
    ({"relative_buckets": 16, "relative_max_distance": 9}, "must exceed relative_buckets // 2 \\+ 1"),
    ({"attention_pattern": "sliding_window", "attention_window": 8}, "does not support position='disentangled'"),
])
def test_config_refuses_what_is_not_defined(overrides, message):
    with pytest.raises(ConfigError, match=message):
        preset("deberta-tiny", **overrides)


def test_absolute_positions_need_the_disentangled_kind():
    with pytest.raises(ConfigError, match="add_absolute_positions needs position='disentangled'"):
        ModelConfig(add_absolute_positions=True)
