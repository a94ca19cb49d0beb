"""`llmkit explain` end to end, in real processes: the sampling view draws the same tokens as
`llmkit generate` with the same seed, each view writes its three files, and a view that does not apply
or a bad flag is one error line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from post_training_helpers import save_tiny_model

LLMKIT = str(Path(sys.executable).with_name("llmkit"))
FLAGS = ["--device", "cpu", "--dtype", "fp32", "--threads", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain_cli")
    return {"llama": save_tiny_model(root / "llama"), "rwkv": save_tiny_model(root / "rwkv", preset_name="rwkv-tiny")}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LLMKIT, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sampling", [["--temperature", "0.9", "--top-k", "40", "--top-p", "0.9", "--seed", "5"],
                                      ["--temperature", "1.2", "--min-p", "0.02", "--repetition-penalty", "1.3",
                                       "--seed", "11"]])
def test_sampling_view_draws_the_tokens_generate_draws(models, tmp_path, sampling):
    prompt = "the quick"
    common = ["--model", str(models["llama"]), "--max-new-tokens", "10", *sampling, *FLAGS]
    generated = run("generate", "--prompt", prompt, *common)
    assert generated.returncode == 0, generated.stderr
    explained = run("explain", "sampling", "--text", prompt, "--out", str(tmp_path), *common)
    assert explained.returncode == 0, explained.stderr
    data = json.loads((tmp_path / "sampling.json").read_text(encoding="utf-8"))["data"]
    assert data["text"] == generated.stdout.removesuffix("\n")
    assert len(data["tokens"]) >= 1


def test_attention_view_writes_three_files_and_prints_the_ranking(models, tmp_path):
    result = run("explain", "attention", "--model", str(models["llama"]), "--out", str(tmp_path), *FLAGS)
    assert result.returncode == 0, result.stderr
    assert "坐→猫" in result.stdout
    assert {p.name for p in tmp_path.iterdir()} == {"attention.json", "attention.png", "attention.html"}


def test_compare_writes_one_page_for_two_models(models, tmp_path):
    result = run("explain", "compare", "--view", "logit-lens", "--model", str(models["llama"]), "--other",
                 str(models["rwkv"]), "--out", str(tmp_path), *FLAGS)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "compare.json").read_text(encoding="utf-8"))["data"]
    assert data["view"] == "logit-lens" and data["left"]["name"] == "llama" and data["right"]["name"] == "rwkv"


@pytest.mark.parametrize("args, message", [
    (["attention", "--model", "{rwkv}"], "has no attention"),
    (["knockout", "--model", "{llama}", "--head", "9.0"], "--head 9.0"),
    (["attention", "--model", "{llama}", "--query", "狗"], "--query"),
    (["sampling", "--model", "{llama}", "--top-p", "1.5"], "top_p"),
])
def test_errors_are_one_line(models, tmp_path, args, message):
    args = [a.format(**{k: str(v) for k, v in models.items()}) for a in args]
    result = run("explain", *args, "--out", str(tmp_path), *FLAGS)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.parametrize("view,flag", [("tokens", ["--temperature", "0.5"]), ("cache", ["--query", "x"]),
                                       ("attention", ["--context", "8"]), ("logit-lens", ["--every-head"])])
def test_a_view_registers_only_the_flags_it_reads(view, flag):
    """A flag of another view is an argparse error (exit 2, naming it), not silently ignored."""
    result = run("explain", view, *flag)
    assert result.returncode == 2 and "unrecognized arguments: " + flag[0] in result.stderr, result.stderr
