"""Parity with `transformers` for DeBERTa v2/v3 (`DebertaV2Model`, `DebertaV2ForMaskedLM`), in and out.

Tiny random models are built and saved in-test (no download), every LayerNorm and bias randomised,
then loaded through the production path `llmkit.load`. The batch is right-padded and its longest row
(20 tokens) passes both the exact and the logarithmic buckets and, with 16 as the largest relative
distance, the clipped end of the table. Compared on real tokens only (padded queries attend
differently in the two and their outputs mean nothing). Export: llmkit models written by `save_hf`
load in transformers with the same logits, and back in llmkit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.config import preset
from llmkit.errors import ModelFormatError
from llmkit.io.hf import save_hf
from llmkit.models.build import build_model
from hf_tiny import VOCAB, train_tokenizer
from test_hf_bert import max_diff_on_real_tokens, randomise_norms_and_biases, save_hf_dir

transformers = pytest.importorskip("transformers")

LENGTHS = (20, 9, 3)
# fp32 summation order only (transformers divides k by the scale before q·k and adds c2p and p2c
# scaled one by one; llmkit scales once): measured worst 1.5e-6 / 1.8e-6 (AVX-512 / AVX2 kernels).
TOLERANCE = 1e-4

V3 = dict(relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type="p2c|c2p",
          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False)
CASES = {
    "v3": V3,
    "v3-deberta-head": dict(V3, legacy=False),  # the original head: lm_predictions.lm_head.*
    # v2 style: absolute positions too, own position projections, token types, untied decoder, c2p only
    "v2-separate": dict(V3, share_att_key=False, position_biased_input=True, type_vocab_size=2,
                        tie_word_embeddings=False, pos_att_type=["c2p"], conv_kernel_size=5),
    # deberta-v2-xlarge's convolution after the first layer (its conv_act is gelu; transformers' default tanh
    # is in v2-separate)
    "v2-conv": dict(V3, conv_kernel_size=3, conv_act="gelu"),
    "p2c-only-gelu-new": dict(V3, pos_att_type=["p2c"], share_att_key=False, hidden_act="gelu_new"),
    # no buckets: distances clipped at ±8, no LayerNorm on the relative table
    "unbucketed": dict(V3, position_buckets=-1, max_relative_positions=8, norm_rel_ebd="none"),
}


def hf_config(**overrides):
    return transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, initializer_range=0.1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **overrides)


def batch(types: int = 0):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    token_types = torch.randint(0, max(types, 1), ids.shape, generator=g) * mask
    return ids.masked_fill(mask == 0, 0), mask, token_types


def compare(lm, hf, types: int, *, mlm: bool) -> None:
    ids, mask, token_types = batch(types)
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types if types else None)
    with torch.no_grad():
        out = hf(**inputs, output_hidden_states=True)
        hidden = lm.model.hidden_states(ids, mask, inputs["token_type_ids"])
        assert max_diff_on_real_tokens(hidden, out.hidden_states[-1], mask) < TOLERANCE
        if mlm:
            logits = lm.model(ids, attention_mask=mask, token_type_ids=inputs["token_type_ids"])
            assert logits.shape == (len(LENGTHS), max(LENGTHS), VOCAB)
            assert max_diff_on_real_tokens(logits, out.logits, mask) < TOLERANCE


@pytest.mark.parametrize("case", list(CASES))
def test_masked_lm_matches_transformers(tmp_path, case):
    torch.manual_seed(0)
    hf = transformers.DebertaV2ForMaskedLM(hf_config(**CASES[case])).eval()
    randomise_norms_and_biases(hf)
    lm = llmkit.load(save_hf_dir(hf, tmp_path / case))
    cfg = lm.model.cfg
    assert cfg.position == "disentangled" and cfg.mlm_head
    assert cfg.relative_span == 8  # the buckets, or (unbucketed) the clipping distance
    compare(lm, hf, hf.config.type_vocab_size, mlm=True)


def test_bare_model_matches_transformers(tmp_path):
    torch.manual_seed(0)
    hf = transformers.DebertaV2Model(hf_config(**V3)).eval()
    randomise_norms_and_biases(hf)
    lm = llmkit.load(save_hf_dir(hf, tmp_path / "bare"))
    assert not lm.model.cfg.mlm_head
    compare(lm, hf, 0, mlm=False)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "share_position_projections": False,
                                            "add_absolute_positions": True, "type_vocab_size": 2, "conv_kernel": 3,
                                            "conv_activation": "gelu"}])
def test_export_loads_in_transformers(tmp_path, overrides):
    torch.manual_seed(0)
    cfg = preset("deberta-tiny", vocab_size=VOCAB, relative_buckets=8, relative_max_distance=16, **overrides)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = save_hf(model, train_tokenizer(), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deberta-v2" and config["legacy"] == (not cfg.tie_embeddings)
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    ids, mask, types = batch(cfg.type_vocab_size)
    types = types if cfg.type_vocab_size else None
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        logits = model(ids, attention_mask=mask, token_type_ids=types)
        back = llmkit.load(out).model(ids, attention_mask=mask, token_type_ids=types)
    assert max_diff_on_real_tokens(logits, expected, mask) < TOLERANCE
    assert max_diff_on_real_tokens(back, logits, mask) < TOLERANCE


@pytest.mark.parametrize("change,message", [
    ({"conv_kernel_size": 3, "conv_groups": 2}, "conv_groups=2 is not supported"),
    ({"conv_kernel_size": 3, "conv_act": "silu"}, "conv_act 'silu' is not supported"),
    ({"conv_kernel_size": 4}, "conv_kernel=4 must be odd"),
    ({"relative_attention": False}, "relative_attention=False is not supported"),
    ({"pos_att_type": ["p2p"]}, "pos_att_type=\\['p2p'\\] is not supported"),
    ({"norm_rel_ebd": "batch_norm"}, "norm_rel_ebd='batch_norm' is not supported"),
    ({"position_buckets": 8, "max_relative_positions": 5}, "relative_max_distance=5 must exceed"),
])
def test_unsupported_config_is_a_one_line_error(tmp_path, change, message):
    torch.manual_seed(0)
    directory = save_hf_dir(transformers.DebertaV2ForMaskedLM(hf_config(**V3)).eval(), tmp_path / "bad")
    config = json.loads((directory / "config.json").read_text())
    config.update(change)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=message):
        llmkit.load(directory)
