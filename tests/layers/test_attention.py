"""Attention kernel equivalences (reference vs sdpa, GQA vs repeated MHA) and whole-model causality."""

import pytest
import torch

from llmkit.config import POSITION_KINDS, ModelConfig
from llmkit.layers.attention import attend, set_attention_impl
from llmkit.layers.position import alibi_bias, alibi_slopes
from llmkit.models.causal_lm import CausalLM

# fp32 summation order only (SDPA vs softmax(QKᵀ)V written out, GQA vs repeated heads, full vs tail rows).
# Worst measured over this file: 2.7e-6 / 1.9e-6 / 1.8e-6 (AVX-512 / AVX2 / default): ≥ 3.7× below; a masking
# or alignment error moves outputs by > 1e-3 (checked below).
ATOL = 1e-5
HEAD_LAYOUTS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # (n_heads, n_kv_heads)


def qkv(B, H, Hkv, Tq, Tk, D=8):
    return torch.randn(B, H, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)


def padding_mask(B, Tk):
    """(B, 1, 1, Tk) bool; key 0 always visible so no query row is fully masked."""
    mask = torch.rand(B, 1, 1, Tk) > 0.4
    mask[..., 0] = True
    return mask


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (3, 7), (1, 7)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_alibi", [False, True])
def test_reference_equals_sdpa(layout, Tq, Tk, causal, with_mask, with_alibi):
    H, Hkv = HEAD_LAYOUTS[layout]
    B = 2
    q, k, v = qkv(B, H, Hkv, Tq, Tk)
    mask = padding_mask(B, Tk) if with_mask else None
    # queries are the newest Tq positions of Tk (cached-decode alignment)
    bias = alibi_bias(alibi_slopes(H), torch.arange(Tk - Tq, Tk), torch.arange(Tk)) if with_alibi else None
    kwargs = dict(causal=causal, mask=mask, bias=bias)
    ref = attend(q, k, v, impl="reference", **kwargs)
    fused = attend(q, k, v, impl="sdpa", **kwargs)
    assert ref.shape == (B, H, Tq, q.shape[-1])
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(fused, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_mask", [False, True])
def test_one_half_precision_query_equals_the_fp32_reference(layout, dtype, with_mask):
    """A decode step in bf16/fp16 on the CPU (attend's one-query path: fp32 sums over the half-precision
    cache) is the fp32 reference on the same half-precision inputs, up to the output's own rounding
    (its unit roundoff: 2^-8 relative in bf16, 2^-11 in fp16) and the two fp32 computations' different
    orders of summation: a score of D products is off by ≤ D·u·Σ|q·k|·scale, which moves each softmax
    weight by ≤ 2× that relatively, and the output's sum of Tk terms adds ≤ Tk·u — all times Σ p·|v|;
    each side is within that of the exact value, so the two within twice it."""
    H, Hkv, Tk, D = *HEAD_LAYOUTS[layout], 300, 8
    q, k, v = (t.to(dtype) for t in qkv(2, H, Hkv, 1, Tk, D))
    mask = padding_mask(2, Tk) if with_mask else None
    got = attend(q, k, v, mask=mask, impl="sdpa")
    ref = attend(q.float(), k.float(), v.float(), mask=mask, impl="reference")
    assert got.dtype == dtype and got.shape == ref.shape
    u = 2.0 ** -24
    group = H // Hkv
    kf, vf = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scale = D ** -0.5
    score_err = D * u * (q.float().abs() @ kf.abs().transpose(-1, -2)).amax(-1, keepdim=True) * scale
    weights = ((q.float() @ kf.transpose(-1, -2)) * scale).masked_fill(
        ~mask if mask is not None else torch.zeros(1, dtype=torch.bool), float("-inf")).softmax(-1)
    fp32_bound = (Tk * u + 2 * score_err) * (weights @ vf.abs())
    roundoff = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert ((got.float() - ref).abs() <= roundoff * ref.abs() + 2 * fp32_bound).all()


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_causal_short_query_aligns_last_query_with_last_key(impl):
    """With Tq < Tk, query i is at absolute position Tk - Tq + i: equal to the matching rows of a
    full Tk x Tk causal attention."""
    q_full, k, v = qkv(1, 4, 2, 9, 9)
    full = attend(q_full, k, v, causal=True, impl=impl)
    tail = attend(q_full[:, :, -3:], k, v, causal=True, impl=impl)
    torch.testing.assert_close(tail, full[:, :, -3:], atol=ATOL, rtol=0)
    # and it is not the top-left alignment (query 0 seeing only key 0)
    top_left = attend(q_full[:, :, -3:], k[:, :, :3], v[:, :, :3], causal=True, impl=impl)
    assert (tail - top_left).abs().max() > 1e-3


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("n_kv", [2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_equals_mha_with_repeated_kv_heads(impl, n_kv, causal):
    H = 4
    q, k, v = qkv(2, H, n_kv, 5, 5)
    grouped = attend(q, k, v, causal=causal, impl=impl)
    rep = H // n_kv
    repeated = attend(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1),
                      causal=causal, impl=impl)
    torch.testing.assert_close(grouped, repeated, atol=ATOL, rtol=0)
    # the grouping is query head h -> kv head h // rep (not h % n_kv)
    if n_kv > 1:
        wrong = attend(q, k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1), causal=causal, impl=impl)
        assert (grouped - wrong).abs().max() > 1e-3


def tiny_model(position, **overrides):
    cfg = ModelConfig(vocab_size=61, max_seq_len=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      position=position, init_std=0.2, **overrides)
    return CausalLM(cfg).eval()


@pytest.mark.parametrize("position", POSITION_KINDS)
def test_model_reference_equals_sdpa_with_left_padding(position):
    model = tiny_model(position)
    ids = torch.randint(0, 61, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0  # a single real token
    with torch.no_grad():
        fused = model(ids, attention_mask=mask)
        ref = set_attention_impl(model, "reference")(ids, attention_mask=mask)
        also_ref = model(ids)
        set_attention_impl(model, "sdpa")
        unmasked = model(ids)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(fused, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(unmasked, also_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("position", POSITION_KINDS)
@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_future_tokens_do_not_change_past_logits(position, impl):
    model = set_attention_impl(tiny_model(position), impl)
    T, t = 12, 6
    ids = torch.randint(0, 61, (1, T))
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 61
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # the same ops on the same past tokens: 0.0 measured (AVX-512 / AVX2 / default)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    per_position = (a - b).abs().amax(dim=-1)[0]  # (T,)
    assert (per_position[t:] > 1e-4).all(), per_position
