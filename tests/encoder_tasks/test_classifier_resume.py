"""`finetune-classifier` resumes like every other training run: a run stopped by Ctrl-C after 3 of 4
steps (between checkpoints) and continued with resume=True logs the same losses, step for step, as
one uninterrupted run."""

from __future__ import annotations

import json
import random

import pytest

from llmkit.errors import ConfigError
from llmkit.training.classify import finetune_classifier
from llmkit.training.config import TrainConfig
from task_helpers import tiny_encoder

WORDS = "the a my our big small old new red green".split()


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_an_interrupted_classifier_run_resumes_to_the_same_losses(tmp_path):
    rng = random.Random(0)
    rows = [{"text": f"{rng.choice(WORDS)} {label} {rng.choice(WORDS)}", "label": label}
            for label in ("cat", "dog", "apple", "bread") * 5]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_encoder(tmp_path / "encoder", [r["text"] for r in rows], vocab=300)
    cfg = TrainConfig(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, eval_interval=2, log_interval=1,
                      val_fraction=0.2, seed=0, dtype="fp32", device="cpu", threads=1)
    finetune_classifier(model, data, tmp_path / "whole", cfg)

    def ctrl_c_after_step_3(row: dict) -> None:
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the Trainer checkpoints step 3, then lets it through
        finetune_classifier(model, data, tmp_path / "cut", cfg, on_step=ctrl_c_after_step_3)
    with pytest.raises(ConfigError, match="already exists and is not empty"):  # only with resume
        finetune_classifier(model, data, tmp_path / "cut", cfg)
    ran = []
    summary = finetune_classifier(model, data, tmp_path / "cut", cfg, resume=True,
                                  on_step=lambda row: ran.append(row["step"]))
    assert summary["steps"] == 4 and ran == [4]  # it went on from the checkpoint, not from the start
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in whole]
    # Same machine, same kernels, fp32, batches a pure function of the step: bitwise in every measured run
    # (as the other resume tests); 1e-6 is slack, while a wrong resume (restarted schedule, other
    # batches, lost optimizer moments) moves these losses by ~1e-2.
    for got, want in zip(cut, whole):
        for key in ("train_loss", "val_loss", "val_accuracy"):
            if key in want:
                assert abs(got[key] - want[key]) <= 1e-6, (got, want)
