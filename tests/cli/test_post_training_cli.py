"""`llmkit sft | reward | score | dpo` as real subprocesses: runs that load back everywhere, resume, and bad
input that prints one error line, exits 2 and leaves no output directory behind.

All commands of a phase start at once (each process pays for importing torch) and are collected by name.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from post_training_helpers import addition_records, easy_preferences, save_tiny_model, write_jsonl
from llmkit_command import llmkit_cmd

FAST = ("--steps", "3", "--batch-size", "4", "--eval-interval", "3", "--eval-batches", "1", "--log-interval", "1",
        "--lr", "3e-3", "--warmup-steps", "1", "--seed", "0")


def run_all(cwd: Path, commands: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess]:
    procs = {name: subprocess.Popen([*llmkit_cmd(), *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, args in commands.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


# Bad input run as real subprocesses (one per kind of failure); test_records.py covers every case in-process.
BAD = {
    "bad_sft_syntax": ("sft", "syntax.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n',
                       r"syntax.jsonl:2:21: invalid JSON \(Expecting ',' delimiter\)"),
    "bad_sft_not_utf8": ("sft", "not_utf8.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}\n',
                         r"not_utf8.jsonl:2: not UTF-8 text \(invalid byte 0xff at offset 17\)"),
    "bad_reward_missing": ("reward", "missing.jsonl", '{"prompt": "p", "chosen": "a"}\n',
                           r"missing.jsonl:1: missing field 'rejected'"),
    "bad_dpo_degenerate": ("dpo", "same.jsonl", '{"prompt": "p", "chosen": "a", "rejected": "a"}\n',
                           r"0 usable examples in .*same.jsonl \(1 lines read; dropped: 1 chosen == rejected\)"),
}


def with_bad_lines(path: Path, name: str) -> Path:
    """A copy of a JSONL file whose 3rd and 5th lines are broken: invalid JSON, then a record missing a field."""
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2], lines[4] = lines[2][:-1], "{}"
    out = path.with_name(name)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    root = tmp_path_factory.mktemp("post_training_cli")
    base = save_tiny_model(root / "base")
    sft_data = write_jsonl(root / "sft.jsonl", addition_records(24))
    prefs = write_jsonl(root / "prefs.jsonl", easy_preferences(24))
    for command, file, body, _ in BAD.values():
        (root / file).write_bytes(body if isinstance(body, bytes) else body.encode())
    sft_skip, prefs_skip = with_bad_lines(sft_data, "sft_skip.jsonl"), with_bad_lines(prefs, "prefs_skip.jsonl")
    first = {
        "sft": ("sft", "--model", base, "--data", sft_data, "--out", "sft", *FAST, "--lora-rank", "2",
                "--lora-targets", "q_proj,v_proj,o_proj", "--pack"),
        "reward": ("reward", "--model", base, "--data", prefs, "--out", "rm", *FAST),
        "dpo": ("dpo", "--model", base, "--data", prefs, "--out", "dpo", *FAST, "--beta", "0.2"),
        **{name: (command, "--model", base, "--data", root / file, "--out", name, *FAST)
           for name, (command, file, _, _) in BAD.items()},
        "skip_sft": ("sft", "--model", base, "--data", sft_skip, "--out", "skip_sft", *FAST, "--skip-bad-lines", "2"),
        "skip_reward": ("reward", "--model", base, "--data", prefs_skip, "--out", "skip_reward", *FAST,
                        "--skip-bad-lines", "3"),
        "skip_too_many": ("dpo", "--model", base, "--data", prefs_skip, "--out", "skip_too_many", *FAST,
                          "--skip-bad-lines", "1"),
    }
    results = run_all(root, first)
    again = ("sft", "--model", base, "--data", sft_data, "--out", "sft", *FAST[2:], "--lora-rank", "2",
             "--lora-targets", "q_proj,v_proj,o_proj", "--pack")
    second = {
        "sft_resume": (*again, "--steps", "5", "--resume"),
        "sft_again": (*again, "--steps", "3"),
        "chat_sft": ("chat", "What is 1+2?", "--model", "sft", "--max-new-tokens", "4"),
        "score_good": ("score", "--model", "rm", "--prompt", "What is 7+7?", "--response", "yes hello world"),
        "score_bad": ("score", "--model", "rm", "--prompt", "What is 7+7?", "--response", "no the quick brown fox"),
    }
    results.update(run_all(root, second))
    return root, results


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("name", ["sft", "reward", "dpo"])
def test_training_commands_write_metrics_and_checkpoints(cli, name):
    root, results = cli
    ok(results[name])
    out = root / {"reward": "rm"}.get(name, name)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r][:3] == [1, 2, 3]
    assert any("val_loss" in r for r in rows) and (out / "loss.png").is_file()
    assert (out / "checkpoints" / "step-00000003" / "manifest.json").is_file()
    if name == "reward":
        assert "val_accuracy" in rows[-1]
    if name == "dpo":
        assert {"reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"} <= set(rows[0])


def test_resume_continues_and_a_second_run_needs_resume(cli):
    root, results = cli
    ok(results["sft_resume"])
    steps = [json.loads(line)["step"] for line in (root / "sft" / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == [1, 2, 3, 4, 5]
    assert "already holds checkpoints; pass --resume" in error_line(results["sft_again"])


def test_lora_output_chats(cli):
    _, results = cli
    assert ok(results["chat_sft"]).stdout.endswith("\n")  # adapters merged on load


def test_score_prints_the_reward(cli):
    _, results = cli
    good, bad = (float(ok(results[name]).stdout) for name in ("score_good", "score_bad"))
    assert good > bad  # the easy preference was learned in three steps


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_error_line_and_leaves_nothing(cli, name):
    root, results = cli
    line = error_line(results[name])
    assert re.search(BAD[name][3], line), line
    assert not (root / name).exists(), f"{name} left its output directory behind"


@pytest.mark.parametrize("name, data", [("skip_sft", "sft_skip.jsonl"), ("skip_reward", "prefs_skip.jsonl")])
def test_skip_bad_lines_drops_them_and_prints_each_location(cli, name, data):
    root, results = cli
    err = ok(results[name]).stderr
    skipped = [line for line in err.splitlines() if line.startswith("warning: skipped bad line ")]
    assert len(skipped) == 2, err
    assert re.search(rf"{data}:3:\d+: invalid JSON", skipped[0]) and f"{data}:5: missing field" in skipped[1]
    assert "(dropped: 2 invalid)" in err
    assert (root / name / "metrics.jsonl").is_file()


def test_one_bad_line_past_skip_bad_lines_is_the_one_line_error(cli):
    root, results = cli
    line = error_line(results["skip_too_many"])
    assert re.search(r"prefs_skip.jsonl:5: missing field 'prompt' \(bad line 2; --skip-bad-lines 1\)", line), line
    assert "warning: skipped" not in results["skip_too_many"].stderr  # the run stopped before reporting
    assert not (root / "skip_too_many").exists()


@pytest.mark.parametrize("args, pattern", [
    (("--config", "CONFIG"), r"\"model\" fields cannot change when fine-tuning"),
    (("--lora-rank", "2", "--lora-targets", "qkv"), r"--lora-targets qkv matched no layer; .*q_proj"),
    (("--lora-rank", "-1"), r"--lora-rank must be ≥ 0"),
])
def test_bad_options_in_process(cli, tmp_path, capsys, args, pattern):
    from llmkit.cli import main

    root, _ = cli
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"steps": 3, "model": {"n_layers": 3}}))
    argv = ["sft", "--model", str(root / "base"), "--data", str(root / "sft.jsonl"), "--out", str(tmp_path / "out"),
            *(str(config) if a == "CONFIG" else a for a in args)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]) and err.splitlines()[-1] == errors[0], err
    assert not (tmp_path / "out").exists()
