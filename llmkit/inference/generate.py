"""The autoregressive loop: prefill the prompt once, then decode one token at a time.

With the KV cache each decode step feeds only the newest token and reads every earlier key/value
from the cache; with `use_cache=False` it recomputes the whole sequence (for comparison and tests).
Prompts of different lengths are left-padded into one batch; an attention mask hides the padding
and positions count from each row's first real token, so a row's tokens equal those it gets alone.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from llmkit.errors import GenerationError
from llmkit.inference.kv_cache import KVCache
from llmkit.inference.sampling import PenaltyState, SamplingParams, sample


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor | None]:
    """(B, T) ids, plus a (B, T) mask of real tokens, or None when all prompts have one length."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, (None if bool(mask.all()) else mask)


@torch.inference_mode()
def generate_stream(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    params: SamplingParams = SamplingParams(), eos_ids: Sequence[int] = (),
                    pad_id: int = 0, use_cache: bool = True, seed: int | None = None,
                    ) -> Iterator[list[int | None]]:
    """Yield, per decode step, each row's new token, or None for a row that already stopped.

    A row stops at one of `eos_ids` (not yielded), at `max_new_tokens`, or when the sequence fills
    the model's context window.
    """
    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest >= cfg.max_seq_len:
        raise GenerationError(f"prompt has {longest} tokens but the model's context is {cfg.max_seq_len} "
                              f"(at most {cfg.max_seq_len - 1} leave room for one new token)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer ≥ 0, got {max_new_tokens!r}")
    check_seed(seed)
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    max_len = min(cfg.max_seq_len, ids.shape[1] + max_new_tokens)
    cache = new_cache(model, len(prompts), max_len, dtype=next(model.parameters()).dtype,
                      device=device) if use_cache else None
    penalty = PenaltyState(params, ids, cfg.vocab_size, real=mask)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)

    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # prefill
    for i in range(max_new_tokens):
        token = sample(logits.float(), params, generator=generator, seen=penalty.seen,
                       generated_counts=penalty.counts)
        finished |= torch.isin(token, eos)
        if bool(finished.all()):
            return
        yield [None if done else int(t) for t, done in zip(token.tolist(), finished.tolist())]
        if i == max_new_tokens - 1 or ids.shape[1] + 1 >= cfg.max_seq_len:
            return  # budget spent, or prompt + output fill the context window: no wasted forward
        token = token.masked_fill(finished, pad_id)[:, None]  # (B, 1)
        penalty.record(token, finished)
        ids = torch.cat([ids, token], dim=1)
        if mask is not None or bool(finished.any()):
            mask = torch.ones_like(ids) if mask is None else torch.cat([mask, torch.ones_like(token)], dim=1)
            mask[:, -1] = (~finished).long()
        if use_cache:
            logits = model(token, attention_mask=mask, cache=cache)[:, -1]
        else:
            logits = model(ids, attention_mask=mask)[:, -1]


def check_seed(seed: int | None) -> None:
    """A seed torch.Generator.manual_seed accepts: an integer in [-2**63, 2**64)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
        raise GenerationError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")


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
