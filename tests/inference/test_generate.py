"""The generation loop: EOS, max_new_tokens, the context window, prompt validation, seeding."""

import pytest
import torch

from llmkit.config import ModelConfig
from llmkit.errors import GenerationError
from llmkit.inference.generate import generate, generate_stream
from llmkit.inference.sampling import SamplingParams
from llmkit.models.causal_lm import CausalLM

VOCAB = 53
GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0)


def tiny(max_seq_len=64, **overrides):
    cfg = ModelConfig(vocab_size=VOCAB, max_seq_len=max_seq_len, d_model=32, n_layers=2, n_heads=4,
                      init_std=0.2, **overrides)
    return CausalLM(cfg).eval()


def forced_model(token):
    """A model whose every next-token prediction is `token`: the final LayerNorm outputs a constant
    vector c (weight 0, bias c) and only `token`'s lm_head row points along c."""
    model = tiny(tie_embeddings=False)
    with torch.no_grad():
        c = torch.randn(model.cfg.d_model)
        model.stack.final_norm.weight.zero_()
        model.stack.final_norm.bias.copy_(c)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = c
    return model


def prompt(n, seed=0):
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------- EOS

@pytest.mark.parametrize("use_cache", [True, False])
def test_forced_eos_stops_immediately_and_is_not_returned(use_cache):
    eos = 7
    model = forced_model(eos)
    assert generate(model, [prompt(4)], max_new_tokens=5, params=GREEDY, use_cache=use_cache) == [[eos] * 5]
    assert generate(model, [prompt(4)], max_new_tokens=5, params=GREEDY, eos_ids=[eos],
                    use_cache=use_cache) == [[]]
    assert list(generate_stream(model, [prompt(4)], max_new_tokens=5, params=GREEDY, eos_ids=[3, eos])) == []


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("params,seed", [(GREEDY, None), (SAMPLED, 11)])
@pytest.mark.parametrize("step", [0, 3, 6])
def test_stops_at_eos_observed_in_a_first_run(use_cache, params, seed, step):
    model = tiny()
    p = prompt(5)
    free = generate(model, [p], max_new_tokens=10, params=params, seed=seed, use_cache=use_cache)[0]
    assert len(free) == 10
    eos = free[step]
    stopped = generate(model, [p], max_new_tokens=10, params=params, seed=seed, use_cache=use_cache,
                       eos_ids=[eos])[0]
    assert stopped == free[:free.index(eos)]
    assert eos not in stopped


@pytest.mark.parametrize("use_cache", [True, False])
def test_rows_stop_independently_in_a_batch(use_cache):
    model = tiny()
    prompts = [prompt(4, seed=1), prompt(7, seed=2), prompt(2, seed=3)]
    alone_free = [generate(model, [p], max_new_tokens=12, params=GREEDY)[0] for p in prompts]
    eos = alone_free[0][2]
    expected = [out[:out.index(eos)] if eos in out else out for out in alone_free]
    # the case is interesting: some row stops early while another runs on
    assert min(map(len, expected)) < 12 and max(map(len, expected)) > min(map(len, expected))
    batched = generate(model, prompts, max_new_tokens=12, params=GREEDY, eos_ids=[eos], use_cache=use_cache)
    assert batched == expected
    steps = list(generate_stream(model, prompts, max_new_tokens=12, params=GREEDY, eos_ids=[eos],
                                 use_cache=use_cache))
    assert len(steps) == max(map(len, expected))
    for row, out in enumerate(expected):  # a stopped row yields None from then on
        assert [s[row] for s in steps] == out + [None] * (len(steps) - len(out))


# ---------------------------------------------------------------- lengths

@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("n", [0, 1, 5, 17])
def test_honours_max_new_tokens(use_cache, n):
    model = tiny()
    outs = generate(model, [prompt(3), prompt(6, seed=1)], max_new_tokens=n, params=GREEDY, use_cache=use_cache)
    assert [len(o) for o in outs] == [n, n]
    assert all(0 <= t < VOCAB for o in outs for t in o)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("prompt_len", [1, 5, 11])
