"""Schema fuzzing over HTTP (RELIABILITY.md S5, S12): requests generated from the server's own
/openapi.json — positive ones (valid by the document) and negative ones (each breaking it in one place,
plus bodies no schema can describe: broken JSON, NaN, deep nesting, lone surrogates, the wrong content
type) — go to one `llmkit serve` process on the tiny model, at least 500 per endpoint, on one kept-alive
connection. Every answer must be documented for its route (status, media type, body shape, each event
of a stream), never a 5xx, never slower than 10 s, with no internals in an error; a valid request must
be answered 200 (or refused only for what a schema cannot say: prompt + max_tokens past the context, a
full queue), a violating one refused with a 4xx. So the document and the checks cannot drift apart
silently. At the end the same process is alive, idle and healthy, and its log holds no traceback.
tests/serve/test_request_fuzz.py runs thousands more cases at the function level."""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import llmkit.errors
from openapi_helpers import TEXT, Schemas, mutations
from post_training_helpers import save_tiny_model
from serve_helpers import Serve

# Requests per endpoint: a generation route gets POSITIVE valid ones, NEGATIVE random violating ones and
# about 700 systematic ones (every field × every kind of wrong value); a read route GET_EXAMPLES. /openapi.json
# is one fixed document: fewer. Each endpoint gets at least 500.
POSITIVE, NEGATIVE = 150, 150
GET_EXAMPLES, GET_BATCH = 500, 10
CALL_SECONDS = 10.0
FUZZ = settings(max_examples=POSITIVE, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
SENT: Counter = Counter()  # (path template, mode) → requests sent
CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception)\b")
INTERNAL_NAMES = {n for n in (*dir(__builtins__ if isinstance(__builtins__, dict) else __builtins__),
                              *dir(llmkit.errors)) if CLASS_NAME.fullmatch(n)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("openapi")
    model = save_tiny_model(root / "tiny")  # llama-tiny: a 128-token context, a 300-token vocabulary
    server = Serve("--model", str(model), "--port", "0", "--dtype", "fp32", "--threads", "1", "--max-batch", "8",
                   "--max-queued", "64", log=root / "serve.log")
    try:
        server.wait_for_url()
        with httpx.Client(base_url=server.url, timeout=CALL_SECONDS * 3) as client:
            server.client, server.model_dir = client, model
            server.document = client.get("/openapi.json").json()
            server.schemas = Schemas(server.document)
            yield server
    finally:
        server.stop()


# ---- checking an answer against the document --------------------------------------------------------

def check(server, response: httpx.Response, template: str, method: str, sent: str) -> dict | None:
    """Assert the answer is documented for the route and safe; the error object if it is one."""
    assert response.elapsed.total_seconds() < CALL_SECONDS, (template, response.elapsed)
    assert response.status_code < 500, (template, response.status_code, response.text[:500])
    documented = server.document["paths"][template][method]["responses"]
    assert str(response.status_code) in documented, (template, response.status_code, response.text[:300])
    spec = documented[str(response.status_code)]
    if "content" not in spec:  # a redirect
        return None
    media = response.headers.get("content-type", "").split(";")[0]
    assert media in spec["content"], (template, response.status_code, media)
    content, schemas = spec["content"][media], server.schemas
    if media == "text/event-stream":
        events = [block.removeprefix("data: ") for block in response.text.split("\n\n")[:-1]]
        assert events and all(not e.startswith("data: ") for e in events), response.text[:300]
        last = events.pop() if events[-1] == "[DONE]" else None
        for payload in events:
            errors = schemas.errors(json.loads(payload), content["x-event-schema"])
            assert not errors, (template, errors[:3], payload[:300])
        assert last == "[DONE]" or "error" in json.loads(events[-1]), response.text[-300:]
        return None
    if media != "application/json":
        return None
    body = response.json()
    errors = schemas.errors(body, content["schema"])
    assert not errors, (template, response.status_code, errors[:3], response.text[:300])
    if response.status_code < 400:
        return None
    assert_no_internals(server, body["error"]["message"], sent)
    return body["error"]


def assert_no_internals(server, message: str, sent: str) -> None:
    """S12: no traceback, no path of this machine, no exception class name (unless the request held it)."""
    assert "Traceback" not in message and 'File "' not in message, message
    for place in (str(Path(llmkit.errors.__file__).parent.parent), sys.prefix, str(server.model_dir), os.getcwd()):
        assert place not in message, message
    names = {m for m in CLASS_NAME.findall(message) if m in INTERNAL_NAMES and m not in sent}
    assert not names, message


# ---- generation routes ----------------------------------------------------------------------------------

ROUTES = {"/v1/chat/completions": "ChatCompletionRequest", "/v1/completions": "CompletionRequest"}
SHORT = {"type": "integer", "minimum": 1, "maximum": 4}


def positive_schema(schemas: Schemas, name: str) -> dict:
    """The route's request schema with max_tokens required and narrowed to 1–4 (the one change: it keeps
    every answer a few tokens long; everything else is drawn from the document as it is)."""
    schema = copy.deepcopy(schemas.resolve({"$ref": f"#/components/schemas/{name}"}))
    schema["required"] = [*schema["required"], "max_tokens"]
    schema["properties"]["max_tokens"] = SHORT
    if "max_completion_tokens" in schema["properties"]:
        schema["properties"]["max_completion_tokens"] = {"anyOf": [{"type": "null"}, SHORT]}
    return schema


# Bodies no JSON value is: broken syntax, non-finite numbers, nesting past the limit, lone surrogates,
# invalid UTF-8, nothing at all — and a valid body under the wrong content type.
RAW = st.one_of(
    st.binary(max_size=40).map(lambda b: (b, "application/json")),
    st.sampled_from([b'{"prompt": NaN}', b'{"messages": Infinity}', b'{"max_tokens": -Infinity}', b"",
                     b"[" * 150 + b"]" * 150, b'{"a":' * 120 + b"1" + b"}" * 120, b'{"prompt": "\\ud800"}',
                     b'{"messages": [{"role": "user", "content": "\\udfff x"}]}', b'{"prompt": "\xff\xfe"}',
                     b"{", b'{"prompt": "a"', b"null", b"[]", b'"text"', b"12"]).map(lambda b: (b, "application/json")),
    st.tuples(st.just(b'{"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'),
              st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""])))


