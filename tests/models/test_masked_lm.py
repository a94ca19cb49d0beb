"""The encoder-only model: parameter counts, padding, token types, ALBERT sharing, heads, pooling,
encoder inputs (framing and truncation), and the config fields' validation."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors

from llmkit.config import ModelConfig, preset
from llmkit.errors import ConfigError
from llmkit.inference.embed import encoder_batch, encoder_ids
from llmkit.models.build import build_model
from llmkit.models.masked_lm import MaskedLM, mean_pool, sentence_embeddings
from llmkit.tokenizer import Tokenizer

ENCODERS = ["bert-tiny", "roberta-tiny", "albert-tiny", "bert-demo"]


def tiny(name: str = "bert-tiny", **overrides) -> MaskedLM:
    torch.manual_seed(0)
    return build_model(preset(name, vocab_size=200, **overrides)).eval()


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("extra", [{}, {"num_labels": 3}, {"tie_embeddings": False}, {"mlm_head": False}])
def test_num_params_matches_the_module(name, extra):
    model = tiny(name, **extra)
    assert isinstance(model, MaskedLM)
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())


def test_albert_shares_one_block_across_layers():
    model = tiny("albert-tiny", n_layers=6)
    assert len(model.stack.blocks) == 6 and model.stack.blocks[5] is model.stack.blocks[0]
    assert sum(".blocks.0." in k for k in model.state_dict()) > 0
    assert not any(".blocks.1." in k for k in model.state_dict())
    assert model.embeddings.project.weight.shape == (64, 32)  # factorised: 32-wide tables, projected to 64


@pytest.mark.parametrize("name", ["bert-tiny", "roberta-tiny", "albert-tiny"])
def test_right_padding_does_not_change_real_tokens(name):
    model = tiny(name)
    ids = torch.randint(4, 200, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 5)], dim=1).long()
    with torch.no_grad():
        alone, batched = model(ids), model(padded, attention_mask=mask)
    assert alone.shape == (1, 9, 200)
    # right padding changes only summation order: 1.6e-7 measured (AVX-512 / AVX2 / default)
    assert torch.allclose(batched[:, :9], alone, atol=1e-5)


def test_encoder_is_bidirectional_and_token_types_matter():
    model = tiny()
    ids = torch.randint(4, 200, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 200
    with torch.no_grad():
        h, h_changed = model.hidden_states(ids), model.hidden_states(changed)
        typed = model.hidden_states(ids, token_type_ids=torch.ones_like(ids))
        zeros = model.hidden_states(ids, token_type_ids=torch.zeros_like(ids))
    assert not torch.allclose(h[0, 0], h_changed[0, 0])  # the first token sees the last one
    assert not torch.allclose(h, typed) and torch.allclose(h, zeros)  # absent types are segment 0


def test_mean_pool_ignores_padding_and_normalises():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    model = tiny()
    ids = torch.randint(4, 200, (2, 6))
    emb = sentence_embeddings(model, ids, torch.ones_like(ids))
    # L2-normalised fp32: norms within a few ulps of 1; ≤ 1.2e-7 measured (AVX-512 / AVX2 / default)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-6)
    raw = sentence_embeddings(model, ids, torch.ones_like(ids), normalize=False)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), emb, atol=1e-6)  # the same op: 0.0 measured


def test_heads_refuse_clearly_when_absent():
    bare, classifier = tiny(mlm_head=False), tiny(num_labels=3)
    ids = torch.randint(4, 200, (2, 5))
    with pytest.raises(ConfigError, match="no masked-LM head"):
        bare(ids)
    with pytest.raises(ConfigError, match="no classification head"):
        bare.classify(ids)
    assert classifier.classify(ids, torch.ones_like(ids)).shape == (2, 3)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        bare.hidden_states(torch.zeros(1, 129, dtype=torch.long))


def test_tied_decoder_shares_the_embedding():
    model = tiny()
    assert model.lm_head.weight is model.embeddings.embed.weight
    assert tiny(tie_embeddings=False).lm_head.weight is not tiny(tie_embeddings=False).embeddings.embed.weight


@pytest.mark.parametrize("fields, message", [
    ({"type_vocab_size": -1}, "type_vocab_size"), ({"embed_dim": 0}, "embed_dim"),
    ({"position_offset": 2, "position": "rope"}, "position_offset"),
    ({"arch": "decoder", "num_labels": 2}, "need arch='encoder'"),
])
def test_bad_encoder_fields_are_config_errors(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**preset("bert-tiny").to_dict(), **fields})


def test_decoder_configs_keep_their_fingerprint():
    """New fields must not appear in a decoder's non-default fields, or old runs could not resume."""
    fields = preset("gpt2-tiny").non_default_fields()
    assert not {"embed_dim", "type_vocab_size", "share_layers", "num_labels", "mlm_head"} & set(fields)


def bert_like_tokenizer() -> Tokenizer:
    tok = Tokenizer.train(["[CLS] [SEP] hello world, a small corpus of words " * 20], vocab_size=300)
    tok.backend.add_special_tokens(["[CLS]", "[SEP]"])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def test_encoder_inputs_are_framed_and_truncated_keeping_the_closing_token():
    tok = bert_like_tokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    ids, cut = encoder_ids(tok, "hello world " * 20, 8)
    assert cut and len(ids) == 8 and ids[0] == cls and ids[-1] == sep
    short, cut = encoder_ids(tok, "hello", 8)
    assert not cut and short[0] == cls and short[-1] == sep
    own = Tokenizer.train(["hello world " * 20], vocab_size=280)  # no post-processor: EOS first
    assert encoder_ids(own, "hello", 8)[0][0] == own.eos_id
    batch, mask, truncated = encoder_batch(tok, ["hello", "hello world " * 20], 8)
    assert batch.shape == (2, 8) and truncated == 1 and mask[0].tolist() == [1] * len(short) + [0] * (8 - len(short))
