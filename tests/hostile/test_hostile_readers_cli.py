"""Hostile input files given to real `python -m llmkit` processes (issue 18, classes 2, 4, 5, 6, 11, 12).

Each case builds its input in a fresh folder: a FIFO where a file is expected, a character device,
JSON nested 100,000 deep, an integer of 5,000 digits, a lone UTF-16 surrogate, a directory or a path
through a file, a line over the 64 MiB cap, a file over the text-file cap. Every process must exit 2
with exactly one stderr line `error: ...` that names the input, print no traceback, leave the folder
exactly as it was (no output files), and run within CPU_LIMIT seconds of CPU (RLIMIT_CPU) and an
address-space limit of MEMORY_LIMIT (RLIMIT_AS), so a reader that loads /dev/zero or a huge file whole
fails the test; a regression that blocks on a FIFO fails by WALL_LIMIT instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from bounded_llmkit import run_bounded
from post_training_helpers import save_tiny_model

CPU_LIMIT = 30  # seconds of CPU per process (RLIMIT_CPU: the kernel kills it past that); a run takes ~2 s
MEMORY_LIMIT = 1 << 30  # RLIMIT_AS per process; an error exit peaks near 230 MB resident
# A process that blocks (on a FIFO) uses no CPU, so a wall-clock limit catches it instead; it is
# generous because the test machine's cores are shared and a 2-second run can take 20 s of wall time.
WALL_LIMIT = 240
DEEP = "[" * 100_000
HUGE_INT = "9" * 5000
SFT = {"instruction": "Add 2 and 3.", "output": "5"}
PAIR = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
NO_BREAK_BYTES = (64 << 20) + 16  # one JSONL line just over MAX_LINE_BYTES


def jsonl(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def fifo(path: Path) -> Path:
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny llmkit run directory and the same model as a Hugging Face directory."""
    import llmkit
    from llmkit.io.hf import save_hf

    root = tmp_path_factory.mktemp("models")
    run = save_tiny_model(root / "run")
    lm = llmkit.load(run)
    hf = save_hf(lm.model, lm.tokenizer, root / "hf", prefix_ids=lm.prefix_ids, eos_ids=lm.eos_ids)
    return {"run": run, "hf": hf}


def hf_with(models: dict[str, Path], case: Path, name: str, content: str | None) -> Path:
    """A copy of the HF directory with `name` replaced: by `content`, or by a FIFO when None."""
    directory = case / "model"
    shutil.copytree(models["hf"], directory)
    target = directory / name
    target.unlink(missing_ok=True)
    fifo(target) if content is None else target.write_text(content, encoding="utf-8")
    return directory


def sharded(models: dict[str, Path], case: Path, index: str) -> Path:
    """The HF directory with its weights named by a (hostile) shard index instead of model.safetensors."""
    directory = hf_with(models, case, "model.safetensors.index.json", index)
    (directory / "model.safetensors").unlink()
    return directory


def checkpoint_with_manifest(models: dict[str, Path], case: Path, content: str | None) -> Path:
    run = case / "run"
    shutil.copytree(models["run"], run)
    step = next((run / "checkpoints").iterdir())
    (step / "manifest.json").unlink()
    fifo(step / "manifest.json") if content is None else (step / "manifest.json").write_text(content)
    return step


def corpus(case: Path) -> Path:
    (case / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50, encoding="utf-8")
    return case / "corpus.txt"


def config_file(case: Path, text: str | None) -> Path:
    path = case / "train.json"
    fifo(path) if text is None else path.write_text(text, encoding="utf-8")
    return path


def long_line(case: Path) -> Path:
    path = case / "long.jsonl"
    with open(path, "wb") as f:  # {"instruction": "aaaa…", "output": "b"} with no newline for 64 MiB
        f.write(b'{"instruction": "')
        f.write(b"a" * NO_BREAK_BYTES)
        f.write(b'", "output": "b"}\n')
    return path