@pytest.mark.parametrize("template", ROUTES)
def test_valid_requests_are_answered_as_documented(server, template):
    schema = positive_schema(server.schemas, ROUTES[template])
    outcomes: Counter = Counter()

    @FUZZ
    @given(body=server.schemas.values(schema))
    def one(body):
        text = json.dumps(body)
        response = server.client.post(template, content=text, headers={"content-type": "application/json"})
        SENT[template, "positive"] += 1
        error = check(server, response, template, "post", text)
        if error is not None:  # only what the document cannot say: the prompt's tokens, a full queue
            assert (response.status_code, error["code"]) in ((400, "context_length_exceeded"),
                                                             (429, "rate_limit_exceeded")), (body, error)
        outcomes[response.status_code] += 1

    one()
    assert SENT[template, "positive"] >= POSITIVE
    assert outcomes[200] >= 0.9 * sum(outcomes.values()), outcomes  # the generation path itself was exercised


@pytest.mark.parametrize("template", ROUTES)
def test_violating_requests_are_refused_as_documented(server, template):
    schemas = server.schemas
    schema = schemas.resolve({"$ref": f"#/components/schemas/{ROUTES[template]}"})

    @settings(FUZZ, max_examples=NEGATIVE)
    @given(case=schemas.violations(schema).map(lambda v: (json.dumps(v).encode(), "application/json")) | RAW)
    def one(case):
        data, content_type = case
        response = server.client.post(template, content=data, headers={"content-type": content_type})
        SENT[template, "negative"] += 1
        check(server, response, template, "post", data.decode("utf-8", "replace"))
        assert 400 <= response.status_code < 500, (data[:300], response.status_code, response.text[:300])

    one()
    assert SENT[template, "negative"] >= NEGATIVE


# Valid bodies reaching every nested field the document describes, for the systematic negative cases
FULL = {"/v1/chat/completions": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                 "max_tokens": 1, "stream": True, "stream_options": {"include_usage": True},
                                 "logprobs": True, "top_logprobs": 1, "stop": ["x"]},
        "/v1/completions": {"prompt": [[1, 2], "hi"], "max_tokens": 1, "stream": True,
                            "stream_options": {"include_usage": True}, "logprobs": 1, "stop": "x"}}


