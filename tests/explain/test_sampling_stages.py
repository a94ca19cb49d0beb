"""sampling_stages: every stage is a distribution, top-p keeps the smallest set reaching p, and the
chain is the one `sample` draws from (same generator → same token)."""

from __future__ import annotations

import pytest
import torch

from llmkit.inference.sampling import STAGES, PenaltyState, SamplingParams, filter_logits, sample, sampling_stages

SETTINGS = [SamplingParams(), SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05),
            SamplingParams(temperature=1.3, top_p=0.5, repetition_penalty=1.3, presence_penalty=0.5,
                           frequency_penalty=0.2),
            SamplingParams(temperature=0.0)]


@pytest.mark.parametrize("params", SETTINGS)
def test_every_stage_is_a_distribution_in_the_chain_order(params):
    torch.manual_seed(0)
    logits = torch.randn(3, 200) * 3
    penalty = PenaltyState(params, torch.randint(0, 200, (3, 5)), 200)
    stages = sampling_stages(logits, params, seen=penalty.seen, generated_counts=penalty.counts)
    assert [name for name, _ in stages] == list(STAGES)
    kept = None
    for name, stage in stages:
        probs = stage.softmax(-1)
        # fp32 softmax over 200 entries: sums within a few ulps of 1
        torch.testing.assert_close(probs.sum(-1), torch.ones(3), atol=1e-5, rtol=0)
        finite = torch.isfinite(stage)
        if kept is not None and name != "penalties":
            assert bool((finite <= kept).all()), f"{name} brought back a token an earlier stage removed"
        kept = finite
    if not params.greedy:
        assert torch.equal(stages[-1][1], filter_logits(stages[1][1], params))


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_the_top_p_set_is_minimal(p):
    torch.manual_seed(1)
    logits = torch.randn(5, 60) * 2
    params = SamplingParams(top_p=p)
    stages = dict(sampling_stages(logits, params))
    before = stages["top_k"].softmax(-1)
    kept = torch.isfinite(stages["top_p"])
    for row in range(5):
        mass = before[row][kept[row]].sum()
        assert float(mass) >= p - 1e-6  # reaches p
        smallest = before[row][kept[row]].min()
        assert float(mass - smallest) < p  # without its least likely member it would not


@pytest.mark.parametrize("params", SETTINGS)
def test_sample_draws_from_the_last_stage(params):
    torch.manual_seed(2)
    logits = torch.randn(4, 50)
    context = torch.randint(0, 50, (4, 3))
    penalty = PenaltyState(params, context, 50)
    drawn = sample(logits, params, generator=torch.Generator().manual_seed(7), seen=penalty.seen,
                   generated_counts=penalty.counts)
    last = sampling_stages(logits, params, seen=penalty.seen, generated_counts=penalty.counts)[-1][1]
    if params.greedy:
        assert torch.equal(drawn, last.argmax(-1))
    else:
        again = torch.multinomial(last.softmax(-1), 1, generator=torch.Generator().manual_seed(7)).squeeze(-1)
        assert torch.equal(drawn, again)
