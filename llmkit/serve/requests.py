"""Reading and checking a request: the body's content type, size and nesting before it is parsed,
then every field of a chat or text completion request, each failure one OpenAI-shaped 400 that names
the field (RELIABILITY.md S3, S4).

The checks follow OpenAI's published ranges (temperature in [0, 2], n ≤ 8 here, at most 4 stop
strings) and its habit of refusing what it does not know: an unknown field is an error, and a field
this server does not implement (tools, response_format, …) is an error saying so, never silently
ignored and never passed on. A field sent as null counts as absent, as OpenAI's clients send it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from llmkit.errors import LlmkitError
from llmkit.inference.sampling import PENALTY_RANGE, SamplingParams
from llmkit.io.safe_json import nesting_depth, parse_json
from llmkit.serve.errors import APIError
from llmkit.serve.server import READ_TIMEOUT_SECONDS

MAX_BODY_BYTES = 4 * 1024 * 1024  # default of --max-body-mb; a 4 MB prompt is ~1M tokens, past any context here
MAX_DEPTH = 100  # real requests nest 4 levels (body → messages → message → content part)
MAX_N = 8
MAX_PROMPTS = 8  # a /v1/completions prompt may be a list of prompts
MAX_STOP, MAX_STOP_CHARS = 4, 256
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 2.0  # OpenAI's range; the sampler itself allows more
INT64 = (-(1 << 63), (1 << 63) - 1)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Fields that change what a model must produce and that this server does not implement: a request that
# sets one gets 400 "not supported" rather than an answer that ignores it. A chat template in a request
# is refused outright: templates are code, and only the model's own runs (vLLM GHSA-6fvq).
NOT_SUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
                 "chat_template", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
                 "documents", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                 "structured_outputs", "modalities", "audio", "prediction", "web_search_options", "suffix",
                 "echo", "best_of", "prompt_logprobs", "reasoning_effort", "mm_processor_kwargs")
# Read by OpenAI's API for bookkeeping only; accepted and not used.
IGNORED = ("user", "store", "metadata", "service_tier", "parallel_tool_calls")
SHARED = ("model", "n", "stop", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stream",
          "stream_options", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs")
CHAT_FIELDS = frozenset((*SHARED, *IGNORED, "messages", "max_completion_tokens", "top_logprobs"))
COMPLETION_FIELDS = frozenset((*SHARED, *IGNORED, "prompt"))


@dataclass(frozen=True)
class Range:
    """An optional numeric field's bounds and the value it takes when absent or null."""
    low: float
    high: float
    default: float | None
    low_open: bool = False  # (low, high] rather than [low, high]


# The ranges of the numeric request fields, read by the checks below and by openapi.py's document, so the
# two cannot disagree. max_tokens and max_completion_tokens are bounded by the model's context instead.
NUMBERS = {"temperature": Range(0.0, MAX_TEMPERATURE, 1.0), "top_p": Range(0.0, 1.0, 1.0, low_open=True),
           "min_p": Range(0.0, 1.0, 0.0), "presence_penalty": Range(-2.0, 2.0, 0.0),
           "frequency_penalty": Range(-2.0, 2.0, 0.0), "repetition_penalty": Range(*PENALTY_RANGE, 1.0)}
INTEGERS = {"top_k": Range(0, 1 << 22, 0), "n": Range(1, MAX_N, 1), "seed": Range(*INT64, None),
            "logprobs": Range(0, MAX_LOGPROBS, None), "top_logprobs": Range(0, MAX_LOGPROBS, None)}


@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the served model."""
    model_id: str
    context: int  # tokens: prompt + output for a decoder; each of source and output for an encoder-decoder
    vocab_size: int


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request. `prompts`: for chat, one list of {"role", "content"} messages; for text
    completions, each prompt as a string or a list of token ids. `logprobs`: how many alternatives per
    token when log-probabilities were asked for, None when they were not."""
    endpoint: str  # "chat" | "completion"
    prompts: list[Any]
    n: int
    max_tokens: int | None  # None: not given (chat: what the context leaves; completions: 16, OpenAI's default)
    sampling: SamplingParams
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None


# ---- the body --------------------------------------------------------------------------------------

