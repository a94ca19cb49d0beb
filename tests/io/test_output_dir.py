"""The one rule for a command's --out (llmkit/io/output_dir.py): a run directory, resumable, or a new one
that nothing is written over; each refusal one line, made before anything is created."""

from __future__ import annotations

import os

import pytest

from llmkit.errors import ConfigError
from llmkit.io.output_dir import check_output_dir


def with_checkpoint(run):
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "manifest.json").write_text("{}")  # what marks it complete
    return run


def test_a_run_directory_may_exist_and_is_resumed_but_not_started_over(tmp_path):
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # nothing created
    run = with_checkpoint(tmp_path / "run")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="run: already holds checkpoints; pass --resume to continue"):
        check_output_dir(run)
    assert check_output_dir(run, resume=True) == run
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert check_output_dir(tmp_path / "notes") == tmp_path / "notes"  # files, but no run: a run may start


def test_a_new_directory_is_never_written_over(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", empty=True) == tmp_path / "empty"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="taken: already exists and is not empty; choose another --out"):
        check_output_dir(tmp_path / "taken", empty=True)
    run = with_checkpoint(tmp_path / "run")
    assert check_output_dir(run, resume=True, empty=True) == run  # a fine-tune resuming in its own directory


@pytest.mark.parametrize("empty", [False, True])
def test_a_file_or_a_path_under_one_is_refused_in_either_mode(tmp_path, empty):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file: exists and is not a directory"):
        check_output_dir(tmp_path / "file", resume=True, empty=empty)
    with pytest.raises(ConfigError, match=r"file exists and is not a directory$"):
        check_output_dir(tmp_path / "file" / "out", empty=empty)


@pytest.mark.parametrize("empty", [False, True])
def test_an_unwritable_folder_is_refused_in_either_mode(tmp_path, empty):
    (tmp_path / "locked").mkdir(mode=0o555)
    if os.access(tmp_path / "locked", os.W_OK):  # root writes anywhere: nothing to refuse
        pytest.skip("running as root")
    with pytest.raises(ConfigError, match="locked is not writable"):
        check_output_dir(tmp_path / "locked" / "out", empty=empty)
