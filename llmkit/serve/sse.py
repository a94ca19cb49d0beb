"""Server-sent events: the response of a `stream: true` request.

Each event is one line `data: <json>` and a blank line; the stream ends with `data: [DONE]` (OpenAI's
convention), or, when generation fails after the headers went out, with one `data: {"error": ...}`
event and no [DONE] (RELIABILITY.md S6).

The response listens for the client's disconnect while it streams, whatever ASGI version the server
speaks: when the client goes away the streaming task is cancelled at once, even while it waits for a
token that has not been generated yet, so the generator's `finally` cancels the engine request and
its row is freed at the next decode step (S7).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

import anyio
from starlette.responses import Response

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode("ascii") + b"\n\n"


class EventStream(Response):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], *, on_close: Callable[[], None],
                 headers: dict[str, str] | None = None) -> None:
        """`on_close` runs when the response ends, however it ends (also for a client that left before
        the first chunk, when the generator never started and so its `finally` never runs)."""
        self.events, self.on_close = events, on_close
        self.status_code = 200
        self.background = None
        # no-cache: a proxy must not hold the stream back; X-Accel-Buffering: nginx would buffer it otherwise
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                    async for chunk in self.events:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:  # the connection broke while writing: the same as a disconnect
                    pass
                finally:
                    await self.events.aclose()  # runs the generator's `finally` if it is still suspended
                    self.on_close()
                    group.cancel_scope.cancel()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            group.start_soon(watch)