@pytest.mark.parametrize("template", ROUTES)
def test_every_field_refuses_every_wrong_kind_of_value(server, template):
    """Systematic negative cases beside the random ones: each field, at every depth, set in turn to a value of
    each JSON type (and the usual edges) that the document says is wrong."""
    schemas = server.schemas
    schema = schemas.resolve({"$ref": f"#/components/schemas/{ROUTES[template]}"})
    assert schemas.valid(FULL[template], schema), schemas.errors(FULL[template], schema)
    cases = mutations(schemas, schema, FULL[template])
    for body in cases:
        text = json.dumps(body)
        response = server.client.post(template, content=text, headers={"content-type": "application/json"})
        check(server, response, template, "post", text)
        assert 400 <= response.status_code < 500, (text[:300], response.status_code, response.text[:300])
    SENT[template, "negative"] += len(cases)
    assert POSITIVE + NEGATIVE + len(cases) >= 500  # the route's requests: valid, random and systematic violating


# ---- read-only routes -------------------------------------------------------------------------------------

QUERY = st.lists(st.tuples(TEXT, TEXT), max_size=3)  # parameters these routes do not take: ignored


@pytest.mark.parametrize("template", ["/v1/models", "/v1/models/{model}", "/health", "/metrics", "/openapi.json"])
def test_read_routes_answer_as_documented(server, template):
    model_id = server.document["components"]["schemas"]["Model"]["properties"]["id"]["const"]
    names = st.just(model_id) | TEXT.filter(lambda t: t not in ("", ".", ".."))
    wanted = 100 if template == "/openapi.json" else GET_EXAMPLES  # the document is one fixed answer

    # each example is a few requests: these answers take ~2 ms, Hypothesis' own work per example as long
    @settings(FUZZ, max_examples=wanted // GET_BATCH)
    @given(batch=st.lists(st.tuples(QUERY, names), min_size=GET_BATCH, max_size=GET_BATCH))
    def one(batch):
        for query, model in batch:
            path = template.replace("{model}", quote(model, safe=""))
            response = server.client.get(path, params=query)
            SENT[template, "get"] += 1
            check(server, response, template, "get", model)
            if template != "/v1/models/{model}" or model == model_id:
                assert response.status_code == 200, response.text[:300]

    one()
    assert SENT[template, "get"] >= wanted


# ---- /explain ------------------------------------------------------------------------------------------

# per view: a valid request runs the view (here 5–50 ms: see below), a violating one is answered 400 by
# the checks in a few ms, so most of each view's 500 are violating ones
EXPLAIN_POSITIVE, EXPLAIN_NEGATIVE = 50, 450
# A valid request asks for the view's JSON (an HTML page draws its figures with matplotlib: 0.2–0.9 s each,
# which tests/serve/test_explain_routes.py covers) and samples at most 4 tokens: the two narrowings of the
# document for the positive cases, as max_tokens is for the generation routes.
CHEAP = {"format": {"const": "json"}, "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": 4}}
NOT_NUMBERS = st.text("abcdefghijklmnopqrstuvwxyz.,-+ ", max_size=6).filter(
    lambda t: t.strip().lower() not in ("nan", "inf", "infinity", "+inf", "-inf", "+nan", "-nan", "+infinity",
                                        "-infinity"))


def query_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def explain_query(schemas: Schemas, parameters: list[dict], draw) -> list[tuple[str, str]]:
    """Some of the view's parameters, each with a value valid by its schema (arrays repeat the name)."""
    items = []
    for parameter in parameters:
        if parameter["name"] == "format" or draw(st.integers(0, 3)) == 0:  # each other one in a request of four
            value = draw(schemas.values(CHEAP.get(parameter["name"], parameter["schema"])))
            items += [(parameter["name"], query_value(v)) for v in (value if isinstance(value, list) else [value])]
    return items


def explain_violation(parameters: list[dict], draw) -> tuple[str, str]:
    """One parameter broken: a number that is not one, a value outside its choices, text past its length,
    a parameter given more often than allowed, or one the view does not take."""
    parameter = draw(st.sampled_from(parameters))
    schema, name = parameter["schema"], parameter["name"]
    items = schema.get("items", schema)
    kinds = [("unknown", None)]
    if items.get("type") in ("integer", "number"):
        kinds.append(("value", draw(NOT_NUMBERS)))
    if "enum" in items:
        kinds.append(("value", draw(TEXT.filter(lambda t: t not in items["enum"]))))
    if "maxLength" in items:
        kinds.append(("value", "x" * (items["maxLength"] + 1)))
    kinds.append(("repeat", None))
    kind, value = draw(st.sampled_from(kinds))
    if kind == "unknown":
        return [(draw(st.sampled_from(["bogus", "model", "out", "every_head", "dtype", "x-y"])), "1")]
    if kind == "repeat":
        times = schema.get("maxItems", 1) + 1
        sample = "1" if items.get("type") in ("integer", "number") else items.get("enum", ["a"])[0]
        return [(name, sample)] * times
    return [(name, value)]


@pytest.mark.parametrize("view", ["tokens", "attention", "knockout", "sampling", "logit-lens", "cache", "positions"])
def test_explain_views_answer_as_documented(server, view):
    template = f"/explain/{view}"
    parameters = server.document["paths"][template]["get"]["parameters"]

    def send(query, mode: str) -> None:
        response = server.client.get(template, params=query)
        SENT[template, mode] += 1
        check(server, response, template, "get", json.dumps(query))
        if mode == "negative":
            assert response.status_code == 400, (query, response.text[:300])

    @settings(FUZZ, max_examples=EXPLAIN_POSITIVE)
    @given(data=st.data())
    def positive(data):
        send(explain_query(server.schemas, parameters, data.draw), "positive")

    @settings(FUZZ, max_examples=EXPLAIN_NEGATIVE)
    @given(data=st.data())
    def negative(data):
        send(explain_violation(parameters, data.draw), "negative")

    positive()
    negative()
    assert SENT[template, "positive"] >= EXPLAIN_POSITIVE // 2  # (Hypothesis may stop early on duplicates)
    assert SENT[template, "positive"] + SENT[template, "negative"] >= 500


def test_the_document_names_every_field_the_checks_know():
    """Fields the checks accept but the document omits would never be fuzzed: the two lists must agree."""
    from llmkit.serve.openapi import openapi_document
    from llmkit.serve.requests import CHAT_FIELDS, COMPLETION_FIELDS, NOT_SUPPORTED, ModelLimits

    schemas = openapi_document(ModelLimits(model_id="m", context=64, vocab_size=300))["components"]["schemas"]
    assert set(schemas["ChatCompletionRequest"]["properties"]) == CHAT_FIELDS | set(NOT_SUPPORTED)
    assert set(schemas["CompletionRequest"]["properties"]) == COMPLETION_FIELDS | set(NOT_SUPPORTED)


def test_the_served_document_is_well_formed(server):
    """OpenAPI 3.1's required parts; every $ref resolves; every schema keeps to the keywords the fuzzing
    implements (so none is silently ignored); every response has a description."""
    document, schemas = server.document, server.schemas
    assert document["openapi"] == "3.1.0" and document["info"]["title"] and document["info"]["version"]
    for name, schema in document["components"]["schemas"].items():
        schemas.assert_known(schema, name)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert method in ("get", "post") and operation["responses"], (path, method)
            for status, response in operation["responses"].items():
                assert response["description"], (path, status)
                for media, content in response.get("content", {}).items():
                    for key in ("schema", "x-event-schema"):
                        if key in content:
                            schemas.assert_known(content[key], f"{path} {status} {media}")
            for parameter in operation.get("parameters", ()):
                assert parameter["in"] in ("query", "path") and parameter["name"], (path, parameter)
                schemas.assert_known(parameter["schema"], f"{path} {parameter['name']}")
            if "requestBody" in operation:
                schemas.assert_known(operation["requestBody"]["content"]["application/json"]["schema"], path)


def test_a_keyed_server_documents_its_key_and_health_is_left_open():
    from llmkit.serve.openapi import openapi_document
    from llmkit.serve.requests import ModelLimits

    limits = ModelLimits(model_id="m", context=64, vocab_size=300)
    keyed, open_ = openapi_document(limits, keyed=True), openapi_document(limits)
    assert keyed["security"] == [{"bearer": []}] and keyed["paths"]["/health"]["get"]["security"] == []
    assert "security" not in open_ and "security" not in open_["paths"]["/health"]["get"]


def test_the_same_server_is_healthy_and_idle_afterwards_and_logged_no_traceback(server):
    assert server.proc.poll() is None  # never restarted: the process the fixture started
    assert server.client.get("/health").json() == {"status": "ok"}
    metrics = server.client.get("/metrics").text
    assert "llmkit_requests_running 0" in metrics and "llmkit_requests_queued 0" in metrics
    assert "Traceback" not in server.log.read_text()
