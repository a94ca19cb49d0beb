"""End-to-end tests of the `llmkit` command line, run as real subprocesses.

One module fixture trains a tokenizer and a tiny `gpt2-tiny` model (10 steps) and runs every
command the tests look at, many at once (each process pays ~2 s to import torch, so they overlap
on the two cores); the tests then only inspect exit codes, output and files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

import llmkit
from llmkit.tokenizer import Tokenizer
from conftest import make_corpus
from llmkit_command import llmkit_cmd

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LONG_PROMPT = "def f(x):\n    return x\n" * 60  # far more than gpt2-tiny's 128-token context


class Runner:
    """Starts commands in the background (all in one working dir) and collects them by name."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if k != "LLMKIT_FAULT_AT"}
        self.env["OMP_NUM_THREADS"] = "1"
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, subprocess.CompletedProcess] = {}

    def start(self, name: str, *args) -> None:
        argv = [*llmkit_cmd(), *map(str, args)]
        self.procs[name] = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                            errors="replace")

    def wait(self, *names: str) -> None:
        for name in names or list(self.procs):
            proc = self.procs.pop(name)
            out, err = proc.communicate(timeout=300)
            self.results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def run(self, name: str, *args) -> subprocess.CompletedProcess:
        self.start(name, *args)
        self.wait(name)
        return self.results[name]


TRAIN_FLAGS = ("--preset", "gpt2-tiny", "--seq-len", "32", "--batch-size", "4", "--eval-interval", "5",
               "--eval-batches", "2", "--log-interval", "1", "--warmup-steps", "2", "--lr", "3e-3",
               "--threads", "1")

