"""Parity with `transformers` for Hugging Face decoder directories, in and out.

Tiny random GPT-2, LLaMA, Mistral and Qwen2 models (tied and untied) are built and saved in-test,
then loaded through the production path, `llmkit.load`. Checked: logits on right- and left-padded
batches (1e-4, fp32), 32 greedy tokens, tokenizer ids on multilingual text, RoPE scaling, and the
export round trip HF → llmkit → HF, including models trained (here: initialised) by llmkit.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmkit
from llmkit.config import ModelConfig, preset
from llmkit.inference.generate import generate_stream
from llmkit.inference.sampling import SamplingParams
from llmkit.io.checkpoint import save_checkpoint
from llmkit.io.hf import save_hf
from llmkit.io.weights import model_tensors
from llmkit.models.causal_lm import CausalLM
from hf_tiny import EOS, PAD, TEXTS, VOCAB, build_hf_model, train_tokenizer

transformers = pytest.importorskip("transformers")

CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2-untied": ("gpt2", {"tie_word_embeddings": False}),
    "llama": ("llama", {}),
    "llama-tied-bias": ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    "mistral": ("mistral", {"sliding_window": None}),
    # a window shorter than the test sequences: llmkit's sliding-window pattern (and ring-buffer cache)
    "mistral-window": ("mistral", {"sliding_window": 6}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
}
HAS_ROPE_SCALING = "rope_scaling" in {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tok, tmp_path_factory):
    """(HF model, llmkit LanguageModel, directory) for one case."""
    family, overrides = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    hf = build_hf_model(family, directory, tok, **overrides)
    return hf, llmkit.load(directory), directory


def padded_batch(tok, prefix: list[int], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [prefix + tok.encode(text) for text in (TEXTS[0], TEXTS[1][:8], TEXTS[3])]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_logits_match_on_padded_batch(pair, left):
    hf, lm, _ = pair
    ids, mask = padded_batch(lm.tokenizer, lm.prefix_ids, left=left)
    # Left padding: HF counts positions from the buffer start unless told; llmkit from each row's first token.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = lm.model(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=positions if left else None).logits
    real = mask.bool()
    assert torch.isfinite(ours[real]).all()
    # fp32 summation order only: ≤ 2.3e-6 measured (AVX-512 / AVX2 / default): 40× below
    diff = (ours[real] - theirs[real]).abs().max().item()
    assert diff < 1e-4, diff


def test_greedy_32_tokens_match(pair):
    hf, lm, _ = pair
    prompt = lm.prefix_ids + lm.tokenizer.encode("def hello(): 你好")
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=PAD)
    ours = [step[0] for step in generate_stream(lm.model, [prompt], max_new_tokens=32,
                                                params=SamplingParams(temperature=0.0), eos_ids=())]
    assert ours == theirs[0, len(prompt):].tolist()
    assert len(ours) == 32


def test_loaded_metadata(pair):
    hf, lm, _ = pair
    family = hf.config.model_type
    assert lm.prefix_ids == ([] if family == "gpt2" else [lm.tokenizer.bos_id])
    assert lm.eos_ids == [EOS]
    assert lm.model.cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert not lm.model.training


def test_tokenizer_ids_match_transformers(tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    build_hf_model("llama", tmp_path, tok)
    lm = llmkit.load(tmp_path)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in [*TEXTS, "混合 mixed 🎉 text\n\tdef f():  pass", " " * 9 + "x" + "\n" * 5, "<|eos|> literal"]:
        ids = lm.tokenizer.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert lm.prefix_ids + ids == theirs.encode(text, add_special_tokens=True)
        assert lm.tokenizer.decode(ids) == text


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.skipif(not HAS_ROPE_SCALING, reason="ModelConfig has no rope_scaling field yet")
@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
@pytest.mark.parametrize("style", ["rope_parameters", "legacy_rope_scaling"])
def test_rope_scaling_matches(tmp_path, tok, kind, style):
    params = {**ROPE_SCALINGS[kind], "rope_theta": 500.0}
    hf = build_hf_model("llama", tmp_path, tok, rope_parameters=dict(params))
    if style == "legacy_rope_scaling":  # the transformers 4.x spelling: top-level theta, "type" key
        data = json.loads((tmp_path / "config.json").read_text())
        del data["rope_parameters"]
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")}
        data.update(rope_theta=500.0, rope_scaling={"type": kind, **scaling})
        (tmp_path / "config.json").write_text(json.dumps(data))
    lm = llmkit.load(tmp_path)
    assert lm.model.cfg.rope_scaling == kind and lm.model.cfg.rope_theta == 500.0
    # 160 tokens: past the original context (32) and past max_position_embeddings (128), where dynamic
    # NTK starts to rescale (the forward allows it; generation stops at max_seq_len).
    ids = torch.randint(3, VOCAB, (2, 160), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # fp32 summation order only, 160 positions of scaled RoPE: ≤ 3.5e-6 measured (AVX-512 / AVX2 / default),
        # 28× below
        diff = (lm.model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_gpt2_bare_names_and_stale_buffers_load(tmp_path, tok):
    """Older GPT-2 files name tensors without "transformer." and keep the causal-mask buffers."""
    hf = build_hf_model("gpt2", tmp_path, tok)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    tensors.update({f"h.{i}.attn.bias": torch.ones(1, 1, 128, 128) for i in range(2)})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(3, VOCAB, (1, 20))
    with torch.no_grad():
        # fp32 summation order only: 1.4e-6 measured (AVX-512 / AVX2 / default)
        assert (llmkit.load(tmp_path).model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_sliding_window_maps_to_the_pattern_or_caps_the_context(tmp_path, tok):
    build_hf_model("mistral", tmp_path / "m", tok, sliding_window=48)
    cfg = llmkit.load(tmp_path / "m").model.cfg  # every Mistral layer slides: llmkit's pattern, full context
    assert (cfg.attention_pattern, cfg.attention_window, cfg.max_seq_len) == ("sliding_window", 48, 128)
    # Qwen2 sliding only from layer 1 on: one pattern per model cannot say that, so the context stops at the window
    build_hf_model("qwen2", tmp_path / "q", tok, use_sliding_window=True, sliding_window=48, max_window_layers=1)
    cfg = llmkit.load(tmp_path / "q").model.cfg
    assert (cfg.attention_pattern, cfg.max_seq_len) == ("full", 48)


# ---- export ------------------------------------------------------------------------------------

def assert_transformers_reads(out: Path, lm, *, atol: float = 1e-5) -> None:
    """transformers loads `out` (model and tokenizer) and agrees with the llmkit model."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (theirs(ids).logits - lm.model(ids)).abs().max().item()
    # export: ≤ 1.2e-6 measured (AVX-512 / AVX2 / default) against the default 1e-5 (8×)
    assert diff < atol, diff
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS[:4]:
        assert hf_tok.encode(text) == lm.prefix_ids + lm.tokenizer.encode(text)
    assert hf_tok.eos_token == lm.tokenizer.eos_token


