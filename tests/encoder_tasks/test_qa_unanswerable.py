"""SQuAD 2.0 end to end, in-process: a tiny encoder fine-tuned on generated biographies where 30 %
of the questions have no answer (a person's work left out, someone never mentioned) learns to
abstain on held-out paragraphs while still finding the answers of the others, and the saved model
abstains through `llmkit.load(...).answer` with the threshold it was trained with, exported too."""

from __future__ import annotations

import json

import pytest

import llmkit
from llmkit.data import qa_synthetic
from llmkit.io.hf import save_hf
from llmkit.training.config import TrainConfig
from llmkit.training.qa import finetune_qa
from task_helpers import tiny_encoder


STEPS = 300


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("squad2")
    squad = qa_synthetic.generate(200, seed=0, people_per=(1, 1), unanswerable=0.4)
    (root / "squad2.json").write_text(json.dumps(squad), encoding="utf-8")
    tiny_encoder(root / "tiny", [p["context"] + " " + " ".join(q["question"] for q in p["qas"])
                                 for a in squad["data"] for p in a["paragraphs"]])
    events = {}
    cfg = TrainConfig(steps=STEPS, batch_size=16, lr=3e-3, warmup_steps=10, eval_interval=STEPS, log_interval=STEPS,
                      val_fraction=0.2, seed=0, dtype="fp32", device="cpu", threads=1)
    summary = finetune_qa(root / "tiny", root / "squad2.json", root / "run", cfg, max_len=64, doc_stride=16,
                          on_event=lambda kind, info: events.setdefault(kind, info))
    return root, squad, summary, events


def test_finetune_learns_to_abstain(run):
    root, squad, got, events = run
    assert events["data"]["unanswerable"] == got["train_unanswerable"] > 0 and got["val_unanswerable"] > 0
    assert got["null_threshold"] == 0.0  # unanswerable questions in the data: transformers' default threshold
    # No fixed policy scores on both halves: always "no answer" gets has-answer F1 0, never gets no-answer 0
    # (the untrained model abstains everywhere: 0 and 100). Trained, measured in percent (AMD EPYC, AVX512
    # and AVX2 kernels alike): has-answer F1 70.1, no-answer 63.6 (42 of 66), all 67.9; so 45 on each half
    # leaves room for other kernels' rounding to move a few questions.
    assert got["val_has_answer_f1"] >= 45 and got["val_no_answer_f1"] >= 45, got
    assert got["val_f1"] >= 50 and got["val_best_f1"] >= got["val_f1"]  # the best threshold can only do better


def test_the_saved_model_abstains_with_its_threshold(run):
    root, squad, got, _ = run
    lm = llmkit.load(root / "run")
    assert lm.model.settings["null_threshold"] == 0.0
    paragraphs = [p for a in squad["data"] for p in a["paragraphs"]]
    unanswerable = [(q["question"], p["context"]) for p in paragraphs for q in p["qas"] if q.get("is_impossible")]
    answers = [lm.answer(question, context) for question, context in unanswerable[:40]]
    abstained = [a for a in answers if a["answer"] == ""]
    assert len(abstained) >= len(answers) // 2, answers
    assert all((a["start"], a["end"]) == (0, 0) and a["null_margin"] > 0 and 0 < a["score"] <= 1 for a in abstained)
    never = lm.answer(*unanswerable[0], null_threshold=float("inf"))
    assert never["answer"] and never["null_margin"] > float("-inf")  # no threshold: always a span
    exported = save_hf(lm.model, lm.tokenizer, root / "hf")  # *ForQuestionAnswering keeps it under llmkit_task
    assert json.loads((exported / "config.json").read_text())["llmkit_task"]["null_threshold"] == 0.0
    assert llmkit.load(exported).answer(*unanswerable[0]) == lm.answer(*unanswerable[0])
