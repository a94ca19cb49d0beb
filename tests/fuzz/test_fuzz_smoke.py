"""CI smoke of the fuzz harnesses (RELIABILITY.md L10): a short seeded run of each must find nothing
(no exception outside the allowed typed errors, no multi-line message, no input over the time limit).
LLMKIT_FUZZ_SECONDS sets the budget per harness (default 8 s here; long runs: tests/fuzz/run_fuzz.py)."""

import os

import pytest

from fuzz_harnesses import HARNESSES, fuzz

SECONDS = float(os.environ.get("LLMKIT_FUZZ_SECONDS", "8"))


@pytest.mark.parametrize("name", list(HARNESSES))
def test_short_fuzz_run_finds_nothing(name):
    report = fuzz(HARNESSES[name], seconds=SECONDS, seed=1234)
    assert not report.findings, "\n".join(f.problem for f in report.findings)
    assert report.runs >= 20 and report.rejected > 0  # it really ran, and really hit the error paths
