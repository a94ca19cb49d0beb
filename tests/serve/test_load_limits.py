"""A bounded queue in time (RELIABILITY.md S8: a request waiting past --queue-timeout gets 503) and a short
soak (issue 14's proof in small; benchmarks/serve_soak.py is the full one): streaming clients that hang
up at random leave no 5xx behind, and every row, handle and detokenizer is freed once they have left."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

import llmkit
from llmkit.serve.app import create_app
from llmkit.serve.server import ServerThread
from serve_helpers import MODEL_ID, metric, running_server, save_scripted_model, wait_until

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return llmkit.load(save_scripted_model(tmp_path_factory.mktemp("scripted")))


def test_a_request_waiting_past_the_queue_timeout_gets_503(lm):
    with running_server(lm, max_batch=1, max_queued=4, queue_timeout=0.3) as base, httpx.Client(timeout=30) as client:
        body = {"model": MODEL_ID, "messages": USER, "max_tokens": 4000, "temperature": 0, "stream": True}
        with client.stream("POST", base + CHAT, json=body) as response:
            lines = response.iter_lines()  # (kept: a dropped iterator would close the stream)
            next(line for line in lines if "<script>" in line)  # it runs, holding the only row
            for stream in (False, True):  # a stream's 503 too: nothing is sent before the request has a row
                started = time.perf_counter()
                queued = client.post(base + CHAT, json={**body, "stream": stream, "max_tokens": 1})
                waited = time.perf_counter() - started
                assert queued.status_code == 503, queued.text
                # at least the timeout; at most a few seconds more on a busy shared machine
                assert 0.3 <= waited < 5, waited
                error = queued.json()["error"]
                assert error["code"] == "queue_timeout" and error["type"] == "server_error"
                assert "0.3 s" in error["message"] and queued.headers["retry-after"] == "1"
                # the refused request left the engine's queue (cancelled at its next step)
                assert wait_until(lambda: metric(base, "llmkit_requests_queued") == 0, 2.0)
            assert metric(base, "llmkit_requests_running") == 1
        assert metric(base, "llmkit_requests_queue_timeout_total") == 2
        assert wait_until(lambda: metric(base, "llmkit_requests_running") == 0, 2.0)
        served = client.post(base + CHAT, json={**body, "stream": True, "max_tokens": 2})  # a free row: served
        assert served.status_code == 200 and served.text.endswith("data: [DONE]\n\n")


async def soak(url: str, *, clients: int, seconds: float, disconnect: float) -> dict:
    """`clients` streaming chat clients for `seconds`; a share `disconnect` of requests hang up early."""
    tally = {"status": {}, "completed": 0, "disconnected": 0, "broken": 0}
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=30) as client:

        async def user(i: int) -> None:
            rng = random.Random(i)
            while time.monotonic() < end:
                body = {"model": MODEL_ID, "messages": USER, "max_tokens": rng.randint(8, 24), "temperature": 0,
                        "stream": True}
                leave_after = rng.randint(1, 4) if rng.random() < disconnect else None
                async with client.stream("POST", url + CHAT, json=body) as response:
                    tally["status"][response.status_code] = tally["status"].get(response.status_code, 0) + 1
                    chunks = 0
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            tally["completed"] += 1
                            break
                        if line.startswith("data: "):
                            if "error" in json.loads(line[6:]):
                                tally["broken"] += 1
                                break
                            chunks += 1
                            if chunks == leave_after:  # leaving the block unread closes the connection
                                tally["disconnected"] += 1
                                break
                    else:
                        tally["broken"] += 1

        await asyncio.gather(*(user(i) for i in range(clients)))
    return tally


def test_soak_with_random_disconnects_has_no_5xx_and_frees_every_row(lm):
    engine = lm.engine(max_batch=4, max_queued=16)
    try:
        with ServerThread(create_app(lm, engine, model_id=MODEL_ID)) as url:
            tally = asyncio.run(soak(url, clients=6, seconds=1.5, disconnect=0.4))
            assert set(tally["status"]) == {200}, tally  # no 5xx, and with 6 clients ≤ 4 + 16 no 429 either
            # (each client makes several requests: at least 6 in all, 40 % of them hanging up)
            assert tally["broken"] == 0 and tally["completed"] >= 2 and tally["disconnected"] >= 2, tally
            # every row freed: the gauges, the engine's own counts and its batch (rows, handles, detokenizers)
            assert wait_until(lambda: metric(url, "llmkit_requests_running") == 0
                              and metric(url, "llmkit_requests_queued") == 0, 2.0)
            # a client that hangs up after the engine has already finished its answer is not a cancellation
            assert 1 <= metric(url, "llmkit_requests_cancelled_total") <= tally["disconnected"]
            stats = engine.stats()
            assert stats["running"] == 0 and stats["queued"] == 0
            session = engine._session
            assert session.scheduler.state.n == 0 and not session.scheduler.busy
            assert not engine._live and not session.streams
            assert httpx.get(url + "/health").status_code == 200
    finally:
        engine.close()