def test_stops_when_the_context_window_fills(use_cache, prompt_len):
    """prompt + generated tokens never exceed max_seq_len (the error for long prompts says a prompt of
    max_seq_len - 1 tokens leaves room for exactly one new token)."""
    S = 12
    model = tiny(max_seq_len=S)
    out = generate(model, [prompt(prompt_len)], max_new_tokens=100, params=GREEDY, use_cache=use_cache)[0]
    assert prompt_len + len(out) == S


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_filling_the_context_window_never_feeds_a_position_past_it(position):
    S = 10
    model = tiny(max_seq_len=S, position=position)
    out = generate(model, [prompt(3)], max_new_tokens=100, params=GREEDY)[0]
    assert 0 < len(out) <= S - 3 + 1  # whatever the stopping convention, at most one token past S - 1


@pytest.mark.parametrize("length", [12, 13, 40])
def test_rejects_prompt_at_or_past_the_context(length):
    model = tiny(max_seq_len=12)
    with pytest.raises(GenerationError) as info:
        generate(model, [prompt(3), prompt(length)], max_new_tokens=1, params=GREEDY)
    assert str(length) in str(info.value) and "\n" not in str(info.value)


def test_rejects_empty_prompts_and_negative_max_new_tokens():
    model = tiny()
    with pytest.raises(GenerationError):
        generate(model, [], max_new_tokens=1)
    with pytest.raises(GenerationError):
        generate(model, [[1, 2], []], max_new_tokens=1)
    with pytest.raises(GenerationError):
        generate(model, [[1, 2]], max_new_tokens=-1)


# ---------------------------------------------------------------- seeding

@pytest.mark.parametrize("use_cache", [True, False])
def test_seeded_sampling_is_repeatable(use_cache):
    model = tiny()
    prompts = [prompt(4), prompt(2, seed=5)]

    def run(seed):
        return generate(model, prompts, max_new_tokens=16, params=SAMPLED, seed=seed, use_cache=use_cache)

    first = run(123)
    assert run(123) == first
    assert run(124) != first
    # sampling, not greedy: the draws are not all the argmax
    assert first != generate(model, prompts, max_new_tokens=16, params=GREEDY, use_cache=use_cache)


def test_seeded_sampling_ignores_the_global_rng():
    model = tiny()
    torch.manual_seed(1)
    a = generate(model, [prompt(4)], max_new_tokens=10, params=SAMPLED, seed=9)
    torch.manual_seed(2)
    torch.rand(100)
    b = generate(model, [prompt(4)], max_new_tokens=10, params=SAMPLED, seed=9)
    assert a == b


def test_repetition_penalty_in_generate_counts_prompt_and_generated_tokens():
    """A forced model whose logits are 1 for token 7, 0.5 for token 8 and 0 elsewhere: greedy picks 7
    until 7 has been seen (in the prompt or the output); a penalty of 4 then makes 8 win."""
    model = forced_model(7)
    with torch.no_grad():
        c = model.stack.final_norm.bias
        model.lm_head.weight[7] = c / c.norm() ** 2
        model.lm_head.weight[8] = 0.5 * c / c.norm() ** 2
    penalised = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    assert generate(model, [[1, 2, 3]], max_new_tokens=1, params=GREEDY) == [[7]]
    assert generate(model, [[1, 7, 3]], max_new_tokens=1, params=GREEDY) == [[7]]
    assert generate(model, [[1, 2, 3]], max_new_tokens=1, params=penalised) == [[7]]
    assert generate(model, [[1, 7, 3]], max_new_tokens=1, params=penalised) == [[8]]
    # step 3: both seen, 7 → 0.25 and 8 → 0.125, so 7 again
    assert generate(model, [[1, 2, 3]], max_new_tokens=3, params=penalised) == [[7, 8, 7]]
