"""One decoding-state interface for every family, so that one loop (llmkit/inference/scheduler.py)
serves decoder-only Transformers, RWKV, Mamba and encoder-decoders alike.

A state holds the rows of a continuous batch (llmkit/inference/rows.py) and answers:

- `check(prompt)`, `room(prompt_len)`: is the prompt usable, and how many tokens may follow it;
- `penalty_context(prompt)`: the tokens a repetition penalty counts as already seen;
- `prefill(prompts)` → `Prefill`: new rows computed on their own (`advance(budget)` runs at most
  `budget` prompt positions per call, so a long prompt is prefilled in chunks between other rows'
  decode steps), whose last logits choose each row's first token;
- `join(prefill, reserve)`: those rows join the running batch;
- `step(tokens, reserve)`: every running row's newest token in, next-token logits (n, vocab) out;
- `drop(rows)`: free rows (finished or cancelled); returns, per remaining row, its old index;
- `reorder(index)`: row i becomes a copy of row index[i] (beam search's hypotheses).

The families:
- `AttentionState` (Transformer decoder-only): a KV cache per row on a shared timeline (optionally a
  `PrefixCache`: the keys and values of recent prompts, whose common beginnings are copied, not computed);
- `RecurrentState` (RWKV, Mamba): a fixed-size state per row, so rows batch with no padding at all;
- `Seq2SeqState` (T5, BART): the encoder runs at prefill; each row's cross-attention keys/values are
  kept in the state beside its decoder self-attention cache;
- `RecomputeState` (`use_cache=False`, any family): token ids per row, the whole sequence recomputed
  every step (slow; the reference the caches are checked against).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from llmkit.errors import GenerationError
from llmkit.inference.kv_cache import Int8KVCache, KVCache
from llmkit.inference.rows import RowStore


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor | None]:
    """(B, T) ids, plus a (B, T) mask of real tokens, or None when all prompts have one length."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, (None if bool(mask.all()) else mask)


def right_pad(sources: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor | None]:
    """(B, S) ids and a (B, S) mask of real tokens, or None when all sources have one length."""
    width = max(len(s) for s in sources)
    ids = torch.full((len(sources), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sources), width), dtype=torch.long)
    for row, source in enumerate(sources):
        ids[row, :len(source)] = torch.tensor(list(source), dtype=torch.long)
        mask[row, :len(source)] = 1
    return ids, (None if bool(mask.all()) else mask)


def check_vocabulary(prompt: Sequence[int], vocab_size: int) -> None:
    low, high = min(prompt), max(prompt)
    if low < 0 or high >= vocab_size:
        raise GenerationError(f"token id {low if low < 0 else high} is outside the model's vocabulary "
                              f"(0..{vocab_size - 1})")


@dataclass
class Prefill:
    """New rows, computed on their own before they join the batch."""

    lengths: list[int]  # each row's positions on the shared timeline (0 for a state without one)
    width: int  # the timeline positions these rows bring (right-aligned)
    total: int  # prompt positions to run (the axis chunked prefill splits)
    run: Callable[[int, int], Tensor]  # runs positions [a, b); returns the last position's logits (k, V)
    parts: Callable[[], dict[str, tuple[Tensor, int, int | None]]]  # the rows' tensors, for RowStore.join
    template: object = None  # a cache of the kind the batch uses, for making views
    done: int = 0
    logits: Tensor | None = None

    def advance(self, budget: int | None = None) -> bool:
        """Run up to `budget` more prompt positions (all of them for None); True when finished."""
        end = self.total if budget is None else min(self.total, self.done + max(budget, 1))
        self.logits = self.run(self.done, end)
        self.done = end
        return self.done == self.total


