"""Schema fuzzing of the request checks (RELIABILITY.md S5, at the function level where thousands of
cases cost a second): any JSON value under any field, known or not, gives either a checked request or
an APIError with a 4xx status, a field name and a one-line message; any bytes give a JSON object or an
APIError. No other exception escapes, so no 500 can come from a malformed request."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmkit.serve.errors import APIError
from llmkit.serve.requests import (CHAT_FIELDS, COMPLETION_FIELDS, NOT_SUPPORTED, GenerationRequest, ModelLimits,
                                   check_chat, check_completion, parse_body)

LIMITS = ModelLimits(model_id="m", context=64, vocab_size=300)
SCALARS = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4), max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | VALUES,
                                 "content": st.text(max_size=20) | VALUES})
NAMES = sorted(CHAT_FIELDS | COMPLETION_FIELDS | set(NOT_SUPPORTED)) + ["bogus"]
BODIES = st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=6).flatmap(
    lambda body: st.fixed_dictionaries({**{k: st.just(v) for k, v in body.items()},
                                        "messages": st.lists(MESSAGE, max_size=3) | VALUES,
                                        "prompt": st.text(max_size=10) | st.lists(st.integers(-5, 400), max_size=4)
                                        | VALUES}))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(check, body):
    try:
        return check(body, LIMITS)
    except APIError as error:
        assert 400 <= error.status < 500 and error.message and "\n" not in error.message
        assert error.param is None or isinstance(error.param, str)
        return error


@FAST
@given(BODIES)
def test_chat_checks_refuse_or_accept_every_body(body):
    result = outcome(check_chat, body)
    if isinstance(result, GenerationRequest):
        assert result.n >= 1 and (result.max_tokens is None or 1 <= result.max_tokens <= LIMITS.context)
        assert all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                   for m in result.prompts[0])


@FAST
@given(BODIES)
def test_completion_checks_refuse_or_accept_every_body(body):
    result = outcome(check_completion, body)
    if isinstance(result, GenerationRequest):
        for prompt in result.prompts:
            assert (isinstance(prompt, str) and prompt) or all(0 <= t < LIMITS.vocab_size for t in prompt)


@FAST
@given(st.binary(max_size=200) | VALUES.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_parse_to_an_object_or_a_400(data):
    try:
        assert isinstance(parse_body(data), dict)
    except APIError as error:
        assert error.status == 400 and "\n" not in error.message
