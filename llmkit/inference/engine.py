"""The generation engine: requests from any thread, one background thread stepping a continuous batch.

    engine = Engine(model, tokenizer, max_batch=8, max_queued=32)
    handle = engine.submit(prompt_ids, max_new_tokens=64, params=SamplingParams(...), seed=None,
                           stop=("\\n\\n",), logprobs=0)
    for event in handle: ...              # TokenEvent*, then exactly one Finished
    async for event in handle.aiter(): ...  # the same, for asyncio code; never blocks the event loop
    handle.cancel()                        # the row is freed at the next decode step
    engine.stats(); engine.close()

Each request joins the running batch between decode steps and leaves it when it ends (llmkit/
inference/scheduler.py): its tokens are those it would get alone (greedy, or sampled with its own
seed). A full engine (`max_batch` requests running and `max_queued` waiting) refuses new ones with
EngineFull at once rather than letting a queue grow without bound.

Iterating a handle and stopping early (breaking out of the loop, an async consumer cancelled or closed)
cancels the request: nobody is left to read its tokens.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import AsyncIterator, Iterator, Sequence

import torch
from torch import nn

from llmkit.errors import GenerationError
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.scheduler import PREFILL_CHUNK, Request
from llmkit.inference.session import Finished, Session, TokenEvent

__all__ = ["Engine", "EngineFull", "Finished", "Handle", "TokenEvent"]


class EngineFull(GenerationError):
    """Every row runs and the queue is full (the server answers 429)."""


class Handle:
    """One submitted request: its events, readable from any thread or event loop, and `cancel`."""

    def __init__(self, engine: "Engine", request: Request) -> None:
        self._engine, self.request = engine, request
        self.prompt_tokens = len(request.prompt)
        self._events: deque = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._admission_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False
        self.finished = False

    @property
    def queued(self) -> bool:
        """Whether the request still waits for a row: not yet prefilled or decoded, and not finished."""
        return not (self.request.admitted or self.finished)

    async def admitted(self) -> None:
        """Return once the request has left the queue (its prefill has begun) or has finished; never
        blocks the event loop. A server times requests' waits in the queue with it."""
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            if not self.queued:
                return
            self._admission_waiters.append((loop, ready))
        try:
            await ready.wait()
        finally:
            with self._cond:
                if (loop, ready) in self._admission_waiters:
                    self._admission_waiters.remove((loop, ready))

    def cancel(self) -> None:
        """Ask the engine to end this request; it answers Finished(reason="cancelled") unless it had
        already finished."""
        if not self.cancelled and not self.finished:
            self.cancelled = True
            self._engine._wake_up()

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        done = False
        try:
            while not done:
                with self._cond:
                    while not self._events:
                        self._cond.wait()
                    event = self._events.popleft()
                done = isinstance(event, Finished)
                yield event
        finally:
            if not done:
                self.cancel()

    async def aiter(self) -> AsyncIterator[TokenEvent | Finished]:
        loop, ready = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, ready))
        done = False
        try:
            while not done:
                with self._cond:
                    event = self._events.popleft() if self._events else None
                    if event is None:
                        ready.clear()  # set again (in this loop) by the next _put
                if event is None:
                    await ready.wait()
                    continue
                done = isinstance(event, Finished)
                yield event
        finally:
            with self._cond:
                self._waiters.remove((loop, ready))
            if not done:
                self.cancel()

    def _put(self, event: TokenEvent | Finished) -> None:
        with self._cond:
            self._events.append(event)
            self.finished = self.finished or isinstance(event, Finished)
            self._cond.notify_all()
            waiters = list(self._waiters)
        _wake(waiters)
        if self.finished:
            self._tell_admitted()

    def _tell_admitted(self) -> None:
        """Wake whoever awaits `admitted()` (the engine's thread calls this once the request left the queue)."""
        with self._cond:
            waiters, self._admission_waiters = self._admission_waiters, []
        _wake(waiters)


