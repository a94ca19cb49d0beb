"""The load-test gates of benchmarks/serve_soak.py (RELIABILITY.md S9), in small: a short soak against a real
server records a baseline for this CPU class and model in a temporary file, and a later run measured
against a baseline far faster than this machine fails, naming the regression. (The full 60 s, 32-client
run and the committed baseline are benchmarks/serve_soak.py's; this only proves the mechanism.)"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import pytest

import llmkit
from serve_helpers import MODEL_ID, running_server, save_scripted_model

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_soak.py"


@pytest.fixture(scope="module")
def soak():
    pytest.importorskip("psutil")  # the script reads the server's memory with it (a dependency of accelerate)
    spec = importlib.util.spec_from_file_location("serve_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_records_a_baseline_and_a_slower_run_fails_against_it(soak, tmp_path, capsys):
    lm = llmkit.load(save_scripted_model(tmp_path / "scripted"))  # 4096 tokens of context: no request refused
    baseline = tmp_path / "baseline.json"
    # a busy 2-core CI machine runs clients and server in one process here: the /health and memory limits are
    # loosened (the gates' logic is what is tested; their real values are the script's defaults)
    short = ["--clients", "3", "--seconds", "0.8", "--warmup", "0.2", "--settle", "0", "--min-tokens", "2",
             "--max-tokens", "6", "--baseline", str(baseline), "--health-limit-ms", "5000", "--rss-tolerance", "1"]
    with running_server(lm, max_batch=4, max_queued=16) as url:
        assert soak.main(["--url", url, "--pid", str(os.getpid()), *short, "--record-baseline"]) == 0
        out = capsys.readouterr().out
        assert "no baseline for this CPU class and model" in out and "baseline recorded" in out
        for figure in ("TTFT ms", "TPOT ms", "ITL ms", "E2EL ms", "peak concurrency", "output tok/s", "RSS after"):
            assert figure in out
        entries = json.loads(baseline.read_text())
        key = soak.baseline_key(MODEL_ID)
        assert list(entries) == [key] and entries[key]["p99_ttft_s"] > 0 and entries[key]["p99_itl_s"] > 0
        entries[key]["p99_ttft_s"] /= 1000  # as if recorded on a machine 1000× faster
        entries[key]["p99_itl_s"] /= 1000
        baseline.write_text(json.dumps(entries))
        assert soak.main(["--url", url, *short]) == 1
        out = capsys.readouterr().out
    assert "P99 TTFT ≤ 1.5× baseline: FAIL" in out and "P99 ITL ≤ 1.5× baseline: FAIL" in out
    assert "0 failed requests: pass" in out and "RSS not measured" in out


def test_a_baseline_for_other_settings_is_not_compared(soak):
    args = argparse.Namespace(**{name: None for name in soak.COMPARED}, regression=1.5)
    tally = {"ttft": [0.5], "itl": [0.1]}
    entry = {"settings": {**soak.settings_of(args), "clients": 99}, "p99_ttft_s": 0.001, "p99_itl_s": 0.001}
    gates, lines = soak.compare(tally, entry, args, "here")
    assert gates == {} and "other settings" in lines[0] and "'clients': (99, None)" in lines[0]
    gates, _ = soak.compare(tally, {**entry, "settings": soak.settings_of(args)}, args, "here")
    assert gates == {"P99 TTFT ≤ 1.5× baseline": False, "P99 ITL ≤ 1.5× baseline": False}
