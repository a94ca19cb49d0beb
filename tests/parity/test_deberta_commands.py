"""A Hugging Face DeBERTa directory through the encoder commands, as real processes: `llmkit embed`
gives transformers' mean-pooled hidden states, and `llmkit finetune-classifier` trains a head on it
whose output directory loads back as a DeBERTa classifier. Both processes run at once (each pays
~2 s to import torch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.inference.embed import encoder_batch
from test_deberta import V3, hf_config
from test_hf_bert import randomise_norms_and_biases, save_hf_dir

transformers = pytest.importorskip("transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):", "我们在学习"]


def llmkit_process(cwd: Path, *args) -> subprocess.Popen:
    script = Path(sys.executable).with_name("llmkit")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "llmkit.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*argv, *map(str, args)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return out


def test_embed_and_finetune_classifier_accept_a_deberta_directory(tmp_path):
    torch.manual_seed(0)
    hf = transformers.DebertaV2Model(hf_config(**V3)).eval()
    randomise_norms_and_biases(hf)
    directory = save_hf_dir(hf, tmp_path / "deberta")
    with open(tmp_path / "records.jsonl", "w", encoding="utf-8") as f:
        for i in range(24):
            f.write(json.dumps({"text": f"{'cat dog' if i % 2 else 'bread soup'} {i}", "label": i % 2}) + "\n")
    embed = llmkit_process(tmp_path, "embed", "--model", directory, "--dtype", "fp32", *TEXTS)
    finetune = llmkit_process(tmp_path, "finetune-classifier", "--model", directory, "--data", "records.jsonl",
                              "--out", "cls", "--steps", "4", "--batch-size", "4", "--eval-interval", "4",
                              "--threads", "1")
    vectors = torch.tensor(json.loads(finish(embed))["embeddings"])
    finish(finetune)

    ids, mask, _ = encoder_batch(llmkit.load(directory).tokenizer, TEXTS, 64)
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    expected = torch.nn.functional.normalize(pooled, dim=-1)
    # fp32 summation order only, as test_deberta's TOLERANCE; pooling and normalising shrink it further
    assert (vectors - expected).abs().max() < 1e-4

    classifier = llmkit.load(tmp_path / "cls").model
    assert classifier.cfg.position == "disentangled" and classifier.cfg.num_labels == 2
    assert classifier.classify(ids, mask).shape == (len(TEXTS), 2)
