"""Token-level generation for a batch of prompts, through the one loop (llmkit/inference/scheduler.py).

`generate_stream` serves every family: a decoder-only model continues each prompt; an encoder-decoder
(T5, BART) reads each prompt as its source and writes a new sequence from its decoder start token.
With the KV cache each decode step feeds only the newest token and reads every earlier key/value
from the cache; with `use_cache=False` it recomputes the whole sequence (for comparison and tests).
Each prompt is a request of its own in one continuous batch, so a row's tokens equal those it gets
alone; with a `seed`, row i samples from a generator seeded with seed + i.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from llmkit.errors import GenerationError
from llmkit.inference.decoding_state import left_pad, right_pad
from llmkit.inference.kv_cache import KVCache
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.scheduler import Request, Scheduler, check_max_new_tokens, check_seed

__all__ = ["check_seed", "generate", "generate_stream", "left_pad", "new_cache", "right_pad", "row_seed"]


def row_seed(seed: int | None, row: int) -> int | None:
    """Row `row`'s seed: seed + row, wrapped into the range torch accepts (row 0 keeps the seed itself)."""
    if seed is None:
        return None
    value = seed + row
    return value - 2**64 if value >= 2**64 else value


@torch.inference_mode()
def generate_stream(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    params: SamplingParams = SamplingParams(), eos_ids: Sequence[int] = (),
                    pad_id: int = 0, use_cache: bool = True, seed: int | None = None,
                    ) -> Iterator[list[int | None]]:
    """Yield, per decode step, each row's new token, or None for a row that already stopped.

    A row stops at one of `eos_ids` (not yielded), at `max_new_tokens`, or when the sequence fills
    the model's context window (decoder-only: prompt + output; encoder-decoder: the decoder's own).
    """
    if not prompts:
        raise GenerationError("every prompt needs at least one token")
    check_max_new_tokens(max_new_tokens)
    check_seed(seed)
    scheduler = Scheduler(model, max_batch=len(prompts), eos_ids=eos_ids, pad_id=pad_id, use_cache=use_cache)
    requests = [Request(list(p), max_new_tokens, params, row_seed(seed, row)) for row, p in enumerate(prompts)]
    for request in requests:  # every prompt is checked before any work
        scheduler.add(request)
    row_of = {id(r): row for row, r in enumerate(requests)}
    while scheduler.busy:
        emitted, ended = scheduler.step()
        for request in ended:
            if request.finish_reason == "error":
                raise GenerationError(request.error)
        if emitted:
            tokens: list[int | None] = [None] * len(requests)
            for e in emitted:
                tokens[row_of[id(e.request)]] = e.token
            yield tokens


def new_cache(model: nn.Module, batch: int, max_len: int, *, dtype: torch.dtype, device) -> object:
    """The model's own decoding state (a KV cache for attention; fixed-size states for recurrent
    bodies), when it defines `new_cache`; otherwise the standard KV cache."""
    if hasattr(model, "new_cache"):
        return model.new_cache(batch, max_len, dtype=dtype, device=device)
    return KVCache.empty(model.cfg, batch, max_len, dtype=dtype, device=device)


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """Run `generate_stream` to the end; each row's new tokens (EOS excluded)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, **kwargs):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs
