"""The server's OpenAPI 3.1 document, `GET /openapi.json` (RELIABILITY.md S5): every route's request body
or query parameters and every response's shape, the error shape included.

It is written here once, from what the checks themselves read: the field names (requests.py's
CHAT_FIELDS, COMPLETION_FIELDS, NOT_SUPPORTED, IGNORED), the numeric ranges (NUMBERS, INTEGERS), the
limits on stop strings, prompts and logprobs, the served model's id, context and vocabulary, and the
/explain views' query parameters from the CLI parsers those routes parse them with. Agreement is
tested, not assumed: tests/serve/test_openapi.py drives a real server with requests generated from
this document, valid ones and ones that violate it, and fails if a valid request is refused for
anything but what a schema cannot say (prompt + max_tokens past the context, a full queue), if a
violating one is answered 2xx, or if any answer does not match the document.

The document keeps to a small part of JSON Schema — type, enum, const, minimum, maximum,
exclusiveMinimum, minLength, maxLength, minItems, maxItems, items, properties, required,
additionalProperties, maxProperties, anyOf, dependentSchemas, $ref — the part that test's generator and
validator implement. FastAPI's own generated document is switched off (the routes read their bodies
themselves, so it would describe none of them).
"""

from __future__ import annotations

import argparse
from http import HTTPStatus
from typing import Any

from llmkit.serve.errors import ERROR_TYPES
from llmkit.serve.requests import (IGNORED, INTEGERS, MAX_LOGPROBS, MAX_PROMPTS, MAX_STOP, MAX_STOP_CHARS,
                                   NOT_SUPPORTED, NUMBERS, ROLES, ModelLimits)

REF = "#/components/schemas/"
NULL = {"type": "null"}
JSON = "application/json"
# What each generation request may be answered besides 200 (docs/serving.md's table of errors)
GENERATION_ERRORS = (400, 401, 403, 404, 408, 413, 415, 429, 500, 503, 504)
READ_ERRORS = (401, 403, 404, 500)  # a GET: the key, the Host check, an unknown model; 500 is a bug


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF + name}


def optional(schema: dict[str, Any]) -> dict[str, Any]:
    """A field that may be absent or null (the checks read null as absent, as OpenAI's clients send it)."""
    return {"anyOf": [NULL, schema]}


