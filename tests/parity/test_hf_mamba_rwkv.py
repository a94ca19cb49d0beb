"""llmkit's RWKV-4 and Mamba bodies against transformers' RwkvForCausalLM and MambaForCausalLM.

Tiny randomly initialised reference models are built in the test (no download), saved as Hugging
Face directories with a tokenizer, loaded through `llmkit.load`, and compared: logits within 1e-4,
greedy generation token for token, and an llmkit export read back by transformers.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import llmkit
from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams
from llmkit.io.hf import save_hf
from hf_tiny import BOS, EOS, PAD, VOCAB, save_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
GREEDY = SamplingParams(temperature=0.0)


def reference(kind: str):
    torch.manual_seed(0)
    ids = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if kind == "mamba":
        config = transformers.MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=2, expand=2,
                                          conv_kernel=4, use_mambapy=False, **ids)
        return transformers.MambaForCausalLM(config).eval()
    # rescale_every=0: transformers would otherwise halve activations every 6 layers in eval mode
    config = transformers.RwkvConfig(hidden_size=64, num_hidden_layers=3, context_length=128,
                                     intermediate_size=160, rescale_every=0, **ids)
    model = transformers.RwkvForCausalLM(config).eval()
    with torch.no_grad():  # its init leaves time_first all ones; vary it so the bonus is really tested
        for block in model.rwkv.blocks:
            block.attention.time_first.uniform_(-1.0, 1.0)
    return model


@pytest.fixture(scope="module", params=["mamba", "rwkv"])
def pair(request, tmp_path_factory):
    kind = request.param
    hf = reference(kind)
    directory = tmp_path_factory.mktemp(f"hf_{kind}")
    hf.save_pretrained(directory)
    save_tokenizer(train_tokenizer(), directory, bos_prefix=False)
    return kind, hf, llmkit.load(directory), directory


def test_logits_match_transformers(pair):
    kind, hf, lm, _ = pair
    assert lm.model.cfg.body == kind
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = lm.model(ids)
    assert expected.abs().max() > 0.1  # a real signal, not two zero tensors
    # fp32 summation order only: 1.2e-6 / 1.2e-6 / 1.4e-6 measured (AVX-512 / AVX2 / default)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    _, hf, lm, _ = pair
    prompt = [5, 17, 42, 99, 7]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               eos_token_id=None, pad_token_id=PAD)[0, len(prompt):].tolist()
    got = generate(lm.model, [prompt], max_new_tokens=12, params=GREEDY)[0]
    assert got == expected


def test_export_reads_back_in_transformers(pair, tmp_path):
    kind, hf, lm, _ = pair
    out = save_hf(lm.model, lm.tokenizer, tmp_path / "export")
    cls = transformers.MambaForCausalLM if kind == "mamba" else transformers.RwkvForCausalLM
    back = cls.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_wrong_shape_in_directory_is_refused(pair, tmp_path):
    _, _, _, directory = pair
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    config = json.loads((bad / "config.json").read_text())
    config["hidden_size"] = 48  # the weights are 64 wide
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(llmkit.errors.ModelFormatError, match="has shape"):
        llmkit.load(bad)
