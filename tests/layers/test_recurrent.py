"""RWKV-4 and Mamba mixers: the sequence (chunked / batched) form equals the token-by-token
recurrent form, padding leaves the state alone, gradients reach every weight, a tiny model learns,
and the config counts the module's parameters."""

from __future__ import annotations

import pytest
import torch

from llmkit.config import ModelConfig, preset
from llmkit.errors import ConfigError
from llmkit.layers.recurrent import NEG, SCAN_CHUNK, WKV_CHUNK, selective_scan, wkv, wkv_step
from llmkit.models.causal_lm import CausalLM

BODIES = ("rwkv", "mamba")


def tiny(body: str, **overrides) -> ModelConfig:
    return preset(f"{body}-tiny", vocab_size=61, **overrides)


@pytest.mark.parametrize("T", [1, 5, WKV_CHUNK, 2 * WKV_CHUNK + 3])
def test_chunked_wkv_equals_token_loop(T):
    """Including keys far apart in size (|k| up to 40) and fast and slow decays: the stabilised
    exponents must keep both forms finite and equal."""
    g = torch.Generator().manual_seed(T)
    B, C = 2, 12
    k = torch.randn(B, T, C, generator=g) * 15
    k[0, 0] = 40.0  # a huge early key, then decayed
    v = torch.randn(B, T, C, generator=g)
    w = torch.exp(torch.linspace(-5, 3, C))
    u = torch.randn(C, generator=g)
    start = (torch.randn(B, C, generator=g), torch.rand(B, C, generator=g) + 0.5, torch.randn(B, C, generator=g) * 5)
    for state in (None, start):
        out, final = wkv(w, u, k, v, state)
        carry = state or (torch.zeros(B, C), torch.zeros(B, C), torch.full((B, C), NEG))
        steps = []
        for t in range(T):
            o, carry = wkv_step(w, u, k[:, t], v[:, t], carry)
            steps.append(o)
        assert torch.isfinite(out).all()
        # chunked vs token-by-token: fp32 sums of exponentials, rescaled in another order; measured 4.2e-6 (outputs, 37×
        # below) and 3e-5 on the final states (7× below atol + rtol·|state|) (AVX-512 / AVX2 / default).
        torch.testing.assert_close(out, torch.stack(steps, 1), atol=1e-4, rtol=1e-4)
        # the final states describe the same sums: num·e^p and den·e^p
        for a, b in ((final[0], carry[0]), (final[1], carry[1])):
            torch.testing.assert_close(a * torch.exp(final[2] - carry[2]), b, atol=1e-4, rtol=1e-4)


def test_selective_scan_matches_the_plain_recurrence_and_its_gradients():
    """The scan (chunked, with a hand-written backward that recomputes states) against the textbook
    recurrence differentiated by autograd, in float64, over more than one chunk, from a non-zero
    starting state, with gradients flowing into both outputs (y and the final state)."""
    g = torch.Generator().manual_seed(0)
    B, T, E, N = 2, 2 * SCAN_CHUNK + 5, 3, 4
    inputs = (torch.randn(B, T, E, generator=g), torch.rand(B, T, E, generator=g), -torch.rand(E, N, generator=g),
              torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g), torch.randn(B, E, N, generator=g))
    grad_y, grad_h = torch.randn(B, T, E, generator=g).double(), torch.randn(B, E, N, generator=g).double()

    def reference(u, dt, A, Bm, C, h):
        ys = []
        for t in range(T):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1))
        return torch.stack(ys, 1), h

    results = []
    for fn in (selective_scan, reference):
        args = tuple(a.double().requires_grad_() for a in inputs)
        y, last = fn(*args)
        ((y * grad_y).sum() + (last * grad_h).sum()).backward()
        results.append((y, last, [a.grad for a in args]))
    (y, last, grads), (y_ref, last_ref, grads_ref) = results
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(last, last_ref)
    for name, got, want in zip(("u", "dt", "A", "B", "C", "h0"), grads, grads_ref):
        torch.testing.assert_close(got, want, msg=f"gradient of {name}")


