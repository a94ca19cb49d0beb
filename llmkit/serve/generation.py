"""A checked request run on the engine: prompts turned into token ids and checked against the context,
one engine request per choice (n × prompts), then either one JSON response or a stream of SSE chunks,
in OpenAI's shapes for chat (`chat.completion`, `chat.completion.chunk`) and text completions
(`text_completion`).

Every way a request can end early frees its engine rows: a client that disconnects (the stream's task
is cancelled, or the watcher of a non-streaming request sees it), an error in one choice, the engine
refusing a later choice with EngineFull. `Run.close` cancels whatever has not finished.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from llmkit.errors import LlmkitError
from llmkit.inference.engine import EngineFull, Finished, TokenEvent
from llmkit.serve.errors import APIError, internal_error, new_request_id
from llmkit.serve.metrics import Metrics
from llmkit.serve.requests import GenerationRequest, ModelLimits
from llmkit.serve.sse import DONE, EventStream, event

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_REQUEST_SECONDS = 600.0  # default of --max-request-seconds: a request running longer is ended (S10)
QUEUE_TIMEOUT_SECONDS = 60.0  # default of --queue-timeout: a request waiting longer for a row gets 503 (S8)
LOWEST_LOGPROB = -9999.0  # JSON has no -Infinity; a token the model rules out reports this (as vLLM does)


@dataclass
class Served:
    """What the routes share: the loaded model, its engine, the limits requests are checked against."""
    lm: Any  # llmkit.api.LanguageModel
    engine: Any  # llmkit.inference.engine.Engine
    limits: ModelLimits
    metrics: Metrics
    max_seconds: float = MAX_REQUEST_SECONDS  # wall time a request may run, from its arrival
    queue_timeout: float = QUEUE_TIMEOUT_SECONDS  # wall time a request may wait for a batch row
    _texts: dict[int, str] = field(default_factory=dict)  # token id → text, for logprobs

    @property
    def seq2seq(self) -> bool:
        return self.lm.config.arch == "encoder-decoder"

    def token_text(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.lm.tokenizer.decode([token_id])
        return text


async def respond(served: Served, req: GenerationRequest, request: Request, started: float):
    """The response to a checked request: a JSONResponse, or an EventStream when it asked to stream.
    Nothing is sent before every choice has left the engine's queue, so a request that waits there past
    the queue timeout can still be answered 503 (a stream's status is sent with its first chunk)."""
    prompts = await asyncio.to_thread(prompt_ids, served, req)  # templates and tokenizing: off the event loop
    run = Run(served, req, prompts, started)
    try:
        if not await _unless_disconnected(run.admitted(), request):
            run.close(disconnected=True)  # the client went away while queued: nobody to answer
            return JSONResponse({}, status_code=499)
        if req.stream:
            return EventStream(stream_chunks(run), on_close=lambda: run.close(disconnected=True),
                               headers={"x-request-id": run.id})
        answered = await _unless_disconnected(collect_answer(run), request)
    except BaseException:
        run.close()
        raise
    if not answered:
        run.close(disconnected=True)
        return JSONResponse({}, status_code=499)
    return JSONResponse(answered[0], headers={"x-request-id": run.id})


async def _unless_disconnected(work: Any, request: Request) -> tuple[Any] | None:
    """(work's result,), or None if the client disconnected first (work is then cancelled)."""
    task, watch = asyncio.create_task(work), asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            return None
    finally:
        for t in (task, watch):
            t.cancel()
    return (task.result(),)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- prompts -----------------------------------------------------------------------------------------

def prompt_ids(served: Served, req: GenerationRequest) -> list[tuple[list[int], int]]:
    """(token ids, max new tokens) of each prompt, each checked against the context."""
    lm, out = served.lm, []
    for i, prompt in enumerate(req.prompts):
        where = "messages" if req.endpoint == "chat" else "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
        try:
            if req.endpoint == "chat":
                ids = lm.chat_ids(prompt)
            elif isinstance(prompt, list):
                ids = list(prompt)  # token ids are used as given, as OpenAI's API does
            elif served.seq2seq:
                from llmkit.inference.seq2seq_generate import source_ids

                ids = source_ids(lm.tokenizer, prompt)
            else:
                ids = lm.prefix_ids + lm.tokenizer.encode(prompt)
        except LlmkitError as exc:  # a chat template's failure, or text the tokenizer refuses
            raise APIError(400, str(exc), param=where, code="invalid_value") from None
        out.append((ids, _budget(len(ids), req, served, where)))
    return out


def _budget(prompt: int, req: GenerationRequest, served: Served, where: str) -> int:
    """The new tokens a prompt of `prompt` tokens gets: max_tokens, refused when prompt + max_tokens
    passes the context; without max_tokens, what the context leaves (at most 16 for completions)."""
    context = served.limits.context
    if served.seq2seq:  # the source and the output each have the whole context
        room = context
        if prompt > context:
            raise _too_long(f"the prompt has {prompt} tokens", context, where)
    else:
        room = context - prompt
        if room < 1:
            raise _too_long(f"the prompt has {prompt} tokens, which leaves no room for an answer", context, where)
    if req.max_tokens is None:
        return min(room, COMPLETION_DEFAULT_TOKENS) if req.endpoint == "completion" else room
    if req.max_tokens > room:
        asked = f"the prompt has {prompt} tokens and max_tokens asks for {req.max_tokens}"
        raise _too_long(asked + ("" if served.seq2seq else f", {prompt + req.max_tokens} in all"), context, where)
    return req.max_tokens


def _too_long(detail: str, context: int, where: str) -> APIError:
    return APIError(400, f"this model's maximum context length is {context} tokens; {detail}", param=where,
                    code="context_length_exceeded")


# ---- running on the engine ---------------------------------------------------------------------------

class Run:
    """The engine requests of one HTTP request, one per choice, merged into one event sequence."""

    def __init__(self, served: Served, req: GenerationRequest, prompts: list[tuple[list[int], int]],
                 started: float) -> None:
        self.served, self.req, self.started = served, req, started
        self.id = new_request_id("chatcmpl" if req.endpoint == "chat" else "cmpl")
        self.created = int(time.time())
        self.handles: list[Any] = []
        self._tasks: list[asyncio.Task] = []
        self.finished: list[bool] = []
        self.closed = False
        k = req.logprobs
        try:
            for p, (ids, budget) in enumerate(prompts):
                for j in range(req.n):
                    index = p * req.n + j
                    # n choices of one seeded request differ from each other and repeat as a whole (an int64
                    # seed plus an index < 64 stays in the range torch's generators take, [-2**63, 2**64))
                    seed = None if req.seed is None else req.seed + index
                    self.handles.append(served.engine.submit(
                        ids, max_new_tokens=budget, params=req.sampling, seed=seed, stop=req.stop, logprobs=k))
        except EngineFull:
            self.close()
            served.metrics.rejected += 1
            raise APIError(429, "the server is busy: its running batch and its queue are full; retry shortly",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        except LlmkitError as exc:
            self.close()
            raise APIError(400, str(exc), code="invalid_value") from None
        self.finished = [False] * len(self.handles)
        self.prompt_tokens = [0] * len(self.handles)
        self.completion_tokens = [0] * len(self.handles)
        self.last_token = [started] * len(self.handles)

    async def admitted(self) -> None:
        """Return once every choice has left the engine's queue; APIError 503 (the choices cancelled)
        if that takes longer than the queue timeout."""
        waits = [h.admitted() for h in self.handles if h.queued]
        if not waits:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.served.queue_timeout)
        except TimeoutError:
            self.close()
            self.served.metrics.queue_timeouts += 1
            raise APIError(503, f"the request waited longer than {self.served.queue_timeout:g} s (--queue-timeout) "
                                "for a free batch row; the server is overloaded, retry later",
                           code="queue_timeout", headers={"Retry-After": "1"}) from None

    async def events(self) -> AsyncIterator[tuple[int, TokenEvent | Finished]]:
        """(choice index, event) as the engine makes them; timing metrics recorded on the way."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, handle: Any) -> None:
            try:
                async for item in handle.aiter():
                    queue.put_nowait((index, item))
            except Exception as exc:  # noqa: BLE001 - a failing engine must end this choice, not hang it
                queue.put_nowait((index, Finished(reason="error", prompt_tokens=0, completion_tokens=0, text="",
                                                  error=f"{type(exc).__name__}: {exc}")))

        self._tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        # one timer for the whole request (not a timeout per token): it puts a marker in the queue
        timer = asyncio.get_running_loop().call_later(max(0.0, self.started + self.served.max_seconds
                                                          - time.perf_counter()), queue.put_nowait, (None, None))
        remaining = len(self.handles)
        try:
            while remaining:
                index, item = await queue.get()
                if index is None:
                    self.close()
                    raise APIError(504, f"the request ran past this server's time limit of "
                                        f"{self.served.max_seconds:g} s (--max-request-seconds) and was ended",
                                   code="timeout")
                remaining = self._record(index, item, remaining)
                yield index, item
        finally:
            timer.cancel()

    def _record(self, index: int, item: TokenEvent | Finished, remaining: int) -> int:
        """Counts and timing metrics of one event; returns how many choices are still running."""
        metrics, now = self.served.metrics, time.perf_counter()
        if isinstance(item, TokenEvent):
            first = self.completion_tokens[index] == 0
            (metrics.ttft if first else metrics.itl).observe(now - self.last_token[index])
            self.last_token[index] = now
            self.completion_tokens[index] += 1
            return remaining
        self.finished[index] = True
        self.prompt_tokens[index], self.completion_tokens[index] = item.prompt_tokens, item.completion_tokens
        if item.reason in ("stop", "length"):
            metrics.generation_tokens += item.completion_tokens
            if index % self.req.n == 0:
                metrics.prompt_tokens += item.prompt_tokens
        if remaining == 1:
            metrics.latency.observe(now - self.started)
        return remaining - 1

    def close(self, *, disconnected: bool = False) -> None:
        """Cancel every choice that has not finished (their rows are freed at the next decode step).
        Only the first call counts: `disconnected` says whether it was the client that left."""
        if self.closed:
            return
        self.closed = True
        for task in self._tasks:
            task.cancel()
        unfinished = [h for i, h in enumerate(self.handles) if not (i < len(self.finished) and self.finished[i])]
        for handle in unfinished:
            handle.cancel()
        if disconnected and unfinished:
            self.served.metrics.cancelled += 1

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_tokens[::self.req.n])  # a prompt counts once however many choices it has
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def failure(self, item: Finished) -> APIError:
        if item.reason == "cancelled":  # the engine was closed: the server is shutting down
            return APIError(503, "the server is shutting down", code="server_shutting_down")
        return internal_error(f"generation of {self.id}", RuntimeError(item.error or "engine error"))


async def collect_answer(run: Run) -> dict[str, Any]:
    """The whole answer of a non-streaming request."""
    req, n_choices = run.req, len(run.handles)
    texts: list[list[str]] = [[] for _ in range(n_choices)]
    logprobs = [Logprobs(run.served, req) for _ in range(n_choices)] if req.logprobs is not None else None
    reasons: list[str] = [""] * n_choices
    offsets = [0] * n_choices
    try:
        async for index, item in run.events():
            if isinstance(item, TokenEvent):
                texts[index].append(item.text)
                if logprobs:
                    logprobs[index].add(item, offsets[index])
                offsets[index] += len(item.text)
            elif item.reason in ("stop", "length"):
                texts[index].append(item.text)
                reasons[index] = item.reason
            else:
                raise run.failure(item)
    finally:
        run.close()
    choices = []
    for i in range(n_choices):
        text, lp = "".join(texts[i]), logprobs[i].whole() if logprobs else None
        body = {"message": {"role": "assistant", "content": text}} if req.endpoint == "chat" else {"text": text}
        choices.append({"index": i, **body, "logprobs": lp, "finish_reason": reasons[i]})
    return {"id": run.id, "object": "chat.completion" if req.endpoint == "chat" else "text_completion",
            "created": run.created, "model": run.served.limits.model_id, "system_fingerprint": None,
            "choices": choices, "usage": run.usage()}


async def stream_chunks(run: Run) -> AsyncIterator[bytes]:
    """The SSE chunks of a streaming request; closing or cancelling this generator cancels the run."""
    req, chat = run.req, run.req.endpoint == "chat"
    head = {"id": run.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": run.created, "model": run.served.limits.model_id, "system_fingerprint": None}
    extra = {"usage": None} if req.include_usage else {}
    offsets = [0] * len(run.handles)

    def chunk(index: int, text: str | None, finish: str | None, logprobs: Any = None) -> bytes:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return event({**head, "choices": [choice], **extra})

    completed = False
    try:
        if chat:  # OpenAI's first chunk of each choice names the role
            for index in range(len(run.handles)):
                yield event({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}], **extra})
        try:
            async for index, item in run.events():
                if isinstance(item, TokenEvent):
                    lp = None
                    if req.logprobs is not None:
                        lp = Logprobs(run.served, req)
                        lp.add(item, offsets[index])
                    offsets[index] += len(item.text)
                    if item.text or lp is not None:
                        yield chunk(index, item.text, None, lp.whole() if lp else None)
                elif item.reason in ("stop", "length"):
                    yield chunk(index, item.text or (None if chat else ""), item.reason)
                else:
                    raise run.failure(item)
        except APIError as error:  # a choice failed, or the time limit passed: the stream ends with it
            completed = True  # ended by the server, not by the client
            yield event(error.body())
            return
        if req.include_usage:
            yield event({**head, "choices": [], "usage": run.usage()})
        yield DONE
        completed = True
    finally:
        run.close(disconnected=not completed)


class Logprobs:
    """One choice's log-probabilities in OpenAI's shape: chat's `{"content": [...]}` or the completions
    API's parallel lists."""

    def __init__(self, served: Served, req: GenerationRequest) -> None:
        self.served, self.chat, self.k = served, req.endpoint == "chat", req.logprobs or 0
        self.items: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top: list[dict[str, float]] = []
        self.offsets: list[int] = []

    def add(self, item: TokenEvent, offset: int) -> None:
        top = item.top_logprobs[:self.k]
        chosen = next((text for tid, text, _ in item.top_logprobs if tid == item.token_id), None)
        chosen = self.served.token_text(item.token_id) if chosen is None else chosen
        logprob = _finite(item.logprob)
        if self.chat:
            self.items.append({**_entry(chosen, logprob), "top_logprobs": [_entry(t, lp) for _, t, lp in top]})
        else:
            self.tokens.append(chosen)
            self.token_logprobs.append(logprob)
            self.top.append({t: _finite(lp) for _, t, lp in top})
            self.offsets.append(offset)

    def whole(self) -> dict[str, Any]:
        if self.chat:
            return {"content": self.items}
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top,
                "text_offset": self.offsets}


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", "replace"))}


def _finite(value: float | None) -> float:
    return LOWEST_LOGPROB if value is None or not math.isfinite(value) else max(float(value), LOWEST_LOGPROB)
