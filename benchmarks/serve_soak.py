#!/usr/bin/env python
"""Soak and load gates of `llmkit serve` (issue 14, RELIABILITY.md S7–S9): many streaming chat clients for a
fixed time, a share of which hang up mid-answer, against SmolLM2-135M-Instruct (or --model) in a child
process (or any server with --url). It reports vLLM-style figures and passes only if every gate holds:
no failed request, no 5xx, no truncated stream, /health always under --health-limit-ms, the server's
memory after the soak at most --rss-tolerance above its level after the warm-up, and P99 TTFT and P99 ITL
within --regression × the baseline recorded for this CPU class and model.

    .venv/bin/python benchmarks/serve_soak.py                       # 32 clients, 60 s, 30 % disconnect
    .venv/bin/python benchmarks/serve_soak.py --record-baseline     # the same, then store its P99s
    .venv/bin/python benchmarks/serve_soak.py --clients 8 --seconds 10 --warmup 5

Baselines: --baseline (default benchmarks/baselines/serve_soak.json) holds one entry per CPU class
(torch.backends.cpu.get_cpu_capability()) and model, with the settings it was recorded with. A run
compares its P99s with the entry for its own CPU class and model when the load settings match, and says
plainly when there is none (or the settings differ): the latency gate is then not applied. Record on an
otherwise idle machine: --record-baseline refuses a run whose other gates failed.

How memory is measured (psutil, the server's resident set size; --pid with --url): a first phase of
--warmup seconds runs the same load, so the start level already holds the loaded weights, the batch's KV
buffers at their working size, the allocator's arenas and every kernel's one-time state; then, once the
engine reports no running and no queued request and --settle seconds have passed, "start" is the median
of ten samples 0.1 s apart. "peak" is the largest sample (every 0.25 s) during the soak, "after" the
median taken the same way as "start" once the clients have left and the engine is idle again.

Each client loops while the soak lasts: one streaming chat request (a prompt drawn from benchmarks/
serve.py's PROMPTS, --min-tokens to --max-tokens new tokens, greedy, stream_options.include_usage); with
probability --disconnect it closes the connection after 1–12 content chunks instead of reading to
`data: [DONE]` (counted apart: hanging up is the client's choice, not a failure). A probe asks GET
/health every 0.25 s and keeps the slowest answer.

Figures, over the requests that completed: TTFT (request sent → first content chunk), ITL (between
content chunks), TPOT ((E2EL − TTFT) / (output tokens − 1)), E2EL (request sent → `[DONE]`), each as
mean, median and P99; request and output-token throughput over the soak's wall time; peak concurrency
(requests in flight at once, seen by the clients). Exit status 1 if any gate fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import PROMPTS, cpu_line, quantile, server_log, start_server  # noqa: E402  (benchmarks/serve.py)

BASELINE = Path(__file__).resolve().parent / "baselines" / "serve_soak.json"
# Load settings a baseline is only comparable under (the run's length is not among them: P99s of a
# steady load do not depend on how long it lasts)
COMPARED = ("clients", "disconnect", "min_tokens", "max_tokens", "max_batch", "max_queued", "dtype", "quantize",
            "threads", "url")


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


def steady_rss(proc: psutil.Process | None) -> float | None:
    if proc is None:
        return None
    samples = []
    for _ in range(10):
        samples.append(proc.memory_info().rss)
        time.sleep(0.1)
    return statistics.median(samples) / 2**20


async def one_request(client: httpx.AsyncClient, url: str, model: str, rng: random.Random, args: argparse.Namespace,
                      tally: dict) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": rng.randint(args.min_tokens, args.max_tokens), "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    leave_after = rng.randint(1, 12) if rng.random() < args.disconnect else None
    chunks, done, tokens, gaps = 0, False, 0, []
    sent = last = time.perf_counter()
    first = None
    tally["in_flight"] += 1
    tally["peak_concurrency"] = max(tally["peak_concurrency"], tally["in_flight"])
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
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    tally["error_events"] += 1
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if not any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    tally["disconnected"] += 1
                    return  # leaving the `async with` unread closes the connection: the server sees a hang-up
    except httpx.HTTPError as exc:
        tally["transport_errors"].append(type(exc).__name__)
        return
    finally:
        tally["in_flight"] -= 1
    if not done:
        tally["truncated"] += 1
        return
    tally["completed"] += 1
    tally["tokens"] += tokens
    end = time.perf_counter()
    if first is not None:
        tally["ttft"].append(first - sent)
        tally["itl"] += gaps
        if tokens > 1:
            tally["tpot"].append((end - first) / (tokens - 1))
    tally["e2el"].append(end - sent)


async def load(url: str, model: str, args: argparse.Namespace, seconds: float, seed: int,
               proc: psutil.Process | None = None) -> dict:
    tally = {"status": {}, "completed": 0, "disconnected": 0, "truncated": 0, "error_events": 0, "tokens": 0,
             "transport_errors": [], "peak_rss": 0.0, "health": [], "ttft": [], "itl": [], "tpot": [], "e2el": [],
             "in_flight": 0, "peak_concurrency": 0}
    started = time.monotonic()
    end = started + seconds
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as client:

        async def user(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < end:
                await one_request(client, url, model, rng, args, tally)

        async def watch() -> None:
            while time.monotonic() < end:
                sent = time.perf_counter()
                try:
                    status = (await client.get(url + "/health")).status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all: a failed probe
                tally["health"].append((time.perf_counter() - sent, status))
                if proc is not None:
                    tally["peak_rss"] = max(tally["peak_rss"], proc.memory_info().rss / 2**20)
                await asyncio.sleep(0.25)

        await asyncio.gather(watch(), *(user(i) for i in range(args.clients)))
    tally["wall"] = time.monotonic() - started
    return tally


# ---- figures, gates and the baseline ------------------------------------------------------------------

def p99(values: list[float]) -> float | None:
    return quantile(values, 0.99)


def latency_rows(t: dict) -> list[str]:
    rows = []
    for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2EL", "e2el")):
        values = t[key]
        cells = [f"{v * 1e3:.1f}" for v in (statistics.fmean(values), statistics.median(values), p99(values))] \
            if values else ["n/a"] * 3
        rows.append(f"| {name} ms | {' | '.join(cells)} |")
    return rows


def baseline_key(model: str) -> str:
    return f"{torch.backends.cpu.get_cpu_capability()} {model}"


def settings_of(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in COMPARED}


def read_baselines(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def compare(t: dict, entry: dict | None, args: argparse.Namespace, where: str) -> tuple[dict[str, bool], list[str]]:
    """The latency gates against `entry` (none when there is nothing comparable) and lines saying why."""
    if entry is None:
        return {}, [f"no baseline for this CPU class and model ({where}): P99 TTFT/ITL not compared; record one "
                    "on an idle machine with --record-baseline"]
    if entry["settings"] != settings_of(args):
        differ = {k: (entry["settings"].get(k), v) for k, v in settings_of(args).items() if entry["settings"].get(k) != v}
        return {}, [f"the baseline ({where}) was recorded with other settings {differ} (baseline, now): P99 "
                    "TTFT/ITL not compared"]
    gates, lines = {}, []
    for name, key in (("P99 TTFT", "ttft"), ("P99 ITL", "itl")):
        now, then = p99(t[key]), entry[f"p99_{key}_s"]
        ok = now is not None and now <= args.regression * then
        gates[f"{name} ≤ {args.regression:g}× baseline"] = ok
        lines.append(f"{name}: {now * 1e3 if now is not None else float('nan'):.1f} ms now, {then * 1e3:.1f} ms "
                     f"baseline ({now / then if now else float('nan'):.2f}×)")
    return gates, lines


def record(path: Path, key: str, t: dict, args: argparse.Namespace) -> None:
    baselines = read_baselines(path)
    baselines[key] = {"p99_ttft_s": p99(t["ttft"]), "p99_itl_s": p99(t["itl"]), "settings": settings_of(args),
                      "cpu": cpu_line().split(" (")[0], "cores": os.cpu_count(), "torch": torch.__version__,
                      "seconds": args.seconds, "requests": t["completed"],
                      "recorded": datetime.date.today().isoformat()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(baselines.items())), indent=1) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model for llmkit serve (default: SmolLM2-135M-Instruct)")
    p.add_argument("--url", help="soak this running server instead of starting llmkit serve")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default: 32)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the soak (default: 60)")
    p.add_argument("--warmup", type=float, default=15.0, help="the same load first, unmeasured (default: 15)")
    p.add_argument("--settle", type=float, default=5.0, help="idle seconds before each RSS reading (default: 5)")
    p.add_argument("--disconnect", type=float, default=0.3, help="share of requests that hang up (default: 0.3)")
    p.add_argument("--min-tokens", type=int, default=16, help="fewest new tokens a request asks for (default: 16)")
    p.add_argument("--max-tokens", type=int, default=96, help="most new tokens a request asks for (default: 96)")
    p.add_argument("--rss-tolerance", type=float, default=0.05,
                   help="allowed growth (after − start) / start of the server's memory (default: 0.05)")
    p.add_argument("--health-limit-ms", type=float, default=100.0, help="slowest /health allowed (default: 100)")
    p.add_argument("--baseline", type=Path, default=BASELINE, help=f"baseline file (default: {BASELINE.name} in "
                   "benchmarks/baselines)")
    p.add_argument("--record-baseline", action="store_true", help="store this run's P99s as the baseline for this "
                   "CPU class and model (only if its other gates pass)")
    p.add_argument("--regression", type=float, default=1.5, help="P99s allowed, × baseline (default: 1.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=16, help="llmkit serve --max-batch (default: 16)")
    p.add_argument("--max-queued", type=int, default=64, help="llmkit serve --max-queued (default: 64)")
    p.add_argument("--dtype", default="auto", help="llmkit serve --dtype (default: auto)")
    p.add_argument("--quantize", choices=("auto", "none", "int4"), default="none",
                   help="llmkit serve --quantize (default: none, the setting of the committed baseline)")
    p.add_argument("--threads", type=int, help="llmkit serve --threads (default: one per core)")
    args = p.parse_args(argv)
    if args.url:
        server, url = None, args.url.rstrip("/")
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        proc = psutil.Process(args.pid) if args.pid else None
        args.max_batch = args.max_queued = args.dtype = args.quantize = args.threads = None  # the server's own
        args.url = "external"  # a baseline's settings: not comparable with a child server's
    else:
        server, url, model = start_server(args)
        proc = psutil.Process(server.pid)
        args.url = None
    try:
        print("# llmkit serve soak\n")
        print(f"- CPU: {cpu_line()}")
        print(f"- server: {url}, model {model}" + (f" (llmkit serve, child process), --max-batch {args.max_batch} "
              f"--max-queued {args.max_queued} --dtype {args.dtype} --quantize {args.quantize}; runtime line: "
              f"{server_log(server).strip().splitlines()[0]}" if server else " (given with --url)"))
        print(f"- {args.clients} streaming clients, {args.seconds:g} s after a {args.warmup:g} s warm-up; "
              f"{args.disconnect:.0%} of requests hang up after 1–12 chunks; {args.min_tokens}–{args.max_tokens} "
              "new tokens, greedy\n", flush=True)
        loaded = proc.memory_info().rss / 2**20 if proc else None
        asyncio.run(load(url, model, args, args.warmup, args.seed + 1))
        wait_idle(url)
        time.sleep(args.settle)
        start = steady_rss(proc)
        cancelled_before = gauges(url)["llmkit_requests_cancelled_total"]
        t = asyncio.run(load(url, model, args, args.seconds, args.seed, proc))
        drained = wait_idle(url)
        cancelled = gauges(url)["llmkit_requests_cancelled_total"] - cancelled_before
        time.sleep(args.settle)
        after = steady_rss(proc)
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(20)
            except Exception:  # noqa: BLE001 - a server that will not stop is killed
                server.kill()
    return report(t, args, model, loaded, start, after, cancelled, drained)


def report(t: dict, args: argparse.Namespace, model: str, loaded: float | None, start: float | None,
           after: float | None, cancelled: float, drained: float) -> int:
    five_xx = sum(n for status, n in t["status"].items() if status >= 500)
    refused = sum(n for status, n in t["status"].items() if status != 200)
    broken = t["truncated"] + t["error_events"] + len(t["transport_errors"])
    slowest = max((s for s, _ in t["health"]), default=float("nan"))
    health_ok = bool(t["health"]) and all(s * 1e3 < args.health_limit_ms and code == 200 for s, code in t["health"])
    growth = None if start is None else (after - start) / start
    mb = lambda v: "n/a" if v is None else f"{v:.0f} MB"  # noqa: E731
    print("| successful | failed | hung up (server counted) | 5xx | truncated streams | duration | req/s | "
          "output tok/s | peak concurrency |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {t['completed']} | {refused + broken} | {t['disconnected']} ({cancelled:.0f}) | {five_xx} | {broken} | "
          f"{t['wall']:.1f} s | {t['completed'] / t['wall']:.2f} | {t['tokens'] / t['wall']:.1f} | "
          f"{t['peak_concurrency']} |\n")
    print("| over completed requests | mean | median | P99 |\n|---|---:|---:|---:|")
    print("\n".join(latency_rows(t)) + "\n")
    print("| /health probes | slowest /health | RSS loaded | RSS start | RSS peak | RSS after | after vs start | "
          "rows freed after |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(t['health'])} | {slowest * 1e3:.0f} ms | {mb(loaded)} | {mb(start)} | "
          f"{mb(t['peak_rss'] if start is not None else None)} | {mb(after)} | "
          f"{'n/a' if growth is None else f'{growth:+.1%}'} | {drained:.2f} s |\n")
    gates = {"0 failed requests": refused + broken == 0, "0 5xx": five_xx == 0, "0 truncated streams": broken == 0,
             f"/health < {args.health_limit_ms:g} ms throughout": health_ok}
    if growth is not None:
        gates[f"RSS growth after warm-up ≤ {args.rss_tolerance:.0%}"] = growth <= args.rss_tolerance
    else:
        print("- RSS not measured (--url without --pid): its gate is not applied")
    key = baseline_key(model)
    latency, lines = compare(t, read_baselines(args.baseline).get(key), args, f"{key!r} in {args.baseline}")
    for line in lines:
        print(f"- {line}")
    status = 0 if all(gates.values()) and all(latency.values()) else 1
    for name, ok in {**gates, **latency}.items():
        print(f"- {name}: {'pass' if ok else 'FAIL'}")
    if t["transport_errors"]:
        print(f"- transport errors: {sorted(set(t['transport_errors']))}")
    if args.record_baseline:
        if not all(gates.values()) or not t["ttft"] or not t["itl"]:
            print("- baseline NOT recorded: this run failed a gate" if t["itl"] else
                  "- baseline NOT recorded: no completed answer of two tokens or more to measure")
            return 1
        record(args.baseline, key, t, args)
        print(f"- baseline recorded for {key!r} in {args.baseline}")
        status = 0
    print(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return status


if __name__ == "__main__":
    sys.exit(main())
