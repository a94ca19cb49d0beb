"""Parity with `transformers` for Longformer (`LongformerModel`, `LongformerForMaskedLM`) and BigBird
(`BigBirdModel`, `BigBirdForMaskedLM`, block_sparse), in and out.

Tiny random models are built and saved in-test (no download), every LayerNorm and bias randomised, then
loaded through the production path `llmkit.load`. Batches are right-padded; Longformer's global tokens
sit at different positions in each row (one row has none), its lengths are not multiples of the window
(transformers pads them, llmkit does not need to); BigBird's are not multiples of the block. Compared on
real tokens only (padded queries' outputs mean nothing in either). BigBird's random blocks: transformers
is made to read llmkit's (a seed whose draw its layout can hold), since its own are all zero in eval mode
and drawn per head in training (llmkit/io/hf_bigbird.py says why they cannot otherwise agree).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.errors import ModelFormatError
from llmkit.io.hf import save_hf
from llmkit.layers.attention import set_attention_impl
from llmkit.models.build import build_model
from llmkit.models.masked_lm import sentence_embeddings

sys.path.insert(0, str(Path(__file__).parents[1] / "parity"))
from hf_tiny import PAD, VOCAB, save_tokenizer, train_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

# fp32 summation order only (transformers scales q before q·k and sums the window, global and random parts
# in separate matmuls; llmkit's blocks are one softmax per chunk). Measured worst (hidden states / MLM
# logits): Longformer 1.7e-6 / 4.1e-6, BigBird 1.3e-6 / 3.8e-6 on AVX-512 kernels; 1.3e-6 / 3.7e-6 and
# 1.7e-6 / 3.0e-6 on AVX2 (AMD EPYC): 24× below.
TOLERANCE = 1e-4
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2, pad_token_id=PAD)


def randomise_norms_and_biases(model) -> None:
    """Initialisation leaves LayerNorms at 1/0 and biases at 0, which would hide a swapped name."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "LayerNorm.weight" in name
                                                                     or "layer_norm.weight" in name else 0.0))