@pytest.mark.parametrize("body", BODIES)
def test_sequence_form_equals_recurrent_form(body):
    model = CausalLM(tiny(body)).eval()
    ids = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        full = model(ids)
        state = model.new_cache(2, 30, dtype=torch.float32, device="cpu")
        steps = torch.cat([model(ids[:, t:t + 1], cache=state) for t in range(30)], dim=1)
        state2 = model.new_cache(2, 30, dtype=torch.float32, device="cpu")
        split = torch.cat([model(ids[:, :19], cache=state2), model(ids[:, 19:], cache=state2)], dim=1)
    # recurrent vs sequence form: fp32 summation order; logits 4.8e-7, split 6e-8, states 7.6e-6 (against
    # 1e-4 + 1e-4·|state|) (AVX-512 / AVX2 / default): ≥ 200× below.
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(split, full, atol=1e-4, rtol=0)
    assert state.pos == state2.pos == 30
    for name in state.tensors:  # both routes end in the same state
        torch.testing.assert_close(state.tensors[name], state2.tensors[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("body", BODIES)
def test_left_padding_leaves_the_state_alone(body):
    model = CausalLM(tiny(body)).eval()
    prompt = torch.randint(3, 61, (1, 9))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), prompt], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone_state = model.new_cache(1, 16, dtype=torch.float32, device="cpu")
        alone = model(prompt, cache=alone_state)
        pad_state = model.new_cache(1, 16, dtype=torch.float32, device="cpu")
        with_pad = model(padded, attention_mask=mask, cache=pad_state)
    # padded steps leave the state alone; only the batch shapes of the products differ: 2.4e-7 (logits),
    # ≤ 9.5e-7 (states) (AVX-512 / AVX2 / default)
    torch.testing.assert_close(with_pad[:, 4:], alone, atol=1e-5, rtol=0)
    for name in alone_state.tensors:
        torch.testing.assert_close(pad_state.tensors[name], alone_state.tensors[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("body", BODIES)
def test_gradients_reach_every_parameter(body):
    model = CausalLM(tiny(body))
    ids = torch.randint(0, 61, (2, 24))
    model(ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("body", BODIES)
def test_tiny_model_loss_falls(body):
    torch.manual_seed(0)
    model = CausalLM(tiny(body))
    pattern = torch.tensor([3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 32] * 2)
    x, y = pattern[None, :-1].repeat(2, 1), pattern[None, 1:].repeat(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x).view(-1, 61), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("name", ["rwkv-tiny", "mamba-tiny", "rwkv-demo", "mamba-demo"])
@pytest.mark.parametrize("tied", [True, False])
def test_num_params_matches_module(name, tied):
    cfg = preset(name, tie_embeddings=tied, bias=not tied)  # bias: Mamba's projections, RWKV's norms
    with torch.device("meta"):
        model = CausalLM(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert cfg.num_params(embeddings=False) == cfg.num_params() - cfg.vocab_size * cfg.d_model * (1 if tied else 2)


def test_demo_presets_match_llama_demo_size():
    llama = preset("llama-demo").num_params()
    for name in ("rwkv-demo", "mamba-demo"):
        assert abs(preset(name).num_params() / llama - 1) < 0.03, name


@pytest.mark.parametrize("fields, message", [
    (dict(body="rwkv", position="rope"), "needs position='none'"),
    (dict(body="mamba", position="none", arch="encoder"), "needs arch='decoder'"),
    (dict(body="mamba", position="none", ssm_state=0), "ssm_state must be a positive integer"),
    (dict(body="rwkv", position="none", rwkv_attention_dim=-2), "rwkv_attention_dim must be"),
])
def test_bad_recurrent_config_is_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(d_model=64, n_heads=1, **fields)


def test_mamba_decay_rates_are_not_weight_decayed():
    from llmkit.training.optim import parameter_groups

    model = CausalLM(tiny("mamba"))
    decay, no_decay = (group["params"] for group in parameter_groups(model, 0.1))
    a_logs = [m.mixer.A_log for m in model.stack.blocks]
    assert all(any(p is a for p in no_decay) for a in a_logs)
    assert not any(p is a for p in decay for a in a_logs)
    assert any(p is model.stack.blocks[0].mixer.in_proj.weight for p in decay)  # matrices still are
