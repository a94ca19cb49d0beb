"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, one line of text that
names the field and the value, never a traceback, a file path or an exception's class name.

Every route raises APIError for a request it refuses; `install_error_handlers` turns it, FastAPI's and
Starlette's own errors (unknown route, wrong method) and any unexpected exception into that shape. An
unexpected exception is a bug in llmkit: the client gets a request id, the server log the traceback.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("llmkit.serve")

# OpenAI's error types by status (what its own API returns, and what its client maps to exception classes).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               503: "server_error", 504: "server_error"}


class APIError(Exception):
    """A refused request: HTTP `status` and the OpenAI error fields. `headers` go on the response
    (Retry-After with a 429, WWW-Authenticate with a 401)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    message = " ".join(str(message).split())  # one line, whatever the text held
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def internal_error(where: str, exc: BaseException | None = None) -> APIError:
    """A 500 for a failure inside the server: the log gets the traceback under a request id, the
    client only the id (S12: no paths, tracebacks or class names in a response)."""
    request_id = new_request_id()
    log.error("request %s failed in %s", request_id, where, exc_info=exc)
    return APIError(500, f"internal server error (request id {request_id}; the server log has the details)",
                    code="internal_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path[:200]!r}",
                   405: f"method {request.method} is not allowed on {request.url.path[:200]!r}"}
        text = message.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, text, code="not_found" if exc.status_code == 404 else None,
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The routes read their own bodies (requests.py); this is only reached by a query or path parameter.
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, f"{where or 'request'}: {first.get('msg', 'invalid')}", param=where)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        error = internal_error(f"{request.method} {request.url.path[:200]}", exc)
        return JSONResponse(error.body(), status_code=500)