def save_dir(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(train_tokenizer(), directory, bos_prefix=False)
    return directory


def padded_batch(lengths, globals_by_row=()):
    """ids (pad id after each row's end, never inside), attention mask, and the Longformer global mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask, global_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    for row, positions in enumerate(globals_by_row):
        global_mask[row, positions] = 1
    return ids.masked_fill(mask == 0, PAD), mask, global_mask


def worst_on_real_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).abs()[mask.bool()].max())


# ---------------------------------------------------------------- Longformer

LONGFORMER_LENGTHS = (23, 14, 5)
GLOBALS = ([0, 11, 22], [3, 13], [])  # varied positions; the last row has none


def longformer(mlm: bool, **overrides):
    config = transformers.LongformerConfig(attention_window=4, max_position_embeddings=64, **{**SIZES, **overrides})
    cls = transformers.LongformerForMaskedLM if mlm else transformers.LongformerModel
    model = cls(config).eval()
    randomise_norms_and_biases(model)
    return model


def test_longformer_matches_transformers_with_globals_and_padding_and_exports(tmp_path):
    torch.manual_seed(0)
    hf = longformer(True)
    lm = llmkit.load(save_dir(hf, tmp_path / "longformer"))
    cfg = lm.model.cfg
    assert (cfg.attention_pattern, cfg.attention_window, cfg.attention_global_projections) == ("longformer", 3, True)
    assert cfg.num_params() == sum(p.numel() for p in lm.model.parameters())
    ids, mask, global_mask = padded_batch(LONGFORMER_LENGTHS, GLOBALS)
    ours = mask * (global_mask + 1)  # transformers' convention: 2 = global
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask, output_hidden_states=True)
        hidden = lm.model.hidden_states(ids, ours)
        assert worst_on_real_tokens(hidden, out.hidden_states[-1], mask) < TOLERANCE
        assert worst_on_real_tokens(lm.model(ids, attention_mask=ours), out.logits, mask) < TOLERANCE
        # the globals matter: the same input without them differs
        assert worst_on_real_tokens(lm.model.hidden_states(ids, mask), hidden, mask) > 1e-3
        reference = set_attention_impl(lm.model, "reference").hidden_states(ids, ours)  # one dense masked softmax
        assert worst_on_real_tokens(reference, hidden, mask) < TOLERANCE
        # pooling weighs every real token once, global (2) or not
        pooled = sentence_embeddings(set_attention_impl(lm.model, "sdpa"), ids, ours, normalize=False)
        expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        assert float((pooled - expected).abs().max()) < 1e-6  # the same sums, one division
    out_dir = save_hf(lm.model, lm.tokenizer, tmp_path / "exported")
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["model_type"], config["attention_window"], config["pad_token_id"]) == ("longformer", 4, PAD)
    exported = transformers.AutoModelForMaskedLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        again = exported(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask).logits
    assert worst_on_real_tokens(again, out.logits, mask) < TOLERANCE


def test_bare_longformer_without_mask_or_globals_runs_on_blocks(tmp_path):
    torch.manual_seed(0)
    hf = longformer(False)
    lm = llmkit.load(save_dir(hf, tmp_path / "plain"))
    assert not lm.model.cfg.mlm_head
    ids = torch.randint(3, VOCAB, (2, 29))
    with torch.no_grad():
        expected = hf(input_ids=ids).last_hidden_state
        assert float((lm.model.hidden_states(ids) - expected).abs().max()) < TOLERANCE


@pytest.mark.parametrize("window,message", [([4, 6], "differs by layer"), (3, "positive even integer")])
def test_longformer_windows_llmkit_cannot_hold_are_refused(tmp_path, window, message):
    directory = save_dir(longformer(False), tmp_path / "bad")
    config = json.loads((directory / "config.json").read_text())
    config["attention_window"] = window
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=message):
        llmkit.load(directory)


# ---------------------------------------------------------------- BigBird

BLOCK, RANDOM = 4, 1


def bigbird(mlm: bool, **overrides):
    config = transformers.BigBirdConfig(attention_type="block_sparse", block_size=BLOCK, num_random_blocks=RANDOM,
                                        max_position_embeddings=64, **{**SIZES, **overrides})
    model = (transformers.BigBirdForMaskedLM if mlm else transformers.BigBirdModel)(config).eval()
    randomise_norms_and_biases(model)
    return model


def with_shared_random_blocks(lm, monkeypatch, n_blocks: int):
    """llmkit's model with a seed whose random blocks transformers' layout can hold (none global), and
    transformers made to read those blocks instead of its own (all-zero in eval mode: see hf_bigbird.py)."""
    import numpy as np
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    from llmkit.layers.sparse import random_blocks

    for seed in range(500):
        cfg = lm.model.cfg.replace(attention_seed=seed)
        table = random_blocks(cfg, n_blocks, n_blocks, causal=False)[1:-1]  # transformers' rows: blocks 1..n-2
        if not (table[:, 0].any() or table[:, -1].any()):
            break
    chosen = np.array([row.nonzero().flatten().tolist() for row in table], dtype=np.int32)
    monkeypatch.setattr(BigBirdBlockSparseAttention, "_bigbird_block_rand_mask_with_head",
                        lambda self, *, num_heads, **_: [chosen] * num_heads)
    model = build_model(cfg).eval()
    model.load_state_dict(lm.model.state_dict())
    return model


def test_bigbird_block_sparse_matches_transformers_and_exports(tmp_path, monkeypatch):
    """30 tokens in blocks of 4 (transformers pads to 8 blocks): each middle block sees 3 blocks, the first
    and the last and one random block; rows of 17 and 9 tokens end before the last block, then padding.
    No q/k/v biases (use_bias=False)."""
    torch.manual_seed(0)
    hf = bigbird(True, use_bias=False)
    lm = llmkit.load(save_dir(hf, tmp_path / "bigbird"))
    cfg = lm.model.cfg
    assert (cfg.attention_pattern, cfg.attention_window, cfg.attention_global_tokens) == ("bigbird", 8, 4)
    assert cfg.attention_global_last_block and cfg.attention_dense_up_to == 28 and not cfg.qkv_bias
    model = with_shared_random_blocks(lm, monkeypatch, 8)
    ids, mask, _ = padded_batch((30, 17, 9))
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert hf.config.attention_type == "block_sparse"  # (transformers switches to full for short inputs)
        hidden = model.hidden_states(ids, mask)
        assert worst_on_real_tokens(hidden, out.hidden_states[-1], mask) < TOLERANCE
        assert worst_on_real_tokens(model(ids, attention_mask=mask), out.logits, mask) < TOLERANCE
        unpadded = model.hidden_states(ids[:1])  # the blocked kernel without a mask
        assert float((unpadded - hidden[:1]).abs().max()) < TOLERANCE
        # the pattern matters: full attention over the same weights differs
        full = model.cfg.replace(attention_pattern="full", attention_window=None, attention_global_tokens=0,
                                 attention_global_last_block=False, attention_dense_up_to=0, attention_random_blocks=0)
        dense = build_model(full).eval()
        dense.load_state_dict(model.state_dict())
        assert worst_on_real_tokens(dense.hidden_states(ids, mask), hidden, mask) > 1e-3
    out_dir = save_hf(model, lm.tokenizer, tmp_path / "exported")
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["model_type"], config["block_size"], config["num_random_blocks"], config["use_bias"]) == (
        "big_bird", BLOCK, RANDOM, False)
    exported = transformers.AutoModelForMaskedLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        again = exported(input_ids=ids, attention_mask=mask).logits
    assert worst_on_real_tokens(again, out.logits, mask) < TOLERANCE


def test_bigbird_short_input_attends_fully_as_transformers_does(tmp_path):
    torch.manual_seed(0)
    hf = bigbird(False)
    lm = llmkit.load(save_dir(hf, tmp_path / "short"))
    ids, mask, _ = padded_batch((28, 11))  # 28 ≤ (5 + 2·1)·4: transformers falls back to full attention
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        assert worst_on_real_tokens(lm.model.hidden_states(ids, mask), expected, mask) < TOLERANCE


@pytest.mark.parametrize("pattern,message", [
    (dict(attention_pattern="longformer", attention_window=3, attention_global_tokens=2), "attention_global_projections"),
    (dict(attention_pattern="bigbird", attention_window=8, attention_block_size=4, attention_global_tokens=4),
     "attention_global_last_block"),
    (dict(attention_pattern="sliding_window", attention_window=3), "attention_pattern='sliding_window'"),
])
def test_patterns_transformers_cannot_hold_are_not_exported(pattern, message):
    """llmkit's own encoder patterns (first-G globals, no last block, a plain window) are not transformers'
    Longformer, BigBird or BERT: exporting them as one would silently change the model."""
    from llmkit.config import preset
    from llmkit.io.hf_encoder import encoder_config_to_hf

    with pytest.raises(ModelFormatError, match=message):
        encoder_config_to_hf(preset("bert-tiny", vocab_size=VOCAB, **pattern))