async def read_json_object(request: Request, limit: int = MAX_BODY_BYTES,
                           timeout: float = READ_TIMEOUT_SECONDS) -> dict[str, Any]:
    """The request's JSON object: Content-Type application/json (a cross-site HTML form cannot send
    it), at most `limit` bytes (checked on Content-Length before reading, and again while reading),
    arriving within `timeout` seconds (a client trickling its body would hold its connection and its
    buffer: 408, and the connection is closed), nested at most MAX_DEPTH deep (checked before parsing)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {content_type[:60]!r}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,}",
                       code="request_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body is over the limit of {limit:,} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s (--read-timeout)",
                       code="request_timeout", headers={"Connection": "close"}) from None
    return await asyncio.to_thread(parse_body, b"".join(chunks))  # megabytes of JSON: off the event loop


def parse_body(data: bytes) -> dict[str, Any]:
    if not data.strip():
        raise APIError(400, "request body is empty; expected a JSON object", code="invalid_json")
    text = data.decode("utf-8", errors="surrogateescape")  # parse_json reports invalid UTF-8 itself
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting_depth(text) > MAX_DEPTH:
        raise APIError(400, f"request body: JSON nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    try:
        value = parse_json(data, where="request body", error=LlmkitError)
    except LlmkitError as exc:
        raise APIError(400, str(exc), code="invalid_json") from None
    if not isinstance(value, dict):
        raise APIError(400, f"request body must be a JSON object, got {_json_type(value)}", code="invalid_json")
    return value


# ---- the fields ------------------------------------------------------------------------------------

def check_chat(body: dict[str, Any], limits: ModelLimits) -> GenerationRequest:
    _check_names(body, CHAT_FIELDS)
    logprobs = _boolean(body, "logprobs", False)
    top = _ranged(body, "top_logprobs")
    if top is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    newer = _integer(body, "max_completion_tokens", 1, limits.context, None, too_big=_past_context(limits))
    max_tokens = _integer(body, "max_tokens", 1, limits.context, None, too_big=_past_context(limits))
    max_tokens = newer if newer is not None else max_tokens  # OpenAI's newer name for the same limit
    return _request("chat", body, limits, [_messages(body)], max_tokens, (top or 0) if logprobs else None)


def check_completion(body: dict[str, Any], limits: ModelLimits) -> GenerationRequest:
    _check_names(body, COMPLETION_FIELDS)
    logprobs = _ranged(body, "logprobs")
    max_tokens = _integer(body, "max_tokens", 1, limits.context, None, too_big=_past_context(limits))
    return _request("completion", body, limits, _prompts(body, limits), max_tokens, logprobs)


def _request(endpoint: str, body: dict[str, Any], limits: ModelLimits, prompts: list[Any], max_tokens: int | None,
             logprobs: int | None) -> GenerationRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"model must be a string, got {_json_type(model)}", param="model", code="invalid_type")
    if model is not None and model != limits.model_id:
        raise APIError(404, f"the model {model[:200]!r} does not exist; this server serves {limits.model_id!r}",
                       param="model", code="model_not_found")
    stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise APIError(400, "stream_options must be an object with at most the field include_usage",
                       param="stream_options", code="invalid_type")
    if options is not None and not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options",
                       code="invalid_value")
    include_usage = _boolean(options or {}, "include_usage", False, where="stream_options.include_usage")
    sampling = SamplingParams(top_k=_ranged(body, "top_k"), **{name: _number(body, name) for name in NUMBERS})
    return GenerationRequest(endpoint, prompts, n=_ranged(body, "n"), max_tokens=max_tokens,
                             sampling=sampling, seed=_ranged(body, "seed"), stop=_stop(body),
                             stream=stream, include_usage=include_usage, logprobs=logprobs)


def _check_names(body: dict[str, Any], known: frozenset[str]) -> None:
    for name in NOT_SUPPORTED:
        if not _harmless(name, body.get(name)):
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    for name in body:
        if name not in known and name not in NOT_SUPPORTED:
            raise APIError(400, f"unrecognized request field {name[:60]!r}", param=name[:60], code="unknown_parameter")


def _harmless(name: str, value: Any) -> bool:
    """An unsupported field set to what asks for nothing (null, false, empty, OpenAI's default)."""
    if value is None:
        return True
    if name in ("chat_template", "chat_template_kwargs"):
        return False
    if isinstance(value, bool):  # true == 1 in Python: best_of: true is not best_of: 1
        return value is False
    return value == [] or value == {} or (name, value) in (
        ("response_format", {"type": "text"}), ("best_of", 1), ("tool_choice", "none"))


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "messages is required", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array of {role, content} objects", param="messages",
                       code="invalid_value" if isinstance(messages, list) else "invalid_type")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object, got {_json_type(message)}", param=where,
                           code="invalid_type")
        for name in ("tool_calls", "function_call", "tool_call_id", "audio"):
            if message.get(name) not in (None, []):
                raise APIError(400, f"{where}.{name} is not supported by this server", param=f"{where}.{name}",
                               code="unsupported_parameter")
        role = message.get("role")
        if role in ("tool", "function"):
            raise APIError(400, f"{where}.role {role!r} is not supported by this server", param=f"{where}.role",
                           code="unsupported_parameter")
        if not isinstance(role, str) or role not in ROLES:  # an array or object would not even hash
            raise APIError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}",
                           param=f"{where}.role", code="invalid_value")
        checked.append({"role": ROLES[role], "content": _content(message.get("content"), f"{where}.content")})
    return checked


