#!/usr/bin/env python
"""Soak test of `llmkit serve` (issue 14's proof, RELIABILITY.md S7–S9): many streaming chat clients for a
fixed time, a share of which hang up mid-answer, against SmolLM2-135M-Instruct (or --model) in a child
process. It passes when no response was a 5xx, no stream broke, every row was freed after the clients
left, and the server's memory came back to its start level (within --rss-tolerance).

    .venv/bin/python benchmarks/serve_soak.py                       # 32 clients, 60 s, 30 % disconnect
    .venv/bin/python benchmarks/serve_soak.py --clients 8 --seconds 10 --warmup 5

How memory is measured (psutil, the child's resident set size): a first phase of --warmup seconds runs the
same load, so the start level already holds the loaded weights, the batch's KV buffers at their working
size, the allocator's arenas and every kernel's one-time state; then, once the engine reports no running
and no queued request and --settle seconds have passed, "start" is the median of ten samples 0.1 s apart.
"peak" is the largest sample (every 0.25 s) during the soak, "after" the median taken the same way as
"start" once the clients have left and the engine is idle again.

Each client loops while the soak lasts: one streaming chat request (a prompt drawn from benchmarks/
serve.py's PROMPTS, 16–96 new tokens, greedy); with probability --disconnect it closes the connection
after 1–12 content chunks instead of reading to `data: [DONE]`. A probe asks GET /health once a second
and keeps the slowest answer. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import PROMPTS, cpu_line, server_log, start_server  # noqa: E402  (benchmarks/serve.py)


def gauges(url: str) -> dict[str, float]:
    """The engine's running and queued gauges from /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("llmkit_requests_running", "llmkit_requests_queued", "llmkit_requests_cancelled_total"):
            out[name] = float(value)
    return out