def test_export_round_trip(pair, tmp_path):
    hf, lm, _ = pair
    out = save_hf(lm.model, lm.tokenizer, tmp_path / "out", prefix_ids=lm.prefix_ids, eos_ids=lm.eos_ids)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                   "tokenizer.json", "tokenizer_config.json"]
    assert_transformers_reads(out, lm)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # transformers on our export vs on the original: 2.3e-6 / 2.3e-6 / 2.7e-6 (AVX-512 / AVX2 / default),
        # 3.7× below
        assert (theirs(ids).logits - hf(ids).logits).abs().max().item() < 1e-5
    again = llmkit.load(out)
    assert again.prefix_ids == lm.prefix_ids and again.eos_ids == lm.eos_ids


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_llmkit_trained_model_exports(tmp_path, tok, name):
    torch.manual_seed(0)
    cfg = preset(name, vocab_size=VOCAB)
    model = CausalLM(cfg)
    tok.save(tmp_path)
    ckpt = save_checkpoint(tmp_path / "checkpoints", 0, tensors={"model.safetensors": model_tensors(model)},
                           json_files={"config.json": {"format": "llmkit", "version": llmkit.__version__,
                                                       "model": cfg.to_dict()}},
                           copy_files={"tokenizer.json": tmp_path / "tokenizer.json"})
    lm = llmkit.load(tmp_path)  # the run directory: its newest checkpoint
    assert lm.path == ckpt and lm.prefix_ids == [EOS]
    out = save_hf(lm.model, lm.tokenizer, tmp_path / "hf", prefix_ids=lm.prefix_ids, eos_ids=lm.eos_ids)
    assert json.loads((out / "config.json").read_text())["model_type"] == name.split("-")[0]
    assert_transformers_reads(out, lm)  # transformers' tokenizer puts EOS first, as llmkit's training did
    again = llmkit.load(out)
    assert again.prefix_ids == [EOS]
    assert lm.generate("def ", max_new_tokens=8, temperature=0) == again.generate("def ", max_new_tokens=8,
                                                                                 temperature=0)


def test_convert_command(tmp_path, tok):
    build_hf_model("qwen2", tmp_path / "src", tok)
    script = Path(sys.executable).with_name("llmkit")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "llmkit.cli"]
    out = tmp_path / "converted"
    run = subprocess.run([*cmd, "convert", "--model", str(tmp_path / "src"), "--out", str(out), "--to", "hf"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_transformers_reads(out, llmkit.load(tmp_path / "src"))
