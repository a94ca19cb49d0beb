"""build_model dispatch and skip_init (no random init for weights that are loaded right after)."""

import pytest
import torch
from torch import nn

from llmkit.config import preset
from llmkit.io.weights import load_model_tensors, model_tensors
from llmkit.models.build import build_model, skip_init, tie_weights
from llmkit.models.causal_lm import CausalLM


def test_decoder_arch_builds_causal_lm():
    assert isinstance(build_model(preset("gpt2-tiny")), CausalLM)


def test_skip_init_then_strict_load_equals_the_source_model():
    torch.manual_seed(0)
    source = build_model(preset("llama-tiny", tie_embeddings=True))
    with skip_init():
        model = build_model(source.cfg)
    load_model_tensors(model, model_tensors(source), where="test")
    tie_weights(model)
    assert model.lm_head.weight is model.embeddings.embed.weight
    ids = torch.randint(0, source.cfg.vocab_size, (2, 9))
    assert torch.equal(model(ids), source(ids))


def test_skip_init_restores_initialisers_even_after_an_error():
    before = nn.init.normal_
    with pytest.raises(RuntimeError), skip_init():
        assert nn.init.normal_ is not before
        raise RuntimeError("boom")
    assert nn.init.normal_ is before
    w = torch.zeros(4, 4)
    nn.init.normal_(w)
    assert w.abs().sum() > 0
