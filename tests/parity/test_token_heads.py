"""Parity with `transformers` for the per-token heads: *ForTokenClassification and
*ForQuestionAnswering of BERT, RoBERTa, ALBERT (and DeBERTa-v2 where llmkit reads it), in and out.

Tiny random models with every LayerNorm and bias randomised (the heads' too) are saved in-test (no
download) and loaded through `llmkit.load`, which gives a TokenClassifier / SpanQA with the file's
label names. Compared on a right-padded batch with token types: the token logits, and the start and
end logits, of every real token. Padding positions are not compared (their outputs mean nothing,
and the two implementations let a padded query see different keys). Export: task models written by
`save_hf` load in transformers' Auto classes with the same logits and labels, and back in llmkit.
"""

from __future__ import annotations

import json

import pytest
import torch

import llmkit
from llmkit.config import preset
from llmkit.errors import ModelFormatError
from llmkit.io.hf import save_hf
from llmkit.models.build import build_model
from llmkit.models.token_heads import SpanQA, TokenClassifier, bare_encoder
from hf_tiny import VOCAB, save_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

LENGTHS = (12, 7, 3)
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# fp32 summation order only (the same arithmetic in another order): measured worst 6.6e-7 with
# AVX-512 kernels, 9.5e-7 with AVX2 ones (all 8 cases below). A swapped or missing weight moves logits
# by O(0.1-1), so 1e-4 leaves 100x room and still separates the two by orders of magnitude.
TOLERANCE = 1e-4
FAMILIES = ["bert", "roberta", "albert", "deberta-v2"]


def hf_config(family: str, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64, initializer_range=0.1,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)
    if family == "bert":
        return transformers.BertConfig(**common)
    if family == "roberta":
        return transformers.RobertaConfig(**{**common, "max_position_embeddings": 66}, pad_token_id=1,
                                          type_vocab_size=1)
    if family == "albert":
        return transformers.AlbertConfig(**common, embedding_size=32)
    # DeBERTa v3's layout (tests/parity/test_deberta.py's "v3" case), with token types
    return transformers.DebertaV2Config(**common, relative_attention=True, position_buckets=8,
                                        max_relative_positions=16, pos_att_type="p2c|c2p", share_att_key=True,
                                        norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=2)


def needs_family(family: str) -> None:
    from llmkit.io.hf import OTHER_FAMILIES

    if family not in OTHER_FAMILIES:
        pytest.skip(f"llmkit does not read {family} directories in this checkout")


def randomised(model):
    """Initialisation leaves LayerNorms at 1/0 and biases at 0, which would hide a swapped name."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                is_scale = name.endswith(("LayerNorm.weight", "layer_norm.weight"))
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_scale else 0.0))
    return model.eval()


def batch(pad_id: int, types: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, pad_id)  # RoBERTa derives positions from the pad id
    return ids, mask, torch.randint(0, max(types, 1), ids.shape, generator=g) * mask


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b).abs()[mask.bool()].max())


def saved(model, directory):
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(train_tokenizer(), directory, bos_prefix=False)
    return directory


@pytest.mark.parametrize("family", FAMILIES)
def test_token_classification_matches_transformers(tmp_path, family):
    needs_family(family)
    torch.manual_seed(0)
    config = hf_config(family, id2label=dict(enumerate(LABELS)), label2id={x: i for i, x in enumerate(LABELS)})
    hf = randomised(transformers.AutoModelForTokenClassification.from_config(config))
    lm = llmkit.load(saved(hf, tmp_path / family))
    assert isinstance(lm.model, TokenClassifier) and lm.model.labels == LABELS
    ids, mask, types = batch(config.pad_token_id or 0, config.type_vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        logits = lm.model(ids, mask, types)
    assert logits.shape == (len(LENGTHS), max(LENGTHS), len(LABELS))
    assert max_diff(logits, expected, mask) < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_question_answering_matches_transformers(tmp_path, family):
    needs_family(family)
    torch.manual_seed(0)
    config = hf_config(family)
    hf = randomised(transformers.AutoModelForQuestionAnswering.from_config(config))
    lm = llmkit.load(saved(hf, tmp_path / family))
    assert isinstance(lm.model, SpanQA)
    ids, mask, types = batch(config.pad_token_id or 0, config.type_vocab_size)
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        start, end = lm.model(ids, mask, types)
    assert max_diff(start, out.start_logits, mask) < TOLERANCE
    assert max_diff(end, out.end_logits, mask) < TOLERANCE


@pytest.mark.parametrize("name", ["bert-tiny", "roberta-tiny", "albert-tiny", "deberta-tiny"])
@pytest.mark.parametrize("task", ["tokens", "qa"])
def test_export_loads_in_transformers_and_back(tmp_path, name, task):
    from llmkit.presets import PRESETS

    if name not in PRESETS:
        pytest.skip(f"no {name} preset in this checkout")
    torch.manual_seed(0)
    # RoBERTa's positions start at pad id + 1, and llmkit's tokenizer has its pad token at id 2
    cfg = preset(name, vocab_size=VOCAB, **({"position_offset": 3} if name == "roberta-tiny" else {}))
    encoder = bare_encoder(build_model(cfg))  # from a model with an MLM head: the head is dropped
    model = TokenClassifier(encoder, LABELS) if task == "tokens" else SpanQA(encoder, {"max_answer_len": 7})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    out = save_hf(model, train_tokenizer(), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    auto = transformers.AutoModelForTokenClassification if task == "tokens" else \
        transformers.AutoModelForQuestionAnswering
    hf = auto.from_pretrained(out).eval()
    ids, mask, types = batch(config.get("pad_token_id") or 0, cfg.type_vocab_size)
    back = llmkit.load(out).model
    with torch.no_grad():
        hf_out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        ours, again = model(ids, mask, types), back(ids, mask, types)
    if task == "tokens":
        assert config["architectures"][0].endswith("ForTokenClassification")
        assert [hf.config.id2label[i] for i in range(len(LABELS))] == LABELS and back.labels == LABELS
        pairs = [(ours, hf_out.logits), (again, ours)]
    else:
        assert config["architectures"][0].endswith("ForQuestionAnswering") and back.settings["max_answer_len"] == 7
        pairs = [(ours[0], hf_out.start_logits), (ours[1], hf_out.end_logits), (again[0], ours[0]),
                 (again[1], ours[1])]
    for a, b in pairs:
        assert max_diff(a, b, mask) < TOLERANCE


def test_other_heads_are_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hf_config("bert")).eval()
    with pytest.raises(ModelFormatError, match="BertForSequenceClassification is not supported"):
        llmkit.load(saved(hf, tmp_path / "seq"))


def test_bad_id2label_is_a_one_line_error(tmp_path):
    torch.manual_seed(0)
    directory = saved(transformers.BertForTokenClassification(hf_config("bert", num_labels=3)).eval(), tmp_path / "t")
    config = json.loads((directory / "config.json").read_text())
    config["id2label"] = {"0": "O", "1": "O", "2": "B-X"}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="id2label's names must be distinct"):
        llmkit.load(directory)
