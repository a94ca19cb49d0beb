"""SIGKILL one rank of a two-rank `torchrun … -m llmkit train` mid-run (issue 15, "Scale out"): the other
rank and torchrun stop within the collective timeout, non-zero, the surviving rank saying why in one
`error:` line; the newest complete checkpoint loads; `torchrun … --resume` then logs, from the step it
resumes at, the very losses the run had logged before the kill.

Real torchrun (gloo on this CPU), a tiny LLaMA and the test corpus. The run is given 100000 steps and a
constant learning rate after warm-up (--min-lr-ratio 1), so its schedule does not depend on its length:
resumed with --steps M it repeats the first M steps of the killed run. Every row the killed run logged
was a step of both ranks (its metrics are averaged over them before rank 0 writes the row), so the rows
past its last checkpoint are an uninterrupted two-rank run's. The rank killed is rank 0, the one that
writes the checkpoints and the log (and holds the run directory's lock); rank 1, silent until then, is
the one to say why it stops.

DDP only: a case costs ~10 s of two cores (two torchrun launches of three processes each). FSDP2's
checkpoints are gathered whole and written by rank 0 the same way; its case passes too (see below).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import llmkit
from conftest import make_corpus
from llmkit.io.checkpoint import list_checkpoints, verify_checkpoint
from test_distributed import environ, llmkit_argv, losses, running, worker_pids

CHECKPOINT_EVERY = 6
TRAIN = ["train", "--data", "corpus", "--preset", "llama-tiny", "--batch-size", "2", "--seq-len", "32",
         "--dtype", "fp32", "--grad-accum", "2", "--eval-interval", str(CHECKPOINT_EVERY), "--eval-batches", "1",
         "--log-interval", "1", "--vocab-size", "300", "--threads", "1", "--warmup-steps", "2", "--min-lr-ratio", "1"]
# The collective timeout of the killed run, and so the bound on how long the survivor may go on: long
# enough for two ranks started together on a busy 2-core machine to meet in the first rendezvous (it
# waits as long), short enough for this test.
TIMEOUT_S = 10
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(*args: str, cwd: Path, log: Path, env: dict[str, str] = ENV) -> subprocess.Popen:
    with log.open("w") as err:
        return subprocess.Popen(llmkit_argv(*TRAIN, *args, ranks=2), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """Whatever the test asserts, nothing it started outlives it (the workers run in their own sessions)."""
    try:
        yield
    finally:
        for pid in worker_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def train_rows(out: Path) -> list[tuple[int, str, float]]:
    return [row for row in losses(out) if row[1] == "train"]


# FSDP2 (["--fsdp"]) passed the same test in 5 of 6 runs, as long as DDP's; left out for the suite's
# time. (In the sixth, the resumed run — not the killed one — ended in SIGABRT: gloo's teardown abort
# under load that commit 9c305b1 describes.)
@pytest.mark.parametrize("flags", [[]], ids=["ddp"])
def test_a_rank_killed_mid_run_stops_the_other_and_resumes_exactly(tmp_path, flags):
    make_corpus(tmp_path / "corpus")
    killed = start("--steps", "100000", "--out", "run", *flags, cwd=tmp_path, log=tmp_path / "killed.err",
                   env={**ENV, "LLMKIT_COLLECTIVE_TIMEOUT_S": str(TIMEOUT_S)})
    metrics = tmp_path / "run" / "metrics.jsonl"
    with reaped(killed):
        # Kill three steps past the first checkpoint: the next one is three steps, an evaluation and a
        # redrawn loss.png away (~0.3 s of rank 0's time alone here), so the kill lands between checkpoints.
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("train_loss") >= CHECKPOINT_EVERY + 3):
            assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.err").read_text()
            time.sleep(0.02)
        ranks = {environ(pid).get("RANK"): pid for pid in worker_pids(killed.pid)}
        survivor = ranks["1"]
        os.kill(ranks["0"], signal.SIGKILL)
        killed_at = time.monotonic()
        while running(survivor) or killed.poll() is None:
            assert time.monotonic() - killed_at < TIMEOUT_S, "the surviving rank or torchrun still runs"
            time.sleep(0.02)
    assert killed.returncode != 0
    log = (tmp_path / "killed.err").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    # one line from the survivor (torchrun's launcher adds its own report of the failed rank after it)
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: ") and "--resume" in errors[0], log

    complete = list_checkpoints(tmp_path / "run" / "checkpoints")
    for path in complete:  # whatever the kill interrupted, a directory that looks complete is complete
        verify_checkpoint(path)
    assert llmkit.load(tmp_path / "run").path == complete[-1]
    step = int(complete[-1].name.split("-")[1])
    before = train_rows(tmp_path / "run")
    last = before[-1][0]
    assert last > step, f"killed at step {last}, at a checkpoint: nothing past it to repeat"

    resumed = subprocess.run(llmkit_argv(*TRAIN, "--steps", str(last), "--out", "run", "--resume", *flags, ranks=2),
                             cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {step})" in resumed.stderr and "resuming from" in resumed.stderr, resumed.stderr
    assert train_rows(tmp_path / "run") == before  # steps step+1 … last again, bit for bit


def test_sigterm_in_a_rank_is_one_error_and_then_ignored():
    """torchrun stops the ranks left with SIGTERM: the rank leaves through the usual error path (one
    line), once; afterwards SIGTERM is ignored, so that line is not cut off."""
    from llmkit.training.distributed import RankLost, stopped_by_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RankLost, match=r"^rank 1: stopped by SIGTERM .*--resume"):
            with stopped_by_sigterm(1):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # (the handler runs at once; never reached)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: this process goes on
    finally:
        signal.signal(signal.SIGTERM, previous)
