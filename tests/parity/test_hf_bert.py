"""Parity with `transformers` for the encoder-only families: BERT, RoBERTa, ALBERT, in and out.

Tiny random *ForMaskedLM models are built and saved in-test (no download), with every LayerNorm
and bias randomised too, then loaded through the production path `llmkit.load`. Checked on a
right-padded batch with token types: the last hidden states and the MLM logits of every real token
(max abs difference < 1e-4, fp32). Padding positions are not compared: their outputs are
meaningless, and transformers lets a padded query see only real keys where llmkit also lets it see
itself. Export: llmkit models written by `save_hf` load in transformers with the same logits.
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
from hf_tiny import VOCAB, save_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

LENGTHS = (12, 7, 3)
# fp32 summation order only: worst measured 1.9e-6 / 1.6e-6 / 1.5e-6 (AVX-512 / AVX2 / default): ≥ 50× below.
TOLERANCE = 1e-4


def hf_encoder(family: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64, initializer_range=0.1,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(**common, **overrides))
    if family == "roberta":
        return transformers.RobertaForMaskedLM(transformers.RobertaConfig(
            **{**common, "max_position_embeddings": 66}, pad_token_id=1, type_vocab_size=1, **overrides))
    return transformers.AlbertForMaskedLM(transformers.AlbertConfig(**common, embedding_size=32, **overrides))


def randomise_norms_and_biases(model) -> None:
    """Initialisation leaves LayerNorms at 1/0 and biases at 0, which would hide a swapped name."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "LayerNorm.weight" in name
                                                                     or "layer_norm.weight" in name else 0.0))


def batch(pad_id: int, types: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, pad_id)  # RoBERTa derives positions from the pad id
    token_types = torch.randint(0, types, ids.shape, generator=g) * mask
    return ids, mask, token_types


def max_diff_on_real_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).abs()[mask.bool()].max())


def save_hf_dir(model, directory: Path) -> Path:
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(train_tokenizer(), directory, bos_prefix=False)
    return directory


CASES = {"bert": ("bert", {}), "bert-untied": ("bert", {"tie_word_embeddings": False}),
         "bert-relu": ("bert", {"hidden_act": "relu"}), "roberta": ("roberta", {}), "albert": ("albert", {})}


@pytest.mark.parametrize("case", list(CASES))
def test_load_matches_transformers(tmp_path, case):
    family, overrides = CASES[case]
    torch.manual_seed(0)
    hf = hf_encoder(family, **overrides).eval()
    randomise_norms_and_biases(hf)
    lm = llmkit.load(save_hf_dir(hf, tmp_path / case))
    cfg = lm.model.cfg
    assert cfg.arch == "encoder" and cfg.share_layers == (family == "albert")
    ids, mask, types = batch(hf.config.pad_token_id or 0, hf.config.type_vocab_size)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = lm.model.hidden_states(ids, mask, types)
        logits = lm.model(ids, attention_mask=mask, token_type_ids=types)
    assert logits.shape == (len(LENGTHS), max(LENGTHS), VOCAB)
    assert max_diff_on_real_tokens(hidden, out.hidden_states[-1], mask) < TOLERANCE
    assert max_diff_on_real_tokens(logits, out.logits, mask) < TOLERANCE


def test_bare_bert_model_loads_without_mlm_head(tmp_path):
    """A BertModel directory (no `bert.` prefix, a pooler, no head) gives hidden states; logits refuse."""
    torch.manual_seed(0)
    hf = transformers.BertModel(hf_encoder("bert").config).eval()
    randomise_norms_and_biases(hf)
    lm = llmkit.load(save_hf_dir(hf, tmp_path / "bare"))
    ids, mask, types = batch(0, 2)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        hidden = lm.model.hidden_states(ids, mask, types)
    assert not lm.model.cfg.mlm_head
    assert max_diff_on_real_tokens(hidden, expected, mask) < TOLERANCE
    with pytest.raises(llmkit.errors.ConfigError, match="no masked-LM head"):
        lm.model(ids)


@pytest.mark.parametrize("name", ["bert-tiny", "roberta-tiny", "albert-tiny"])
def test_export_loads_in_transformers(tmp_path, name):
    torch.manual_seed(0)
    # RoBERTa's positions start at pad id + 1, and llmkit's tokenizer has its pad token at id 2
    cfg = preset(name, vocab_size=VOCAB, **({"position_offset": 3} if name == "roberta-tiny" else {}))
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = save_hf(model, train_tokenizer(), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == name.split("-")[0]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    ids, mask, types = batch(config.get("pad_token_id") or 0, cfg.type_vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        logits = model(ids, attention_mask=mask, token_type_ids=types)
        back = llmkit.load(out).model(ids, attention_mask=mask, token_type_ids=types)
    assert max_diff_on_real_tokens(logits, expected, mask) < TOLERANCE
    assert max_diff_on_real_tokens(back, logits, mask) < TOLERANCE


def test_unsupported_config_is_a_one_line_error(tmp_path):
    torch.manual_seed(0)
    directory = save_hf_dir(hf_encoder("bert").eval(), tmp_path / "rel")
    config = json.loads((directory / "config.json").read_text())
    config["position_embedding_type"] = "relative_key"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="position_embedding_type='relative_key' is not supported"):
        llmkit.load(directory)
