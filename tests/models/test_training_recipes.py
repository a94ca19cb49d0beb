"""The small-model training options (ModelConfig.qk_norm, logit_softcap, zero_init_residual, mlp="relu2"):
each does what it says, counts its parameters, survives decoding's fused projections, and is refused
by the Hugging Face export (no family there has them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmkit.config import preset
from llmkit.errors import ModelFormatError
from llmkit.inference.optimize import prepare_for_decoding
from llmkit.io.hf_config import config_to_hf
from llmkit.models.build import build_model

OPTIONS = [dict(qk_norm=True), dict(logit_softcap=5.0), dict(zero_init_residual=True), dict(mlp="relu2")]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: next(iter(o)))
def test_parameter_count_and_fused_decoding_agree(options):
    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=320, **options)).eval()
    assert model.cfg.num_params() == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
        prepare_for_decoding(model)
        after = model(ids)
    # fusion is exact up to the order of a few float32 sums (max seen 0 here): 1e-5 on logits of size ~1
    assert (before - after).abs().max() < 1e-5


def test_qk_norm_normalises_each_head():
    model = build_model(preset("llama-tiny", vocab_size=320, qk_norm=True))
    attn = model.stack.blocks[0].attn
    x = torch.randn(1, 5, model.cfg.d_model) * 50
    q, k, _ = attn.project_qkv(x, rope=None)
    rms = lambda t: t.pow(2).mean(-1).sqrt()  # noqa: E731
    # gains start at 1; RMSNorm's eps lowers the RMS by ~eps/(2·mean x²), negligible at x·50: ≤ 1.2e-7 measured
    # (AVX-512 / AVX2 / default)
    assert torch.allclose(rms(q), torch.ones_like(rms(q)), atol=1e-3)
    assert torch.allclose(rms(k), torch.ones_like(rms(k)), atol=1e-3)


def test_softcap_bounds_the_logits_and_keeps_their_order():
    torch.manual_seed(0)
    plain = build_model(preset("llama-tiny", vocab_size=320))
    capped = build_model(preset("llama-tiny", vocab_size=320, logit_softcap=0.5))
    capped.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 320, (1, 8))
    a, b = plain(ids), capped(ids)
    assert a.abs().max() > 0.5 > b.abs().max()
    assert torch.allclose(b, 0.5 * torch.tanh(a / 0.5), atol=1e-6)  # the same tanh: 0.0 measured on all 3 kernels


def test_zero_init_makes_each_block_the_identity():
    model = build_model(preset("llama-tiny", vocab_size=320, zero_init_residual=True))
    block = model.stack.blocks[0]
    assert not block.attn.o_proj.weight.any() and not block.mlp.down_proj.weight.any()


def test_relu2_is_relu_squared():
    from llmkit.layers.feedforward import ACTIVATIONS

    x = torch.linspace(-2, 2, 9)
    assert torch.equal(ACTIVATIONS["relu2"](x), F.relu(x) ** 2)


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(logit_softcap=30.0), dict(mlp="relu2")],
                         ids=lambda o: next(iter(o)))
def test_hugging_face_export_refuses_them_by_name(options):
    with pytest.raises(ModelFormatError, match=next(iter(options))):
        config_to_hf(preset("llama-tiny", vocab_size=320, **options))
