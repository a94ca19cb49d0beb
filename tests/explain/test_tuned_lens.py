"""The tuned lens: trained through the one training loop, it reads the model's own distribution out of
the middle layers better than the logit lens on text it never saw; the last layer is read as it is;
a second run reloads the checkpoint instead of training; `llmkit explain logit-lens --tuned` shows
both lenses."""

from __future__ import annotations

import json
import random

import pytest
import torch

from explain_helpers import LINES, tiny_lm
from llmkit.cli import main as cli_main
from llmkit.explain import run_view
from llmkit.explain.subject import Subject
from llmkit.explain.tuned_lens import fit_tuned_lens, kl_by_point, token_stream
from post_training_helpers import save_tiny_model

WORDS = " ".join(LINES).split()
STEPS = 30
SEQ = 32


def shuffled_text(seed: int, n_words: int = 3000) -> str:
    """The helpers' words in a random order: the same vocabulary, never the same sequence."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    lm = tiny_lm("llama-tiny", seed=3)
    out = tmp_path_factory.mktemp("tuned") / "tuned-lens"
    fit = fit_tuned_lens(lm, out, steps=STEPS, texts=[shuffled_text(1)], data="shuffled words", seq_len=SEQ)
    return lm, fit


def test_tuned_lens_beats_the_logit_lens_on_unseen_text(fitted):
    lm, fit = fitted
    unseen = token_stream(lm.tokenizer, [shuffled_text(2, 600)])
    windows = unseen[:len(unseen) // 64 * 64].reshape(-1, 64)
    plain, tuned = kl_by_point(lm.model, fit.lens, windows)
    middle = slice(0, len(plain) - 1)  # every read-out before the model's own output
    # measured (random llama-tiny, seeds 3-5, 30 steps of 4 x 32 tokens, AVX512 and AVX2): the tuned lens's
    # KL is 0.46-0.62 of the logit lens's at each layer (seed 3: 0.0015 → 0.0007 nats after the
    # embeddings); 0.75 of the sum and 0.9 per layer leave room for other seeds' and CPUs' rounding
    assert sum(tuned[middle]) < 0.75 * sum(plain[middle]), (plain, tuned)
    assert all(t < 0.9 * p for t, p in zip(tuned[middle], plain[middle])), (plain, tuned)
    assert plain[-1] == tuned[-1] == 0  # the last read-out is the model's output, read as it is


def test_the_last_layer_is_read_as_it_is(fitted):
    lm, fit = fitted
    assert len(fit.lens.maps) == lm.model.cfg.n_layers  # the embeddings' and every block's but the last
    hidden = torch.randn(2, 5, lm.model.cfg.d_model)
    assert torch.equal(fit.lens(len(fit.lens.maps), hidden), hidden)
    assert all(m.weight.abs().max() > 0 for m in fit.lens.maps)  # the others learned something


def test_a_second_run_reloads_the_trained_lens(fitted):
    lm, fit = fitted
    again = fit_tuned_lens(lm, fit.directory, steps=STEPS, texts=[shuffled_text(1)], data="shuffled words",
                           seq_len=SEQ)
    assert again.steps == STEPS
    for a, b in zip(fit.lens.parameters(), again.lens.parameters()):
        assert torch.equal(a, b)
    checkpoints = sorted((fit.directory / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == [f"step-{STEPS:08d}"]  # nothing trained the second time
    assert (checkpoints[0] / "model.safetensors").exists() and (checkpoints[0] / "tuned_lens.json").exists()
    rows = [json.loads(line) for line in (fit.directory / "metrics.jsonl").read_text().splitlines()]
    evaluation = [r for r in rows if "val_kl_tuned_lens" in r]
    assert evaluation and evaluation[-1]["val_kl_tuned_lens"] < evaluation[-1]["val_kl_logit_lens"]


def test_the_view_shows_both_lenses(fitted):
    lm, fit = fitted
    result = run_view("logit-lens", Subject.create(lm, "The cat sat on the mat."), tuned=fit)
    tuned = result.data["tuned_lens"]
    assert len(tuned["kl_tuned_lens"]) == len(result.data["layers"]) and tuned["kl_logit_lens"][-1] == 0
    assert [m["name"] for m in result.heatmaps[0]["maps"]] == ["p(next)", "p(next), tuned lens"]
    assert any("tuned lens" in line for line in result.lines)


def test_cli_tuned_flag(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "model")
    data = tmp_path / "data.txt"
    data.write_text(shuffled_text(5, 2000), encoding="utf-8")
    out = tmp_path / "out"
    assert cli_main(["explain", "logit-lens", "--model", str(model), "--text", "the cat sat", "--tuned",
                     "--tuned-steps", "2", "--tuned-data", str(data), "--out", str(out), "--device", "cpu"]) == 0
    document = json.loads((out / "logit-lens.json").read_text(encoding="utf-8"))
    assert document["data"]["tuned_lens"]["steps"] == 2
    assert (out / "tuned-lens" / "checkpoints" / "step-00000002" / "model.safetensors").exists()
    assert "tuned lens (2 steps" in capsys.readouterr().out
    assert cli_main(["explain", "logit-lens", "--model", str(model), "--tuned", "--tuned-steps", "0"]) == 2
