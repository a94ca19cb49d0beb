"""Parity with `transformers` for BART (post-norm with the embedding LayerNorm, learned positions
offset by 2, GELU, tied head plus final_logits_bias), in and out.

Tiny random BartForConditionalGeneration models are built and saved in-test (no download) and loaded
through `llmkit.load`. Checked on right-padded batches: encoder output and teacher-forced decoder
logits at real positions (max abs difference < 1e-4, fp32), greedy generation of 32 tokens token for
token; llmkit BART models written by `save_hf` load in transformers with the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch

import llmkit
from llmkit.config import preset
from llmkit.errors import ModelFormatError
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.seq2seq_generate import seq2seq_generate
from llmkit.io.hf import save_hf
from llmkit.models.build import build_model
from llmkit.tokenizer import Tokenizer
from seq2seq_helpers import VOCAB, bart_model, padded_batch, save_hf_dir, tokenizer_json, until_eos

pytest.importorskip("transformers")

# the same fp32 ops as transformers in the same order: 0.0 measured (AVX-512 / AVX2 / default).
TOLERANCE = 1e-4
EOS = 2


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    hf = bart_model(eos_bias=5.2)
    return hf, save_hf_dir(hf, tmp_path_factory.mktemp("bart") / "bart", "bart")


def test_bart_encoder_output_and_teacher_forced_logits_match(bart_dir):
    hf, directory = bart_dir
    model = llmkit.load(directory).model
    assert (model.cfg.position_offset, model.cfg.embed_norm, model.cfg.norm_position) == (2, True, "post")
    ids, mask = padded_batch([9, 4, 7], seed=1)
    targets, target_mask = padded_batch([6, 3, 5], seed=2)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=targets, decoder_attention_mask=target_mask)
        encoded = model.encode(ids, mask)
        logits = model(ids, targets, attention_mask=mask, decoder_attention_mask=target_mask)
    assert (encoded - ref.encoder_last_hidden_state)[mask.bool()].abs().max() < TOLERANCE
    assert (logits - ref.logits)[target_mask.bool()].abs().max() < TOLERANCE
    assert ref.logits.abs().max() > 1.0


def test_bart_greedy_generation_matches_transformers(bart_dir):
    hf, directory = bart_dir
    model = llmkit.load(directory).model
    ids, mask = padded_batch([9, 4, 7, 5], seed=3)
    sources = [row[:n].tolist() for row, n in zip(ids, mask.sum(1))]
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False, num_beams=1)
    ours = seq2seq_generate(model, sources, max_new_tokens=32, params=SamplingParams(temperature=0), eos_ids=[EOS])
    assert ours == [until_eos(row[1:].tolist(), EOS) for row in ref]
    assert max(len(o) for o in ours) == 32 and min(len(o) for o in ours) < 32  # full rows and a stopped one


def test_bart_export_loads_in_transformers_with_the_same_outputs(tmp_path):
    from tokenizers import Tokenizer as Backend
    from transformers import BartForConditionalGeneration

    torch.manual_seed(5)
    model = build_model(preset("bart-tiny", vocab_size=VOCAB, max_seq_len=64, init_std=0.2)).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)
    tokenizer = Tokenizer(Backend.from_str(tokenizer_json("bart")), bos_token="<s>", eos_token="</s>",
                          pad_token="<pad>")
    out = save_hf(model, tokenizer, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "bart"
    hf = BartForConditionalGeneration.from_pretrained(out).eval()
    ids, mask = padded_batch([8, 5], seed=6)
    targets, target_mask = padded_batch([4, 6], seed=7)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=targets, decoder_attention_mask=target_mask)
        ours = model(ids, targets, attention_mask=mask, decoder_attention_mask=target_mask)
    assert (ours - ref.logits)[target_mask.bool()].abs().max() < TOLERANCE
    assert ref.logits.abs().max() > 1.0
    again = llmkit.load(out)
    assert again.model.cfg == model.cfg.replace(init_std=0.02)  # every field but the initialisation
    with torch.no_grad():
        assert torch.equal(again.model(ids, targets, attention_mask=mask), model(ids, targets, attention_mask=mask))


@pytest.mark.parametrize("change, needle", [({"scale_embedding": True}, "scale_embedding"),
                                            ({"decoder_ffn_dim": 64}, "decoder_ffn_dim"),
                                            ({"activation_function": "swish"}, "activation_function")])
def test_bart_unsupported_configs_are_refused_by_name(bart_dir, tmp_path, change, needle):
    directory = bart_dir[1]
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelFormatError, match=needle):
        llmkit.load(tmp_path)


def test_bart_wrong_shape_or_missing_tensor_is_refused_by_name(bart_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = bart_dir[1]
    for f in directory.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    name = next(n for n in tensors if n.endswith("decoder.layers.1.fc1.weight"))
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match="fc1.weight has shape"):
        llmkit.load(tmp_path)
    del tensors[name]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match="missing tensor decoder.layers.1.fc1.weight"):
        llmkit.load(tmp_path)