class DecodingState:
    def __init__(self, model: nn.Module, *, max_rows: int, pad_id: int = 0) -> None:
        self.model, self.cfg, self.pad_id = model, model.cfg, pad_id
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.rows = RowStore(max_rows)
        self.template = None
        self._view: tuple[int, object] | None = None

    @property
    def n(self) -> int:
        return self.rows.n

    def check(self, prompt: Sequence[int]) -> None:
        if len(prompt) == 0:
            raise GenerationError("every prompt needs at least one token")
        check_vocabulary(prompt, self.cfg.vocab_size)
        if len(prompt) >= self.cfg.max_seq_len:
            S = self.cfg.max_seq_len
            raise GenerationError(f"prompt has {len(prompt)} tokens but the model's context is {S} "
                                  f"(at most {S - 1} leave room for one new token)")

    def room(self, prompt_len: int) -> int:
        """New tokens that fit after a prompt: prompt + output fill at most the context window."""
        return self.cfg.max_seq_len - prompt_len

    def penalty_context(self, prompt: Sequence[int]) -> list[int]:
        return list(prompt)

    def join(self, prefill: Prefill, reserve: int) -> None:
        if self.template is None and prefill.template is not None:
            # the kind of cache to make views of, without holding on to the prefill's own buffers
            self.template = copy.copy(prefill.template)
            for name in ("k", "v", "k_scale", "v_scale", "memory", "tensors", "_views"):
                if name in vars(self.template):
                    setattr(self.template, name, None)
        self.rows.join(prefill.parts(), prefill.lengths, prefill.width, reserve)

    def drop(self, rows: set[int]) -> list[int]:
        return self.rows.drop(rows)

    def reorder(self, index: list[int]) -> None:
        self.rows.reorder(index)

    def cache_view(self):
        """A cache object over the rows in use (remade only when rows or buffers moved)."""
        if self._view is None or self._view[0] != self.rows.version:
            names = [n for n in self.rows.tensors if n not in ("mask", "source_mask")]
            self._view = (self.rows.version, self.template.over({n: self.rows.view(n) for n in names}, self.rows.pos))
        view = self._view[1]
        view.pos = self.rows.pos
        return view

    def _ids(self, prompts: Sequence[Sequence[int]], pad=left_pad) -> tuple[Tensor, Tensor | None]:
        ids, mask = pad(prompts, self.pad_id)
        return ids.to(self.device), (mask.to(self.device) if mask is not None else None)


class PrefixCache:
    """Keys and values of recent prompts, so that a prompt beginning like one of them (the same system
    prompt, the next turn of a chat) prefills only what differs. A position's keys and values depend
    only on the tokens up to it, so any common beginning of two prompts can be copied. The least
    recently used prompts are forgotten once more than `max_tokens` positions are held."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[int, ...], dict[str, Tensor]] = OrderedDict()
        self.held = 0
        self.reused = 0  # positions copied instead of computed, in all

    def restore(self, prompt: list[int], cache: KVCache) -> int:
        """Copy the longest cached beginning of `prompt` (leaving at least its last token to compute)
        into `cache`, a one-row cache at position 0; returns its length."""
        best, found = 0, None
        for key in self.entries:
            n = _common_prefix(key, prompt)
            if n > best:
                best, found = n, key
        best = min(best, len(prompt) - 1)
        if best == 0:
            return 0
        self.entries.move_to_end(found)
        for name, tensor in cache.buffers().items():
            tensor.narrow(3, 0, best).copy_(self.entries[found][name].narrow(3, 0, best))
        cache.pos = best
        self.reused += best
        return best

    def keep(self, prompt: list[int], cache: KVCache) -> None:
        key = tuple(prompt)
        if key in self.entries or len(key) > self.max_tokens:
            return
        self.entries[key] = {name: t.narrow(3, 0, len(key)).clone() for name, t in cache.buffers().items()}
        self.held += len(key)
        while self.held > self.max_tokens:
            oldest, _ = self.entries.popitem(last=False)
            self.held -= len(oldest)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def attention_cache(model: nn.Module, batch: int, max_len: int, *, dtype: torch.dtype, device) -> KVCache:
    """A full KV cache (int8 where `model.kv_cache == "int8"`). Never the sliding window's ring buffer:
    rows of a continuous batch move on a shared timeline, which a ring's slot arithmetic cannot follow."""
    kind = Int8KVCache if getattr(model, "kv_cache", "full") == "int8" else KVCache
    cfg = model.cfg
    return kind(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype=dtype, device=device)


