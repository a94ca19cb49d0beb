"""Streaming conformance (RELIABILITY.md S6, its error path included), cancellation on disconnect (S7) and the full-engine 429 (S8),
through real sockets against the scripted tiny model."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import llmkit
from serve_helpers import (CHAIN_ANSWER, CONTEXT, IMG, MODEL_ID, MORE, SCRIPT, metric, running_server,
                           save_scripted_model, sse_payloads, wait_until)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return llmkit.load(save_scripted_model(tmp_path_factory.mktemp("scripted")))


@pytest.fixture(scope="module")
def url(lm):
    with running_server(lm) as base:
        yield base


def stream(url, route, body):
    response = httpx.post(url + route, json={"model": MODEL_ID, "stream": True, **body}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return sse_payloads(response.text)


def test_chat_stream_framing_roles_finish_usage_and_done(url):
    payloads = stream(url, CHAT, {"messages": USER, "max_tokens": 4, "temperature": 0,
                                  "stream_options": {"include_usage": True}})
    assert payloads[-1] == "[DONE]"
    chunks, usage = payloads[:-2], payloads[-2]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in payloads[:-1]}) == 1 and all(c["model"] == MODEL_ID for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == SCRIPT + IMG + MORE * 2
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 4


def test_completion_stream_equals_the_whole_answer(url):
    body = {"prompt": "What is 2+3?", "max_tokens": 10, "temperature": 0.7, "seed": 7}
    whole = httpx.post(url + COMPLETIONS, json={"model": MODEL_ID, **body}, timeout=30).json()
    payloads = stream(url, COMPLETIONS, body)
    assert payloads[-1] == "[DONE]" and all(p["object"] == "text_completion" for p in payloads[:-1])
    assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == whole["choices"][0]["text"]
    assert payloads[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_n_streams_interleave_by_index(url):
    payloads = stream(url, CHAT, {"messages": USER, "max_tokens": 3, "temperature": 0, "n": 2})
    by_index = {0: "", 1: ""}
    finished = set()
    for chunk in payloads[:-1]:
        (choice,) = chunk["choices"]
        by_index[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert by_index == {0: CHAIN_ANSWER, 1: CHAIN_ANSWER} and finished == {0, 1}


def test_stream_reaching_the_context_ends_with_length(url, lm):
    words = CONTEXT
    while (excess := len(lm.chat_ids([{"role": "user", "content": "hello " * words}])) - (CONTEXT - 3)) > 0:
        words -= excess
    content = "hello " * words
    room = CONTEXT - len(lm.chat_ids([{"role": "user", "content": content}]))
    payloads = stream(url, CHAT, {"messages": [{"role": "user", "content": content}], "temperature": 0,
                                  "stream_options": {"include_usage": True}})  # no max_tokens: what is left
    assert payloads[-3]["choices"][0]["finish_reason"] == "length"
    assert payloads[-2]["usage"]["completion_tokens"] == room


def test_concurrent_requests_each_get_their_own_answer(url):
    def ask(i):
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": f"question {i}"}],
                "max_tokens": 3 + i, "temperature": 0}
        return httpx.post(url + CHAT, json=body, timeout=60).json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert answers == [CHAIN_ANSWER + MORE * i for i in range(6)]


def test_disconnect_mid_stream_cancels_the_request(url):
    cancelled = metric(url, "llmkit_requests_cancelled_total")
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", url + CHAT, json=body) as response:
        lines = response.iter_lines()
        for _ in range(8):  # a few chunks: generation is under way
            next(lines)
        assert metric(url, "llmkit_requests_running") == 1
    # The client closed the connection: the row is freed within a couple of decode steps (a few ms each
    # here); one second is the S7 bound, with room for a busy shared machine.
    assert wait_until(lambda: metric(url, "llmkit_requests_running") == 0, 1.0)
    assert metric(url, "llmkit_requests_cancelled_total") == cancelled + 1
    tokens = metric(url, "llmkit_engine_tokens_total")
    time.sleep(0.2)
    assert metric(url, "llmkit_engine_tokens_total") == tokens  # nothing is generated for it any more


def test_disconnect_before_the_first_token_cancels_the_request(url):
    """The client leaves while a long prompt (~4,000 tokens, prefilled in chunks) is still being read."""
    cancelled = metric(url, "llmkit_requests_cancelled_total")
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello " * 3900}], "max_tokens": 100,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", url + CHAT, json=body) as response:
        assert '"role":"assistant"' in next(response.iter_lines())  # headers and the role chunk, no token yet
    assert wait_until(lambda: metric(url, "llmkit_requests_cancelled_total") == cancelled + 1, 1.0)
    # The engine acts on a cancel between steps, and a lone prompt is prefilled in one step (~0.7 s for
    # these 3,900 tokens on two busy cores), so its row is freed once that step ends.
    assert wait_until(lambda: metric(url, "llmkit_requests_running") + metric(url, "llmkit_requests_queued") == 0, 10)


def test_disconnect_while_waiting_for_a_whole_answer_cancels_it(url):
    cancelled = metric(url, "llmkit_requests_cancelled_total")
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 4000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + CHAT, json=body, timeout=httpx.Timeout(30, read=0.3))
    assert wait_until(lambda: metric(url, "llmkit_requests_running") == 0, 1.0)
    assert metric(url, "llmkit_requests_cancelled_total") == cancelled + 1


def test_full_engine_answers_429_with_retry_after(lm):
    with running_server(lm, max_batch=1, max_queued=0) as base, httpx.Client(timeout=30) as client:
        body = {"model": MODEL_ID, "messages": USER, "max_tokens": 4000, "temperature": 0, "stream": True}
        with client.stream("POST", base + CHAT, json=body) as response:
            lines = response.iter_lines()
            next(line for line in lines if "<script>" in line)  # its first token: it runs
            started = time.perf_counter()
            refused = client.post(base + CHAT, json={**body, "stream": False, "max_tokens": 1})
            elapsed = time.perf_counter() - started
            # (if it was not refused, the first request must have ended: its last lines say how)
            assert refused.status_code == 429, (refused.text, list(lines)[-3:])
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert elapsed < 0.5  # S8: 50 ms on an idle machine; refused before any work, whatever the load
        assert metric(base, "llmkit_requests_rejected_total") == 1
        assert wait_until(lambda: metric(base, "llmkit_requests_running") == 0, 1.0)
        ok = client.post(base + CHAT, json={**body, "stream": False, "max_tokens": 1})
        assert ok.status_code == 200, ok.text


def test_metrics_are_prometheus_text(url):
    httpx.post(url + CHAT, json={"model": MODEL_ID, "messages": USER, "max_tokens": 3}, timeout=30)
    response = httpx.get(url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("llmkit_requests_running", "llmkit_requests_queued", "llmkit_generation_tokens_total",
                 "llmkit_prompt_tokens_total", "llmkit_time_to_first_token_seconds_bucket",
                 "llmkit_inter_token_latency_seconds_bucket", "llmkit_http_responses_total"):
        assert name in text
    assert metric(url, "llmkit_time_to_first_token_seconds_count") >= 1
    assert metric(url, "llmkit_generation_tokens_total") >= 3
    assert 'llmkit_time_to_first_token_seconds_bucket{le="+Inf"}' in text
    json.dumps(text)  # plain text, no bytes


def test_generation_failing_after_the_headers_ends_the_stream_with_one_error(tmp_path):
    """A model whose activations overflow (here: a NaN row in the LM head, so every step's logits hold a
    NaN) fails inside the engine after the stream's headers went out: the stream ends with one
    `data: {"error": ...}` and no [DONE]; a whole answer is a 500 with a request id and no internals."""
    broken = llmkit.load(save_scripted_model(tmp_path / "broken"))
    with torch.no_grad():
        broken.model.lm_head.weight[5] = float("nan")
    with running_server(broken) as base:
        payloads = stream(base, CHAT, {"messages": USER, "max_tokens": 4})
        assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
        assert set(payloads[-1]) == {"error"} and payloads[-1]["error"]["type"] == "server_error"
        assert "[DONE]" not in payloads
        whole = httpx.post(base + CHAT, json={"messages": USER, "max_tokens": 4}, timeout=30)
        assert whole.status_code == 500
        message = whole.json()["error"]["message"]
        assert "request id" in message and "Error" not in message and ".py" not in message
        assert httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}, timeout=30).status_code == 500


def test_a_request_past_the_time_limit_is_ended(lm):
    """RELIABILITY.md S10: --max-request-seconds ends a generation that runs too long, with a clear error."""
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 4000, "temperature": 0}
    with running_server(lm, max_request_seconds=0.5) as base:
        started = time.perf_counter()
        whole = httpx.post(base + CHAT, json=body, timeout=30)
        assert whole.status_code == 504 and time.perf_counter() - started < 10
        error = whole.json()["error"]
        assert error["code"] == "timeout" and "0.5 s" in error["message"]
        payloads = stream(base, CHAT, body)
        assert payloads[-1]["error"]["code"] == "timeout" and "[DONE]" not in payloads
        assert any(p.get("choices") and p["choices"][0]["delta"].get("content") for p in payloads[:-1])
        assert wait_until(lambda: metric(base, "llmkit_requests_running") == 0, 2.0)
        assert metric(base, "llmkit_requests_cancelled_total") == 0  # ended by the server, not by a client
