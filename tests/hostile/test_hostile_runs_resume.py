"""Run directories a crash, a tamperer or a second process left behind (issue 18, classes 8 and 9).

Real `python -m llmkit train` subprocesses on a tiny model. A damaged metrics.jsonl, token cache or
checkpoint set is repaired with a warning line, or refused in one line, never a traceback; a resume
never restarts from step 0 without saying so; and two runs on one --out cannot both write it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_corpus
from llmkit.io.run_dir import LOCK_NAME

TINY = ("--preset", "gpt2-tiny", "--seq-len", "32", "--batch-size", "4", "--eval-interval", "2", "--eval-batches",
        "1", "--vocab-size", "300", "--threads", "1", "--log-interval", "1", "--warmup-steps", "1")


def llmkit(*args, cwd: Path, wait: bool = True):
    """A `python -m llmkit` subprocess (finished: CompletedProcess; else the running Popen)."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("LLMKIT_FAULT_AT", "LLMKIT_DEBUG")},
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *map(str, args)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, errors="replace")
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def train(run: Path, steps: int, *extra, data: str | Path = "corpus"):
    return llmkit("train", "--data", data, "--out", run, *TINY, "--steps", steps, *extra, cwd=run.parent)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in rows(run) if "train_loss" in r]


def warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def assert_one_error(result, needle: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("error: ") and needle in lines[-1], result.stderr[-2000:]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4); tests work on copies of it."""
    root = tmp_path_factory.mktemp("hostile_runs")
    make_corpus(root / "corpus")
    result = train(root / "base", 4)
    assert result.returncode == 0, result.stderr
    return root / "base"


@pytest.fixture
def run(base_run: Path) -> Path:
    copy = base_run.parent / f"run_{time.monotonic_ns()}"
    shutil.copytree(base_run, copy)
    return copy


def test_partial_last_metrics_line_is_cut_on_resume(run: Path) -> None:
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "train_loss": 1.2')  # a write cut short by a crash
    result = train(run, 6, "--resume")
    assert result.returncode == 0, result.stderr
    assert any("unreadable" in w for w in warnings(result))
    assert train_steps(run) == [1, 2, 3, 4, 5, 6]  # every line parses, no step twice


def test_a_damaged_middle_row_is_one_line_naming_it(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]  # not something a crash does: appends are whole lines
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert_one_error(train(run, 6, "--resume"), "metrics.jsonl:2:")


def test_rows_past_the_checkpoint_are_dropped_atomically(run: Path) -> None:
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # the newest checkpoint lost: rows 3-4 are ahead of it
    result = train(run, 4, "--resume")
    assert result.returncode == 0, result.stderr
    assert any("logged after step 2" in w for w in warnings(result))
    assert train_steps(run) == [1, 2, 3, 4]
    assert not list(run.glob(".metrics.jsonl.*"))  # the temp file of the rewrite is gone


def test_rows_of_an_attempt_killed_before_its_first_checkpoint_are_not_duplicated(run: Path) -> None:
    shutil.rmtree(run / "checkpoints")
    result = train(run, 4)  # a fresh start (no --resume): the old rows describe nothing that exists now
    assert result.returncode == 0, result.stderr
    assert any("before its first checkpoint" in w for w in warnings(result))
    assert train_steps(run) == [1, 2, 3, 4]


def test_checkpoints_without_manifests_are_never_restarted_over(run: Path) -> None:
    for manifest in run.glob("checkpoints/step-*/manifest.json"):
        manifest.unlink()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = train(run, 8, "--resume")
    assert_one_error(result, "no readable manifest.json and no complete checkpoint remains")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing overwritten


def test_interrupted_saves_only_restart_with_a_message(run: Path) -> None:
    for ckpt in (run / "checkpoints").iterdir():
        ckpt.rename(ckpt.with_name(ckpt.name + ".tmp"))
    result = train(run, 2, "--resume")
    assert result.returncode == 0, result.stderr
    assert any("no complete checkpoint" in w and "starting from step 0" in w for w in warnings(result))


def test_a_corrupt_newest_checkpoint_is_named_when_passed_over(run: Path) -> None:
    weights = run / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    result = train(run, 4, "--resume")
    assert result.returncode == 0, result.stderr
    assert any("step-00000004" in w and "resuming from the older step-00000002" in w for w in warnings(result))


def test_unwritable_metrics_is_one_line(run: Path) -> None:
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()  # appending to it fails even for root
    result = train(run, 6, "--resume")
    assert_one_error(result, "metrics.jsonl")


def test_tampered_token_cache_is_rebuilt_not_trusted(run: Path) -> None:
    cache = run / "data" / "train.bin"
    data = bytearray(cache.read_bytes())
    data[100:4100] = b"\xff" * 4000  # ids far past the 300-token vocabulary
    cache.write_bytes(bytes(data))
    result = train(run, 6, "--resume")
    assert result.returncode == 0, result.stderr
    assert any("train.bin" in w and "checksum" in w for w in warnings(result))
    meta = json.loads((run / "data" / "train.json").read_text())
    assert hashlib.blake2b(cache.read_bytes()).hexdigest() == meta["blake2b"]
    assert cache.read_bytes() != bytes(data)


def test_a_second_run_on_a_busy_out_is_refused_and_the_first_finishes(base_run: Path) -> None:
    run = base_run.parent / "busy"
    # 30 s of training (then a checkpoint and exit 0): long enough for both refusals below to happen
    first = llmkit("train", "--data", "corpus", "--out", run, *TINY, "--steps", "100000", "--eval-interval", "100",
                   "--max-minutes", "0.5", cwd=run.parent, wait=False)
    lock = run / LOCK_NAME
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for extra in ((), ("--resume",)):
        second = train(run, 4, *extra)
        assert_one_error(second, f"in use by another llmkit run (pid {first.pid})")
        assert len(second.stderr.strip().splitlines()) == 1
    assert first.poll() is None, "the first run ended before the second was refused; the test proves nothing"
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    steps = train_steps(run)
    assert steps == list(range(1, steps[-1] + 1))  # the first run's log is whole and its own
    assert (run / "checkpoints" / f"step-{steps[-1]:08d}" / "manifest.json").exists()
    assert not lock.exists()  # released and removed at the end
