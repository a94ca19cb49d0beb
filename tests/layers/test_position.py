"""RoPE (against transformers' LLaMA), ALiBi slopes/bias (against the paper's rule) and the
sinusoidal table (against math.sin/cos)."""

import math

import pytest
import torch

from llmkit.layers.position import (alibi_bias, alibi_slopes, apply_rope, rope_cos_sin, rope_inv_freq,
                                    sinusoidal_table)


# ---------------------------------------------------------------- RoPE

@pytest.mark.parametrize("head_dim,theta", [(8, 10000.0), (16, 500000.0), (32, 10000.0)])
def test_rope_matches_transformers_llama(head_dim, theta):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    n_heads, n_kv = 4, 2
    hf_cfg = LlamaConfig(hidden_size=n_heads * head_dim, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                         head_dim=head_dim, rope_theta=theta, max_position_embeddings=256)
    B, T = 2, 11
    positions = torch.stack([torch.arange(T), torch.arange(T) + 37])  # rows at different offsets
    q, k = torch.randn(B, n_heads, T, head_dim), torch.randn(B, n_kv, T, head_dim)

    hf_cos, hf_sin = LlamaRotaryEmbedding(hf_cfg)(q, positions)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin, unsqueeze_dim=1)

    cos, sin = rope_cos_sin(positions, rope_inv_freq(head_dim, theta), torch.float32)
    assert cos.shape == (B, 1, T, head_dim)
    # the same fp32 ops as transformers: 0.0 measured (AVX-512 / AVX2 / default) (here and for q, k)
    torch.testing.assert_close(cos[:, 0], hf_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[:, 0], hf_sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k, atol=1e-5, rtol=0)


def rotate(x, positions, theta=10000.0):
    cos, sin = rope_cos_sin(positions, rope_inv_freq(x.shape[-1], theta), x.dtype)
    return apply_rope(x, cos, sin)


def test_rope_preserves_norm_and_is_identity_at_position_zero():
    x = torch.randn(3, 4, 20, 16)
    positions = torch.randint(0, 5000, (3, 20))
    # a rotation keeps norms up to fp32 rounding of cos, sin and the 16-term sum: 4.8e-7 measured
    # (AVX-512 / AVX2 / default)
    torch.testing.assert_close(rotate(x, positions).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotate(x, torch.zeros(3, 20, dtype=torch.long)), x)
    assert (rotate(x, positions) - x).abs().max() > 1e-2  # it does rotate


# Angles are fp32 (as in LLaMA/transformers): angle p·θ_i is rounded by up to p·θ_i·2^-24 (at position ~1000,
# ~6e-5 rad). First-order error of a score: Σ_pairs |q_pair|·|k_pair|·(rounding of both angles), for these q, k and
# positions up to 117: ≤ 4.2e-5, plus ≤ ~7e-6 for cos/sin and the 32-term sum (Σ|q||k| = 24, a few eps each).
# Bound 5e-5 (was 1e-5, below that model: measured 6.7e-6 / 6.7e-6 / 6.2e-6 on AVX-512 / AVX2 / default).
# A wrong rotation changes scores by O(1): score(5, 2) − score(5, 4) is 1.8.
@pytest.mark.parametrize("offset", [1, 7, 42, 100])
def test_rope_dot_product_depends_only_on_position_difference(offset):
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m, n):
        return (rotate(q, torch.tensor([[m]])) * rotate(k, torch.tensor([[n]]))).sum().item()

    for m, n in [(5, 2), (3, 9), (0, 0), (17, 0)]:
        assert score(m, n) == pytest.approx(score(m + offset, n + offset), abs=5e-5)
    # and it does depend on the difference
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


# ---------------------------------------------------------------- ALiBi

def paper_slopes(n):
    """Press et al.'s rule, written independently of the library."""
    def geometric(m):
        return [2 ** (-8 * i / m) for i in range(1, m + 1)]

    if math.log2(n).is_integer():
        return geometric(n)
    closest = 2 ** int(math.log2(n))
    return geometric(closest) + geometric(2 * closest)[0::2][: n - closest]


def test_alibi_slopes_power_of_two():
    expected = [2.0 ** (-8 * i / 8) for i in range(1, 9)]
    assert expected[0] == 0.5 and expected[-1] == 2 ** -8
    torch.testing.assert_close(alibi_slopes(8), torch.tensor(expected))


def test_alibi_slopes_twelve_heads():
    eight = [2.0 ** (-8 * i / 8) for i in range(1, 9)]
    sixteen = [2.0 ** (-8 * i / 16) for i in range(1, 17)]
    expected = eight + sixteen[0::2][:4]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 12, 16, 20, 32])
def test_alibi_slopes_follow_the_paper_rule(n):
    slopes = alibi_slopes(n)
    assert slopes.shape == (n,)
    torch.testing.assert_close(slopes, torch.tensor(paper_slopes(n), dtype=torch.float32))


@pytest.mark.parametrize("Tq,Tk", [(5, 5), (1, 9), (3, 9)])
def test_alibi_bias_is_minus_slope_times_distance(Tq, Tk):
    slopes = alibi_slopes(6)
    q_index = torch.arange(Tk - Tq, Tk)  # newest queries
    k_index = torch.arange(Tk)
    bias = alibi_bias(slopes, q_index, k_index)
    assert bias.shape == (1, 6, Tq, Tk)
    for h in range(6):
        for qi in range(Tq):
            i = Tk - Tq + qi
            for j in range(Tk):
                # slopes are powers of two and distances small integers: exact, 0.0 measured (AVX-512 / AVX2 / default)
                assert bias[0, h, qi, j].item() == pytest.approx(-slopes[h].item() * abs(i - j), abs=1e-6)


# ---------------------------------------------------------------- sinusoidal

@pytest.mark.parametrize("dim", [8, 64])
def test_sinusoidal_table_matches_formula(dim):
    n = 50
    table = sinusoidal_table(n, dim)
    assert table.shape == (n, dim) and table.dtype == torch.float32
    for p in (0, 1, 7, 49):
        for i in (0, 1, dim // 4, dim // 2 - 1):
            angle = p / 10000 ** (2 * i / dim)
            # fp32 table vs float64 math: angles p·θ_i are exact for θ_0 = 1, else ≤ 4.9 rad (rounding ≤ ~5e-7);
            # 2.9e-8 measured (AVX-512 / AVX2 / default)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
