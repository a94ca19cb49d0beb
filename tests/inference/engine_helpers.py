"""Models and drivers for the engine and continuous-batching tests: tiny random models of every family,
and a "chain" model whose greedy output is a chosen token sequence (to test text handling exactly)."""

from __future__ import annotations

import threading

import pytest
import torch

from llmkit.inference.engine import Finished, TokenEvent
from llmkit.models.build import build_model
from llmkit.models.causal_lm import CausalLM
from llmkit.presets import preset
from post_training_helpers import tiny_tokenizer

VOCAB = 97
# 8 prompts of different lengths, joining a running batch at different decode steps
LENGTHS = [3, 9, 1, 14, 6, 20, 2, 11]
JOIN_AT = [0, 0, 2, 3, 3, 5, 7, 9]
MAX_NEW = [8, 9, 10, 6, 9, 4, 7, 6]


def tiny(name: str, **overrides) -> torch.nn.Module:
    """A random tiny model of preset `name`; init_std 0.2 makes its logits far apart, so float rounding
    differences between batch shapes (~1e-6) cannot flip a greedy choice."""
    torch.manual_seed(0)
    return build_model(preset(name, **{"vocab_size": VOCAB, "init_std": 0.2, **overrides})).eval()


def prompts(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def chain_model(vocab_size: int, sequence: list[int], end: int) -> CausalLM:
    """A LLaMA-style model that, given token sequence[i], predicts sequence[i + 1] (and `end` after the
    last): every block's output projections are zero, so the final hidden state is the token's own
    normalised embedding n(e); lm_head row b is n(e_a) for each pair a → b, which gives b a logit of
    d_model (64) against at most a few times √d_model (~8) for any other token."""
    assert len(set(sequence)) == len(sequence), "a chain needs distinct tokens"
    torch.manual_seed(0)
    model = CausalLM(preset("llama-tiny", vocab_size=vocab_size, tie_embeddings=False)).eval()
    with torch.no_grad():
        for block in model.stack.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for a, b in zip(sequence, sequence[1:] + [end]):
            e = model.embeddings.embed.weight[a]
            model.lm_head.weight[b] = e / e.pow(2).mean().sqrt()
    return model


def drain(handle, timeout: float = 60.0) -> list:
    """Every event of an engine handle, read in a helper thread so that a hang fails the test."""
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(handle), daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"no Finished within {timeout} s (got {len(events)} events)"
    return events


# Fixtures shared by the engine test files (import them by name: pytest finds fixtures in a module's namespace).
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny("llama-tiny", vocab_size=tok.vocab_size)


def tokens_of(events) -> list[int]:
    """The token ids of one request's events, which must be tokens and then one Finished."""
    assert isinstance(events[-1], Finished) and all(isinstance(e, TokenEvent) for e in events[:-1])
    return [e.token_id for e in events[:-1]]
