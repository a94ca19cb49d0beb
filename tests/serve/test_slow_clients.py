"""Slow clients (RELIABILITY.md S10), over raw sockets: a client that trickles its request's head or body
is answered 408 and disconnected once --read-timeout has passed, and while such connections are open
the server answers everyone else at once."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

import llmkit
from llmkit.serve.app import create_app
from llmkit.serve.server import ServerThread
from serve_helpers import MODEL_ID, save_scripted_model

READ_TIMEOUT = 1.0
MARGIN = 2.0  # a busy shared machine may be this much late closing a connection
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    lm = llmkit.load(save_scripted_model(tmp_path_factory.mktemp("scripted")))
    engine = lm.engine(max_batch=2, max_queued=4)
    try:
        app = create_app(lm, engine, model_id=MODEL_ID, read_timeout=READ_TIMEOUT)
        with ServerThread(app, read_timeout=READ_TIMEOUT) as base:
            yield base
    finally:
        engine.close()


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def until_closed(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """What the server sends until it closes the connection, and when (seconds from now); fails if it is
    still open after `seconds`."""
    started, data = time.perf_counter(), b""
    while True:
        left = started + seconds - time.perf_counter()
        assert left > 0, f"still open after {seconds} s; got {data[:200]!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            sock.close()
            return data, time.perf_counter() - started
        data += chunk


def trickle(sock: socket.socket, data: bytes, every: float, stop: threading.Event) -> None:
    for byte in data:
        if stop.wait(every):
            return
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # the server closed it
            return


def status_and_body(response: bytes) -> tuple[int, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_slow_heads_are_cut_off_and_do_not_hold_the_server(url):
    stop = threading.Event()
    opened = time.perf_counter()
    silent = [connect(url) for _ in range(40)]
    for sock in silent:
        sock.sendall(HEAD[:30])  # part of a head, then nothing
    trickled = connect(url)
    worker = threading.Thread(target=trickle, args=(trickled, HEAD, 0.05, stop), daemon=True)
    worker.start()  # one byte every 50 ms: the head never completes within the timeout
    try:
        started = time.perf_counter()
        answer = httpx.post(url + "/v1/chat/completions", timeout=10,
                            json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert answer.status_code == 200 and time.perf_counter() - started < 1.0  # S10: not delayed past 1 s
        for sock in [*silent, trickled]:
            data, _ = until_closed(sock, READ_TIMEOUT + MARGIN)
            status, body = status_and_body(data)
            assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert time.perf_counter() - opened < READ_TIMEOUT + MARGIN
    finally:
        stop.set()


def test_a_slow_body_gets_408_and_its_connection_closed(url):
    sock = connect(url)
    sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n" + b'{"model"')  # 8 of 100 bytes, then nothing
    data, elapsed = until_closed(sock, READ_TIMEOUT + MARGIN)
    status, body = status_and_body(data)
    assert status == 408 and elapsed >= READ_TIMEOUT - 0.1  # (0.1: the clock of connect vs the server's)
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "1 s" in error["message"]


def test_a_kept_alive_connection_trickling_its_next_head_is_cut_off(url):
    """uvicorn's idle keep-alive timer restarts with every byte received: a deadline on the next head does not."""
    sock = connect(url)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = b""
    while b'"ok"' not in first:
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    stop = threading.Event()
    threading.Thread(target=trickle, args=(sock, b"GET /health HTTP/1.1\r\n", 0.05, stop), daemon=True).start()
    try:
        data, elapsed = until_closed(sock, READ_TIMEOUT + MARGIN)
        assert status_and_body(data)[0] == 408
    finally:
        stop.set()
