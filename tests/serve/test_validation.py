"""The request validation matrix (RELIABILITY.md S4, S12) through real HTTP: every malformed request gets
its documented status and an OpenAI-shaped error naming the field, with no traceback, path or
exception class, and the server answers the next valid request."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

import llmkit
from serve_helpers import CONTEXT, MODEL_ID, running_server, save_scripted_model

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|site-packages|/tmp/|/work/|/home/|"
                       r"\b[A-Z][A-Za-z]*(Error|Exception)\b")


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    lm = llmkit.load(save_scripted_model(tmp_path_factory.mktemp("scripted")))
    with running_server(lm) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def chat(**fields):
    return {"model": MODEL_ID, "messages": USER, "max_tokens": 2, **fields}


def completion(**fields):
    return {"model": MODEL_ID, "prompt": "hello", "max_tokens": 2, **fields}


CASES = [
    # (id, route, body (dict → JSON; bytes/str as sent), status, param, code)
    ("invalid-json", CHAT, b'{"messages": [', 400, None, "invalid_json"),
    ("not-an-object", CHAT, b"[1, 2]", 400, None, "invalid_json"),
    ("empty-body", CHAT, b"", 400, None, "invalid_json"),
    ("deeper-than-100", CHAT, '{"messages": ' + "[" * 101 + "]" * 101 + "}", 400, None, "invalid_json"),
    ("nesting-bomb", CHAT, "[" * 1_000_000, 400, None, "invalid_json"),
    ("huge-integer", CHAT, '{"max_tokens": ' + "9" * 5000 + "}", 400, None, "invalid_json"),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, "invalid_json"),
    ("lone-surrogate", CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None, "invalid_json"),
    ("missing-messages", CHAT, {"model": MODEL_ID}, 400, "messages", "missing_required_parameter"),
    ("empty-messages", CHAT, chat(messages=[]), 400, "messages", "invalid_value"),
    ("messages-not-array", CHAT, chat(messages="hi"), 400, "messages", "invalid_type"),
    ("unknown-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role", "invalid_value"),
    ("tool-role", CHAT, chat(messages=[{"role": "tool", "content": "hi"}]), 400, "messages[0].role",
     "unsupported_parameter"),
    ("content-not-string", CHAT, chat(messages=[{"role": "user", "content": 12}]), 400, "messages[0].content",
     "invalid_type"),
    ("image-content", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     400, "messages[0].content[0]", "unsupported_parameter"),
    ("empty-prompt", COMPLETIONS, completion(prompt=""), 400, "prompt", "invalid_value"),
    ("missing-prompt", COMPLETIONS, {"model": MODEL_ID}, 400, "prompt", "missing_required_parameter"),
    ("negative-token-id", COMPLETIONS, completion(prompt=[5, -1]), 400, "prompt", "invalid_value"),
    ("token-id-past-vocab", COMPLETIONS, completion(prompt=[5, 10**6]), 400, "prompt", "invalid_value"),
    ("max-tokens-0", CHAT, chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("max-tokens-negative", CHAT, chat(max_tokens=-1), 400, "max_tokens", "invalid_value"),
    ("max-tokens-float", CHAT, chat(max_tokens=1.5), 400, "max_tokens", "invalid_type"),
    ("max-tokens-string", CHAT, chat(max_tokens="10"), 400, "max_tokens", "invalid_type"),
    ("max-tokens-bool", CHAT, chat(max_tokens=True), 400, "max_tokens", "invalid_type"),
    ("max-tokens-past-context", CHAT, chat(max_tokens=CONTEXT + 1), 400, "max_tokens", "invalid_value"),
    ("max-completion-tokens-0", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens", "invalid_value"),
    ("temperature-negative", CHAT, chat(temperature=-0.1), 400, "temperature", "invalid_value"),
    ("temperature-above-2", CHAT, chat(temperature=2.5), 400, "temperature", "invalid_value"),
    ("temperature-nan", CHAT, '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature", "invalid_value"),
    ("temperature-infinity", CHAT, '{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
     400, "temperature", "invalid_value"),
    ("temperature-huge-int", CHAT, chat(temperature=10**400), 400, "temperature", "invalid_value"),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("top-p-0", CHAT, chat(top_p=0), 400, "top_p", "invalid_value"),
    ("top-p-above-1", CHAT, chat(top_p=1.5), 400, "top_p", "invalid_value"),
    ("top-k-negative", CHAT, chat(top_k=-1), 400, "top_k", "invalid_value"),
    ("n-9", CHAT, chat(n=9), 400, "n", "invalid_value"),
    ("n-million", CHAT, chat(n=10**6), 400, "n", "invalid_value"),
    ("stop-5", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
    ("stop-257-chars", CHAT, chat(stop=["x" * 257]), 400, "stop", "invalid_value"),
    ("stop-empty", CHAT, chat(stop=[""]), 400, "stop", "invalid_value"),
    ("stop-not-strings", CHAT, chat(stop=[1]), 400, "stop", "invalid_type"),
    ("top-logprobs-21", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", "invalid_value"),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    ("completion-logprobs-21", COMPLETIONS, completion(logprobs=21), 400, "logprobs", "invalid_value"),
    ("seed-past-int64", CHAT, chat(seed=2**63), 400, "seed", "invalid_value"),
    ("seed-below-int64", CHAT, chat(seed=-(2**63) - 1), 400, "seed", "invalid_value"),
    ("stream-not-bool", CHAT, chat(stream="yes"), 400, "stream", "invalid_type"),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options",
     "invalid_value"),
    ("unknown-model", CHAT, chat(model="gpt-4"), 404, "model", "model_not_found"),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
     "unsupported_parameter"),
    ("response-format", CHAT, chat(response_format={"type": "json_object"}), 400, "response_format",
     "unsupported_parameter"),
    ("chat-template", CHAT, chat(chat_template="{{ 7 * 7 }}"), 400, "chat_template", "unsupported_parameter"),
    ("chat-template-kwargs", CHAT, chat(chat_template_kwargs={}), 400, "chat_template_kwargs",
     "unsupported_parameter"),
    ("echo", COMPLETIONS, completion(echo=True), 400, "echo", "unsupported_parameter"),
    ("unknown-field", CHAT, chat(frobnicate=1), 400, "frobnicate", "unknown_parameter"),
]


@pytest.mark.parametrize("route, body, status, param, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_an_openai_error(http, route, body, status, param, code):
    content = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    started = time.perf_counter()
    response = http.post(route, content=content, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - started
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code, error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert "\n" not in error["message"] and not INTERNALS.search(error["message"]), error["message"]
    # Refused before any work: well under a second even for the 1 MB nesting bomb on a busy 2-core machine
    # (measured ~0.1 s; the S4 target for n = 10**6 is 50 ms on an idle one).
    assert elapsed < 2.0
    assert http.get("/health").status_code == 200  # (a real generation follows the matrix, below)


def test_the_server_answers_after_the_matrix(http):
    reply = http.post(CHAT, json=chat(max_tokens=1))
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_context_length_exceeded_names_both_numbers(http):
    prompt = "hello " * 1000
    asked = CONTEXT - 10
    response = http.post(COMPLETIONS, json=completion(prompt=prompt, max_tokens=asked))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    numbers = [int(n) for n in re.findall(r"\d+", error["message"])]
    assert CONTEXT in numbers and asked in numbers


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_over_the_limit_is_413_before_it_is_read(http, chunked):
    body = b'{"prompt": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    content = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    try:
        response = http.post(COMPLETIONS, content=content, headers={"content-type": "application/json"})
    except httpx.TransportError:  # the server may close the connection while the client still sends
        pytest.skip("the client could not read the early response")  # (not seen with uvicorn's h11)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert http.get("/health").status_code == 200


def test_json_content_type_is_required(http):
    form = http.post(CHAT, content=b"messages=hi", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    plain = http.post(CHAT, content=json.dumps(chat()).encode(), headers={"content-type": "text/plain"})
    assert plain.status_code == 415


def test_unknown_route_and_method_are_openai_errors(http):
    missing = http.get("/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = http.get(CHAT)
    assert wrong.status_code == 405 and set(wrong.json()["error"]) == {"message", "type", "param", "code"}
