"""Sampling: truncation sets (top-k, top-p, min-p) against direct computations, greedy limits,
a statistical check of the sampled distribution, seeding, penalties and parameter validation."""

import math

import pytest
import torch

from llmkit.errors import GenerationError
from llmkit.inference.sampling import SamplingParams, apply_penalties, filter_logits, sample


def kept(logits, params):
    """Bool mask of the tokens filter_logits leaves finite."""
    return torch.isfinite(filter_logits(logits, params))


def nucleus(probs, p):
    """Indices of the smallest prefix, by descending probability, whose mass reaches p (float64)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    total, chosen = 0.0, []
    for i in order:
        chosen.append(i)
        total += probs[i]
        if total >= p:
            break
    return set(chosen)


# ---------------------------------------------------------------- top-k

@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_never_samples_outside_the_k_most_likely(k):
    B, V, draws = 20, 40, 100
    logits = torch.randn(B, V) * 2
    allowed = torch.zeros(B, V, dtype=torch.bool).scatter(1, logits.topk(k, dim=-1).indices, True)
    params = SamplingParams(temperature=1.0, top_k=k)
    gen = torch.Generator().manual_seed(1)
    rows = logits.repeat(draws, 1)  # (draws·B, V)
    tokens = sample(rows, params, generator=gen).view(draws, B)
    assert allowed.gather(1, tokens.T).all()
    assert kept(logits, params).sum(-1).eq(k).all()
    if k > 1:  # it samples, not just argmax
        assert (tokens != logits.argmax(-1)).any()


def test_top_k_larger_than_vocab_keeps_everything():
    logits = torch.randn(3, 8)
    assert kept(logits, SamplingParams(top_k=8)).all()
    assert kept(logits, SamplingParams(top_k=100)).all()


# ---------------------------------------------------------------- top-p

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8, 0.9, 0.95, 0.999])
def test_top_p_keeps_the_smallest_prefix_reaching_p(seed, p):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 25, generator=gen) * (0.5 + seed)
    probs = torch.softmax(logits.double(), -1)[0].tolist()
    cumulative = torch.tensor(sorted(probs, reverse=True)).cumsum(0)
    if (cumulative - p).abs().min() < 1e-5:
        pytest.skip("a prefix mass is within float32 rounding of p")  # not hit for these seeds
    expected = nucleus(probs, p)
    got = set(torch.nonzero(kept(logits, SamplingParams(top_p=p)))[:, 1].tolist())
    assert got == expected


def test_top_p_edge_cases():
    logits = torch.randn(4, 30)
    only_top = kept(logits, SamplingParams(top_p=1e-6))
    assert only_top.sum(-1).eq(1).all()
    assert only_top.gather(1, logits.argmax(-1, keepdim=True)).all()
    assert kept(logits, SamplingParams(top_p=1.0)).all()
    # a token holding more than p on its own is kept alone
    peaked = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    assert kept(peaked, SamplingParams(top_p=0.9)).tolist() == [[True, False, False, False]]
    # uniform: ceil(p·V) tokens are needed to reach p
    uniform = torch.zeros(1, 10)
    assert kept(uniform, SamplingParams(top_p=0.35)).sum().item() == 4


# ---------------------------------------------------------------- min-p

@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.3, 0.7, 1.0])
def test_min_p_keeps_tokens_above_fraction_of_max(min_p):
    logits = torch.randn(8, 30) * 2
    probs = torch.softmax(logits.double(), -1)
    threshold = min_p * probs.max(-1, keepdim=True).values
    assert ((probs - threshold).abs() > 1e-7).all() or min_p == 1.0  # no boundary cases
    expected = probs >= threshold
    got = kept(logits, SamplingParams(min_p=min_p))
    if min_p == 1.0:
        expected = probs == probs.max(-1, keepdim=True).values
    assert torch.equal(got, expected)


# ---------------------------------------------------------------- temperature

def test_temperature_zero_is_argmax():
    logits = torch.randn(50, 100)
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))
    # filters are irrelevant for greedy
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0, top_k=5, top_p=0.1, min_p=0.5)),
                       logits.argmax(-1))


def test_tiny_temperature_sampling_is_argmax():
    logits = torch.randn(50, 100)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3  # no near ties (margin / 1e-4 ≥ 10 nats)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        assert torch.equal(sample(logits, SamplingParams(temperature=1e-4), generator=gen), logits.argmax(-1))


def test_temperature_flattens_and_sharpens():
    logits = torch.randn(1, 20)
    entropy = []
    for t in (0.3, 1.0, 3.0):
        probs = filter_logits(logits, SamplingParams(temperature=t)).softmax(-1)
        entropy.append(-(probs * probs.log()).sum().item())
    assert entropy[0] < entropy[1] < entropy[2]


# ---------------------------------------------------------------- statistics

def test_sampled_frequencies_match_filtered_distribution():
    V, N, temperature, top_k, top_p = 10, 20000, 0.7, 5, 0.9
    logits = torch.randn(V, generator=torch.Generator().manual_seed(1234)) * 0.7

    # expected distribution, computed independently: temperature → top-k → top-p (on the top-k
    # renormalised distribution) → renormalise, in float64
    scaled = [x / temperature for x in logits.double().tolist()]
    top = sorted(range(V), key=lambda i: -scaled[i])[:top_k]
    z = sum(math.exp(scaled[i]) for i in top)
    topk_probs = {i: math.exp(scaled[i]) / z for i in top}
    keep, mass = [], 0.0
    for i in top:  # descending
        keep.append(i)
        mass += topk_probs[i]
        if mass >= top_p:
            break
    expected = torch.zeros(V, dtype=torch.float64)
    for i in keep:
        expected[i] = topk_probs[i]
    expected /= expected.sum()
    # the setting is non-trivial: top-p drops some of the top-k, and more than one token survives
    assert 1 < len(keep) < top_k
    assert abs(mass - top_p) > 1e-3  # and the top-p cut is not a float-rounding coin toss

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    gen = torch.Generator().manual_seed(0)
    tokens = sample(logits.expand(N, V), params, generator=gen)
    freq = torch.bincount(tokens, minlength=V).double() / N

    # filtered tokens never appear
    assert freq[expected == 0].sum().item() == 0.0
    # Tolerance: each kept token's count is Binomial(N, p); its frequency has standard error
    # sqrt(p(1-p)/N) (≤ 0.0036 here). Allow 5 standard errors per token (false-alarm rate ~6e-7 each).
    se = (expected * (1 - expected) / N).sqrt()
    for i in keep:
        assert abs(freq[i] - expected[i]) <= 5 * se[i], (i, freq[i].item(), expected[i].item())


# ---------------------------------------------------------------- seeding

def test_same_seed_same_draws_different_seed_different_draws():
    logits = torch.randn(64, 50)
    params = SamplingParams(temperature=1.0)

    def draws(seed):
        return sample(logits, params, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draws(7), draws(7))
    assert not torch.equal(draws(7), draws(8))


# ---------------------------------------------------------------- penalties

def test_repetition_penalty_divides_positive_multiplies_negative_seen_only():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False, True]])
    counts = torch.zeros(1, 5, dtype=torch.long)
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), seen, counts)
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 3.0, -1.0, 0.25]]))


def test_presence_and_frequency_penalties_subtract():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    seen = torch.tensor([[True, True, True, False]])  # prompt tokens do not count for these penalties
    counts = torch.tensor([[0, 1, 3, 0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, params, seen, counts)
    # logit - presence·[count > 0] - frequency·count
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.75, 1.0]]))
    # negative penalties encourage
    out = apply_penalties(logits, SamplingParams(presence_penalty=-1.0), seen, counts)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 2.0, 1.0]]))


def test_penalties_change_the_greedy_pick_in_sample():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    seen = torch.tensor([[True, False, False]])
    counts = torch.tensor([[1, 0, 0]])
    assert sample(logits, SamplingParams(temperature=0.0)).item() == 0
    assert sample(logits, SamplingParams(temperature=0.0, repetition_penalty=1.5), seen=seen,
                  generated_counts=counts).item() == 1
    assert sample(logits, SamplingParams(temperature=0.0, frequency_penalty=1.0), seen=seen,
                  generated_counts=counts).item() == 1
    assert sample(logits, SamplingParams(temperature=0.0), seen=seen, generated_counts=counts).item() == 0


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_p", 0.0),
    ("top_p", -0.1),
    ("top_p", 1.01),
    ("top_p", float("nan")),
    ("top_k", -1),
    ("min_p", -0.1),
    ("min_p", 1.5),
    ("min_p", float("nan")),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", float("nan")),
    ("presence_penalty", 2.5),
    ("frequency_penalty", float("nan")),
])
def test_sampling_params_reject_bad_values(field, value):
    with pytest.raises(GenerationError) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value) and "\n" not in str(info.value)


def test_sampling_params_accept_boundaries():
    SamplingParams(temperature=0.0, top_p=1.0, min_p=1.0, top_k=0, presence_penalty=-2.0, frequency_penalty=2.0)
    assert SamplingParams(temperature=0.0).greedy and not SamplingParams(temperature=1e-6).greedy
