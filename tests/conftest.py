"""Shared test setup: a fixed seed and thread count, and a small real corpus."""

import os
import random
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

# Under pytest-xdist (`make test` runs two workers) each worker gets one of the two cores.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
torch.set_num_threads(THREADS)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state and thread count."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    yield


def make_corpus(root: Path) -> Path:
    """~60 KB of varied text: Python source (the stdlib json package) plus generated prose."""
    root.mkdir(parents=True, exist_ok=True)
    for src in sorted((STDLIB / "json").glob("*.py")):
        shutil.copyfile(src, root / src.name)
    rng = random.Random(0)
    words = ("the model reads tokens and predicts the next one while the optimizer lowers the loss "
             "every step of training moves the weights a little closer to the data").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + "."
             for _ in range(250)]
    (root / "notes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
