"""Listening: the socket is bound here, before the model loads (a busy port is one error line at once),
on loopback unless --host says otherwise (RELIABILITY.md S1), and handed to uvicorn.

Slow clients (S10): uvicorn closes an idle keep-alive connection, but a client that trickles a request's
head one byte at a time resets that timer with every byte and would hold its connection for ever. The
protocol made by `timed_protocol` gives every request head `read_timeout` seconds from the moment the
connection opens or its previous response ends; past that the client gets 408 and the connection is
closed. (The body has its own deadline, read_json_object's.) Such a connection costs the server a socket
and nothing else: requests are served by one event loop, so slow clients never delay the others.

`ServerThread` runs the same server in a background thread of this process, on a free loopback port;
the tests and the benchmark use it to talk to a real server over real sockets.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from typing import Any

from llmkit.errors import ConfigError

KEEP_ALIVE_SECONDS = 5  # an idle connection is closed after this (S10)
SHUTDOWN_SECONDS = 3  # on Ctrl-C, open streams get this long before they are cut
BACKLOG = 2048  # uvicorn's default
READ_TIMEOUT_SECONDS = 30.0  # default of --read-timeout: a request's head, then its body, must arrive within it


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: any free one), not yet listening."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise ConfigError(f"--host {host!r}: cannot resolve it ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    return sock


def is_loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def timed_protocol(read_timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol class, with a deadline on each request's head (see the module's text)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from llmkit.serve.errors import error_body

    body = json.dumps(error_body(408, f"the request's headers did not arrive within {read_timeout:g} s "
                                      "(--read-timeout); closing the connection", code="request_timeout")).encode()
    refusal = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
               b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeadDeadline(AutoHTTPProtocol):
        _head_deadline = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()  # the next request's head, on this kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(read_timeout, self._head_too_slow)

        def _head_too_slow(self) -> None:
            self._head_deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is under way: its head came in time
            self.transport.write(refusal)
            self.transport.close()

    return HeadDeadline


def make_server(app: Any, read_timeout: float = READ_TIMEOUT_SECONDS):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            http=timed_protocol(read_timeout), timeout_keep_alive=KEEP_ALIVE_SECONDS,
                            timeout_graceful_shutdown=SHUTDOWN_SECONDS)
    return uvicorn.Server(config)


def run(app: Any, sock: socket.socket, read_timeout: float = READ_TIMEOUT_SECONDS) -> None:
    """Serve `app` on `sock` until interrupted (Ctrl-C or SIGTERM)."""
    make_server(app, read_timeout).run(sockets=[sock])


class ServerThread:
    """`with ServerThread(app) as url:` — the app served on 127.0.0.1 on a free port in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", read_timeout: float = READ_TIMEOUT_SECONDS) -> None:
        self.sock = bind(host, 0)
        self.sock.listen(BACKLOG)
        self.server = make_server(app, read_timeout)
        self.url = url_of(self.sock)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended before it started")
            self.thread.join(0.01)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
