"""The one generation loop, for every family and every caller: `generate` / `generate_stream`, the CLI's
generate and chat, `llmkit.load(...).generate/stream` and the engine behind the server.

It runs a continuous batch. Each `step()`:
1. frees the rows of requests that finished or were cancelled since the last step;
2. runs one decode step for every running row (its newest token in, next-token logits out) and
   chooses each row's next token with that request's own sampling settings and random generator;
3. admits waiting requests into free rows: they are prefilled on their own — a chunk of at most
   `prefill_chunk` positions per step while other rows are decoding, so a long prompt does not stall
   them — and, once done, join the batch with their first token chosen.
A request therefore gets at most one token per step, and the tokens it gets do not depend on which
other requests share the batch: rows never see each other (padding masks, positions per row), and
each request draws from its own generator seeded by its own seed.

A row stops at an EOS token (not emitted), when its token limit is reached (max_new_tokens, clipped
to what fits in the context: `finish_reason` "length"), or when the caller finishes it (`finish`:
a stop string, a cancellation).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from llmkit.errors import GenerationError
from llmkit.inference.decoding_state import AttentionState, PrefixCache, decoding_state
from llmkit.inference.sampling import PenaltyState, SamplingParams, sample

PREFILL_CHUNK = 256  # prompt positions per prefill chunk while other rows decode (latency vs throughput)
GREEDY = SamplingParams(temperature=0.0)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = SamplingParams()
    seed: int | None = None  # None: a fresh random seed
    logprobs: int | None = None  # None: none computed; k ≥ 0: the chosen token's logprob and the top k
    stop: tuple[str, ...] = ()  # stop strings, for the text layer above (llmkit/inference/session.py)
    owner: object = None  # the caller's (the engine keeps its handle here)
    # kept by the scheduler
    limit: int = 0  # max_new_tokens clipped to the context
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    generator: torch.Generator | None = None
    penalty: PenaltyState | None = None
    pending: int | None = None  # the token the next decode step feeds
    admitted: bool = False  # has left the queue: being prefilled or decoded (read by other threads)


@dataclass
class Emitted:
    request: Request
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


def check_seed(seed: int | None) -> None:
    """A seed torch.Generator.manual_seed accepts: an integer in [-2**63, 2**64)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
        raise GenerationError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")


def check_max_new_tokens(n: object, *, minimum: int = 0) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise GenerationError(f"max_new_tokens must be an integer ≥ {minimum}, got {n!r}")


class Scheduler:
    def __init__(self, model: nn.Module, *, max_batch: int, eos_ids: Sequence[int] = (), pad_id: int = 0,
                 use_cache: bool = True, prefill_chunk: int = PREFILL_CHUNK, prefix_cache_tokens: int = 0,
                 draft: nn.Module | None = None, draft_tokens: int = 4) -> None:
        """`prefix_cache_tokens` > 0 keeps the keys and values of recent prompts (up to that many positions,
        Transformer decoders) and prefills only what a new prompt does not share with one of them; requests
        are then prefilled one at a time (a padded group has no common positions to copy). `draft`: a
        smaller Transformer decoder with the same vocabulary that guesses `draft_tokens` tokens per step
        for a greedy request running alone (llmkit/inference/speculative.py's Speculator)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise GenerationError(f"max_batch must be an integer ≥ 1, got {max_batch!r}")
        self.state = decoding_state(model, max_rows=max_batch, pad_id=pad_id, use_cache=use_cache)
        if prefix_cache_tokens > 0 and isinstance(self.state, AttentionState):
            self.state.prefix_cache = PrefixCache(prefix_cache_tokens)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.on_admit = None  # called with each request as it leaves the queue, before its prefill
        self.speculator = None
        if draft is not None:
            from llmkit.inference.speculative import Speculator

            self.speculator = Speculator(self.state, draft, draft_tokens=draft_tokens)
        self.eos = set(eos_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # index = row of the decoding state
        self.joining: list[Request] = []  # being prefilled
        self.prefill = None
        self.ended: list[Request] = []  # finished before they ever ran (a zero budget)
        self.steps = 0  # decode steps run
        self.tokens_total = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.joining or self.ended)

    def add(self, request: Request) -> None:
        """Queue `request`; GenerationError (one line) if its prompt or settings are unusable."""
        self.state.check(request.prompt)
        check_max_new_tokens(request.max_new_tokens)
        check_seed(request.seed)
        device = self.state.device
        request.limit = min(request.max_new_tokens, self.state.room(len(request.prompt)))
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        request.generator = torch.Generator(device=device).manual_seed(seed)
        context = torch.tensor([self.state.penalty_context(request.prompt)], dtype=torch.long, device=device)
        request.penalty = PenaltyState(request.params, context, self.state.cfg.vocab_size)
        if request.limit == 0:
            request.finish_reason = "length"
            self.ended.append(request)
        else:
            self.waiting.append(request)

    def finish(self, request: Request, reason: str) -> None:
        """End `request` (a stop string, a cancellation); its row is freed at the start of the next step."""
        if request.finish_reason is None:
            request.finish_reason = reason

    def step(self) -> tuple[list[Emitted], list[Request]]:
        """One decode step and some prefill work: the tokens chosen, and the requests that ended."""
        ended = self.sweep()
        emitted: list[Emitted] = []
        guessed = self._speculate()
        if guessed is not None:
            self.steps += 1
            emitted += self._accept(self.running[0], *guessed)
        elif self.running:
            tokens = torch.tensor([r.pending for r in self.running], dtype=torch.long, device=self.state.device)
            logits = self.state.step(tokens, reserve=self._reserve(self.running))
            self.steps += 1
            emitted += self._choose(self.running, logits)
        emitted += self._prefill_work()
        self.tokens_total += len(emitted)
        return emitted, ended + self.sweep()

    def fail_all(self, message: str) -> list[Request]:
        """End every request with an error (the model raised mid-step); the state starts afresh."""
        everyone = self.running + self.joining + list(self.waiting) + self.ended
        for r in everyone:
            if r.finish_reason is None:
                r.finish_reason, r.error = "error", message
        self.state.drop(set(range(self.state.n)))
        self.running, self.joining, self.prefill, self.ended = [], [], None, []
        if self.speculator is not None:
            self.speculator.forget()
        self.waiting.clear()
        return everyone

    # ---- inside a step ----------------------------------------------------------------------------

    @staticmethod
    def _reserve(requests: list[Request]) -> int:
        return max(r.limit - len(r.generated) for r in requests) + 1

    def sweep(self) -> list[Request]:
        """Free the rows of ended requests and drop ended ones from the queue; those requests."""
        ended, self.ended = self.ended, []
        gone = {row for row, r in enumerate(self.running) if r.finish_reason is not None}
        if gone:
            ended += [self.running[row] for row in sorted(gone)]
            order = self.state.drop(gone)
            self.running = [self.running[old] for old in order]
        if any(r.finish_reason is not None for r in self.waiting):
            ended += [r for r in self.waiting if r.finish_reason is not None]
            self.waiting = deque(r for r in self.waiting if r.finish_reason is None)
        return ended

    def _speculate(self) -> tuple[list[int], Tensor] | None:
        """A speculative round's tokens and logits when one greedy request without penalties runs alone
        (nothing joining or waiting), else None."""
        if self.speculator is None or len(self.running) != 1 or self.joining or self.waiting:
            return None
        r = self.running[0]
        if r.finish_reason is not None or not r.params.greedy or r.penalty.seen is not None:
            return None
        return self.speculator.round(r, self.eos, self._reserve(self.running))

    def _accept(self, r: Request, tokens: list[int], logits: Tensor) -> list[Emitted]:
        """A round's tokens for `r` (chosen from `logits`, one row each), up to an EOS or its limit, as
        `_choose` takes one."""
        scores = self._logprobs([r] * len(tokens), logits, dict(enumerate(tokens)))
        out = []
        for i, token in enumerate(tokens):
            if token in self.eos:
                r.finish_reason = "stop"
                break
            r.generated.append(token)
            out.append(Emitted(r, token, *scores.get(i, (None, []))))
            if len(r.generated) >= r.limit:
                r.finish_reason = "length"
                break
            r.pending = token
        return out

    def _prefill_work(self) -> list[Emitted]:
        if self.prefill is None:
            free = self.max_batch - len(self.running)
            if getattr(self.state, "prefix_cache", None) is not None:
                free = min(free, 1)
            while self.waiting and len(self.joining) < free:
                self.joining.append(self.waiting.popleft())
                self.joining[-1].admitted = True
                if self.on_admit is not None:
                    self.on_admit(self.joining[-1])
            if not self.joining:
                return []
            self.prefill = self.state.prefill([r.prompt for r in self.joining])
        # with nothing else running there is nobody to interleave with: the whole prompt at once
        if not self.prefill.advance(self.prefill_chunk if self.running else None):
            return []
        joining, logits = self.joining, self.prefill.logits
        self.state.join(self.prefill, reserve=self._reserve(joining))
        self.running += joining
        self.joining, self.prefill = [], None
        return self._choose(joining, logits)

    def _choose(self, requests: list[Request], logits: Tensor) -> list[Emitted]:
        """Each live request's next token from its row of `logits` (n, vocab), with its own settings."""
        live = [i for i, r in enumerate(requests) if r.finish_reason is None]
        chosen: dict[int, int] = {}
        # greedy rows without penalties need no generator: one argmax for all of them
        plain = [i for i in live if requests[i].params.greedy and requests[i].penalty.seen is None]
        if plain:
            rows = logits if len(plain) == len(requests) else logits[plain]
            try:
                chosen.update(zip(plain, sample(rows, GREEDY).tolist()))
            except GenerationError as exc:
                for i in plain:
                    requests[i].finish_reason, requests[i].error = "error", str(exc)
        for i in live:
            r = requests[i]
            if i in chosen or r.finish_reason is not None:
                continue
            try:
                chosen[i] = int(sample(logits[i:i + 1], r.params, generator=r.generator, seen=r.penalty.seen,
                                       generated_counts=r.penalty.counts))
            except GenerationError as exc:
                r.finish_reason, r.error = "error", str(exc)
        out = []
        scores = self._logprobs(requests, logits, chosen)
        for i in sorted(chosen):
            r, token = requests[i], chosen[i]
            if token in self.eos:
                r.finish_reason = "stop"
                continue
            r.generated.append(token)
            if r.penalty.seen is not None:
                r.penalty.record(torch.tensor([[token]], device=logits.device),
                                 torch.zeros(1, dtype=torch.bool, device=logits.device))
            out.append(Emitted(r, token, *scores.get(i, (None, []))))
            if len(r.generated) >= r.limit:
                r.finish_reason = "length"
            else:
                r.pending = token
        return out

    @staticmethod
    def _logprobs(requests: list[Request], logits: Tensor, chosen: dict[int, int]
                  ) -> dict[int, tuple[float, list[tuple[int, float]]]]:
        """For the rows whose requests asked: the chosen token's log-probability and the top k, from the
        model's raw logits (one log-softmax and one top-k for all of them)."""
        rows = [i for i in sorted(chosen) if requests[i].logprobs is not None]
        if not rows:
            return {}
        logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
        picked = logprobs.gather(1, torch.tensor([[chosen[i]] for i in rows], device=logits.device)).squeeze(1)
        k = min(max(requests[i].logprobs for i in rows), logprobs.shape[-1])
        values, ids = logprobs.topk(k) if k > 0 else (logprobs[:, :0], logprobs[:, :0].long())
        values, ids, picked = values.tolist(), ids.tolist(), picked.tolist()
        return {i: (picked[j], list(zip(ids[j], values[j]))[:requests[i].logprobs]) for j, i in enumerate(rows)}
