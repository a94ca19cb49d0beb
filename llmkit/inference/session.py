"""Requests with text: the one loop (llmkit/inference/scheduler.py) plus incremental detokenisation,
stop strings and the events every caller reads — the engine's background thread for the server, and
`run_alone` for the CLI and `llmkit.load(...).generate/stream`, which run one request through the
same code in the caller's thread.

Events, per request: TokenEvent for every generated token (its text is "" while a character is
incomplete or the text may begin a stop string), then exactly one Finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from llmkit.errors import GenerationError
from llmkit.inference.detokenize import TextStream
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.scheduler import PREFILL_CHUNK, Request, Scheduler, check_max_new_tokens, check_seed

MAX_TOP_LOGPROBS = 20  # OpenAI's limit; each one costs a decode of its token per step


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the new printable text ("" while held back)
    logprob: float | None = None  # log-softmax of the model's raw logits, when asked for
    top_logprobs: list[tuple[int, str, float]] = field(default_factory=list)  # (token id, token text, logprob)


@dataclass
class Finished:
    reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    text: str = ""  # text held back until now, released at the end
    error: str | None = None


class Session:
    """A Scheduler whose requests carry stop strings and produce events."""

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int, eos_ids: Sequence[int] = (),
                 pad_id: int = 0, use_cache: bool = True, prefill_chunk: int = PREFILL_CHUNK,
                 prefix_cache_tokens: int = 0, draft: nn.Module | None = None, draft_tokens: int = 4) -> None:
        self.scheduler = Scheduler(model, max_batch=max_batch, eos_ids=eos_ids, pad_id=pad_id, use_cache=use_cache,
                                   prefill_chunk=prefill_chunk, prefix_cache_tokens=prefix_cache_tokens,
                                   draft=draft, draft_tokens=draft_tokens)
        self.tokenizer = tokenizer
        self.streams: dict[Request, TextStream] = {}

    def request(self, prompt_ids: Sequence[int], *, max_new_tokens: int, params: SamplingParams = SamplingParams(),
                seed: int | None = None, stop: Sequence[str] = (), logprobs: int | None = None,
                min_new_tokens: int = 0) -> Request:
        """A checked request (GenerationError, one line, for anything unusable), not yet queued."""
        if not isinstance(prompt_ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt_ids):
            raise GenerationError("the prompt must be a list of token ids (integers)")
        self.scheduler.state.check(prompt_ids)
        check_max_new_tokens(max_new_tokens, minimum=min_new_tokens)
        check_seed(seed)
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"params must be a SamplingParams, got {type(params).__name__}")
        stop = () if stop is None else stop
        if isinstance(stop, str) or not all(isinstance(s, str) for s in stop):
            raise GenerationError("stop must be a list of strings")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise GenerationError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}")
        return Request(list(prompt_ids), max_new_tokens, params, seed, logprobs, tuple(stop))

    def add(self, request: Request) -> None:
        self.scheduler.add(request)
        self.streams[request] = TextStream(self.tokenizer, request.stop)

    def finish(self, request: Request, reason: str) -> None:
        self.scheduler.finish(request, reason)

    def step(self) -> list[tuple[Request, TokenEvent | Finished]]:
        """One scheduler step, as events."""
        emitted, ended = self.scheduler.step()
        events: list[tuple[Request, TokenEvent | Finished]] = []
        stopped = False
        for e in emitted:
            stream = self.streams[e.request]
            if stream.stopped:  # a speculative round's tokens after a stop string: not part of the answer
                e.request.generated.pop()  # (they are the last ones it holds)
                continue
            text = stream.push(e.token)
            if stream.stopped:
                self.scheduler.finish(e.request, "stop")
                stopped = True
            top = [(t, self.tokenizer.decode([t]), lp) for t, lp in e.top]
            events.append((e.request, TokenEvent(e.token, text, e.logprob, top)))
        if stopped:  # free those rows now rather than a step later
            ended += self.scheduler.sweep()
        return events + [(r, self._finished(r)) for r in ended]

    def fail_all(self, message: str) -> list[tuple[Request, Finished]]:
        return [(r, self._finished(r)) for r in self.scheduler.fail_all(message)]

    def _finished(self, request: Request) -> Finished:
        stream = self.streams.pop(request, None)
        text = stream.finish() if stream is not None and request.finish_reason != "error" else ""
        return Finished(request.finish_reason or "cancelled", len(request.prompt), len(request.generated),
                        text, request.error)


@torch.inference_mode()
def run_alone(model: nn.Module, tokenizer, prompt_ids: Sequence[int], *, eos_ids: Sequence[int] = (),
              pad_id: int = 0, use_cache: bool = True, draft: nn.Module | None = None, draft_tokens: int = 4,
              **options) -> Iterator[TokenEvent | Finished]:
    """One request through the one loop, in the caller's thread: its events; GenerationError (on the
    first `next`) for an unusable prompt or setting, or if generation fails. `draft`: speculative
    decoding for a greedy request (a smaller model with the same vocabulary; the output is unchanged)."""
    session = Session(model, tokenizer, max_batch=1, eos_ids=eos_ids, pad_id=pad_id, use_cache=use_cache,
                      draft=draft, draft_tokens=draft_tokens)
    session.add(session.request(prompt_ids, **options))
    while session.scheduler.busy:
        for _, event in session.step():
            if isinstance(event, Finished) and event.reason == "error":
                raise GenerationError(event.error)
            yield event