class AttentionState(DecodingState):
    prefix_cache: PrefixCache | None = None  # set by the scheduler when prompts' beginnings are reused

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefill:
        ids, mask = self._ids(prompts)
        cache = attention_cache(self.model, len(prompts), ids.shape[1], dtype=self.dtype, device=self.device)
        reused = 0
        if self.prefix_cache is not None and len(prompts) == 1:  # one unpadded row: positions from 0
            reused = self.prefix_cache.restore(list(prompts[0]), cache)

        def run(a: int, b: int) -> Tensor:
            a, b = a + reused, b + reused
            return self.model(ids[:, a:b], attention_mask=None if mask is None else mask[:, :b], cache=cache,
                              last_only=True)[:, -1]

        def parts() -> dict:
            if self.prefix_cache is not None and len(prompts) == 1:
                self.prefix_cache.keep(list(prompts[0]), cache)
            out = {name: (t, 1, 3) for name, t in cache.buffers().items()}
            out["mask"] = (torch.ones_like(ids) if mask is None else mask, 0, 1)
            return out

        width = ids.shape[1]
        return Prefill([len(p) for p in prompts], width, width - reused, run, parts, cache)

    def step(self, tokens: Tensor, reserve: int) -> Tensor:
        return self.extend(tokens[:, None], reserve)[:, -1]

    def extend(self, tokens: Tensor, reserve: int) -> Tensor:
        """Feed every row T new tokens (n, T); logits (n, T, vocab) (speculative decoding verifies a
        draft's guesses this way, T at a time)."""
        rows, T = self.rows, tokens.shape[1]
        rows.make_room(T, reserve)
        rows.tensors["mask"][:rows.n, rows.pos:rows.pos + T] = 1
        cache = self.cache_view()
        mask = rows.tensors["mask"].narrow(0, 0, rows.n).narrow(1, 0, rows.pos + T) if rows.padded else None
        logits = self.model(tokens, attention_mask=mask, cache=cache)
        rows.pos += T
        return logits

    def rewind(self, positions: int) -> None:
        """Forget every row's last `positions` positions (speculative decoding's rejected guesses)."""
        assert 0 <= positions <= self.rows.pos - max(self.rows.start, default=0)
        self.rows.pos -= positions


class RecurrentState(DecodingState):
    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefill:
        ids, mask = self._ids(prompts)  # padding leaves a recurrent state exactly as it was
        state = self.model.new_cache(len(prompts), ids.shape[1], dtype=self.dtype, device=self.device)

        def run(a: int, b: int) -> Tensor:
            return self.model(ids[:, a:b], attention_mask=None if mask is None else mask[:, :b], cache=state,
                              last_only=True)[:, -1]

        def parts() -> dict:
            return {name: (t, 1, None) for name, t in state.buffers().items()}

        return Prefill([0] * len(prompts), 0, ids.shape[1], run, parts, state)

    def step(self, tokens: Tensor, reserve: int) -> Tensor:
        return self.model(tokens[:, None], cache=self.cache_view())[:, -1]


class Seq2SeqRules:
    """What differs for an encoder-decoder's prompt (its source): the limits and the decoder's start."""

    def check(self, prompt: Sequence[int]) -> None:
        if len(prompt) == 0:
            raise GenerationError("every source needs at least one token")
        if len(prompt) > self.cfg.max_seq_len:
            raise GenerationError(f"source has {len(prompt)} tokens but the model's context is {self.cfg.max_seq_len}")
        check_vocabulary(prompt, self.cfg.vocab_size)

    def room(self, prompt_len: int) -> int:
        return self.cfg.max_seq_len  # the decoder's positions: the start token + outputs

    def penalty_context(self, prompt: Sequence[int]) -> list[int]:
        return [self.cfg.decoder_start_token_id]  # the decoder's tokens, as transformers counts them

    def _start(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        ids, mask = self._ids(prompts, right_pad)
        start = torch.full((len(prompts), 1), self.cfg.decoder_start_token_id, dtype=torch.long, device=self.device)
        return start, self.model.encode(ids, mask), torch.ones_like(ids) if mask is None else mask, mask



class Seq2SeqState(Seq2SeqRules, DecodingState):
    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefill:
        cache = self.model.new_cache(len(prompts), 1, dtype=self.dtype, device=self.device)
        saved: dict = {}

        def run(a: int, b: int) -> Tensor:  # one chunk: the encoder reads the whole source at once
            start, memory, source_mask, mask = self._start(prompts)
            saved.update(start=start, source_mask=source_mask)
            return self.model.decode(start, memory, attention_mask=mask, cache=cache)[:, -1]

        def parts() -> dict:
            out = {name: (t, 1, 3) for name, t in cache.buffers().items()}
            out.update({name: (t, 1, None) for name, t in cache.cross_buffers().items()})
            out["mask"] = (torch.ones_like(saved["start"]), 0, 1)
            out["source_mask"] = (saved["source_mask"], 0, None)
            return out

        return Prefill([1] * len(prompts), 1, 1, run, parts, cache)

    def step(self, tokens: Tensor, reserve: int) -> Tensor:
        rows = self.rows
        rows.make_room(1, reserve)
        rows.tensors["mask"][:rows.n, rows.pos] = 1
        cache = self.cache_view()
        mask = rows.timeline("mask") if rows.padded else None
        positions = mask.sum(-1, keepdim=True) - 1 if mask is not None else None  # each row's own count
        source_mask = rows.view("source_mask")
        placeholder = tokens.new_zeros((rows.n, 0, self.cfg.d_model), dtype=self.dtype)  # keys are in the cache
        logits = self.model.decode(tokens[:, None], placeholder, cache=cache, decoder_attention_mask=mask,
                                   attention_mask=None if bool(source_mask.all()) else source_mask,
                                   positions=positions)[:, -1]
        rows.pos += 1
        return logits


class RecomputeState(DecodingState):
    """No cache: each row's token ids on the shared timeline, the whole sequence run every step."""

    seq2seq = False

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Prefill:
        saved: dict = {}
        if self.seq2seq:
            def run(a: int, b: int) -> Tensor:
                start, memory, source_mask, mask = self._start(prompts)
                saved.update(ids=start, mask=torch.ones_like(start), memory=memory, source_mask=source_mask)
                return self.model.decode(start, memory, attention_mask=mask)[:, -1]
            lengths, width = [1] * len(prompts), 1
        else:
            ids, mask = self._ids(prompts)
            saved.update(ids=ids, mask=torch.ones_like(ids) if mask is None else mask)

            def run(a: int, b: int) -> Tensor:
                return self.model(ids, attention_mask=mask, last_only=True)[:, -1]
            lengths, width = [len(p) for p in prompts], ids.shape[1]

        def parts() -> dict:
            out = {"ids": (saved["ids"], 0, 1), "mask": (saved["mask"], 0, 1)}
            if self.seq2seq:
                out.update(memory=(saved["memory"], 0, None), source_mask=(saved["source_mask"], 0, None))
            return out

        return Prefill(lengths, width, 1, run, parts)

    def step(self, tokens: Tensor, reserve: int) -> Tensor:
        rows = self.rows
        rows.make_room(1, reserve)
        rows.tensors["ids"][:rows.n, rows.pos] = tokens
        rows.tensors["mask"][:rows.n, rows.pos] = 1
        ids, mask = rows.timeline("ids"), (rows.timeline("mask") if rows.padded else None)
        rows.pos += 1
        if not self.seq2seq:
            return self.model(ids, attention_mask=mask, last_only=True)[:, -1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else None
        source_mask = rows.view("source_mask")
        return self.model.decode(ids, rows.view("memory"), decoder_attention_mask=mask, positions=positions,
                                 attention_mask=None if bool(source_mask.all()) else source_mask)[:, -1]


class RecomputeSeq2SeqState(Seq2SeqRules, RecomputeState):
    seq2seq = True


def decoding_state(model: nn.Module, *, max_rows: int, pad_id: int = 0, use_cache: bool = True) -> DecodingState:
    """The state that decodes `model`'s family, for up to `max_rows` rows at once."""
    arch = model.cfg.arch
    if arch == "encoder":
        raise GenerationError("an encoder-only model (BERT family) does not generate text; use `llmkit embed`, "
                              "or lm.model(ids) for masked-LM logits")
    if not use_cache:
        kind = RecomputeSeq2SeqState if arch == "encoder-decoder" else RecomputeState
        return kind(model, max_rows=max_rows, pad_id=pad_id)
    if arch == "encoder-decoder":
        return Seq2SeqState(model, max_rows=max_rows, pad_id=pad_id)
    if model.cfg.body != "transformer":
        return RecurrentState(model, max_rows=max_rows, pad_id=pad_id)
    return AttentionState(model, max_rows=max_rows, pad_id=pad_id)
