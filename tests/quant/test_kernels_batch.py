"""llmkit's int4 kernels for a batch decoding together: products of many rows (the rows share each
expansion of the weights) and the whole-block step over a padded batch, each against the reference
(the dequantised fp32 matmul; the Block's own layers), on every vector path this CPU runs."""

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.inference.decoding_state import left_pad
from llmkit.inference.kv_cache import KVCache
from llmkit.inference.optimize import prepare_for_decoding
from llmkit.layers.quantized import Int4Linear, WeightFormat, dequantize_weight, quantize_weight
from llmkit.models.build import build_model
from llmkit.quant import kernels
from llmkit.quant.kernels.block import BlockStep

NATIVE = kernels.native()
pytestmark = pytest.mark.skipif(NATIVE is None, reason=f"llmkit's kernels are unavailable here: "
                                                       f"{kernels.unavailable_reason()}")
ISAS = list(range(NATIVE.isa + 1)) if NATIVE is not None else []  # 0 portable C++, 1 AVX2, 2 AVX-512
U = 2.0 ** -24  # fp32 unit roundoff


def _bound(codes, scale, offset, x, bits=4):
    """fp32's error model for x·wᵀ summed in two orders: each sum of K terms is within K·u of the sum of
    their magnitudes, and a term is at most (|code − 8|·scale + |offset|)·|x| (int8: |code|·scale·|x|;
    code·scale + minimum, as rounded, is within that plus rounding), so |difference| ≤ 2·(K + 4)·u·that
    magnitude."""
    N, K = codes.shape
    per = K // scale.shape[1]
    middle = 8 if bits == 4 else 0
    magnitude = ((codes.float() - middle).abs() * scale.float().repeat_interleave(per, 1)
                 + offset.float().abs().repeat_interleave(per, 1))
    return 2 * (K + 4) * U * (x.double().abs() @ magnitude.double().t()).float() + 1e-30


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [4, 8])
# 1: the one-row kernel (4 output rows at a time; 42 leaves 2 over); 5, 7: tiles of 4 rows sharing an
# expansion of the weights, with a last tile of 1 or 3 (AVX-512 takes 7 on the panel); 27, 64: a panel of
# expanded weights for all rows (many_rows.inc), 42 output rows leaving AVX-512's tiles of 4 two over,
# 27 rows leaving partial tiles of rows on both widths
@pytest.mark.parametrize("rows", [1, 5, 7, 27, 64])
def test_batches_on_the_native_kernel_equal_the_dequantised_fp32_matmul(isa, bits, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(42, 192, generator=g) * 0.05
    w[:, 3] *= 20  # an outlier column: its groups get a large step
    codes, scale, offset = quantize_weight(w, WeightFormat(bits, 64, bits == 8))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4) if bits == 4 else codes
    x = torch.randn(rows, 192, generator=g)
    bias = torch.randn(42, generator=g)
    got = NATIVE.ops.linear(x, packed, scale, offset, 64, bias, None, isa)
    expected = x @ dequantize_weight(codes, scale, offset).t() + bias
    err, bound = (got - expected).abs(), _bound(codes, scale, offset, x, bits)
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("isa", [isa for isa in ISAS if isa >= 1])
@pytest.mark.parametrize("bits", [4, 8])
def test_many_rows_span_several_panels_and_their_edges(isa, bits):
    """A weight taller than one panel (128 KB of fp32 weights: 128 rows of 256) whose height is a multiple
    of neither tile width, times rows that fill no whole tile of rows at the end."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(301, 256, generator=g) * 0.05
    codes, scale, offset = quantize_weight(w, WeightFormat(bits, 128, bits == 8))
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4) if bits == 4 else codes
    x, bias = torch.randn(13, 256, generator=g), torch.randn(301, generator=g)
    got = NATIVE.ops.linear(x, packed, scale, offset, 128, bias, None, isa)
    expected = x @ dequantize_weight(codes, scale, offset).t() + bias
    err, bound = (got - expected).abs(), _bound(codes, scale, offset, x, bits)
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_a_decoding_batch_of_16_rows_stays_on_the_native_kernel(compute_dtype):
    """The serving engine's 16 concurrent rows must not dequantise every weight on every step (they did
    past 8 rows); past the layer's measured crossover they do."""
    layer = Int4Linear(torch.nn.Linear(128, 48), compute_dtype=compute_dtype)
    dequantised = []
    original = layer._weight_for_product
    layer._weight_for_product = lambda dtype: dequantised.append(dtype) or original(dtype)
    assert layer.native_max_rows() >= 16
    x = torch.randn(16, 128)
    torch.testing.assert_close(layer(x), x @ layer.dequantize(torch.float32).t() + layer.bias, atol=1e-5, rtol=1e-5)
    assert not dequantised
    layer(torch.randn(layer.native_max_rows() + 1, 128))
    assert dequantised == [compute_dtype]


def _model():
    cfg = ModelConfig(vocab_size=96, max_seq_len=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, init_std=0.2,
                      norm="rmsnorm", mlp="swiglu", position="rope", bias=False)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    assert prepare_for_decoding(m, quantize="int4", dtype=torch.float32).block_steps == 2
    return m


def _decode(m, prompts, tokens):
    """A left-padded batch (as generate and the serving engine hold it): the prompts, then each step's
    tokens for every row; logits of the steps (B, steps, vocab)."""
    ids, mask = left_pad(prompts, 0)
    cache = KVCache.empty(m.cfg, len(prompts), ids.shape[1] + len(tokens) + 1)
    m(ids, attention_mask=mask, cache=cache)
    out = []
    for step in tokens:
        mask = None if mask is None else torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        out.append(m(torch.tensor(step)[:, None], attention_mask=mask, cache=cache))
    return torch.cat(out, 1)


@pytest.mark.parametrize("isa", ISAS)
def test_a_padded_batch_decodes_in_one_call_per_block_as_its_layers_do(isa):
    """Three rows of different lengths (each sees only its own positions) and an unpadded pair: logits
    within 1e-5 of their scale of the Block's layers (fp32; the two differ in summation order and the
    softmax's exp, < 2e-7 relative), and the steps did serve every decode call."""
    m = _model()
    blocks = list(m.stack.blocks)
    served = []

    def counted(step):
        return lambda x, args: served.append(step(x, args)) or served[-1]

    g = torch.Generator().manual_seed(isa)
    for prompts in ([[5, 9, 1, 33, 2, 8, 70], [4, 11], [60, 61, 62, 63]], [[1, 2, 3], [7, 8, 9]]):
        tokens = torch.randint(1, 96, (4, len(prompts)), generator=g).tolist()
        with torch.inference_mode():
            for b in blocks:
                b.decode_step = None
            ref = _decode(m, prompts, tokens)
            for b in blocks:
                b.decode_step = counted(BlockStep(b, kernels.Kernels(NATIVE.ops, isa)))
            served.clear()
            got = _decode(m, prompts, tokens)
        assert [y is None for y in served] == [True] * 2 + [False] * 8  # the prompt declined; each step served
        assert (got - ref).abs().max() < 1e-5 * ref.abs().max(), float((got - ref).abs().max())
