"""The OpenAI-compatible routes and the chat page, as one FastAPI application.

    POST /v1/chat/completions   POST /v1/completions     (stream, n, stop, max_tokens, sampling, seed, logprobs)
    GET  /v1/models             GET  /v1/models/{model}
    GET  /health                GET  /metrics            (Prometheus text)
    GET  /                      GET  /static/chat.js     GET /static/chat.css   (the page)
    GET  /explain               GET  /explain/{view}     (llmkit explain's pages: explain_routes.py)
    GET  /openapi.json                                   (the routes' OpenAPI 3.1 document: openapi.py)

`create_app(lm, engine, model_id=...)` builds it around a loaded model and a running engine;
llmkit/serve/server.py runs it under uvicorn. FastAPI's interactive docs are off: they load scripts
from a CDN, which the page's Content-Security-Policy (and the no-network rule) forbids; its generated
/openapi.json is replaced by openapi.py's, which describes the bodies the routes read themselves.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from llmkit.serve.errors import APIError, install_error_handlers
from llmkit.serve.explain_routes import add_explain_routes
from llmkit.serve.generation import MAX_REQUEST_SECONDS, QUEUE_TIMEOUT_SECONDS, Served, respond
from llmkit.serve.guard import LOOPBACK_HOSTS, Guard
from llmkit.serve.metrics import Metrics
from llmkit.serve.openapi import openapi_document
from llmkit.serve.requests import MAX_BODY_BYTES, ModelLimits, check_chat, check_completion, read_json_object
from llmkit.serve.server import READ_TIMEOUT_SECONDS

PAGE_FILES = {"index.html": "text/html; charset=utf-8", "chat.js": "text/javascript; charset=utf-8",
              "chat.css": "text/css; charset=utf-8"}


def create_app(lm: Any, engine: Any, *, model_id: str, api_key: str | None = None,
               allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS, max_body_bytes: int = MAX_BODY_BYTES,
               max_request_seconds: float = MAX_REQUEST_SECONDS, queue_timeout: float = QUEUE_TIMEOUT_SECONDS,
               read_timeout: float = READ_TIMEOUT_SECONDS) -> FastAPI:
    """`allowed_hosts`: Host names answered (None: any; for a server bound to a public address).
    `api_key`: required as `Authorization: Bearer KEY` on every route but /health and the page.
    `max_request_seconds`: a generation request still running this long after it arrived is ended (504).
    `queue_timeout`: a request still waiting for a batch row this long is refused (503).
    `read_timeout`: a request body must arrive within this long (408); server.py times the head."""
    limits = ModelLimits(model_id=model_id, context=lm.config.max_seq_len, vocab_size=lm.tokenizer.vocab_size)
    served = Served(lm=lm, engine=engine, limits=limits, metrics=Metrics(), max_seconds=max_request_seconds,
                    queue_timeout=queue_timeout)
    page = {name: (resources.files("llmkit.serve") / "static" / name).read_bytes() for name in PAGE_FILES}
    created = int(time.time())
    app = FastAPI(title="llmkit", docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,
                  openapi_url=None)
    app.state.served = served
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        started = time.perf_counter()
        body = await read_json_object(request, max_body_bytes, read_timeout)
        return await respond(served, check_chat(body, limits), request, started)

    @app.post("/v1/completions")
    async def completions(request: Request):
        started = time.perf_counter()
        body = await read_json_object(request, max_body_bytes, read_timeout)
        return await respond(served, check_completion(body, limits), request, started)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "llmkit",
                "max_model_len": limits.context}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict[str, Any]:
        if model != model_id:
            raise APIError(404, f"the model {model[:200]!r} does not exist; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(served.metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    def page_route(path: str, name: str) -> None:
        async def serve_file() -> Response:
            return Response(page[name], media_type=PAGE_FILES[name], headers={"cache-control": "no-cache"})
        app.add_api_route(path, serve_file, methods=["GET"], include_in_schema=False, name=name)

    page_route("/", "index.html")
    page_route("/static/chat.js", "chat.js")
    page_route("/static/chat.css", "chat.css")
    explain_parsers = add_explain_routes(app, lm, model_id=model_id)  # /explain: the explain views as pages
    document = json.dumps(openapi_document(limits, explain_parsers, keyed=api_key is not None)).encode("utf-8")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> Response:
        return Response(document, media_type="application/json")

    routes = frozenset(getattr(r, "path", "") for r in app.routes)
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts, metrics=served.metrics, routes=routes)
    return app
