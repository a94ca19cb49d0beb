"""Auth on every registered route (RELIABILITY.md S2), browser-origin defences (S3: Host check against
DNS rebinding, no CORS, JSON content type) and the page's security headers, through real sockets."""

from __future__ import annotations

import httpx
import pytest

import llmkit
from llmkit.serve.app import create_app
from llmkit.serve.guard import LOOPBACK_HOSTS, PUBLIC_PATHS
from llmkit.serve.server import ServerThread
from serve_helpers import MODEL_ID, save_scripted_model

KEY = "s3cret-Key_42"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return llmkit.load(save_scripted_model(tmp_path_factory.mktemp("scripted")))


@pytest.fixture(scope="module")
def keyed(lm):
    """(app, url) of a server that needs KEY and also answers the Host name 'llm.internal'."""
    engine = lm.engine(max_batch=2, max_queued=2)
    app = create_app(lm, engine, model_id=MODEL_ID, api_key=KEY, allowed_hosts=LOOPBACK_HOSTS | {"llm.internal"})
    try:
        with ServerThread(app) as url:
            yield app, url
    finally:
        engine.close()


def registered(app):
    """(method, concrete path) of every route the app has, path parameters filled in."""
    for route in app.routes:
        path = route.path.replace("{model:path}", MODEL_ID)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                yield method, path


def test_every_route_but_health_and_the_page_needs_the_key(keyed):
    app, url = keyed
    routes = list(registered(app))
    assert {p for _, p in routes} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/metrics",
                                      "/health", "/", "/openapi.json"}
    bodies = {"/v1/chat/completions": {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 1},
              "/v1/completions": {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1}}
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path in routes:
            body = bodies.get(path) if method == "POST" else None
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {KEY.lower()}"},
                            {"authorization": KEY}, {"authorization": f"Basic {KEY}"}):
                response = client.request(method, path, json=body, headers=headers)
                if path in PUBLIC_PATHS:
                    assert response.status_code == 200, (method, path)
                else:
                    assert response.status_code == 401, (method, path, headers)
                    assert response.json()["error"]["type"] == "authentication_error"
                    assert response.headers["www-authenticate"] == "Bearer"
            answer = client.request(method, path, json=body, headers={"authorization": f"Bearer {KEY}"})
            assert answer.status_code == 200, (method, path, answer.text)
        # a path nobody registered is refused before routing: no way to probe what exists without the key
        assert client.get("/v1/secret-admin").status_code == 401
        assert client.get("/v1/secret-admin", headers={"authorization": f"Bearer {KEY}"}).status_code == 404


def test_the_page_never_holds_the_key(keyed):
    _, url = keyed
    for path in ("/", "/static/chat.js", "/static/chat.css"):
        assert KEY not in httpx.get(url + path).text


@pytest.mark.parametrize("host, status", [("localhost", 200), ("LOCALHOST:8000", 200), ("127.0.0.1", 200),
                                          ("[::1]:1234", 200), ("llm.internal", 200), ("evil.example", 403),
                                          ("evil.example:8000", 403), ("127.0.0.1.evil.example", 403),
                                          ("localhost.", 403), ("", 403)])
def test_host_header_is_checked_on_loopback(keyed, host, status):
    _, url = keyed
    response = httpx.get(url + "/health", headers={"host": host})
    assert response.status_code == status
    if status == 403:
        assert response.json()["error"]["type"] == "permission_error"


def test_a_public_bind_accepts_any_host(lm):
    engine = lm.engine(max_batch=1, max_queued=0)
    try:
        with ServerThread(create_app(lm, engine, model_id=MODEL_ID, allowed_hosts=None)) as url:
            assert httpx.get(url + "/health", headers={"host": "llm.example.com"}).status_code == 200
    finally:
        engine.close()


def test_no_cors_and_security_headers(keyed):
    _, url = keyed
    origin = {"origin": "https://evil.example"}
    preflight = httpx.options(url + "/v1/chat/completions", headers={
        **origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization"})
    assert preflight.status_code in (401, 405)
    page = httpx.get(url + "/", headers=origin)
    for response in (preflight, page, httpx.get(url + "/health", headers=origin)):
        assert not [h for h in response.headers if h.startswith("access-control-")]
        assert response.headers["content-security-policy"] == "default-src 'self'"
        assert response.headers["x-content-type-options"] == "nosniff"
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["x-frame-options"] == "DENY"


def test_a_form_post_is_refused(keyed):
    """A cross-site HTML form can send text/plain or urlencoded bodies, never application/json."""
    _, url = keyed
    response = httpx.post(url + "/v1/completions", content=b'{"prompt": "hi"}',
                          headers={"content-type": "text/plain", "authorization": f"Bearer {KEY}"})
    assert response.status_code == 415
