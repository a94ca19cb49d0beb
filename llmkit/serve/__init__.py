"""`llmkit serve`: an OpenAI-compatible HTTP server and a web chat page over the generation engine.

    app.py        the routes (FastAPI): /v1/chat/completions, /v1/completions, /v1/models, /health,
                  /metrics, /openapi.json and the page at /
    requests.py   reading a request body (content type, size, depth) and checking every field
    generation.py a checked request run on the engine: whole responses, SSE chunks, logprobs
    guard.py      the ASGI layer every request passes first: Host check, API key, security headers
    errors.py     errors in OpenAI's shape, never a traceback
    metrics.py    Prometheus text: counters, gauges and latency histograms
    openapi.py    the OpenAPI 3.1 document at /openapi.json, from the same tables the checks read
    server.py     binding the socket (loopback by default) and running uvicorn
    static/       the chat page: one HTML file, its script and its style sheet, nothing fetched elsewhere

Threat model: every HTTP client is untrusted (docs/security.md); the model file is trusted as far as
llmkit's loaders bound it. Details and flags: docs/serving.md.
"""
