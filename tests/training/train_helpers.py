"""Shared pieces of the training tests: the corpus fixture, one torch thread, metrics readers."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

from conftest import make_corpus

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Resume and split runs are compared on one machine with the same kernels: bitwise. The resume tests pass
# with TOL = 0 on AVX-512, AVX2 and default kernels; 1e-6 is slack that no measured run used.
TOL = 1e-6


# -- helpers -------------------------------------------------------------------------------------

def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> dict[int, float]:
    rows = [r for r in rows_of(run) if "train_loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate train rows in {run}/metrics.jsonl: {steps}"
    return {r["step"]: r["train_loss"] for r in rows}


def val_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in rows_of(run) if "val_loss" in r}


def max_tensor_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def assert_losses_equal(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    bad = {s: (got[s], want[s]) for s in want if abs(got[s] - want[s]) > TOL}
    assert not bad, f"per-step losses differ (step: got, want): {bad}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """pretrain(threads=1) sets torch's global thread count; put it back afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)