def _wake(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    for loop, ready in waiters:
        try:
            loop.call_soon_threadsafe(ready.set)
        except RuntimeError:  # that event loop has closed: nobody is waiting there any more
            pass


class Engine:
    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 8, max_queued: int = 32,
                 eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, prefix_cache_tokens: int = 0, draft: nn.Module | None = None,
                 draft_tokens: int = 4) -> None:
        """`eos_ids` default to the tokenizer's EOS (pass `lm.eos_ids` for a model with its own, e.g. a
        chat model's end-of-turn token). `prefix_cache_tokens` > 0 keeps recent prompts' keys and values
        (that many positions at most, held until evicted) so a prompt that begins like one of them (a
        shared system prompt, a chat's next turn) prefills only the rest; Transformer decoders. `draft`: a
        smaller Transformer decoder with the same vocabulary for speculative decoding, used while one
        greedy request runs alone (`draft_tokens` guesses per step; outputs do not change)."""
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0:
            raise GenerationError(f"max_queued must be an integer ≥ 0, got {max_queued!r}")
        if eos_ids is None:
            eos_ids = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id is not None else []
        if pad_id is None:
            pad_id = (tokenizer.pad_id if tokenizer is not None else None) or 0
        self._session = Session(model, tokenizer, max_batch=max_batch, eos_ids=eos_ids, pad_id=pad_id,
                                prefill_chunk=prefill_chunk, prefix_cache_tokens=prefix_cache_tokens,
                                draft=draft, draft_tokens=draft_tokens)
        self.max_batch, self.max_queued = max_batch, max_queued
        self._lock = threading.Condition()
        self._incoming: list[Handle] = []
        self._live: set[Handle] = set()  # submitted and not finished
        self._closed = False
        self._stats = dict(running=0, queued=0, requests_total=0, tokens_total=0, steps=0, prefix_tokens_reused=0,
                           draft_proposed=0, draft_accepted=0)
        # a request's `admitted()` returns as its prefill begins (a server then sends its headers)
        self._session.scheduler.on_admit = lambda request: request.owner._tell_admitted()
        self._thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 64,
               params: SamplingParams = SamplingParams(), seed: int | None = None, stop: Sequence[str] = (),
               logprobs: int | None = 0) -> Handle:
        """Queue a request. GenerationError (one line) for an unusable prompt or setting; EngineFull when
        `max_batch` requests run and `max_queued` wait. `logprobs`: k ≥ 0 gives every TokenEvent the
        chosen token's logprob and the top k; None gives neither."""
        request = self._session.request(prompt_ids, max_new_tokens=max_new_tokens, params=params, seed=seed,
                                        stop=stop, logprobs=logprobs, min_new_tokens=1)
        handle = Handle(self, request)
        request.owner = handle
        with self._lock:
            if self._closed:
                raise GenerationError("the engine is closed")
            if len(self._live) >= self.max_batch + self.max_queued:
                raise EngineFull(f"the engine is full ({self.max_batch} requests running and {self.max_queued} "
                                 "waiting); try again later")
            self._live.add(handle)
            self._incoming.append(handle)
            self._stats["requests_total"] += 1
            self._stats["queued"] += 1
            self._lock.notify_all()
        return handle

    def stats(self) -> dict:
        """running, queued, requests_total, tokens_total (and steps: decode steps run; prefix_tokens_reused:
        prompt positions copied from the prefix cache instead of computed; draft_proposed / draft_accepted:
        a draft's guesses checked and kept)."""
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Stop the thread; requests still pending finish with reason "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake_up(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ---- the engine's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        session, scheduler = self._session, self._session.scheduler
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._incoming or scheduler.busy or self._closed):
                        self._lock.wait()
                    if self._closed:
                        break
                    incoming, self._incoming = self._incoming, []
                    live = list(self._live)
                refused = []
                for handle in incoming:
                    try:
                        session.add(handle.request)  # checked at submit already
                    except GenerationError as exc:
                        handle.request.finish_reason, handle.request.error = "error", str(exc)
                        refused.append((handle.request, session._finished(handle.request)))
                for handle in live:
                    if handle.cancelled:
                        session.finish(handle.request, "cancelled")
                try:
                    events = session.step()
                except Exception as exc:  # the model failed mid-step: every request in flight ends with it
                    events = session.fail_all(f"generation failed: {type(exc).__name__}: {exc}".splitlines()[0])
                self._deliver(refused + events)
            # closing: whatever is still pending ends as cancelled
            with self._lock:
                pending = list(self._live)
            for handle in pending:
                handle.request.finish_reason = handle.request.finish_reason or "cancelled"
            self._deliver([(h.request, session._finished(h.request)) for h in pending])

    def _deliver(self, events: list) -> None:
        scheduler = self._session.scheduler
        tokens = 0
        for request, event in events:
            handle: Handle = request.owner
            if isinstance(event, Finished):  # its place is free before its reader can submit again
                with self._lock:
                    self._live.discard(handle)
            else:
                tokens += 1
            handle._put(event)
        with self._lock:
            prefixes = getattr(scheduler.state, "prefix_cache", None)
            self._stats.update(running=len(scheduler.running) + len(scheduler.joining),
                               queued=len(scheduler.waiting) + len(self._incoming), steps=scheduler.steps,
                               prefix_tokens_reused=prefixes.reused if prefixes is not None else 0)
            if scheduler.speculator is not None:
                self._stats.update(draft_proposed=scheduler.speculator.stats.proposed,
                                   draft_accepted=scheduler.speculator.stats.accepted)
            self._stats["tokens_total"] += tokens