def wait_idle(url: str, seconds: float = 120) -> float:
    """Seconds until the engine runs and queues nothing (the clients have left)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        g = gauges(url)
        if g["llmkit_requests_running"] == 0 and g["llmkit_requests_queued"] == 0:
            return time.monotonic() - started
        time.sleep(0.1)
    raise SystemExit(f"the engine still had requests {seconds:g} s after the clients left: {gauges(url)}")


def steady_rss(proc: psutil.Process) -> float:
    samples = []
    for _ in range(10):
        samples.append(proc.memory_info().rss)
        time.sleep(0.1)
    return statistics.median(samples) / 2**20


async def one_request(client: httpx.AsyncClient, url: str, model: str, rng: random.Random, disconnect: float,
                      tally: dict) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(16, 96), "temperature": 0, "stream": True}
    leave_after = rng.randint(1, 12) if rng.random() < disconnect else None
    chunks, done = 0, False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            tally["status"][response.status_code] = tally["status"].get(response.status_code, 0) + 1
            if response.status_code != 200:
                await response.aread()
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                if "error" in json.loads(line[6:]):
                    tally["error_events"] += 1
                    return
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    tally["disconnected"] += 1
                    return  # leaving the `async with` unread closes the connection: the server sees a hang-up
    except httpx.HTTPError as exc:
        tally["transport_errors"].append(type(exc).__name__)
        return
    tally["completed" if done else "truncated"] += 1


async def load(url: str, model: str, clients: int, seconds: float, disconnect: float, seed: int,
               proc: psutil.Process | None = None) -> dict:
    tally = {"status": {}, "completed": 0, "disconnected": 0, "truncated": 0, "error_events": 0,
             "transport_errors": [], "peak_rss": 0.0, "slowest_health": 0.0}
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:

        async def user(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < end:
                await one_request(client, url, model, rng, disconnect, tally)

        async def watch() -> None:
            while time.monotonic() < end:
                started = time.perf_counter()
                response = await client.get(url + "/health")
                tally["slowest_health"] = max(tally["slowest_health"], time.perf_counter() - started)
                assert response.status_code == 200
                for _ in range(4):
                    if proc is not None:
                        tally["peak_rss"] = max(tally["peak_rss"], proc.memory_info().rss / 2**20)
                    await asyncio.sleep(0.25)

        await asyncio.gather(watch(), *(user(i) for i in range(clients)))
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model for llmkit serve (default: SmolLM2-135M-Instruct)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: 32)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the soak (default: 60)")
    p.add_argument("--warmup", type=float, default=15.0, help="the same load first, unmeasured (default: 15)")
    p.add_argument("--settle", type=float, default=5.0, help="idle seconds before each RSS reading (default: 5)")
    p.add_argument("--disconnect", type=float, default=0.3, help="share of requests that hang up (default: 0.3)")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed |after - start| / start (default: 0.10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=16, help="llmkit serve --max-batch (default: 16)")
    p.add_argument("--max-queued", type=int, default=64, help="llmkit serve --max-queued (default: 64)")
    p.add_argument("--dtype", default="auto", help="llmkit serve --dtype (default: auto)")
    p.add_argument("--threads", type=int, help="llmkit serve --threads (default: one per core)")
    args = p.parse_args(argv)

    server, url, model = start_server(args)
    proc = psutil.Process(server.pid)
    try:
        print("# llmkit serve soak\n")
        print(f"- CPU: {cpu_line()}")
        print(f"- server: llmkit serve (child process), model {model}, --max-batch {args.max_batch} "
              f"--max-queued {args.max_queued} --dtype {args.dtype}; runtime line: "
              f"{server_log(server).strip().splitlines()[0]}")
        print(f"- {args.clients} streaming clients, {args.seconds:g} s after a {args.warmup:g} s warm-up; "
              f"{args.disconnect:.0%} of requests hang up after 1–12 chunks; 16–96 new tokens, greedy\n", flush=True)
        loaded = proc.memory_info().rss / 2**20
        asyncio.run(load(url, model, args.clients, args.warmup, args.disconnect, args.seed + 1))
        wait_idle(url)
        time.sleep(args.settle)
        start = steady_rss(proc)
        cancelled_before = gauges(url)["llmkit_requests_cancelled_total"]
        t = asyncio.run(load(url, model, args.clients, args.seconds, args.disconnect, args.seed, proc))
        drained = wait_idle(url)
        cancelled = gauges(url)["llmkit_requests_cancelled_total"] - cancelled_before
        time.sleep(args.settle)
        after = steady_rss(proc)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except Exception:  # noqa: BLE001 - a server that will not stop is killed
            server.kill()
    five_xx = sum(n for status, n in t["status"].items() if status >= 500)
    other = sum(n for status, n in t["status"].items() if status != 200 and status < 500)
    drift = (after - start) / start
    checks = {"no 5xx": five_xx == 0, "no other refusal": other == 0,
              "no broken stream": t["truncated"] + t["error_events"] + len(t["transport_errors"]) == 0,
              f"RSS back within ±{args.rss_tolerance:.0%}": abs(drift) <= args.rss_tolerance}
    print("| requests | completed | hung up (server counted) | 5xx | other non-200 | broken streams | "
          "slowest /health | RSS loaded | RSS start | RSS peak | RSS after | after vs start | rows freed after |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {sum(t['status'].values())} | {t['completed']} | {t['disconnected']} ({cancelled:.0f}) | {five_xx} | "
          f"{other} | {t['truncated'] + t['error_events'] + len(t['transport_errors'])} | "
          f"{t['slowest_health'] * 1e3:.0f} ms | {loaded:.0f} MB | {start:.0f} MB | {t['peak_rss']:.0f} MB | "
          f"{after:.0f} MB | {drift:+.1%} | {drained:.2f} s |")
    print()
    for name, ok in checks.items():
        print(f"- {name}: {'pass' if ok else 'FAIL'}")
    if t["transport_errors"]:
        print(f"- transport errors: {sorted(set(t['transport_errors']))}")
    print(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
