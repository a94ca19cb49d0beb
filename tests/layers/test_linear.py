"""The one-row (decode) fast path of llmkit's Linear equals nn.Linear's matmul."""

import pytest
import torch
import torch.nn.functional as F

from llmkit.layers.linear import Linear


@pytest.mark.parametrize("bias", [True, False])
# fp32: the same dot products, 0.0 measured; bf16: one output rounding (half an ulp at |y| < 2 is 3.9e-3), 3.9e-3
# measured (AVX-512 / AVX2 / default).
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("shape", [(1, 1, 48), (1, 48), (48,)])
def test_one_row_fast_path_matches_matmul(bias, dtype, atol, shape):
    layer = Linear(48, 80, bias=bias).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    y = layer(x)
    assert y.shape == (*shape[:-1], 80)
    torch.testing.assert_close(y.float(), F.linear(x, layer.weight, layer.bias).float(), atol=atol, rtol=0)


def test_many_rows_and_gradients_take_the_ordinary_path():
    layer = Linear(16, 8)
    x = torch.randn(3, 5, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    one = torch.randn(1, 1, 16, requires_grad=True)
    layer(one).sum().backward()  # the mv path is differentiable too
    assert one.grad is not None
