"""Generation for encoder-decoder models (T5, BART): the encoder runs once over the source; the decoder
starts from `cfg.decoder_start_token_id` and adds one token per step, reading its own past keys and
values from the cache and the cross-attention keys/values that the cache computed on the first step.

Token choice is the one `sample` of llmkit.inference.sampling (greedy at temperature 0, and every
truncation and penalty); beam search is llmkit.inference.beam. Sources of different lengths are
right-padded (T5 and BART tokenizers pad on the right; the encoder's mask hides the padding).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from llmkit.errors import GenerationError
from llmkit.inference.beam import beam_search
from llmkit.inference.sampling import PenaltyState, SamplingParams, sample


def right_pad(sources: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor | None]:
    """(B, S) ids and a (B, S) mask of real tokens, or None when all sources have one length."""
    width = max(len(s) for s in sources)
    ids = torch.full((len(sources), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sources), width), dtype=torch.long)
    for row, source in enumerate(sources):
        ids[row, :len(source)] = torch.tensor(list(source), dtype=torch.long)
        mask[row, :len(source)] = 1
    return ids, (None if bool(mask.all()) else mask)


def source_ids(tokenizer, text: str) -> list[int]:
    """The encoder input for `text`: what the tokenizer's post-processor makes of it (T5: text </s>;
    BART: <s> text </s>), or, for a tokenizer without one (llmkit's own), text + EOS, as
    llmkit's seq2seq training builds its sources."""
    with_specials = tokenizer.backend.encode(text, add_special_tokens=True).ids
    plain = tokenizer.encode(text)
    if with_specials != plain or tokenizer.eos_id is None:
        return with_specials
    return plain + [tokenizer.eos_id]


def _encode_sources(model: nn.Module, sources: Sequence[Sequence[int]], pad_id: int,
                    max_new_tokens: int) -> tuple[Tensor, Tensor | None]:
    cfg = model.cfg
    if not sources or any(len(s) == 0 for s in sources):
        raise GenerationError("every source needs at least one token")
    longest = max(len(s) for s in sources)
    if longest > cfg.max_seq_len:
        raise GenerationError(f"source has {longest} tokens but the model's context is {cfg.max_seq_len}")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    ids, mask = right_pad(sources, pad_id)
    mask = mask.to(device) if mask is not None else None
    return model.encode(ids.to(device), mask), mask


@torch.inference_mode()
def seq2seq_generate_stream(model: nn.Module, sources: Sequence[Sequence[int]], *, max_new_tokens: int,
                            params: SamplingParams = SamplingParams(), eos_ids: Sequence[int] = (),
                            pad_id: int = 0, use_cache: bool = True, seed: int | None = None,
                            ) -> Iterator[list[int | None]]:
    """Yield, per decode step, each row's new token, or None for a row that already stopped.

    A row stops at one of `eos_ids` (not yielded), at `max_new_tokens`, or when the decoder reaches
    the model's context. The repetition penalty counts the decoder's tokens (start token included),
    as transformers does for encoder-decoders.
    """
    cfg = model.cfg
    memory, mask = _encode_sources(model, sources, pad_id, max_new_tokens)
    device, B = memory.device, memory.shape[0]
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    max_len = min(cfg.max_seq_len, max_new_tokens + 1)  # decoder positions: the start token + outputs
    cache = model.new_cache(B, max_len, dtype=memory.dtype, device=device) if use_cache else None
    decoded = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    penalty = PenaltyState(params, decoded, cfg.vocab_size)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    logits = model.decode(decoded, memory, attention_mask=mask, cache=cache)[:, -1]
    for i in range(max_new_tokens):
        token = sample(logits.float(), params, generator=generator, seen=penalty.seen,
                       generated_counts=penalty.counts)
        finished |= torch.isin(token, eos)
        if bool(finished.all()):
            return
        yield [None if done else int(t) for t, done in zip(token.tolist(), finished.tolist())]
        if i == max_new_tokens - 1 or decoded.shape[1] >= cfg.max_seq_len:
            return  # budget spent, or the next position would be past the decoder's context
        token = token.masked_fill(finished, pad_id)[:, None]  # (B, 1); stopped rows are independent of others
        penalty.record(token, finished)
        decoded = torch.cat([decoded, token], dim=1)
        if use_cache:
            logits = model.decode(token, memory, attention_mask=mask, cache=cache)[:, -1]
        else:
            logits = model.decode(decoded, memory, attention_mask=mask)[:, -1]


def seq2seq_generate(model: nn.Module, sources: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """Run `seq2seq_generate_stream` to the end; each row's new tokens (EOS excluded)."""
    outputs: list[list[int]] = [[] for _ in sources]
    for step in seq2seq_generate_stream(model, sources, **kwargs):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs


@torch.inference_mode()
def seq2seq_beam_search(model: nn.Module, sources: Sequence[Sequence[int]], *, max_new_tokens: int,
                        num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool | str = False,
                        eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """The best beam of each source (EOS excluded); see llmkit.inference.beam for the search."""
    cfg = model.cfg
    memory, mask = _encode_sources(model, sources, pad_id, max_new_tokens)
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len)  # the decoder's positions: start + outputs
    if max_new_tokens == 0:
        return [[] for _ in sources]
    B, device = memory.shape[0], memory.device
    # every hypothesis is a row: the encoder output is repeated, not recomputed, per beam
    memory = memory.repeat_interleave(num_beams, dim=0)
    mask = mask.repeat_interleave(num_beams, dim=0) if mask is not None else None
    cache = model.new_cache(B * num_beams, max_new_tokens + 1, dtype=memory.dtype, device=device)

    def next_logits(tokens: Tensor, parents: Tensor | None) -> Tensor:
        if parents is not None:  # a beam's parent is a beam of the same source: same encoder output
            cache.reorder(parents, memory=False)
        return model.decode(tokens[:, None], memory, attention_mask=mask, cache=cache)[:, -1]

    return beam_search(next_logits, batch=B, start_id=cfg.decoder_start_token_id, max_new_tokens=max_new_tokens,
                       num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                       eos_ids=eos_ids, device=device)
