"""`llmkit train --config FILE`: unknown keys named, model overrides applied, flags win, bad types are
user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmkit
from llmkit.cli import main as cli_main
from llmkit.io.checkpoint import latest_checkpoint, read_json
from train_helpers import _one_thread, corpus  # noqa: F401 (corpus, _one_thread: fixtures)


# -- --config FILE ----------------------------------------------------------------------------------

def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def config_argv(corpus: Path, out: Path, config: Path, *extra: str) -> list[str]:
    return ["train", "--data", corpus, "--out", out, "--config", config, "--seq-len", "32",
            "--batch-size", "4", "--vocab-size", "300", "--eval-batches", "1", "--threads", "1", *extra]


def test_config_file_unknown_key_is_named(corpus, tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"preset": "gpt2-tiny", "steps": 2, "learning_rate": 0.1}))
    rc, _, err = cli(config_argv(corpus, tmp_path / "out", config), capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "learning_rate" in lines[0], err
    assert not (tmp_path / "out").exists()


def test_config_file_model_overrides_and_flag_precedence(corpus, tmp_path, capsys):
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"preset": "llama-tiny", "steps": 5, "eval_interval": 2, "lr": 0.002,
                                  "model": {"d_ff": 96, "dropout": 0.05, "n_layers": 1}}))
    out = tmp_path / "out"
    rc, _, err = cli(config_argv(corpus, out, config, "--steps", "3"), capsys)
    assert rc == 0, err
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt.name == "step-00000003", "--steps on the command line overrides the file"
    model = read_json(ckpt / "config.json")["model"]
    assert (model["d_ff"], model["dropout"], model["n_layers"]) == (96, 0.05, 1)
    assert (model["d_model"], model["position"], model["n_kv_heads"]) == (64, "rope", 2), \
        "fields not in the file come from the preset named in the file"
    train_config = read_json(ckpt / "train_state.json")["train_config"]
    assert (train_config["steps"], train_config["lr"], train_config["eval_interval"]) == (3, 0.002, 2)
    assert llmkit.load(out).config.d_ff == 96


@pytest.mark.parametrize("content,named", [
    ({"model": {"hidden_size": 64}}, "hidden_size"),   # unknown model field
    ({"steps": "3"}, "steps"),                           # wrong type for a training field
    ({"model": {"dropout": "0.1"}}, "dropout"),          # wrong type for a model field
])
def test_config_file_bad_fields_are_user_errors(corpus, tmp_path, capsys, content, named):
    """Bad config-file contents are user input: exit 2 with one `error:` line naming the field,
    never a TypeError traceback."""
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"preset": "gpt2-tiny", **content}))
    rc, _, err = cli(config_argv(corpus, tmp_path / "out", config), capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], err
    assert not (tmp_path / "out").exists()
