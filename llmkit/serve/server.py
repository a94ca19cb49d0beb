"""Listening: the socket is bound here, before the model loads (a busy port is one error line at once),
on loopback unless --host says otherwise (RELIABILITY.md S1), and handed to uvicorn.

`ServerThread` runs the same server in a background thread of this process, on a free loopback port;
the tests and the benchmark use it to talk to a real server over real sockets.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Any

from llmkit.errors import ConfigError

KEEP_ALIVE_SECONDS = 5  # an idle connection is closed after this (S10)
SHUTDOWN_SECONDS = 3  # on Ctrl-C, open streams get this long before they are cut
BACKLOG = 2048  # uvicorn's default


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


def make_server(app: Any):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_keep_alive=KEEP_ALIVE_SECONDS, timeout_graceful_shutdown=SHUTDOWN_SECONDS)
    return uvicorn.Server(config)


def run(app: Any, sock: socket.socket) -> None:
    """Serve `app` on `sock` until interrupted (Ctrl-C or SIGTERM)."""
    make_server(app).run(sockets=[sock])


class ServerThread:
    """`with ServerThread(app) as url:` — the app served on 127.0.0.1 on a free port in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self.sock = bind(host, 0)
        self.sock.listen(BACKLOG)
        self.server = make_server(app)
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