# bad-input cases by name; for the train ones the test also checks that no --out dir is left behind
BAD_TRAIN = ("empty_file", "binary_dir", "latin1_file", "unknown_preset", "steps_zero")
BAD_GENERATE = ("missing_model", "corrupt_run", "corrupt_checkpoint_dir", "long_prompt", "temperature_neg",
                "top_p_zero", "top_p_big")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = make_corpus(root / "corpus")
    r = Runner(root)
    paths = dict(root=root, corpus=corpus, tok=root / "tok", run=root / "run")

    # inputs for the bad-input cases
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_bytes(b"")
    (bad / "bin_only").mkdir()
    (bad / "bin_only" / "blob.dat").write_bytes(bytes(range(256)) * 4)
    latin1 = bad / "latin1.txt"
    latin1.write_bytes("first line is fine\nsecond: caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    paths.update(empty=bad / "empty.txt", bin_dir=bad / "bin_only", latin1=latin1)

    r.start("help", "-h")
    r.start("train_help", "train", "-h")
    r.start("generate_help", "generate", "-h")
    tok = r.run("tokenizer", "tokenizer", "train", "--data", corpus, "--vocab-size", "300", "--out", paths["tok"])
    assert tok.returncode == 0, tok.stderr
    r.start("train", "train", "--data", corpus, "--tokenizer", paths["tok"], "--out", paths["run"],
            "--steps", "10", *TRAIN_FLAGS)
    for name, data in (("empty_file", paths["empty"]), ("binary_dir", paths["bin_dir"]),
                       ("latin1_file", latin1)):
        r.start(name, "train", "--data", data, "--out", root / f"out_{name}", "--steps", "2", *TRAIN_FLAGS)
    r.start("unknown_preset", "train", "--data", corpus, "--out", root / "out_unknown_preset", "--steps", "2",
            "--preset", "gpt5-huge")
    r.start("steps_zero", "train", "--data", corpus, "--out", root / "out_steps_zero", "--steps", "0",
            *TRAIN_FLAGS)
    r.start("missing_model", "generate", "--model", root / "no_such_run", "--prompt", "def ")
    for name in ("temperature_neg", "top_p_zero", "top_p_big"):
        flag = {"temperature_neg": ("--temperature", "-1"), "top_p_zero": ("--top-p", "0"),
                "top_p_big": ("--top-p", "1.5")}[name]
        r.start(name, "generate", "--model", root / "no_such_run_either", "--prompt", "def ", *flag)
    r.wait("train")
    assert r.results["train"].returncode == 0, r.results["train"].stderr

    # a copy whose only checkpoint has a garbage model.safetensors
    corrupt = root / "damaged_run"  # (a name without "corrupt": the message must say it)
    shutil.copytree(paths["run"], corrupt)
    ckpts = sorted((corrupt / "checkpoints").iterdir())
    for extra in ckpts[:-1]:
        shutil.rmtree(extra)
    (ckpts[-1] / "model.safetensors").write_bytes(b"this is not a safetensors file" * 100)
    paths.update(corrupt=corrupt, corrupt_ckpt=ckpts[-1])
    # a copy to train into again without --resume (plus one with a different tokenizer)
    for name in ("again", "again_other_tok"):
        shutil.copytree(paths["run"], root / name)
    other_tok = root / "other_tok"
    Tokenizer.train([(corpus / "notes.txt").read_text()], 280).save(other_tok)  # in-process: cheap

    gen = ("generate", "--model", paths["run"], "--prompt", "def ", "--max-new-tokens", "10")
    r.start("seed0_a", *gen, "--seed", "0")
    r.start("seed0_b", *gen, "--seed", "0")
    r.start("greedy_a", *gen, "--temperature", "0")
    r.start("greedy_b", *gen, "--temperature", "0", "--seed", "5")
    r.start("greedy_nocache", *gen, "--temperature", "0", "--no-kv-cache")
    r.start("corrupt_run", "generate", "--model", corrupt, "--prompt", "def ")
    r.start("corrupt_checkpoint_dir", "generate", "--model", ckpts[-1], "--prompt", "def ")
    r.start("long_prompt", "generate", "--model", paths["run"], "--prompt", LONG_PROMPT, "--max-new-tokens", "5")
    r.start("again", "train", "--data", corpus, "--tokenizer", paths["tok"], "--out", root / "again",
            "--steps", "20", *TRAIN_FLAGS)
    r.start("again_other_tok", "train", "--data", corpus, "--tokenizer", other_tok, "--out",
            root / "again_other_tok", "--steps", "20", *TRAIN_FLAGS)
    r.wait()
    return r.results, paths


def one_error_line(result: subprocess.CompletedProcess, *, progress_ok: bool = False) -> str:
    """The `error: ...` line of a run that failed with exit 2: it must be the only stderr line
    (or, with progress_ok, the only error line and the last, after progress messages)."""
    assert result.returncode == 2, f"rc={result.returncode}\nstderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip("\n").splitlines()
    if progress_ok:
        assert sum(line.startswith("error:") for line in lines) == 1, result.stderr
        lines = lines[-1:]
    assert len(lines) == 1, f"expected exactly one stderr line, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


# -- the happy path --------------------------------------------------------------------------------

def test_tokenizer_train(cli):
    results, paths = cli
    vocab = json.loads((paths["tok"] / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) <= 300
    # the run uses that tokenizer, and each checkpoint carries a copy of it
    assert (paths["run"] / "tokenizer.json").read_bytes() == (paths["tok"] / "tokenizer.json").read_bytes()


def test_train_writes_metrics_plot_and_checkpoints(cli):
    results, paths = cli
    run = paths["run"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if "train_loss" in r]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 11))
    for r in train:
        assert {"step", "train_loss", "lr", "tokens_per_s"} <= set(r)
        assert r["train_loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0
    assert [r["step"] for r in val] == [5, 10]
    assert all(r["val_ppl"] > 1 and r["val_loss"] > 0 for r in val)
    assert (run / "loss.png").read_bytes()[:8] == PNG_MAGIC
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000005", "step-00000010"]
    for ckpt in ckpts:
        for name in ("model.safetensors", "config.json", "tokenizer.json", "manifest.json"):
            assert (ckpt / name).is_file(), f"{ckpt / name} missing"
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert manifest["step"] == int(ckpt.name[5:])
        assert "model.safetensors" in manifest["files"]
    assert "val loss" in results["train"].stdout + results["train"].stderr


def test_generate_starts_with_prompt_and_is_repeatable(cli):
    results, _ = cli
    for name in ("seed0_a", "seed0_b", "greedy_a", "greedy_b", "greedy_nocache"):
        assert results[name].returncode == 0, f"{name}: {results[name].stderr}"
        assert results[name].stdout.startswith("def "), (name, results[name].stdout)
    assert results["seed0_a"].stdout == results["seed0_b"].stdout
    assert results["greedy_a"].stdout == results["greedy_b"].stdout
    assert results["greedy_nocache"].stdout == results["greedy_a"].stdout, "KV cache changed greedy output"
    assert len(results["greedy_a"].stdout) > len("def \n"), "greedy decoding produced nothing"


def test_generate_matches_the_python_api(cli):
    """The CLI prints prompt + `llmkit.load(run).generate(...)` + newline; another seed differs."""
    results, paths = cli
    lm = llmkit.load(paths["run"])
    sample = lm.generate("def ", max_new_tokens=10, seed=0)
    assert results["seed0_a"].stdout == "def " + sample + "\n"
    assert results["greedy_a"].stdout == "def " + lm.generate("def ", max_new_tokens=10, temperature=0) + "\n"
    assert lm.generate("def ", max_new_tokens=10, seed=1) != sample, "the seed must change the sample"


# -- help ------------------------------------------------------------------------------------------

def test_help_lists_documented_flags(cli):
    results, _ = cli
    for name in ("help", "train_help", "generate_help"):
        assert results[name].returncode == 0, results[name].stderr
    top = results["help"].stdout
    for command in ("train", "generate", "tokenizer", "presets", "demo"):
        assert command in top
    train = results["train_help"].stdout
    for flag in ("--data", "--out", "--steps", "--batch-size", "--lr", "--warmup-steps", "--weight-decay",
                 "--grad-accum", "--grad-clip", "--eval-interval", "--dtype", "--seed", "--resume", "--config",
                 "--tokenizer", "--preset", "--seq-len", "--skip-nonfinite-steps"):
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", train), f"train -h does not list {flag}"
    generate = results["generate_help"].stdout
    for flag in ("--model", "--prompt", "--max-new-tokens", "--top-k", "--top-p", "--temperature", "--stop",
                 "--no-kv-cache", "--seed"):
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", generate), f"generate -h does not list {flag}"


# -- bad input -------------------------------------------------------------------------------------

EXPECTED_IN_MESSAGE = {
    "empty_file": ("empty.txt",),
    "binary_dir": ("bin_only",),
    "latin1_file": ("latin1.txt:2",),           # path and line number
    "unknown_preset": ("gpt5-huge",),
    "steps_zero": ("--steps", "0"),
    "missing_model": ("no_such_run",),
    "corrupt_checkpoint_dir": ("model.safetensors",),
    "long_prompt": ("128",),                    # the context length
    "temperature_neg": ("temperature", "-1"),
    "top_p_zero": ("top_p", "0"),
    "top_p_big": ("top_p", "1.5"),
}


@pytest.mark.parametrize("case", sorted(EXPECTED_IN_MESSAGE))
def test_bad_input_is_one_error_line(cli, case):
    results, paths = cli
    # generate prints its device/precision line once the model is loaded, before checking the prompt
    line = one_error_line(results[case], progress_ok=case == "long_prompt")
    for part in EXPECTED_IN_MESSAGE[case]:
        assert part in line, f"{case}: {part!r} not in {line!r}"
    if case in BAD_TRAIN:
        assert not (paths["root"] / f"out_{case}").exists(), f"{case}: output dir left behind"


def test_corrupt_only_checkpoint_names_the_problem(cli):
    """A run dir whose only checkpoint has a garbage model.safetensors: the message should say what
    is wrong with it (the corrupt file), not just that there is no complete checkpoint."""
    results, paths = cli
    line = one_error_line(results["corrupt_run"])
    assert "damaged_run" in line
    assert re.search(r"model\.safetensors|corrupt|sha256|size", line), line


def test_generate_error_prints_nothing_on_stdout(cli):
    """A rejected prompt must not leave half an answer (the echoed prompt) on stdout."""
    results, _ = cli
    one_error_line(results["long_prompt"], progress_ok=True)
    assert results["long_prompt"].stdout == "", f"stdout: {results['long_prompt'].stdout[:80]!r}…"


def test_train_into_existing_checkpoints_needs_resume(cli):
    results, paths = cli
    line = one_error_line(results["again"], progress_ok=True)
    assert "--resume" in line and "again" in line
    ckpts = sorted(p.name for p in (paths["root"] / "again" / "checkpoints").iterdir())
    assert ckpts == ["step-00000005", "step-00000010"], "a refused run must not touch the checkpoints"


def test_refused_train_leaves_the_run_tokenizer_alone(cli):
    """Refusing to train into a run dir (no --resume) must not first overwrite its tokenizer.json
    with the --tokenizer given; otherwise a later plain `--resume` fails (tokenizer changed)."""
    results, paths = cli
    line = one_error_line(results["again_other_tok"], progress_ok=True)
    assert "--resume" in line
    run_tok = paths["root"] / "again_other_tok" / "tokenizer.json"
    assert run_tok.read_bytes() == (paths["tok"] / "tokenizer.json").read_bytes(), \
        f"{run_tok} was overwritten by the refused run's --tokenizer"
