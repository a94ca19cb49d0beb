"""prepare_for_decoding: fused projections change nothing; int4 weights are the quantiser's weights.

Also the int4 format itself: round-to-nearest error bounds, Q4_1-grid weights coming back exactly,
and the kernel path (few rows) agreeing with the dequantise-then-matmul path (many rows).
"""

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import GenerationError
from llmkit.inference.generate import generate
from llmkit.inference.optimize import prepare_for_decoding
from llmkit.inference.sampling import SamplingParams
from llmkit.layers.lora import LoraConfig, apply_lora
from llmkit.layers.quantized import (KERNEL_MAX_ROWS, Int4Linear, Int8Linear, dequantize_int4, int4_kernel_available,
                                     quantize_int4, quantize_int8)
from llmkit.models.build import build_model
from llmkit.presets import preset

GREEDY = SamplingParams(temperature=0.0)
VOCAB = 97


def model(seed=0, **overrides):
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, max_seq_len=96, d_model=64, n_layers=2, n_heads=4, init_std=0.2)
    return build_model(ModelConfig(**{**base, **overrides})).eval()


FAMILIES = {
    "llama (GQA, SwiGLU, RoPE)": dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_heads=2, bias=False),
    "gpt2 (biases, learned positions, plain MLP)": dict(),
    "qwen2 (q/k/v biases only)": dict(norm="rmsnorm", mlp="swiglu", position="rope", n_kv_heads=2, bias=False,
                                      qkv_bias=True),
}


