"""kill -9 during checkpoint saves and at random moments, then resume (RELIABILITY T1–T3): the previous
complete checkpoint always survives and resuming reproduces an uninterrupted run."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import llmkit
from llmkit.cli import main as cli_main
from llmkit.io.checkpoint import (FAULT_ENV, latest_checkpoint, list_checkpoints, load_tensors, read_json,
                                  verify_checkpoint)
from llmkit.training.config import TrainConfig
from llmkit.training.pretrain import pretrain
from train_helpers import TOL, _one_thread, assert_losses_equal, corpus, max_tensor_diff, train_losses  # noqa: F401 (corpus, _one_thread: fixtures)
from llmkit_command import llmkit_cmd


# -- kill -9 during a checkpoint save (T2), resumed exactly (T3) ----------------------------------

KILL_STAGES = ("after_first_file", "before_manifest", "after_manifest", "after_rename")
KILL_FLAGS = dict(preset="gpt2-tiny", batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, min_lr_ratio=1.0,
                  eval_interval=5, eval_batches=2, log_interval=1, vocab_size=320, seed=11, threads=1)


def train_args(corpus: Path, out: Path, steps: int) -> list[str]:
    """`llmkit train` arguments equivalent to TrainConfig(steps=steps, **KILL_FLAGS)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in KILL_FLAGS.items()]
    return ["train", "--data", str(corpus), "--out", str(out), "--steps", str(steps), *flags]


def start_parallel(jobs: list[tuple[list[str], dict[str, str]]], cwd: Path) -> list[subprocess.Popen]:
    env_base = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env_base["OMP_NUM_THREADS"] = "1"
    return [subprocess.Popen(argv, cwd=cwd, env={**env_base, **extra}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for argv, extra in jobs]


def finish_parallel(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def kill_runs(corpus, tmp_path_factory):
    """A 5-step run (one complete checkpoint), copied per stage; each copy is resumed towards 15
    steps by a `llmkit train --resume` subprocess that is SIGKILLed at its first save (step 10) at
    one stage, then resumed again cleanly (in-process, through the same CLI entry point)."""
    root = tmp_path_factory.mktemp("kill")
    base, ref = root / "base", root / "reference"
    pretrain([corpus], base, TrainConfig(steps=5, **KILL_FLAGS))
    runs = {}
    for stage in KILL_STAGES:
        runs[stage] = root / stage
        shutil.copytree(base, runs[stage])
    procs = start_parallel([([*llmkit_cmd(), *train_args(corpus, runs[s], 15), "--resume"], {FAULT_ENV: s})
                            for s in KILL_STAGES], cwd=root)
    pretrain([corpus], ref, TrainConfig(steps=15, **KILL_FLAGS))  # the uninterrupted run, meanwhile
    killed = finish_parallel(procs)
    after_kill, resumed = {}, {}
    for stage, result in zip(KILL_STAGES, killed):
        try:
            loaded = llmkit.load(runs[stage]).path.name
        except Exception as exc:  # reported by the test, not here
            loaded = f"load failed: {exc!r}"
        entries = sorted(p.name for p in (runs[stage] / "checkpoints").iterdir())
        after_kill[stage] = dict(result=result, entries=entries, loaded=loaded)
        if result[0] != -9:
            continue
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main([*train_args(corpus, runs[stage], 15), "--resume"])
        resumed[stage] = (rc, err.getvalue())
    return dict(runs=runs, ref=ref, after_kill=after_kill, resumed=resumed)


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_kill_during_save_then_resume(kill_runs, stage):
    run = kill_runs["runs"][stage]
    info = kill_runs["after_kill"][stage]
    rc, _, err = info["result"]
    assert rc == -9, f"expected SIGKILL at {stage}, got rc={rc}\n{err[-2000:]}"
    committed = stage == "after_rename"
    newest = "step-00000010" if committed else "step-00000005"
    assert "step-00000005" in info["entries"], "the previous complete checkpoint must survive"
    assert info["loaded"] == newest, f"llmkit.load after kill at {stage}: {info['loaded']}"

    rc, err = kill_runs["resumed"][stage]
    assert rc == 0, err[-3000:]
    resumed_from = 10 if committed else 5
    assert re.search(rf"resuming from \S*{newest} \(step {resumed_from}\)", err), err[-2000:]
    entries = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert entries[-1] == "step-00000015" and all(re.fullmatch(r"step-\d{8}", e) for e in entries), \
        f"crash leftovers not cleaned up: {entries}"
    final = latest_checkpoint(run / "checkpoints")
    assert read_json(final / "train_state.json")["step"] == 15
    # metrics.jsonl reads as one run, and the kill + resume changed no loss.
    assert_losses_equal(train_losses(run), train_losses(kill_runs["ref"]))
    assert max_tensor_diff(load_tensors(final / "model.safetensors"),
                           load_tensors(latest_checkpoint(kill_runs["ref"] / "checkpoints") /
                                        "model.safetensors")) <= TOL


# -- kill -9 at random wall-clock moments (T2): whatever was interrupted, the newest complete
# checkpoint loads and resume finishes ------------------------------------------------------------

def test_kill_at_random_moments_leaves_a_loadable_run(corpus, tmp_path):
    rng = random.Random(7)
    delays = [rng.uniform(3.0, 9.0) for _ in range(3)]  # seconds after start: torch import, then saves
    flags = ["--eval-interval=1", "--keep-checkpoints=2"]  # a save after every step: kills land in saves
    runs = [tmp_path / f"run{i}" for i in range(len(delays))]
    procs = start_parallel([([*llmkit_cmd(), *train_args(corpus, run, 400), *flags], {}) for run in runs],
                           cwd=tmp_path)
    started = time.monotonic()
    for proc, delay in sorted(zip(procs, delays), key=lambda pair: pair[1]):
        time.sleep(max(0.0, started + delay - time.monotonic()))
        proc.kill()
    finish_parallel(procs)
    for run, proc in zip(runs, procs):
        assert proc.returncode == -9, "the run should still have been training when killed"
        complete = list_checkpoints(run / "checkpoints")
        for path in complete:  # a directory that looks complete is complete: no half checkpoint
            verify_checkpoint(path)
        if complete:
            assert llmkit.load(run).path == complete[-1]
        step = int(complete[-1].name.split("-")[1]) if complete else 0
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main([*train_args(corpus, run, step + 2), *flags, "--resume"])
        assert rc == 0, err.getvalue()[-2000:]
        leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".old"))]
        assert leftovers == []
        assert llmkit.load(run).path.name == f"step-{step + 2:08d}"
