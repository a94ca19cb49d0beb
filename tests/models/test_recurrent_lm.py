"""RWKV and Mamba language models through the shared generation loop and the real command line:
the fixed-size state gives the same tokens as recomputing the whole sequence, left-padded batches
give each row what it gets alone, the state's size does not grow with the sequence, and
`llmkit train --preset mamba-tiny` / `rwkv-tiny` followed by `llmkit generate` works end to end."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from llmkit.config import preset
from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.state_cache import StateCache
from llmkit.models.causal_lm import CausalLM
from conftest import make_corpus
from llmkit_command import llmkit_cmd

BODIES = ("rwkv", "mamba")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 40, 41, 42]]


def model_for(body: str) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(preset(f"{body}-tiny", vocab_size=61)).eval()


@pytest.mark.parametrize("body", BODIES)
def test_state_cache_generation_equals_recompute(body):
    model = model_for(body)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=20)):
        cached = generate(model, PROMPTS, max_new_tokens=10, params=params, seed=3)
        recomputed = generate(model, PROMPTS, max_new_tokens=10, params=params, seed=3, use_cache=False)
        assert cached == recomputed
        assert all(len(row) == 10 for row in cached)


@pytest.mark.parametrize("body", BODIES)
def test_padded_batch_rows_equal_their_solo_runs(body):
    model = model_for(body)
    greedy = SamplingParams(temperature=0.0)
    batch = generate(model, PROMPTS, max_new_tokens=8, params=greedy)
    assert batch == [generate(model, [p], max_new_tokens=8, params=greedy)[0] for p in PROMPTS]


@pytest.mark.parametrize("body", BODIES)
def test_state_size_is_constant_in_sequence_length(body):
    model = model_for(body)
    short = model.new_cache(2, 16, dtype=torch.float32, device="cpu")
    long = model.new_cache(2, 100_000, dtype=torch.float32, device="cpu")
    assert isinstance(short, StateCache)
    assert short.memory_bytes() == long.memory_bytes() > 0
    shapes = {name: t.shape for name, t in short.tensors.items()}
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 5)), cache=short)
        after_5 = short.memory_bytes()
        for _ in range(3):
            model(torch.randint(0, 61, (2, 40)), cache=short)
    assert short.pos == 125
    assert short.memory_bytes() == after_5 == long.memory_bytes()
    assert {name: t.shape for name, t in short.tensors.items()} == shapes
    # and it is small: per row, a few vectors per layer — not one per past token
    cfg = model.cfg
    per_layer_row = short.memory_bytes() // (cfg.n_layers * 2)
    assert per_layer_row < 40 * cfg.d_model * 4


# ---- the command line ---------------------------------------------------------------------------

def run(*args, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "LLMKIT_FAULT_AT"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([*llmkit_cmd(), *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_train_and_generate_from_the_command_line(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    tok = finish(run("tokenizer", "train", "--data", corpus, "--vocab-size", "300", "--out", tmp_path / "tok",
                     cwd=tmp_path))
    assert tok.returncode == 0, tok.stderr
    flags = ("--seq-len", "32", "--batch-size", "4", "--steps", "6", "--eval-interval", "6", "--eval-batches", "1",
             "--log-interval", "1", "--warmup-steps", "1", "--lr", "3e-3", "--threads", "1")
    procs = {body: run("train", "--data", corpus, "--tokenizer", tmp_path / "tok", "--out", tmp_path / body,
                       "--preset", f"{body}-tiny", *flags, cwd=tmp_path) for body in BODIES}
    for body, proc in procs.items():
        result = finish(proc)
        assert result.returncode == 0, result.stderr
        rows = [json.loads(line) for line in (tmp_path / body / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "train_loss" in r]
        assert [r["step"] for r in steps][-1] == 6
        assert all(r["train_loss"] > 0 and r["tokens_per_s"] > 0 for r in steps)
        assert any("val_loss" in r for r in rows)
        saved = json.loads(next((tmp_path / body / "checkpoints").iterdir()).joinpath("config.json").read_text())
        assert saved["model"]["body"] == body
    gens = {body: run("generate", "--model", tmp_path / body, "--prompt", "def ", "--max-new-tokens", "12",
                      "--temperature", "0", cwd=tmp_path) for body in BODIES}
    gens_nocache = {body: run("generate", "--model", tmp_path / body, "--prompt", "def ", "--max-new-tokens", "12",
                              "--temperature", "0", "--no-kv-cache", cwd=tmp_path) for body in BODIES}
    for body in BODIES:
        with_state, without = finish(gens[body]), finish(gens_nocache[body])
        assert with_state.returncode == 0, with_state.stderr
        assert with_state.stdout.startswith("def ") and len(with_state.stdout) > len("def ")
        assert without.returncode == 0 and without.stdout == with_state.stdout
