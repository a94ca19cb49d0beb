"""The RLHF demo's task (true score, generated files) and the pipeline's wiring at toy budgets."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmkit.data.records import read_preference_pairs, read_prompts, read_sft_records
from llmkit.training import rlhf_demo
from llmkit.training.rlhf_task import any_other_number, answer, problems, render_prompt, true_score, write_task_files


def test_any_other_number_is_another_possible_result():
    rng = random.Random(0)
    for right in range(19):
        drawn = {any_other_number(right, rng) for _ in range(200)}
        assert right not in drawn and drawn <= set(range(19)) and len(drawn) > 12


def test_true_score_wants_the_right_number_and_nothing_else():
    assert true_score("What is 7 plus 5?", "12") == 1.0
    assert true_score("Compute 9 - 4.", " 5\n") == 1.0
    assert true_score("Compute 9 - 4.", "The answer is 5.") == 0.0
    assert true_score("3 + 4 = ?", "8") == 0.0
    assert true_score("no numbers here", "3") == 0.0
    for a, op, b in problems():
        for k in range(6):
            assert true_score(render_prompt(a, op, b, k), str(answer(a, op, b))) == 1.0


def test_task_files_hold_out_their_prompts_and_parse(tmp_path):
    files = write_task_files(tmp_path, seed=0, sft_examples=200, pairs=300, wrong_pair_rate=0.6)
    held = [p.text for p in read_prompts(files["heldout.jsonl"])[0]]
    train = [p.text for p in read_prompts(files["prompts.jsonl"])[0]]
    sft, _ = read_sft_records(files["sft.jsonl"])
    pairs, _ = read_preference_pairs(files["prefs.jsonl"])
    seen = set(train) | {c.messages[0]["content"] for c in sft} | {p.prompt for p in pairs}
    assert held and not set(held) & seen
    assert not set(held) & set(files["corpus.txt"].read_text().splitlines())
    assert all(true_score(p.prompt, p.chosen) == 1.0 and true_score(p.prompt, p.rejected) == 0.0 for p in pairs)
    near_misses = [abs(int(p.rejected) - int(p.chosen)) for p in pairs if p.rejected.isdigit()]
    assert 0.5 < len(near_misses) / len(pairs) < 0.7 and set(near_misses) <= {1, 2}  # the rest: chatter
    right = sum(true_score(c.messages[0]["content"], c.messages[1]["content"]) for c in sft) / len(sft)
    assert 0.5 < right < 0.8  # careless annotators: chatter and wrong numbers
    # A rerun leaves identical files untouched (pretraining's resume fingerprint includes their mtime).
    mtimes = {name: path.stat().st_mtime_ns for name, path in files.items()}
    write_task_files(tmp_path, seed=0, sft_examples=200, pairs=300, wrong_pair_rate=0.6)
    assert {name: path.stat().st_mtime_ns for name, path in files.items()} == mtimes


def test_pipeline_runs_end_to_end_at_toy_budgets(tmp_path, monkeypatch):
    tiny = {name: dict(stage, steps=2, eval_interval=2, eval_batches=1, warmup_steps=0)
            for name, stage in rlhf_demo.STAGES.items()}
    tiny["base"].update(steps=4, tokenizer_sample_bytes=100_000)
    monkeypatch.setattr(rlhf_demo, "STAGES", tiny)
    monkeypatch.setattr(rlhf_demo, "PPO_SETTINGS", {k: dict(v, rollout_batch=8, minibatch_size=8)
                                                    for k, v in rlhf_demo.PPO_SETTINGS.items()})
    monkeypatch.setattr(rlhf_demo, "SAMPLES_PER_PROMPT", 1)
    monkeypatch.setattr(rlhf_demo, "TASK", dict(sft_examples=60, pairs=100))
    events = []
    result = rlhf_demo.run_pipeline(tmp_path / "demo", threads=1, on_event=lambda kind, info: events.append(kind))
    torch.set_num_threads(2)
    assert events[:6] == ["base", "sft", "rm", "ppo", "ppo-rule", "dpo"]
    assert set(result.scores) == {"base", "sft", "ppo", "ppo-rule", "dpo"}
    assert all(0.0 <= s["sampled"] <= 1.0 and 0.0 <= s["greedy"] <= 1.0 for s in result.scores.values())
    assert result.scores["sft"]["kl"] == pytest.approx(0.0, abs=1e-6)  # its own reference: 0.0 measured on all 3
    assert 0.0 <= result.rm_accuracy <= 1.0 and set(result.rm_by_kind) == {"chatter", "near miss",
                                                                             "any other number"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in result.plots) and len(result.plots) == 2
    table = rlhf_demo.format_table(result)
    assert "| PPO (reward model) |" in table and "| DPO |" in table and "reward model held-out accuracy" in table
    rows = [json.loads(x) for x in (tmp_path / "demo" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "score" in r] == [1, 2]
