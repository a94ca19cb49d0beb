"""The server's numbers in Prometheus' text format (version 0.0.4) for `GET /metrics`.

Counters and histograms are updated on the event loop's thread only (the routes and the guard run
there), so they need no lock; the engine's own gauges (running rows, queued requests) are read from
`engine.stats()` when /metrics is asked for.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import Iterable

# Seconds. Time to first token spans a queued request on a busy CPU; inter-token latency one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: Iterable[float]) -> None:
        self.name, self.help_text, self.buckets = name, help_text, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1  # `le` buckets: a value on a bound counts in it
        self.total += seconds

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip((*map(_number, self.buckets), "+Inf"), self.counts):
            running += count
            out.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        out += [f"{self.name}_sum {_number(self.total)}", f"{self.name}_count {running}"]
        return out


class Metrics:
    """What /metrics reports, beside the engine's gauges."""

    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()  # (route, status) → count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cancelled = 0  # requests whose client went away before the answer ended
        self.rejected = 0  # 429: the engine's running batch and queue were full
        self.queue_timeouts = 0  # 503: waited longer than the queue timeout for a batch row
        self.ttft = Histogram("llmkit_time_to_first_token_seconds",
                              "From a request's arrival to its first generated token.", TTFT_BUCKETS)
        self.itl = Histogram("llmkit_inter_token_latency_seconds",
                             "Between consecutive tokens of one answer.", ITL_BUCKETS)
        self.latency = Histogram("llmkit_request_duration_seconds",
                                 "From a generation request's arrival to its last token.", LATENCY_BUCKETS)

    def render(self, engine_stats: dict[str, int]) -> str:
        lines = ["# HELP llmkit_http_responses_total HTTP responses by route and status.",
                 "# TYPE llmkit_http_responses_total counter"]
        for (route, status), count in sorted(self.responses.items()):
            lines.append(f'llmkit_http_responses_total{{route="{route}",status="{status}"}} {count}')
        counters = [
            ("llmkit_prompt_tokens_total", "Prompt tokens of finished requests.", self.prompt_tokens),
            ("llmkit_generation_tokens_total", "Tokens generated for finished requests.", self.generation_tokens),
            ("llmkit_requests_cancelled_total", "Requests cancelled because their client disconnected.",
             self.cancelled),
            ("llmkit_requests_rejected_total", "Requests refused with 429: batch and queue full.", self.rejected),
            ("llmkit_requests_queue_timeout_total", "Requests answered 503: they waited past the queue timeout.",
             self.queue_timeouts),
            ("llmkit_engine_requests_total", "Requests the engine accepted.", engine_stats.get("requests_total", 0)),
            ("llmkit_engine_tokens_total", "Tokens the engine generated.", engine_stats.get("tokens_total", 0)),
            ("llmkit_draft_tokens_proposed_total", "Tokens a --draft model guessed (speculative decoding).",
             engine_stats.get("draft_proposed", 0)),
            ("llmkit_draft_tokens_accepted_total", "Guessed tokens the model kept.", engine_stats.get("draft_accepted", 0)),
        ]
        for name, help_text, value in counters:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        gauges = [("llmkit_requests_running", "Requests in the running batch.", engine_stats.get("running", 0)),
                  ("llmkit_requests_queued", "Requests waiting for a row in the batch.", engine_stats.get("queued", 0))]
        for name, help_text, value in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        for histogram in (self.ttft, self.itl, self.latency):
            lines += histogram.lines()
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value))
