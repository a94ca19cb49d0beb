"""The weight formats: round-to-nearest error bounds from the step size, and the packed kernel
multiplying by exactly the weight that dequantising gives (llmkit/layers/quantized.py)."""

import pytest
import torch

from llmkit.layers.quantized import (KERNEL_MAX_ROWS, Int4Linear, Int8Linear, QuantizedWeight, WeightFormat,
                                     dequantize_weight, group_params, int4_kernel_available, quantize_weight,
                                     quantized_layer)

FORMATS = {
    "int8 per channel": WeightFormat(8, 192, True),
    "int8 g32": WeightFormat(8, 32, True),
    "int4 asymmetric g32": WeightFormat(4, 32, False),
    "int4 asymmetric g128": WeightFormat(4, 64 * 3, False),  # not a kernel group: given to it as 3 × 64
    "int4 symmetric g32": WeightFormat(4, 32, True),
    "int4 symmetric g64": WeightFormat(4, 64, True),
}
MID = {4: 8, 8: 0}  # the code that stands for 0 (int4 codes are 0..15, int8 codes −127..127)


def weights(seed=0, n=48, k=192):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 7] *= 12  # an outlier column, as trained layers have: it sets its groups' steps
    return w


@pytest.mark.parametrize("name", FORMATS)
def test_round_to_nearest_is_within_half_a_step_plus_the_bf16_rounding_of_scale_and_offset(name):
    """Each weight is its code's value to within scale/2 (round-to-nearest on the unrounded grid);
    storing scale s and offset o in bf16 moves a code's value by at most |code − mid|·|s_bf16 − s| + |o_bf16 − o|."""
    fmt = FORMATS[name]
    w = weights()
    codes, scale_b, offset_b = quantize_weight(w, fmt)
    assert codes.dtype == (torch.int8 if fmt.bits == 8 else torch.uint8)
    lo, hi = (-127, 127) if fmt.bits == 8 else (0, 15)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert scale_b.dtype == torch.bfloat16 and scale_b.shape == (48, 192 // fmt.group)
    grouped = w.reshape(48, -1, fmt.group)
    s, minimum = group_params(grouped, fmt.bits, fmt.symmetric)
    o = torch.zeros_like(s) if fmt.bits == 8 or fmt.symmetric else minimum + 8 * s
    assert torch.equal(scale_b, s.bfloat16()) and torch.equal(offset_b, o.bfloat16())  # rounded once, to nearest
    q = codes.reshape(48, -1, fmt.group).float() - MID[fmt.bits]
    bound = (s / 2)[..., None] + q.abs() * (scale_b.float() - s).abs()[..., None] + (offset_b.float() - o).abs()[..., None]
    err = (dequantize_weight(codes, scale_b, offset_b) - w).reshape(48, -1, fmt.group).abs()
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all()), float((err - bound).max())  # fp32 rounding of w/s
    assert float((err / s[..., None]).max()) > 0.4  # the bound is nearly reached: it is the right one


def test_zero_groups_stay_zero_and_asymmetric_int4_keeps_a_constant_group():
    w = torch.zeros(16, 64)
    w[:, 32:] = 0.25  # bf16-exact: asymmetric int4 stores it as the offset, every code 0
    for fmt in FORMATS.values():
        if 64 % fmt.group == 0:
            got = dequantize_weight(*quantize_weight(w, fmt))
            assert torch.equal(got[:, :32], w[:, :32]), fmt  # a zero scale does not divide by zero
            if fmt.bits == 4 and not fmt.symmetric:
                assert torch.equal(got, w)


def _layer(fmt, seed=0):
    codes, scale, offset = quantize_weight(weights(seed), fmt)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(9))
    return quantized_layer(QuantizedWeight(codes, scale, offset, bias), compute_dtype=torch.float32)


@pytest.mark.skipif(not int4_kernel_available(), reason="this torch has no CPU int4 kernel")
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("rows", [1, 5])
def test_packed_kernel_matmul_equals_the_dequantised_matmul(name, rows, monkeypatch):
    """torch's kernel (llmkit's own, which is preferred where built, is tests/quant/test_kernels.py's) multiplies bf16 activations by the packed codes with the bf16 scales, accumulating in
    fp32 and rounding its output to bf16 (int8: two passes, each rounded, then their sum): relative
    error ≤ 2^-9 per rounding, of a magnitude at most |x|·(|ŵ| + 16·scale) (the larger pass's weight)."""
    monkeypatch.setenv("LLMKIT_NATIVE_KERNELS", "0")
    fmt = FORMATS[name]
    layer = _layer(fmt)
    assert layer.kernel_passes, "the kernel should serve every format here"
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows))
    w = layer.dequantize(torch.float32)
    expected = x.bfloat16().float() @ w.t() + layer.bias
    steps = layer.scale.float().repeat_interleave(fmt.group, 1)
    magnitude = x.bfloat16().float().abs() @ (w.abs() + 16 * steps).t()
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 48)
    assert bool(((got - expected).abs() <= 3 * 2 ** -9 * magnitude + 1e-5).all())


@pytest.mark.parametrize("name", FORMATS)
def test_many_rows_multiply_by_the_dequantised_weight_in_fp32(name):
    layer = _layer(FORMATS[name])
    x = torch.randn(KERNEL_MAX_ROWS + 3, 192, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t() + layer.bias)  # fp32: summation order only


def test_layers_built_from_a_linear_are_the_round_to_nearest_weight():
    linear = torch.nn.Linear(192, 48)
    with torch.no_grad():
        linear.weight.copy_(weights(2))
    for layer, fmt in ((Int4Linear(linear, 64, symmetric=True), WeightFormat(4, 64, True)),
                       (Int4Linear(linear, 32), WeightFormat(4, 32, False)),
                       (Int8Linear(linear, 192), WeightFormat(8, 192, True))):
        assert torch.equal(layer.dequantize(torch.float32), dequantize_weight(*quantize_weight(linear.weight, fmt)))


def test_awq_input_divisor_is_applied_before_the_product():
    codes, scale, offset = quantize_weight(weights(), WeightFormat(4, 32, False))
    s = torch.rand(192, generator=torch.Generator().manual_seed(4)) + 0.5
    layer = quantized_layer(QuantizedWeight(codes, scale, offset, act_scale=s), compute_dtype=torch.float32)
    x = torch.randn(KERNEL_MAX_ROWS + 1, 192, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(layer(x), (x / s) @ dequantize_weight(codes, scale, offset).t())
