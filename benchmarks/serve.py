#!/usr/bin/env python
"""Load test of `llmkit serve`: N concurrent streaming chat clients for a fixed time each, N in
--concurrency (default 1, 4, 16, 32), against SmolLM2-135M-Instruct (or --model), vLLM-style columns.

    .venv/bin/python benchmarks/serve.py                      # 30 s per concurrency level
    .venv/bin/python benchmarks/serve.py --seconds 10 --concurrency 1,4
    .venv/bin/python benchmarks/serve.py --url http://127.0.0.1:8080 --model-id NAME   # any OpenAI server

Without --url it starts `llmkit serve --port 0` (loopback) as a child process with --max-batch and
--max-queued, so clients and server do not share a Python interpreter; with --url it measures an
already-running OpenAI-compatible server instead (llama-cpp-python's `python -m llama_cpp.server
--model FILE.gguf`, say), for a side-by-side run on the same machine.

Each client loops: one streaming chat request (a prompt drawn from PROMPTS, --max-tokens new tokens,
temperature 0, stream_options.include_usage), timing the first content chunk (TTFT) and the gaps
between content chunks (ITL); a new request starts only while the level's time lasts, and requests
under way at the end finish and count. A request fails on a non-200 status, an error event, or a
stream without `data: [DONE]` or without a `finish_reason` (an answer the server cut off: llama-cpp-python's
server, by default, ends a running request with an empty stream when another arrives; run it with
`--interrupt_requests false` to queue them).

| column | meaning |
|---|---|
| clients | concurrent streaming clients |
| ok / failed | finished requests; failed ones (must be 0) |
| req/s | finished requests ÷ the level's wall time (until its last request ended) |
| out tok/s | completion tokens (from `usage`; content chunks where the server sends none, marked ‡) ÷ the same wall time: the aggregate decode rate |
| TTFT p50 / p99 | request sent → first content chunk, seconds |
| ITL p50 / p99 | between consecutive content chunks of one answer, milliseconds |
| RSS MB | the server's resident memory after the level (psutil; only for the child server) |
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is.",
           "Give three tips for learning a language.", "Why is the sky blue?", "Name five prime numbers.",
           "Describe a cat in one sentence.", "What does HTTP stand for?"]


def cpu_line() -> str:
    name = "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((row.split(":", 1)[1].strip() for row in f if row.startswith("model name")), "?")
    except OSError:
        name = platform.processor() or platform.machine()
    return (f"{name} ({os.cpu_count()} logical cores; torch capability {torch.backends.cpu.get_cpu_capability()}; "
            f"load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())})")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    command = [str(Path(sys.executable).with_name("llmkit")), "serve", "--port", "0", "--max-batch",
               str(args.max_batch), "--max-queued", str(args.max_queued), "--dtype", args.dtype,
               "--quantize", args.quantize,
               *(["--model", args.model] if args.model else []), *(["--threads", str(args.threads)] if args.threads else [])]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty server must never block on a full pipe
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    proc.log = log
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if selector.select(timeout=0.2):
            line = proc.stdout.readline()
            match = re.match(r"^serving (\S+) at (http://\S+)/ ", line)
            if match:
                return proc, match.group(2), match.group(1)
            if not line:
                break
    proc.kill()
    sys.exit(f"llmkit serve did not start: {server_log(proc)[-2000:]}")


def server_log(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      record: dict) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    last = first = None
    tokens, chunks, done, finished = 0, 0, False, False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record["failed"] += 1
                record["statuses"][response.status_code] = record["statuses"].get(response.status_code, 0) + 1
                await response.aread()
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    break
                finished = finished or any(c.get("finish_reason") for c in chunk.get("choices", []))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    chunks += 1
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        record["ttft"].append(now - sent)
                    else:
                        record["itl"].append(now - last)
                    last = now
    except httpx.HTTPError:
        done = False
    if done and finished:  # an answer cut off without a finish_reason (an interrupted one) is a failure
        record["ok"] += 1
        # a server that sends no usage (llama-cpp-python's ignores stream_options) streams one token a chunk
        record["tokens"] += tokens or chunks
        record["no_usage"] = record.get("no_usage", False) or not tokens
    else:
        record["failed"] += 1


async def level(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    record = {"ok": 0, "failed": 0, "tokens": 0, "ttft": [], "itl": [], "statuses": {}}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:
        started = time.perf_counter()
        end = started + seconds

        async def loop(i: int) -> None:
            n = 0
            while time.perf_counter() < end:
                await one_request(client, url, model, PROMPTS[(i + n) % len(PROMPTS)], max_tokens, record)
                n += 1

        await asyncio.gather(*(loop(i) for i in range(clients)))
        record["wall"] = time.perf_counter() - started
    return record


async def warm_up(url: str, model: str) -> None:
    """One short request first: the server's first one pays one-time costs (kernels, templates)."""
    record = {"ok": 0, "failed": 0, "tokens": 0, "ttft": [], "itl": [], "statuses": {}}
    async with httpx.AsyncClient(timeout=httpx.Timeout(600)) as client:
        await one_request(client, url, model, PROMPTS[0], 4, record)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def fmt(value: float | None, scale: float = 1.0, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value * scale, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model for llmkit serve (default: SmolLM2-135M-Instruct)")
    p.add_argument("--url", help="measure this running OpenAI-compatible server instead of starting llmkit serve")
    p.add_argument("--model-id", help="the model name to send with --url (default: the first of /v1/models)")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated client counts (default: 1,4,16,32)")
    p.add_argument("--seconds", type=float, default=30.0, help="time per concurrency level (default: 30)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--max-batch", type=int, default=16, help="llmkit serve --max-batch (default: 16)")
    p.add_argument("--max-queued", type=int, default=64, help="llmkit serve --max-queued (default: 64)")
    p.add_argument("--dtype", default="auto", help="llmkit serve --dtype (default: auto)")
    p.add_argument("--quantize", choices=("auto", "none", "int4"), default="auto",
                   help="llmkit serve --quantize: auto (the server's default) keeps a GGUF's own blocks, as "
                        "llama.cpp runs them; none dequantises every layer (default: auto)")
    p.add_argument("--threads", type=int, help="llmkit serve --threads (default: one per core)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]

    proc = None
    if args.url:
        url = args.url.rstrip("/")
        model = args.model_id or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    else:
        proc, url, model = start_server(args)
    try:
        import psutil
    except ImportError:
        psutil = None
    print("# llmkit serve load test\n")
    print(f"- CPU: {cpu_line()}")
    print(f"- server: {url} ({'llmkit serve, child process' if proc else 'given with --url'}), model {model}"
          + (f", --max-batch {args.max_batch} --max-queued {args.max_queued} --dtype {args.dtype} --quantize {args.quantize}" if proc else ""))
    if proc:
        print(f"- server's runtime line: {server_log(proc).strip().splitlines()[0]}")
    print(f"- each request: a chat prompt of ~10 words, {args.max_tokens} new tokens, greedy, streamed; "
          f"{args.seconds:g} s per level\n")
    print("| clients | ok | failed | req/s | out tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms | ITL p99 ms | RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    asyncio.run(warm_up(url, model))
    try:
        for clients in levels:
            r = asyncio.run(level(url, model, clients, args.seconds, args.max_tokens))
            rss = f"{psutil.Process(proc.pid).memory_info().rss / 2**20:.0f}" if proc and psutil else "n/a"
            print(f"| {clients} | {r['ok']} | {r['failed']}{' ' + str(r['statuses']) if r['statuses'] else ''} | "
                  f"{r['ok'] / r['wall']:.2f} | {r['tokens'] / r['wall']:.1f}{' ‡' if r.get('no_usage') else ''} | "
                  f"{fmt(quantile(r['ttft'], .5))} | "
                  f"{fmt(quantile(r['ttft'], .99))} | {fmt(quantile(r['itl'], .5), 1e3, '.1f')} | "
                  f"{fmt(quantile(r['itl'], .99), 1e3, '.1f')} | {rss} |", flush=True)
    finally:
        if proc:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"\n- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