def obj(properties: dict[str, Any], required: tuple[str, ...] = (), *, closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": list(required)}
    if closed:
        schema["additionalProperties"] = False
    return schema


def integer(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def string(low: int = 0, high: int | None = None) -> dict[str, Any]:
    return {"type": "string", "minLength": low, **({"maxLength": high} if high is not None else {})}


def array(items: dict[str, Any], low: int = 0, high: int | None = None) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": low, **({"maxItems": high} if high is not None else {})}


# ---- requests -------------------------------------------------------------------------------------------

def _harmless(name: str) -> dict[str, Any]:
    """An unsupported field: accepted only set to what asks for nothing (requests.py's _harmless)."""
    if name in ("chat_template", "chat_template_kwargs"):
        return {**NULL, "description": "refused whatever its value: only the model's own template runs"}
    options = [NULL, {"const": False}, array({}, 0, 0), {"type": "object", "maxProperties": 0}]
    own = {"response_format": {"const": {"type": "text"}}, "best_of": {"const": 1}, "tool_choice": {"const": "none"}}
    return {"anyOf": options + ([own[name]] if name in own else []),
            "description": f"{name} is not supported by this server: only null, false, empty or its default"}


def _shared(limits: ModelLimits) -> dict[str, Any]:
    """The fields both generation routes take."""
    fields: dict[str, Any] = {
        "model": {"type": ["string", "null"], "enum": [limits.model_id, None],
                  "description": "optional; another name is 404 model_not_found"},
        "max_tokens": optional({**integer(1, limits.context), "description": "prompt tokens + max_tokens must "
                                f"not pass the context of {limits.context} (400 context_length_exceeded)"}),
        "stop": optional({"anyOf": [string(1, MAX_STOP_CHARS), array(string(1, MAX_STOP_CHARS), 0, MAX_STOP)]}),
        "stream": optional({"type": "boolean"}),
        "stream_options": optional(obj({"include_usage": optional({"type": "boolean"})})),
    }
    for name, bounds in NUMBERS.items():
        low = {"exclusiveMinimum": bounds.low} if bounds.low_open else {"minimum": bounds.low}
        fields[name] = optional({"type": "number", **low, "maximum": bounds.high})
    for name in ("n", "seed", "top_k"):
        fields[name] = optional(integer(INTEGERS[name].low, INTEGERS[name].high))
    fields.update({name: {"description": "accepted and unused"} for name in IGNORED})
    fields.update({name: _harmless(name) for name in NOT_SUPPORTED})
    return fields


def _needs(field: str, other: str, value: Any) -> dict[str, Any]:
    """dependentSchemas entry: `field`, unless null, needs `other` set to `value`."""
    return {field: {"anyOf": [{"properties": {field: NULL}},
                              {"properties": {other: {"const": value}}, "required": [other]}]}}


def _request(properties: dict[str, Any], required: str, dependent: dict[str, Any]) -> dict[str, Any]:
    return {**obj(properties, (required,)), "dependentSchemas": {**_needs("stream_options", "stream", True),
                                                                  **dependent}}


def request_schemas(limits: ModelLimits) -> dict[str, Any]:
    text_part = obj({"type": {"const": "text"}, "text": {"type": "string"}}, ("type", "text"), closed=False)
    unsupported = optional(array({}, 0, 0))  # tool_calls and the like: only null or []
    message = obj({"role": {"enum": list(ROLES)},
                   "content": {"anyOf": [{"type": "string"}, array(text_part)]},
                   **{name: unsupported for name in ("tool_calls", "function_call", "tool_call_id", "audio")}},
                  ("role", "content"), closed=False)
    token_ids = array(integer(0, limits.vocab_size - 1), 1)
    one_prompt = {"anyOf": [string(1), token_ids]}
    chat = _request({**_shared(limits), "messages": array(ref("ChatMessage"), 1),
                     "max_completion_tokens": optional(integer(1, limits.context)),
                     "logprobs": optional({"type": "boolean"}),
                     "top_logprobs": optional(integer(0, MAX_LOGPROBS))},
                    "messages", _needs("top_logprobs", "logprobs", True))
    completion = _request({**_shared(limits), "prompt": {"anyOf": [one_prompt, array(one_prompt, 1, MAX_PROMPTS)]},
                           "logprobs": optional(integer(0, MAX_LOGPROBS))}, "prompt", {})
    return {"ChatMessage": message, "ChatCompletionRequest": chat, "CompletionRequest": completion}


# ---- responses ------------------------------------------------------------------------------------------

def response_schemas(limits: ModelLimits) -> dict[str, Any]:
    count = {"type": "integer", "minimum": 0}
    usage = obj({"prompt_tokens": count, "completion_tokens": count, "total_tokens": count},
                ("prompt_tokens", "completion_tokens", "total_tokens"))
    finish = {"enum": ["stop", "length"]}
    entry = {"token": {"type": "string"}, "logprob": {"type": "number"}, "bytes": array(integer(0, 255))}
    chat_logprob = obj({**entry, "top_logprobs": array(obj(entry, tuple(entry)))}, (*entry, "top_logprobs"))
    chat_logprobs = optional(obj({"content": array(chat_logprob)}, ("content",)))
    text_logprobs = optional(obj({"tokens": array({"type": "string"}), "token_logprobs": array({"type": "number"}),
                                  "top_logprobs": array({"type": "object", "additionalProperties": {"type": "number"}}),
                                  "text_offset": array(count)},
                                 ("tokens", "token_logprobs", "top_logprobs", "text_offset")))
    head = {"id": {"type": "string"}, "created": count, "model": {"const": limits.model_id},
            "system_fingerprint": NULL}

    def answer(kind: str, choice: dict[str, Any], *, chunk: bool) -> dict[str, Any]:
        fields = {**head, "object": {"const": kind}, "choices": array(choice, 0 if chunk else 1)}
        if chunk:  # usage: absent, null on every chunk with include_usage, or the counts on the last one
            return obj({**fields, "usage": optional(usage)}, (*head, "object", "choices"))
        return obj({**fields, "usage": usage}, (*head, "object", "choices", "usage"))

    index = count  # a choice's position among the request's choices
    chat_choice = obj({"index": index, "message": obj({"role": {"const": "assistant"}, "content": {"type": "string"}},
                                                      ("role", "content")),
                       "logprobs": chat_logprobs, "finish_reason": finish},
                      ("index", "message", "logprobs", "finish_reason"))
    delta = obj({"role": {"const": "assistant"}, "content": {"type": "string"}})
    chunk_choice = obj({"index": index, "delta": delta, "logprobs": chat_logprobs, "finish_reason": optional(finish)},
                       ("index", "delta", "logprobs", "finish_reason"))
    text_choice = obj({"index": index, "text": {"type": "string"}, "logprobs": text_logprobs,
                       "finish_reason": finish}, ("index", "text", "logprobs", "finish_reason"))
    text_chunk_choice = {**text_choice, "properties": {**text_choice["properties"], "finish_reason": optional(finish)}}
    error = obj({"error": obj({"message": string(1), "type": {"enum": sorted(set(ERROR_TYPES.values()))},
                               "param": optional({"type": "string"}), "code": optional({"type": "string"})},
                              ("message", "type", "param", "code"))}, ("error",))
    card = obj({"id": {"const": limits.model_id}, "object": {"const": "model"}, "created": count,
                "owned_by": {"type": "string"}, "max_model_len": {"const": limits.context}},
               ("id", "object", "created", "owned_by", "max_model_len"))
    return {
        "Error": error,
        "ChatCompletion": answer("chat.completion", chat_choice, chunk=False),
        "ChatCompletionChunk": answer("chat.completion.chunk", chunk_choice, chunk=True),
        "TextCompletion": answer("text_completion", text_choice, chunk=False),
        "TextCompletionChunk": answer("text_completion", text_chunk_choice, chunk=True),
        "Model": card,
        "ModelList": obj({"object": {"const": "list"}, "data": array(ref("Model"), 1, 1)}, ("object", "data")),
        "Health": obj({"status": {"const": "ok"}}, ("status",)),
    }


# ---- paths ----------------------------------------------------------------------------------------------

def errors(statuses: tuple[int, ...]) -> dict[str, Any]:
    return {str(s): {"description": f"{HTTPStatus(s).phrase} ({ERROR_TYPES[s]}; docs/serving.md's table of errors)",
                     "content": {JSON: {"schema": ref("Error")}}} for s in statuses}


def generation(summary: str, request: str, answer: str, chunk: str) -> dict[str, Any]:
    stream = {"schema": {"type": "string", "description": "server-sent events: `data: {json}` blank-line "
                         "separated, ending with `data: [DONE]`, or with one error event if generation failed"},
              "x-event-schema": {"anyOf": [ref(chunk), ref("Error")]}}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {JSON: {"schema": ref(request)}}},
                     "responses": {"200": {"description": "the answer, or its stream with stream: true",
                                           "content": {JSON: {"schema": ref(answer)}, "text/event-stream": stream}},
                                   **errors(GENERATION_ERRORS)}}}


