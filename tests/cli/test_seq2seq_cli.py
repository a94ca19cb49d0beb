"""The encoder-decoder training commands as real subprocesses: `train --arch t5|bart`,
`finetune-seq2seq` (good data, resume, bad records, truncation) and `seq2seq-demo`.

One module fixture starts every command, as many at once as their dependencies allow (each process
pays seconds to import torch); the tests only inspect exit codes, output and files.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import llmkit
from conftest import make_corpus
from llmkit.training.seq2seq_demo import ONES, TENS
from llmkit_command import llmkit_cmd

TINY = ["--seq-len", "64", "--batch-size", "4", "--vocab-size", "400", "--eval-interval", "3", "--eval-batches",
        "1", "--threads", "1", "--log-interval", "1"]
GOOD = [{"source": f"count {i}", "target": " ".join(["step"] * (i % 4 + 1))} for i in range(30)] + [
    {"instruction": "Repeat the word", "input": "tick", "output": "tick tick"},
    {"instruction": "Say hello", "output": "hello"}]
# name: (file contents as bytes, the message's expected "file:line: ..." tail); the other record
# errors are tested in-process (tests/training/test_seq2seq_train.py), sparing a torch import each
BAD = {
    "syntax": (b'{"source": "a", "target": "b"}\n{"source": "a", "target": \n', ":2:"),
    "empty_target": (b'{"source": "a", "target": "b"}\n\n{"source": "a", "target": "   "}\n',
                     ":3: field 'target' is empty"),
    "not_utf8": (b'{"source": "a", "target": "b"}\n{"source": "caf\xe9", "target": "b"}\n', ":2: not UTF-8 text"),
}


class Runner:
    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def start(self, name: str, *args) -> None:
        self.procs[name] = subprocess.Popen([*llmkit_cmd(), *map(str, args)], cwd=self.cwd, env=self.env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            encoding="utf-8", errors="replace")

    def wait(self) -> None:
        for name, proc in list(self.procs.items()):
            out, err = proc.communicate(timeout=600)
            self.results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        self.procs.clear()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq_cli")
    corpus = make_corpus(root / "corpus")
    r = Runner(root)
    r.start("t5", "train", "--arch", "t5", "--preset", "t5-tiny", "--data", corpus, "--out", "t5run", "--steps", 6,
            *TINY)
    r.start("bart", "train", "--arch", "bart", "--preset", "bart-tiny", "--data", corpus, "--out", "bartrun",
            "--steps", 6, *TINY)
    r.start("gpt", "train", "--preset", "gpt2-tiny", "--data", corpus, "--out", "gptrun", "--steps", 1, *TINY)
    r.start("demo", "seq2seq-demo", "--out", "demo", "--preset", "t5v11-tiny", "--steps", 20, "--batch-size", 16,
            "--train-examples", 300, "--test-examples", 12, "--eval-interval", 10, "--threads", 1)
    (root / "good.jsonl").write_text("".join(json.dumps(x) + "\n" for x in GOOD), encoding="utf-8")
    (root / "long.jsonl").write_text("".join(json.dumps(x) + "\n" for x in GOOD[:5] + [
        {"source": "word " * 300, "target": "long"}]), encoding="utf-8")
    for name, (data, _) in BAD.items():  # records are checked before the model loads: no need to wait
        (root / f"{name}.jsonl").write_bytes(data)
        r.start(f"bad_{name}", "finetune-seq2seq", "--model", "t5run", "--data", f"{name}.jsonl",
                "--out", f"out_{name}")
    r.wait()
    ft = ["--steps", 4, "--batch-size", 4, "--eval-interval", 2, "--threads", 1, "--log-interval", 1]
    r.start("ft", "finetune-seq2seq", "--model", "t5run", "--data", "good.jsonl", "--out", "ft", *ft)
    r.start("long", "finetune-seq2seq", "--model", "bartrun", "--data", "long.jsonl", "--out", "ftlong", *ft)
    r.start("not_seq2seq", "finetune-seq2seq", "--model", "gptrun", "--data", "good.jsonl", "--out", "out_gpt")
    r.wait()
    r.start("ft_resume", "finetune-seq2seq", "--model", "t5run", "--data", "good.jsonl", "--out", "ft", "--resume",
            *ft, "--steps", 6)  # (the later --steps wins)
    r.start("ft_again", "finetune-seq2seq", "--model", "t5run", "--data", "good.jsonl", "--out", "ftlong", *ft)
    r.start("generate", "generate", "--model", "demo", "--prompt", "40721", "--temperature", 0,
            "--max-new-tokens", 12)
    r.wait()
    return root, r.results


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_train_arch_pretrains_an_encoder_decoder(runs, arch):
    root, results = runs
    assert "token accuracy" in ok(results[arch]).stdout + results[arch].stderr
    run = root / f"{arch}run"
    evals = [r for r in rows(run) if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all(0 <= r["val_acc"] <= 1 for r in evals)
    lm = llmkit.load(run)
    assert lm.model.cfg.arch == "encoder-decoder" and lm.model.cfg.vocab_size == lm.tokenizer.vocab_size
    added = "<|sentinel_0|>" if arch == "t5" else "<|mask|>"
    assert lm.tokenizer.token_to_id(added) is not None  # the objective's tokens were added and saved
    assert (lm.tokenizer.token_to_id("<|sentinel_0|>") is None) == (arch == "bart")


def test_finetune_writes_a_loadable_run_and_resumes(runs):
    root, results = runs
    first = ok(results["ft"])
    assert "data: 29 training and 3 held-out records" in first.stderr  # val_fraction 0.1 of 32
    resumed = ok(results["ft_resume"])
    assert "resuming from" in resumed.stderr and "(step 4)" in resumed.stderr
    steps = [r["step"] for r in rows(root / "ft") if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # one uninterrupted log
    lm = llmkit.load(root / "ft")
    assert lm.model.cfg.arch == "encoder-decoder" and "checkpoints" in str(lm.path)
    assert isinstance(lm.generate("count 3", max_new_tokens=4, temperature=0), str)


def test_finetune_refuses_an_existing_run_without_resume(runs):
    _, results = runs
    r = results["ft_again"]
    assert r.returncode == 2 and "already holds checkpoints; pass --resume" in r.stderr


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_records_are_one_line_errors_with_file_and_line(runs, name):
    root, results = runs
    r = results[f"bad_{name}"]
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}.jsonl")
    assert BAD[name][1] in lines[0] and "Traceback" not in r.stderr
    assert not (root / f"out_{name}").exists()  # nothing half-written


def test_long_sources_are_truncated_and_counted(runs):
    root, results = runs
    r = ok(results["long"])
    assert "truncated to 128 tokens: 1 sources" in r.stderr
    assert llmkit.load(root / "ftlong").model.cfg.position == "learned"  # the BART base


def test_a_decoder_only_model_is_refused(runs):
    root, results = runs
    ok(results["gpt"])
    r = results["not_seq2seq"]
    assert r.returncode == 2 and r.stderr.startswith("error: gptrun: a decoder model") and "Traceback" not in r.stderr
    assert not (root / "out_gpt").exists()


def test_seq2seq_demo_reports_exact_match_and_saves_a_model(runs):
    root, results = runs
    r = ok(results["demo"])
    assert "exact match on 12 held-out numbers:" in r.stdout
    assert (root / "demo" / "loss.png").exists()
    lm = llmkit.load(root / "demo")
    assert lm.model.cfg.arch == "encoder-decoder"
    # a digit stays one token: the tokenizer was trained on the words only
    assert len(lm.tokenizer.encode("40721")) == 5
    # `generate` decodes for encoder-decoders too: 20 steps teach only the vocabulary, not the rule
    words = ok(results["generate"]).stdout.replace("40721", "").replace("-", " ").split()
    assert words and set(words) <= set(ONES) | set(TENS[2:]) | {"hundred", "thousand"}
