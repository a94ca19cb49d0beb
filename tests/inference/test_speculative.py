"""Speculative decoding: whatever the draft guesses, the output is the target's greedy output."""

import pytest

from llmkit.errors import GenerationError
from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.speculative import SpeculationStats, speculative_generate
from engine_helpers import prompts, tiny

GREEDY = SamplingParams(temperature=0.0)


@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_output_is_the_targets_greedy_output_with_any_draft(draft_tokens):
    target = tiny("llama-tiny")
    drafts = {"itself": target, "a stranger": tiny("gpt2-tiny", n_layers=1), "a sibling": tiny("llama-tiny", n_layers=1)}
    for prompt in prompts(lengths=[3, 17], seed=5):
        expected = generate(target, [prompt], max_new_tokens=25, params=GREEDY)[0]
        for name, draft in drafts.items():
            stats = SpeculationStats()
            got = list(speculative_generate(target, draft, prompt, max_new_tokens=25, draft_tokens=draft_tokens,
                                            stats=stats))
            assert got == expected, name
            if draft is target:  # a draft that is the target is always right: fewer target forwards
                assert stats.accepted == stats.proposed > 0
                assert stats.rounds < len(got) or draft_tokens == 1


def test_eos_and_the_context_limit_end_it_as_they_end_greedy_decoding():
    target = tiny("llama-tiny", max_seq_len=30)
    draft = tiny("llama-tiny", n_layers=1, max_seq_len=30)
    prompt = prompts(lengths=[6])[0]
    free = generate(target, [prompt], max_new_tokens=100, params=GREEDY)[0]
    assert len(free) == 24  # prompt + output fill the context
    assert list(speculative_generate(target, draft, prompt, max_new_tokens=100, draft_tokens=4)) == free
    eos = free[7]
    assert list(speculative_generate(target, draft, prompt, max_new_tokens=100, draft_tokens=4,
                                     eos_ids=[eos])) == free[:free.index(eos)]


def test_unsuitable_pairs_are_refused():
    target = tiny("llama-tiny")
    with pytest.raises(GenerationError, match="vocabulary"):
        list(speculative_generate(target, tiny("llama-tiny", vocab_size=50), [1, 2], max_new_tokens=3))
    with pytest.raises(GenerationError, match="Transformer"):
        list(speculative_generate(target, tiny("mamba-tiny"), [1, 2], max_new_tokens=3))