def read(summary: str, content: dict[str, Any], statuses: tuple[int, ...] = READ_ERRORS, **extra: Any):
    return {"get": {"summary": summary, **extra,
                    "responses": {"200": {"description": summary, "content": content}, **errors(statuses)}}}


def explain_paths(parsers: dict[str, argparse.ArgumentParser]) -> dict[str, Any]:
    """/explain/VIEW for each view: its query parameters are the view's CLI flags (explain_routes.py)."""
    from llmkit.serve.explain_routes import MAX_REPEATS, MAX_TEXT_CHARS, query_flags

    kinds = {int: {"type": "integer"}, float: {"type": "number"}}
    paths = {}
    for view, parser in parsers.items():
        parameters = [{"name": "format", "in": "query", "schema": {"enum": ["html", "json"]}}]
        for name, action in query_flags(parser).items():
            schema = dict(kinds.get(action.type, {"type": "string"}))
            if action.choices:
                schema = {"enum": [str(c) for c in action.choices]}
            if name in ("text", "target"):
                schema = string(0, MAX_TEXT_CHARS)
            if isinstance(action, argparse._AppendAction):
                schema = array(schema, 1, MAX_REPEATS)
            parameters.append({"name": name, "in": "query", "schema": schema, "explode": True,
                               "description": (action.help or "").replace("%%", "%")})
        paths[f"/explain/{view}"] = read(
            f"llmkit explain {view} on the served model", {"text/html": {"schema": {"type": "string"}},
                                                             JSON: {"schema": {"type": "object"}}},
            (400, 401, 403, 429, 500), parameters=parameters, **{"x-additional-parameters": False})
    if parsers:
        index = read("the views' index page; with view=V, a redirect to /explain/V with the other parameters",
                     {"text/html": {"schema": {"type": "string"}}}, (400, 401, 403, 500),
                     parameters=[{"name": "view", "in": "query", "schema": {"enum": list(parsers)}}])
        index["get"]["responses"]["303"] = {"description": "redirect to /explain/VIEW"}
        paths["/explain"] = index
    return paths


def openapi_document(limits: ModelLimits, explain_parsers: dict[str, argparse.ArgumentParser] | None = None, *,
                     keyed: bool = False) -> dict[str, Any]:
    """The document for a server of `limits`' model; `keyed`: it was started with an API key, which every
    route but /health then needs (guard.py; the page is not an API route and is not described)."""
    json_of = lambda name: {JSON: {"schema": ref(name)}}  # noqa: E731
    paths = {
        "/v1/chat/completions": generation("chat: the model's own template renders messages",
                                           "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"),
        "/v1/completions": generation("text completion of a prompt (text or token ids)", "CompletionRequest",
                                      "TextCompletion", "TextCompletionChunk"),
        "/v1/models": read("the one model served", json_of("ModelList")),
        "/v1/models/{model}": read("the served model's card", json_of("Model"), parameters=[
            {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]),
        "/health": read("liveness; never needs the key", json_of("Health"), (403, 500)),
        "/metrics": read("Prometheus text format 0.0.4", {"text/plain": {"schema": {"type": "string"}}}),
        "/openapi.json": read("this document", {JSON: {"schema": {"type": "object"}}}),
    }
    paths.update(explain_paths(explain_parsers or {}))
    if keyed:
        paths["/health"]["get"]["security"] = []
    return {"openapi": "3.1.0", **({"security": [{"bearer": []}]} if keyed else {}),
            "info": {"title": "llmkit serve", "version": _version(),
                     "description": "OpenAI-compatible API over llmkit's generation engine (docs/serving.md)"},
            "paths": paths,
            "components": {"schemas": {**request_schemas(limits), **response_schemas(limits)},
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmkit")
    except PackageNotFoundError:
        return "0"
