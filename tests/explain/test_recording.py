"""Attention recorded through the probes: rows are distributions, causal zeros are exact, the maps
reproduce the layer's output, the recording run's logits equal the fast path's, the probes leave no
trace, and knockouts do exactly what they claim."""

from __future__ import annotations

import pytest
import torch

from explain_helpers import tiny_lm
from llmkit.explain.recording import Knockout, recording
from llmkit.explain.subject import Subject
from llmkit.layers.attention import Attention

TEXT = "猫坐在垫子上。The cat sat on the mat."
FAMILIES = [("llama-tiny", {}), ("gpt2-tiny", {}), ("bert-tiny", {}), ("t5-tiny", {}), ("bart-tiny", {}),
            ("albert-tiny", {}), ("llama-tiny", {"attention_pattern": "sliding_window", "attention_window": 4})]


def subject(name: str, **overrides) -> Subject:
    return Subject.create(tiny_lm(name, **overrides), TEXT)


@pytest.mark.parametrize("name, overrides", FAMILIES)
def test_rows_are_distributions_and_causal_zeros_exact(name, overrides):
    s = subject(name, **overrides)
    with recording(s.model) as maps:
        s.run()
    assert maps.maps, "nothing recorded"
    for (site, layer), w in maps.maps.items():
        # fp32 softmax rows: each sum is within a few ulps of 1 for ≤ 40 keys
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6, rtol=0)
        if site == "decoder.self":
            future = torch.ones(w.shape[-2:], dtype=torch.bool).triu(1)
            assert bool((w[:, future] == 0).all()), f"{site} layer {layer}: a future token got weight"
        if overrides.get("attention_window"):
            T = w.shape[-1]
            far = (torch.arange(T)[:, None] - torch.arange(T)[None, :]) >= overrides["attention_window"]
            assert bool((w[:, far] == 0).all()), "a key outside the sliding window got weight"
    n_layers = s.cfg.n_layers
    assert len(maps.layers(maps.sites()[0])) == n_layers  # ALBERT's one shared block counts as n layers


@pytest.mark.parametrize("name, overrides", FAMILIES)
def test_recording_run_equals_the_fast_path_and_leaves_no_trace(name, overrides):
    s = subject(name, **overrides)
    fast = s.run() if s.cfg.mlm_head or s.arch != "encoder" else None
    with recording(s.model):
        recorded = s.run()
    if fast is not None:
        # reference softmax vs fused SDPA in fp32: measured differences ~1e-6 on logits of size ~1
        torch.testing.assert_close(recorded, fast, atol=2e-5, rtol=1e-5)
    layers = [m for m in s.model.modules() if isinstance(m, Attention)]
    assert all(m.impl == "sdpa" and m.probe is None for m in layers)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_recorded_maps_reproduce_the_layer_output(name):
    s = subject(name)
    block = s.model.stack.blocks[1]
    seen = {}
    hooks = [block.attn.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0])),
             block.attn.register_forward_hook(lambda m, args, out: seen.setdefault("y", out))]
    with recording(s.model) as maps:
        s.run()
    for h in hooks:
        h.remove()
    attn, x = block.attn, seen["x"]
    with torch.inference_mode():  # x was made in inference mode (Subject.run)
        _, _, v = attn.project_qkv(x, None)  # values carry no rotation
        v = v.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)[0]  # (H, T, D)
        w = maps.maps[("decoder.self", 1)]
        heads = w @ v  # (H, T, D)
        y = attn.o_proj(heads.transpose(0, 1).reshape(1, heads.shape[1], -1))
    # the same products in the same precision as the layer: only summation order can differ
    torch.testing.assert_close(y, seen["y"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny", "t5-tiny"])
def test_knocking_out_a_zero_weight_edge_changes_nothing(name):
    s = subject(name)
    with recording(s.model) as maps:
        base = s.run()
    site = "decoder.self"
    w = maps.maps[(site, 0)]
    zero = (w[0] == 0).nonzero()
    assert len(zero), "expected causal zeros"
    q, k = (int(i) for i in zero[0])
    with recording(s.model, Knockout(site, edges=[(None, None, q, k)])):
        knocked = s.run()
    assert torch.equal(knocked, base)
    # and a weighted edge does change the output, so the comparison above can fail
    with recording(s.model, Knockout(site, edges=[(None, None, w.shape[-2] - 1, 0)])):
        assert not torch.equal(s.run(), base)


def test_knocking_out_every_head_of_a_layer_equals_removing_the_attention_sublayer():
    s = subject("llama-tiny")  # LLaMA's o_proj has no bias, so a silent head outputs exactly 0
    heads = {(1, h) for h in range(s.cfg.n_heads)}
    with recording(s.model, Knockout("decoder.self", heads=heads)):
        knocked = s.run()
    block = s.model.stack.blocks[1]
    original = block.attn.forward
    block.attn.forward = lambda x, **kwargs: torch.zeros_like(x)  # the sublayer removed: x + 0
    try:
        with recording(s.model):  # the same reference kernel in the other layers
            removed = s.run()
    finally:
        block.attn.forward = original
    assert torch.equal(knocked, removed)
    with recording(s.model):
        assert not torch.equal(s.run(), removed)


def test_edge_knockout_renormalises_like_a_masked_softmax():
    s = subject("llama-tiny")
    q, k = 6, 2
    with recording(s.model, Knockout("decoder.self", edges=[(0, 1, q, k)])) as maps:
        s.run()
    with recording(s.model) as plain:
        s.run()
    w, before = maps.maps[("decoder.self", 0)][1, q], plain.maps[("decoder.self", 0)][1, q]
    expected = before.clone()
    expected[k] = 0
    expected /= expected.sum()
    assert float(w[k]) == 0.0
    torch.testing.assert_close(w, expected, atol=1e-7, rtol=1e-6)  # fp32 division by a sum near 1


def test_one_knockout_per_batch_row_equals_each_knockout_alone():
    s = subject("llama-tiny")
    rows = [{(1, h)} for h in range(s.cfg.n_heads)] + [set()]
    with recording(s.model, Knockout("decoder.self", rows=rows)):
        batch = s.logits(copies=len(rows))
    for row, heads in enumerate(rows):
        with recording(s.model, Knockout("decoder.self", heads=heads)):
            alone = s.run()
        # the same computation in a batch of 5 instead of 1: matmul blocking may differ by fp32 rounding
        torch.testing.assert_close(batch[row], alone, atol=1e-5, rtol=1e-5)
    assert not torch.equal(batch[0], batch[-1])


def test_the_fast_path_never_consults_a_probe_and_nothing_stays_hooked():
    s = subject("llama-tiny")
    fast = s.run()

    def explode(weights):
        raise AssertionError("the sdpa kernel called the probe")

    layers = [m for m in s.model.modules() if isinstance(m, Attention)]
    try:
        for m in layers:
            m.probe = explode  # impl stays "sdpa": the fused kernel must not look at it
        assert torch.equal(s.run(), fast)
    finally:
        for m in layers:
            m.probe = None
    with recording(s.model):
        s.run()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in s.model.modules())