def _content(content: Any, where: str) -> str:
    """A message's text: a string, or an array of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise APIError(400, f"{where}[{j}]: content of type {kind[:40]!r} is not supported by this "
                                        "server (text only)", param=f"{where}[{j}]", code="unsupported_parameter")
                raise APIError(400, f"{where}[{j}] must be {{\"type\": \"text\", \"text\": string}}",
                               param=f"{where}[{j}]", code="invalid_type")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"{where} must be a string or an array of text parts, got {_json_type(content)}",
                   param=where, code="invalid_type")


def _prompts(body: dict[str, Any], limits: ModelLimits) -> list[str | list[int]]:
    """`prompt`: a string, an array of token ids, or an array (≤ MAX_PROMPTS) of either."""
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
    prompts = prompt if many else [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request",
                       param="prompt", code="invalid_value")
    for i, one in enumerate(prompts):
        where = f"prompt[{i}]" if many else "prompt"
        if isinstance(one, str):
            if not one:
                raise APIError(400, f"{where} must not be empty", param=where, code="invalid_value")
            continue
        if not isinstance(one, list) or not one or any(isinstance(t, bool) or not isinstance(t, int) for t in one):
            raise APIError(400, f"{where} must be a non-empty string or array of token ids", param=where,
                           code="invalid_type" if not isinstance(one, list) or one else "invalid_value")
        bad = next((t for t in one if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{where} holds token id {_show(bad)}, outside the vocabulary [0, "
                                f"{limits.vocab_size})", param=where, code="invalid_value")
    return prompts


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or any(not isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop holds {len(stops)} strings; at most {MAX_STOP}", param="stop",
                       code="invalid_value")
    for s in stops:
        if not 0 < len(s) <= MAX_STOP_CHARS:
            raise APIError(400, f"each stop string must hold 1 to {MAX_STOP_CHARS} characters, got {len(s)}",
                           param="stop", code="invalid_value")
    return tuple(stops)


def _past_context(limits: ModelLimits) -> str:
    return f"more than the model's context of {limits.context} tokens"


def _integer(body: dict[str, Any], name: str, low: int, high: int, default: int | None, *,
             too_big: str | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {_show(value)}", param=name, code="invalid_type")
    if value > high and too_big:
        raise APIError(400, f"{name} is {_show(value)}, {too_big}", param=name, code="invalid_value")
    if not low <= value <= high:
        raise APIError(400, f"{name} must be an integer in [{low}, {high}], got {_show(value)}", param=name,
                       code="invalid_value")
    return value


def _ranged(body: dict[str, Any], name: str) -> int | None:
    """An integer field of INTEGERS, checked against its range."""
    bounds = INTEGERS[name]
    return _integer(body, name, bounds.low, bounds.high, bounds.default)


def _number(body: dict[str, Any], name: str) -> float:
    """A number field of NUMBERS, checked against its range."""
    low, high, default, low_open = dataclasses.astuple(NUMBERS[name])
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"{name} must be a number, got {_show(value)}", param=name, code="invalid_type")
    value = float(value) if isinstance(value, float) or abs(value) < 1 << 1000 else math.inf  # past float's range
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        shown = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise APIError(400, f"{name} must be a finite number in {shown}, got {_show(value)}", param=name,
                       code="invalid_value")
    return value


def _boolean(body: dict[str, Any], name: str, default: bool, *, where: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{where or name} must be true or false, got {_show(value)}", param=where or name,
                       code="invalid_type")
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), "a value")


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else _json_type(value)
    return text if len(text) <= 40 else text[:37] + "..."
