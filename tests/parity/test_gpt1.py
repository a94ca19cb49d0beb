"""Parity with `transformers` for GPT-1 (`openai-gpt`, OpenAIGPTLMHeadModel), in and out.

A tiny random model (every LayerNorm and bias perturbed, so a dropped or swapped one shows) is saved
in-test and loaded through `llmkit.load`: logits on right- and left-padded batches within 1e-4
(fp32), 16 greedy tokens identical to transformers' `generate`, and llmkit's own `gpt1-tiny` written
by `save_hf` loads in transformers with the same logits.
"""

from __future__ import annotations

import json

import pytest
import torch

import llmkit
from llmkit.config import preset
from llmkit.errors import ModelFormatError
from llmkit.inference.generate import generate_stream
from llmkit.inference.sampling import SamplingParams
from llmkit.io.hf import save_hf
from llmkit.models.build import build_model
from hf_tiny import PAD, VOCAB, save_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

# fp32 summation order only (transformers masks with -1e4 and finfo.min, llmkit with -inf; both give
# exactly 0 after the softmax): measured worst 6.0e-7 (AVX-512 and AVX2 kernels).
TOLERANCE = 1e-4
LENGTHS = (11, 6, 2)


def hf_gpt1(directory, **overrides):
    torch.manual_seed(0)
    config = transformers.OpenAIGPTConfig(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1,
                                          pad_token_id=PAD, **overrides)
    model = transformers.OpenAIGPTLMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    save_tokenizer(train_tokenizer(), directory, bos_prefix=False)
    return model


def padded(left: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.full((len(LENGTHS), max(LENGTHS)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        span = slice(max(LENGTHS) - n, None) if left else slice(0, n)
        ids[row, span], mask[row, span] = torch.randint(3, VOCAB, (n,), generator=g), 1
    return ids, mask


@pytest.mark.parametrize("overrides", [{}, {"afn": "relu", "tie_word_embeddings": False}])
@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_logits_match_transformers(tmp_path, overrides, left):
    hf = hf_gpt1(tmp_path, **overrides)
    lm = llmkit.load(tmp_path)
    cfg = lm.model.cfg
    assert (cfg.norm_position, cfg.position, cfg.tie_embeddings) == ("post", "learned", "afn" not in overrides)
    ids, mask = padded(left)
    # left padding: transformers counts positions from the buffer start unless told; llmkit from each row's first token
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (ours - theirs).abs()[real].max() < TOLERANCE


def test_greedy_tokens_match_transformers(tmp_path):
    """Cached decoding through the post-norm blocks gives transformers' full-recompute tokens."""
    hf = hf_gpt1(tmp_path)
    lm = llmkit.load(tmp_path)
    prompt = lm.tokenizer.encode("The quick brown fox")
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=PAD)
    ours = [step[0] for step in generate_stream(lm.model, [prompt], max_new_tokens=16,
                                                params=SamplingParams(temperature=0.0), eos_ids=())]
    assert ours == theirs[0, len(prompt):].tolist()


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "mlp": "relu"}])
def test_export_loads_in_transformers(tmp_path, overrides):
    torch.manual_seed(0)
    model = build_model(preset("gpt1-tiny", vocab_size=VOCAB, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = save_hf(model, train_tokenizer(), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "openai-gpt"
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = padded(left=False)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask).logits
        ours = model(ids, attention_mask=mask)
        back = llmkit.load(out).model(ids, attention_mask=mask)
    real = mask.bool()
    assert (ours - theirs).abs()[real].max() < TOLERANCE
    assert (back - ours).abs()[real].max() < TOLERANCE


def test_unsupported_activation_is_a_one_line_error(tmp_path):
    hf_gpt1(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["afn"] = "silu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="afn 'silu' is not supported"):
        llmkit.load(tmp_path)