def padded_batch():
    ids = torch.randint(1, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    mask[2, :3] = 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_fusion_leaves_logits_and_greedy_tokens_unchanged(family):
    plain, fused = model(**FAMILIES[family]), model(**FAMILIES[family])
    report = prepare_for_decoding(fused)
    assert report.fused_attention == 2 and report.int4_linears == 0
    assert report.fused_mlp == (2 if FAMILIES[family].get("mlp") == "swiglu" else 0)
    assert not hasattr(fused.stack.blocks[0].attn, "q_proj")  # the separate weights are gone, not duplicated
    ids, mask = padded_batch()
    with torch.no_grad():  # fused q/k/v and gate/up: the same dot products, 0.0 measured (AVX-512 / AVX2 / default)
        torch.testing.assert_close(fused(ids, attention_mask=mask), plain(ids, attention_mask=mask),
                                   atol=1e-5, rtol=1e-5)
    prompts = [ids[0, 7:].tolist(), ids[1].tolist()]
    assert generate(fused, prompts, max_new_tokens=32, params=GREEDY) == \
        generate(plain, prompts, max_new_tokens=32, params=GREEDY)


def test_seq2seq_fuses_self_attention_and_leaves_cross_attention_alone():
    torch.manual_seed(0)
    cfg = preset("t5v11-tiny", vocab_size=VOCAB)
    plain = build_model(cfg).eval()
    fused = build_model(cfg).eval()
    fused.load_state_dict(plain.state_dict())
    report = prepare_for_decoding(fused)
    assert report.fused_attention == cfg.n_layers + (cfg.n_decoder_layers or cfg.n_layers)
    assert hasattr(fused.decoder.blocks[0].cross_attn, "q_proj")
    src = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    tgt = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the same dot products: 0.0 measured (AVX-512 / AVX2 / default)
        torch.testing.assert_close(fused(src, tgt), plain(src, tgt), atol=1e-5, rtol=1e-5)


def test_lora_wrapped_projections_are_not_fused():
    m = model(**FAMILIES["llama (GQA, SwiGLU, RoPE)"])
    apply_lora(m, LoraConfig(rank=2, targets=("q_proj", "v_proj")))
    report = prepare_for_decoding(m)
    assert report.fused_attention == 0 and report.fused_mlp == 2


def test_unknown_quantisation_is_refused():
    with pytest.raises(GenerationError, match="int3"):
        prepare_for_decoding(model(), quantize="int3")


# ---------------------------------------------------------------- the int4 format

def test_round_to_nearest_error_is_at_most_half_a_step():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    codes, scale, minimum = quantize_int4(w)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    err = (dequantize_int4(codes, scale, minimum) - w).abs().reshape(48, 3, 32)
    assert bool((err <= scale[..., None] / 2 + 1e-6).all())


def test_weights_on_a_q4_1_grid_come_back_exactly():
    """A Q4_1 block is code·d + m with codes spanning 0..15: re-quantising finds the same d, m, codes."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.uint8)
    codes[:, 0::32], codes[:, 1::32] = 0, 15  # every group uses the full range, as Q4_1's min/max fit does
    d = torch.rand(32, 2, generator=g).half().float() * 0.1 + 0.01  # fp16 scales, as GGUF stores them
    m = -torch.rand(32, 2, generator=g).half().float()
    w = dequantize_int4(codes, d, m)
    got_codes, got_d, got_m = quantize_int4(w)
    assert torch.equal(got_codes, codes)
    # code·d + m in fp32 for |w| ≤ ~2: ≤ 1 ulp (2.4e-7); 1.2e-7 measured (AVX-512 / AVX2 / default)
    torch.testing.assert_close(dequantize_int4(got_codes, got_d, got_m), w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("out_features", [48, 40])  # 40: not a multiple of 16, so no kernel, dequantised path only
@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS + 5])
def test_int4_linear_multiplies_by_its_dequantised_weight(out_features, rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, out_features, bias=True)
    q = Int4Linear(linear)
    x = torch.randn(rows, 64)
    expected = x.bfloat16().float() @ q.dequantize(torch.float32).t() + linear.bias.detach()
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.02)  # bf16 products and output rounding
    # and the dequantised weight is the layer's weight to within half a quantisation step
    step = (linear.weight.detach().reshape(out_features, 2, 32).aminmax(dim=-1)[1]
            - linear.weight.detach().reshape(out_features, 2, 32).aminmax(dim=-1)[0]) / 15
    err = (q.dequantize(torch.float32) - linear.weight.detach()).abs().reshape(out_features, 2, 32)
    assert bool((err <= step[..., None] / 2 + 0.02 * step[..., None].abs().max() + 1e-3).all())


def test_int4_model_matches_its_dequantised_weights_and_generates():
    """A prepared int4 model computes what an fp32 model holding the dequantised weights computes,
    up to bf16 activations in the matrix products."""
    m = model(**FAMILIES["llama (GQA, SwiGLU, RoPE)"])
    q = model(**FAMILIES["llama (GQA, SwiGLU, RoPE)"])
    report = prepare_for_decoding(q, quantize="int4")
    assert report.int4_linears == 2 * 4  # qkv, o, gate_up, down per layer
    # the head (97 rows): torch's kernel cannot take it (not a multiple of 16), llmkit's own can (8-bit)
    assert report.kept_linears + report.int8_linears == 1
    prepare_for_decoding(m)
    with torch.no_grad():  # give the fp32 reference the int4 model's weights
        for name, module in q.named_modules():
            if isinstance(module, Int4Linear):
                m.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    ids, mask = padded_batch()
    with torch.no_grad():
        ref, got = m(ids, attention_mask=mask), q(ids, attention_mask=mask)
    # bf16 activations into 9 products in series (see the fp32 decoding test below: ≲ 3.5 % of the logit scale in
    # the worst, linear case); measured 0.11 of 5.9 (1.9 %) on AVX-512, AVX2 and default kernels
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    out = generate(q, [ids[1].tolist()], max_new_tokens=16, params=GREEDY)[0]
    assert len(out) == 16 and all(0 <= t < VOCAB for t in out)


# ---------------------------------------------------------------- the int8 head (Q8_0 as two int4 passes)

needs_kernel = pytest.mark.skipif(not int4_kernel_available(), reason="this torch has no CPU int4 kernel")


def test_weights_on_a_q8_0_grid_come_back_exactly():
    """A Q8_0 block is code·d with the largest |code| = 127 (d = max|w|/127): re-quantising finds d and
    the codes again."""
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-127, 128, (16, 64), generator=g, dtype=torch.int32)
    codes[:, 0::32] = 127 * torch.where(torch.rand(16, 2, generator=g) < 0.5, -1, 1)  # each group reaches ±127
    d = torch.rand(16, 2, generator=g).half().float() * 0.01 + 1e-3  # fp16 scales, as GGUF stores them
    w = (codes.reshape(16, 2, 32).float() * d[..., None]).reshape(16, 64)
    got_codes, got_d = quantize_int8(w)
    assert got_codes.dtype == torch.int8 and torch.equal(got_codes.int(), codes)
    torch.testing.assert_close(got_d, d, atol=0, rtol=0)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS + 5])  # the last: the dequantised path
def test_int8_linear_is_its_dequantised_weight_and_close_to_the_original(rows, monkeypatch):
    monkeypatch.setenv("LLMKIT_NATIVE_KERNELS", "0")  # torch's kernel (llmkit's own: tests/quant/test_kernels.py)
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False)
    q = Int8Linear(linear)
    assert len(q.kernel_passes) == 2
    x = torch.randn(rows, 64)
    w = q.dequantize(torch.float32)
    # within half a step (max|w|/127 per group) of the original weight, plus the scale's bf16 rounding
    step = linear.weight.detach().abs().reshape(48, 2, 32).amax(-1) / 127
    bound = step / 2 + 127 * (step.bfloat16().float() - step).abs() + 1e-7
    assert bool(((w - linear.weight.detach()).abs().reshape(48, 2, 32) <= bound[..., None]).all())
    got = q(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 48)
    torch.testing.assert_close(got, x.bfloat16().float() @ w.t(), atol=0.03, rtol=0.02)  # bf16 products/outputs
    # the two kernel passes (16·scale·high + scale·low) are the 8-bit weight, not 4-bit halves of it
    assert (got - x @ linear.weight.detach().t()).abs().max() < 0.05


def test_prepared_int4_model_gets_an_int8_head_where_the_kernel_serves_it():
    m = model(**FAMILIES["llama (GQA, SwiGLU, RoPE)"], vocab_size=96)  # a multiple of 16: the kernel serves it
    report = prepare_for_decoding(m, quantize="int4")
    if not int4_kernel_available():
        assert report.int8_linears == 0 and report.kept_linears == 1
        return
    assert report.int8_linears == 1 and report.kept_linears == 0 and isinstance(m.lm_head, Int8Linear)
    assert m.embeddings.embed.weight.dtype == torch.float32  # the tied embedding keeps its own weight
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(5))
    out = generate(m, [ids[0].tolist()], max_new_tokens=8, params=GREEDY)[0]
    assert len(out) == 8 and all(0 <= t < 96 for t in out)


# ---------------------------------------------------------------- the compute dtype (fp32 where bf16 is emulated)

@pytest.mark.parametrize("rows", [1, KERNEL_MAX_ROWS + 5])
def test_int4_linear_in_fp32_multiplies_by_the_same_weight(rows):
    """compute_dtype=fp32: many-row products are the fp32 matmul by the dequantised weight (nothing
    rounded to bf16 but the stored scales); one-row products still run the kernel, on the input
    rounded to bf16 (its fp32 path is ~14× slower), and return fp32."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    q = Int4Linear(linear, compute_dtype=torch.float32)
    w = q.dequantize()
    assert w.dtype == torch.float32 and torch.equal(w, Int4Linear(linear).dequantize(torch.float32))
    x = torch.randn(rows, 64)
    got = q(x)
    assert got.dtype == torch.float32
    if rows > KERNEL_MAX_ROWS or not q.kernel_passes:
        torch.testing.assert_close(got, x @ w.t() + linear.bias.detach())  # fp32 tolerances: summation order only
    else:  # bf16 input and output of the kernel: |x·w| ≲ 4 here, so 2^-8 relative is < 0.02
        torch.testing.assert_close(got, x.bfloat16().float() @ w.t() + linear.bias.detach(), atol=0.02, rtol=0.01)


def test_quantised_layers_compute_in_the_models_dtype_unless_told():
    m32 = model(**FAMILIES["llama (GQA, SwiGLU, RoPE)"], vocab_size=96)
    assert prepare_for_decoding(m32, quantize="int4").compute_dtype == torch.float32
    assert {mod.compute_dtype for mod in m32.modules() if isinstance(mod, (Int4Linear, Int8Linear))} == {torch.float32}
    m16 = model(**FAMILIES["llama (GQA, SwiGLU, RoPE)"]).to(torch.bfloat16)
    assert prepare_for_decoding(m16, quantize="int4").compute_dtype == torch.bfloat16
    mixed = model(**FAMILIES["llama (GQA, SwiGLU, RoPE)"])
    report = prepare_for_decoding(mixed, quantize="int4", dtype="bf16")  # fp32 model, bf16 prefill: the old default
    assert report.compute_dtype == torch.bfloat16 and report.describe().startswith("int4 weights")
    assert prepare_for_decoding(model(), dtype="fp32").compute_dtype is None  # nothing quantised
    with pytest.raises(GenerationError, match="fp8"):
        prepare_for_decoding(model(), quantize="int4", dtype="fp8")


def _int4_pair(**overrides):
    """An fp32 model prepared with int4 weights computing in fp32, and an fp32 model holding its
    dequantised weights (untied, so the 8-bit head's weight can be given to the reference alone)."""
    cfg = {**FAMILIES["llama (GQA, SwiGLU, RoPE)"], "vocab_size": 96, "tie_embeddings": False, **overrides}
    m, q = model(**cfg), model(**cfg)
    report = prepare_for_decoding(q, quantize="int4", dtype=torch.float32)
    assert report.int4_linears == 2 * 4 and report.int8_linears == (1 if int4_kernel_available() else 0)
    prepare_for_decoding(m)
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, (Int4Linear, Int8Linear)):
                m.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    return m, q