def sparse_text(case: Path) -> Path:
    """A text file 1 byte over the 1 GiB cap, sparse: it takes no disk space, and reading it whole
    would need the memory it claims."""
    from llmkit.data.corpus import MAX_TEXT_FILE_BYTES

    path = case / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(MAX_TEXT_FILE_BYTES + 1)
    return path


def data_file(case: Path, text: str | None, name: str = "data.jsonl") -> Path:
    path = case / name
    fifo(path) if text is None else path.write_text(text, encoding="utf-8")
    return path


def post_training(command: str, text: str | None) -> Callable:
    return lambda m, c: ([command, "--model", m["run"], "--data", data_file(c, text), "--out", c / "out"], "data.jsonl")


def generate(needle: str, build: Callable) -> Callable:
    return lambda m, c: (["generate", "--model", build(m, c), "--prompt", "hi", "--max-new-tokens", "1"], needle)


def hf_file(name: str, content: str | None) -> Callable:
    """`generate` on the HF directory with file `name` replaced by `content` (None: a FIFO)."""
    return generate(name, lambda m, c: hf_with(m, c, name, content))


# name → (models, case folder) → (argv, a text the one error line must contain, or None: any)
CASES: dict[str, Callable] = {
    # 2: a FIFO where a file is expected must not block
    "train_data_fifo": lambda m, c: (["train", "--data", fifo(c / "data.txt"), "--out", c / "out"], "FIFO"),
    "train_config_fifo": lambda m, c: (["train", "--data", corpus(c), "--config", config_file(c, None),
                                        "--out", c / "out"], "FIFO"),
    "sft_data_fifo": post_training("sft", None),
    "reward_data_fifo": post_training("reward", None),
    "dpo_data_fifo": post_training("dpo", None),
    "tokenizer_train_data_fifo": lambda m, c: (["tokenizer", "train", "--data", fifo(c / "text"), "--out", c / "tok"],
                                               "FIFO"),
    "hf_config_fifo": hf_file("config.json", None),
    "hf_tokenizer_config_fifo": hf_file("tokenizer_config.json", None),
    "hf_generation_config_fifo": hf_file("generation_config.json", None),
    "hf_chat_template_fifo": hf_file("chat_template.jinja", None),
    "hf_tokenizer_json_fifo": hf_file("tokenizer.json", None),
    "hf_weights_fifo": hf_file("model.safetensors", None),
    "checkpoint_manifest_fifo": generate("manifest.json", lambda m, c: checkpoint_with_manifest(m, c, None)),
    "gguf_fifo": generate("m.gguf", lambda m, c: fifo(c / "m.gguf")),
    "model_dev_zero": generate("/dev/zero", lambda m, c: "/dev/zero"),
    # 4, 5: deep nesting and huge integers, in every JSON reader
    "sft_deep_nesting": post_training("sft", jsonl(SFT, DEEP)),
    "sft_deep_objects": post_training("sft", jsonl('{"a":' * 50_000)),
    "reward_huge_int": post_training("reward", jsonl(PAIR, f'{{"prompt": {HUGE_INT}}}')),
    "dpo_nested_under_cap_then_deep": post_training("dpo", jsonl({**PAIR, "x": [[[[1]]]]}, '{"x": ' + DEEP)),
    "hf_config_deep": hf_file("config.json", DEEP),
    "hf_config_huge_int": hf_file("config.json", f'{{"model_type": "llama", "vocab_size": {HUGE_INT}}}'),
    "hf_tokenizer_config_deep": hf_file("tokenizer_config.json", '{"a": ' + DEEP),
    "hf_generation_config_huge_int": hf_file("generation_config.json", f'{{"eos_token_id": -{HUGE_INT}}}'),
    "hf_shard_index_deep": generate("model.safetensors.index.json",
                                    lambda m, c: sharded(m, c, '{"weight_map": ' + DEEP)),
    "checkpoint_manifest_deep": generate("manifest.json", lambda m, c: checkpoint_with_manifest(m, c, DEEP)),
    "train_config_deep": lambda m, c: (["train", "--data", corpus(c), "--config", config_file(c, DEEP),
                                        "--out", c / "out"], "nested"),
    "train_config_huge_int": lambda m, c: (["train", "--data", corpus(c), "--config",
                                            config_file(c, f'{{"steps": {HUGE_INT}}}'), "--out", c / "out"], "digits"),
    # 6: lone surrogates are refused where the record is read, naming line and field
    "sft_lone_surrogate": post_training("sft", jsonl(SFT, '{"instruction": "x\\ud800", "output": "y"}')),
    "sft_lone_low_surrogate_in_messages": post_training(
        "sft", jsonl('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udc00"}]}')),
    "dpo_reversed_surrogate_pair": post_training("dpo", jsonl('{"prompt": "p", "chosen": "\\udc00\\ud800", '
                                                              '"rejected": "r"}')),
    # 11: operating-system errors
    "train_config_directory": lambda m, c: (["train", "--data", corpus(c), "--config", c, "--out", c / "out"],
                                            "directory"),
    "train_config_through_a_file": lambda m, c: (["train", "--data", corpus(c), "--config", corpus(c) / "x.json",
                                                  "--out", c / "out"], "corpus.txt"),
    "train_data_dev_zero": lambda m, c: (["train", "--data", "/dev/zero", "--out", c / "out"], "/dev/zero"),
    "tokenizer_train_data_dev_urandom": lambda m, c: (["tokenizer", "train", "--data", "/dev/urandom", "--out",
                                                       c / "tok"], "character device"),
    "sft_data_dev_zero": lambda m, c: (["sft", "--model", m["run"], "--data", "/dev/zero", "--out", c / "out"],
                                       "/dev/zero"),
    "tokenizer_train_out_existing_file": lambda m, c: (["tokenizer", "train", "--data", corpus(c), "--out",
                                                        corpus(c)], "not a directory"),
    "tokenizer_train_out_under_a_file": lambda m, c: (["tokenizer", "train", "--data", corpus(c), "--out",
                                                       corpus(c) / "tok"], "not a directory"),
    "train_data_directory_of_fifos": lambda m, c: (["train", "--data", fifo(c / "in" / "a_fifo").parent,
                                                    "--out", c / "out"], "no UTF-8 text"),
    # 12: one line over the per-line cap; a text file over the whole-file cap (never read)
    "sft_line_over_cap": lambda m, c: (["sft", "--model", m["run"], "--data", long_line(c), "--out", c / "out"],
                                       "line longer than"),
    "train_text_over_cap": lambda m, c: (["train", "--data", sparse_text(c), "--out", c / "out"], "limit"),
}


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_case(name: str, models: dict[str, Path], root: Path) -> dict:
    case = root / name
    case.mkdir()
    argv, needle = CASES[name](models, case)
    before = tree(case)
    r = run_bounded(argv, case, memory=MEMORY_LIMIT, cpu_s=CPU_LIMIT, wall_s=WALL_LIMIT)
    return dict(rc=r.rc, stderr=r.stderr, needle=needle, new_files=sorted(tree(case) - before), argv=argv)


@pytest.fixture(scope="module")
def results(models, tmp_path_factory) -> dict[str, dict]:
    """Every case at once, four processes at a time (each pays ~2 s of CPU to import torch)."""
    root = tmp_path_factory.mktemp("hostile")
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(run_case, name, models, root) for name in CASES}
    return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input_is_one_error_line_and_exit_2(results, name):
    r = results[name]
    assert r["rc"] is not None, f"still running after {WALL_LIMIT} s (blocked?): {r['argv']}"
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), r["stderr"][-2000:]
    assert "Traceback" not in r["stderr"] and "internal error" not in lines[0], lines[0]
    if r["needle"] is not None:
        assert r["needle"] in lines[0], lines[0]
    assert not r["new_files"], f"left behind: {r['new_files']}"
