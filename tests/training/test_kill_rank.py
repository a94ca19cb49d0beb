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

Ctrl-C (`test_ctrl_c_…`) the same way: the terminal's SIGINT goes to torchrun's process group, and
torchrun passes it on to the ranks (each in its own session).

DDP only: a case costs ~10 s of two cores (two torchrun launches of three processes each). FSDP2's
checkpoints are gathered whole and written by rank 0 the same way; its case passes too (see below).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import llmkit
from conftest import make_corpus
from llmkit.io.checkpoint import list_checkpoints, verify_checkpoint
from test_distributed import environ, llmkit_argv, losses, running, worker_pids

CHECKPOINT_EVERY = 20
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


def start_past_a_checkpoint(tmp_path: Path, flags: list[str]) -> subprocess.Popen:
    """A 2-rank run, returned three logged steps past its first checkpoint, so that what the test does
    next lands between checkpoints: the next one is 17 steps away (a step takes ~12 ms here, 2 cores
    under load; with checkpoints 6 steps apart a signal ~30 ms late came after the next one)."""
    make_corpus(tmp_path / "corpus")
    run = start("--steps", "100000", "--out", "run", *flags, cwd=tmp_path, log=tmp_path / "killed.err",
                env={**ENV, "LLMKIT_COLLECTIVE_TIMEOUT_S": str(TIMEOUT_S)})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("train_loss") >= CHECKPOINT_EVERY + 3):
        if run.poll() is not None or time.monotonic() > deadline:
            with reaped(run):
                pytest.fail((tmp_path / "killed.err").read_text())
        time.sleep(0.005)
    return run


def wait_for_the_end(run: subprocess.Popen, workers: list[int], what: str) -> float:
    """Seconds until torchrun and its ranks have all ended; at most TIMEOUT_S."""
    since = time.monotonic()
    while any(map(running, workers)) or run.poll() is None:
        assert time.monotonic() - since < TIMEOUT_S, f"a rank or torchrun still runs {TIMEOUT_S} s after {what}"
        time.sleep(0.02)
    return time.monotonic() - since


def assert_left_resumable(tmp_path: Path, flags: list[str]) -> int:
    """Every complete checkpoint verifies, the newest loads, and `torchrun … --resume` logs the stopped
    run's losses past it bit for bit. Returns the newest checkpoint's step."""
    complete = list_checkpoints(tmp_path / "run" / "checkpoints")
    for path in complete:  # whatever the stop interrupted, a directory that looks complete is complete
        verify_checkpoint(path)
    assert llmkit.load(tmp_path / "run").path == complete[-1]
    step = int(complete[-1].name.split("-")[1])
    before = train_rows(tmp_path / "run")
    last = before[-1][0]
    assert last > step, f"stopped at step {last}, at a checkpoint: nothing past it to repeat"

    resumed = subprocess.run(llmkit_argv(*TRAIN, "--steps", str(last), "--out", "run", "--resume", *flags, ranks=2),
                             cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"(step {step})" in resumed.stderr and "resuming from" in resumed.stderr, resumed.stderr
    assert train_rows(tmp_path / "run") == before  # steps step+1 … last again, bit for bit
    return step


# FSDP2 (["--fsdp"]) passed the same test in 5 of 6 runs, as long as DDP's; left out for the suite's
# time. (In the sixth, the resumed run — not the killed one — ended in SIGABRT: gloo's teardown abort
# under load that commit 9c305b1 describes.)
@pytest.mark.parametrize("flags", [[]], ids=["ddp"])
def test_a_rank_killed_mid_run_stops_the_other_and_resumes_exactly(tmp_path, flags):
    killed = start_past_a_checkpoint(tmp_path, flags)
    with reaped(killed):
        ranks = {environ(pid).get("RANK"): pid for pid in worker_pids(killed.pid)}
        os.kill(ranks["0"], signal.SIGKILL)  # the writer
        wait_for_the_end(killed, [ranks["1"]], "the kill")
    assert killed.returncode != 0
    log = (tmp_path / "killed.err").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    # one line from the survivor (torchrun's launcher adds its own report of the failed rank after it)
    assert len(errors) == 1 and errors[0].startswith("error: rank 1: ") and "--resume" in errors[0], log
    assert_left_resumable(tmp_path, flags)


TORCHRUN_LOG = re.compile(r"^[DIWE]\d{4} ")  # torchrun's own log lines ("W1205 13:35:10.89 … shutting down workers")
EVAL_LINE = re.compile(r"^step \d+: val loss ")  # rank 0 may finish an evaluation as the signal comes


def test_ctrl_c_on_torchrun_stops_every_rank_and_leaves_the_last_checkpoint(tmp_path):
    """Ctrl-C: SIGINT to torchrun's foreground process group, as a terminal sends it. torchrun passes it
    to each rank once, waits for them (SIGKILL after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s) and exits 1
    with a traceback of its own SignalException: torchrun's, which llmkit cannot avoid (it is raised in
    torchrun's agent, not in a rank). The ranks leave as one process does on Ctrl-C — rank 0 prints
    its `stopped early … interrupted` line and `interrupted` (exit 130), the other rank nothing — without
    saving (a rank cannot know where the others stopped), so --resume goes back to the last checkpoint."""
    run = start_past_a_checkpoint(tmp_path, [])
    log_path = tmp_path / "killed.err"
    with reaped(run):
        workers = worker_pids(run.pid)
        assert len(workers) == 2
        before = len(log_path.read_text())
        os.killpg(run.pid, signal.SIGINT)
        # Bound: a rank leaves at its next Python instruction, or when the collective it is in fails (at
        # once when the other rank has gone, else after the collective timeout): within TIMEOUT_S.
        wait_for_the_end(run, workers, "Ctrl-C")
    assert run.returncode == 1  # torchrun's uncaught SignalException (the ranks' own exit is 130)
    log = log_path.read_text()
    assert log.count("Traceback") == 1 and log.rstrip().splitlines()[-1].startswith(
        "torch.distributed.elastic.multiprocessing.api.SignalException: "), log  # torchrun's alone
    tail = log[before:].split("Traceback (most recent call last):")[0]
    ranks_lines = [line for line in tail.splitlines()
                   if line.strip() and not TORCHRUN_LOG.match(line) and not EVAL_LINE.match(line)]
    step = assert_left_resumable(tmp_path, [])
    assert len(ranks_lines) == 2 and ranks_lines[1] == "interrupted", log
    assert re.match(rf"stopped early at step \d+ of 100000: interrupted \(under torchrun nothing is saved at "
                    rf"Ctrl-C: --resume goes back to the checkpoint of step {step}\); ", ranks_lines[0]), log


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