def test_fp32_int4_prefill_is_the_dequantised_fp32_model(monkeypatch):
    """Every product on the dequantised path (as a prefill longer than KERNEL_MAX_ROWS runs): the int4
    model in fp32 is the fp32 model with the dequantised weights, up to fp32 summation order — so the
    logits agree to ~1e-6 of their scale and greedy decoding picks the same tokens."""
    m, q = _int4_pair()
    monkeypatch.setattr("llmkit.layers.quantized.KERNEL_MAX_ROWS", 0)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref, got = m(ids, attention_mask=mask), q(ids, attention_mask=mask)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()
    prompts = [ids[0, 7:].tolist(), ids[1].tolist()]
    assert generate(q, prompts, max_new_tokens=32, params=GREEDY) == generate(m, prompts, max_new_tokens=32,
                                                                              params=GREEDY)


def test_fp32_int4_decoding_is_close_to_the_dequantised_fp32_model():
    """With the kernel (few rows: decoding), each int4 product's input and output are rounded to bf16
    (8 significant bits: relative error ≤ 2^-9 ≈ 0.2 % each). Nine products lie in series (four per
    layer, then the head's two kernel passes summed in bf16), so in the worst, linear case the errors add
    to ~9 × 2 × 0.2 % ≈ 3.5 % of the logit scale: bound 4 % (measured 1.6 %). The greedy token is the
    same wherever the reference's top two logits are further apart than twice the largest difference
    (a random tiny model has near ties; there either token is right)."""
    m, q = _int4_pair()
    ids, mask = padded_batch()
    with torch.no_grad():
        ref, got = m(ids, attention_mask=mask), q(ids, attention_mask=mask)
    diff = (got - ref).abs().max()
    print(f"fp32 int4 (kernel) vs dequantised fp32: max |Δlogit| {diff:.4f} of {ref.abs().max():.2f}")
    assert diff < 0.04 * ref.abs().max()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1] > 2 * diff) & mask.bool()
    assert clear.sum() > clear.numel() // 4  # the check covers enough positions to mean something
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
