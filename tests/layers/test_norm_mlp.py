"""LayerNorm / RMSNorm against torch and transformers; MLP / gated MLP shapes and formulas."""

import pytest
import torch
import torch.nn.functional as F

from llmkit.layers.feedforward import MLP, GatedMLP, build_mlp
from llmkit.layers.norm import LayerNorm, RMSNorm, build_norm


def randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_layernorm_equals_torch(bias, eps):
    ours = randomise(LayerNorm(24, eps=eps, bias=bias))
    ref = torch.nn.LayerNorm(24, eps=eps, elementwise_affine=True, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 24) * 4 + 2
    # the same ops as torch.nn.LayerNorm: 0.0 measured (AVX-512 / AVX2 / default)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == 24 * (2 if bias else 1)


@pytest.mark.parametrize("eps", [1e-6, 1e-1])
def test_rmsnorm_formula(eps):
    norm = randomise(RMSNorm(16, eps=eps))
    x = torch.randn(2, 7, 16) * 3 + 1
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * norm.weight
    # fp32 mean of 16 squares, then rsqrt: a few ulps (|x| ≤ ~12); 4.8e-7 measured (AVX-512 / AVX2 / default)
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    # no mean subtraction: differs from LayerNorm on inputs with a non-zero mean
    assert (norm(x) - F.layer_norm(x, (16,), norm.weight, None, eps)).abs().max() > 1e-2


def test_rmsnorm_fp16_does_not_overflow():
    norm = RMSNorm(8)
    x = torch.full((1, 8), 300.0, dtype=torch.float16)  # x² = 90000 > fp16 max
    out = norm(x)
    assert torch.isfinite(out).all()
    # fp16 output: one ulp at 1.0 is 9.8e-4; 0.0 measured (AVX-512 / AVX2 / default)
    torch.testing.assert_close(out.float(), torch.ones(1, 8), atol=1e-3, rtol=0)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rmsnorm_equals_transformers_llama(eps):
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours = randomise(RMSNorm(32, eps=eps))
    ref = LlamaRMSNorm(32, eps=eps)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 32) * 2
    # the same ops as transformers' LlamaRMSNorm: 0.0 measured (AVX-512 / AVX2 / default)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


def test_build_norm_kinds():
    assert isinstance(build_norm("layernorm", 8, eps=1e-5, bias=True), LayerNorm)
    assert build_norm("layernorm", 8, eps=1e-5, bias=False).bias is None
    rms = build_norm("rmsnorm", 8, eps=1e-6, bias=True)  # bias is ignored for RMSNorm
    assert isinstance(rms, RMSNorm) and rms.eps == 1e-6


ACT = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


@pytest.mark.parametrize("kind", list(ACT))
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_shapes_and_formula(kind, bias):
    d, f = 12, 40
    mlp = randomise(build_mlp(kind, d, f, bias=bias, dropout=0.0))
    gated = kind in ("swiglu", "geglu")
    assert isinstance(mlp, GatedMLP if gated else MLP)
    x = torch.randn(2, 3, d)
    out = mlp(x)
    assert out.shape == x.shape
    up = x @ mlp.up_proj.weight.T + (mlp.up_proj.bias if bias else 0)
    hidden = ACT[kind](x @ mlp.gate_proj.weight.T + (mlp.gate_proj.bias if bias else 0)) * up if gated \
        else ACT[kind](up)
    assert hidden.shape == (2, 3, f)
    expected = hidden @ mlp.down_proj.weight.T + (mlp.down_proj.bias if bias else 0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    n_params = (3 if gated else 2) * d * f + (((2 if gated else 1) * f + d) if bias else 0)
    assert sum(p.numel() for p in mlp.parameters()) == n_params


def test_swiglu_is_silu_gate_times_up():
    mlp = randomise(GatedMLP(6, 10, kind="swiglu", bias=False))
    x = torch.randn(4, 6)
    g, u = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    expected = (g * torch.sigmoid(g) * u) @ mlp.down_proj.weight.T
    # fp32 summation order only (K = 6 and 10): 4.8e-7 measured (AVX-512 / AVX2 / default)
    torch.testing.assert_close(mlp(x), expected, atol=1e-5, rtol=1e-5)
    # gate and up are not interchangeable
    swapped = (u * torch.sigmoid(u) * g) @ mlp.down_proj.weight.T
    assert (mlp(x) - swapped).abs().max() > 1e-3
