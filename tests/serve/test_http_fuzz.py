"""Schema fuzzing over HTTP (RELIABILITY.md S5, S12), beside test_request_fuzz.py's thousands of cases at
the function level: bodies that are mostly wrong (negative) and bodies that are valid (positive) go
through a real server — the route, the checks, the engine, streaming — and every answer is a 2xx or a
4xx in OpenAI's shape with no internals; never a 5xx, and the server stays healthy throughout."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmkit
from post_training_helpers import save_tiny_model
from serve_helpers import MODEL_ID, metric, running_server
from test_request_fuzz import BODIES

ROUTES = ("/v1/chat/completions", "/v1/completions")
# few examples: each is a real HTTP round trip (and a generation for the valid ones); the function-level
# fuzzing runs the thousands
QUICK = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
NEGATIVE = settings(max_examples=40, deadline=None, suppress_health_check=QUICK)
POSITIVE = settings(max_examples=12, deadline=None, suppress_health_check=QUICK)
TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)
VALID = st.fixed_dictionaries(
    {"model": st.just(MODEL_ID), "max_tokens": st.integers(1, 4), "stream": st.booleans()},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 50),
              "n": st.integers(1, 3), "seed": st.integers(-2**63, 2**63 - 1), "presence_penalty": st.floats(-2, 2),
              "stop": st.lists(TEXT, max_size=4), "logprobs": st.booleans()})


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    lm = llmkit.load(save_tiny_model(tmp_path_factory.mktemp("tiny")))  # llama-tiny: a 128-token context
    with running_server(lm, max_batch=8, max_queued=64) as base:
        yield base


def check_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:300]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert not any(leak in error["message"] for leak in ("Traceback", ".py", "Error:", "/work/", "site-packages"))
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-300:]
    else:
        assert response.json()["choices"]


@NEGATIVE
@given(route=st.sampled_from(ROUTES), body=BODIES)
def test_mostly_wrong_bodies_get_4xx_never_5xx(url, route, body):
    check_answer(httpx.post(url + route, content=json.dumps(body, allow_nan=True), timeout=30,
                            headers={"content-type": "application/json"}))


@POSITIVE
@given(route=st.sampled_from(ROUTES), body=VALID, prompt=TEXT)
def test_valid_bodies_are_answered(url, route, body, prompt):
    if route == ROUTES[0]:
        body = {**body, "messages": [{"role": "user", "content": prompt}],
                **({"top_logprobs": 2} if body.get("logprobs") else {})}
    else:
        body = {**body, "prompt": prompt, "logprobs": 2 if body.get("logprobs") else None}
    response = httpx.post(url + route, json=body, timeout=30)
    check_answer(response)
    assert response.status_code == 200, response.text[:300]


def test_the_server_is_healthy_after_the_fuzzing(url):
    assert httpx.get(url + "/health").status_code == 200
    assert metric(url, "llmkit_requests_running") == metric(url, "llmkit_requests_queued") == 0
