"""Tests for llmkit.io.checkpoint: round trips, purging, corruption, and kill -9 mid-save.

The crash tests run a child process that SIGKILLs itself at each fault stage (LLMKIT_FAULT_AT);
the children run in parallel so the whole file stays fast.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from llmkit.errors import CheckpointError, NonFiniteError
from llmkit.io.checkpoint import (FAULT_STAGES, atomic_write_text, latest_checkpoint,
                                  list_checkpoints, load_tensors, read_json, save_checkpoint,
                                  verify_checkpoint)

REPO = Path(__file__).resolve().parents[2]

# One source for the payload, run both here and in the crashing child, so both sides agree.
PAYLOAD_SRC = '''
def tensors_for(step):
    g = torch.Generator().manual_seed(step)
    w = torch.randn(8, 4, generator=g)
    return {"model.safetensors": {"embed.weight": w, "lm_head.weight": w,
                                  "count": torch.arange(step, step + 4)},
            "optimizer.safetensors": {"exp_avg": torch.full((3,), float(step))}}

def json_for(step):
    return {"config.json": {"dim": 4}, "train_state.json": {"step": step, "loss": 1.0 / step}}
'''
_ns: dict[str, Any] = {"torch": torch}
exec(PAYLOAD_SRC, _ns)
tensors_for = _ns["tensors_for"]
json_for = _ns["json_for"]

CHILD_SRC = f'''
import os, sys, torch
from llmkit.io.checkpoint import save_checkpoint
{PAYLOAD_SRC}
root, stage = sys.argv[1], sys.argv[2]
os.environ.pop("LLMKIT_FAULT_AT", None)
save_checkpoint(root, 1, tensors=tensors_for(1), json_files=json_for(1))
os.environ["LLMKIT_FAULT_AT"] = stage
save_checkpoint(root, 2, tensors=tensors_for(2), json_files=json_for(2))
sys.exit(3)  # not reached: the fault hook kills the process first
'''


def _save(root: Path, step: int, **kwargs: Any) -> Path:
    return save_checkpoint(root, step, tensors=tensors_for(step), json_files=json_for(step),
                           **kwargs)


def _steps(root: Path) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in list_checkpoints(root)]


def _assert_payload(ckpt: Path, step: int,
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    for file, expected in (tensors or tensors_for(step)).items():
        loaded = load_tensors(ckpt / file)
        assert loaded.keys() == expected.keys()
        for name, t in expected.items():
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), (file, name)
    for file, obj in json_for(step).items():
        assert read_json(ckpt / file) == obj


def test_round_trip_with_tied_tensors_and_copied_tokenizer(tmp_path: Path) -> None:
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": "bpe"}', encoding="utf-8")
    base = torch.randn(6, 4)
    extra = {"transposed": base.t(), "half": base[:3], "bf16": base.to(torch.bfloat16)}
    tensors = tensors_for(5)
    tensors["model.safetensors"].update(extra)
    tensors["rng.safetensors"] = {"cpu": torch.get_rng_state()}
    root = tmp_path / "ckpts"
    path = save_checkpoint(root, 5, tensors=tensors, json_files=json_for(5),
                           copy_files={"tokenizer.json": tok})
    assert path == root / "step-00000005"
    _assert_payload(path, 5, tensors)
    model = load_tensors(path / "model.safetensors")
    assert model["embed.weight"].data_ptr() != model["lm_head.weight"].data_ptr()
    assert (path / "tokenizer.json").read_bytes() == tok.read_bytes()
    manifest = verify_checkpoint(path)
    assert manifest["format_version"] == 1 and manifest["step"] == 5
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.safetensors",
                                      "rng.safetensors", "config.json", "train_state.json",
                                      "tokenizer.json"}
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005"]


def test_latest_and_purge_keep_two(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert _steps(tmp_path) == [3, 4]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


def test_keep_one_still_keeps_two_and_keep_three_keeps_three(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _save(tmp_path / "a", step, keep=1)
    assert _steps(tmp_path / "a") == [20, 30]
    for step in (1, 2, 3, 4):
        _save(tmp_path / "b", step, keep=3)
    assert _steps(tmp_path / "b") == [2, 3, 4]


def test_resave_same_step_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    tensors = tensors_for(1)
    tensors["model.safetensors"]["count"] = torch.tensor([7, 7])
    path = save_checkpoint(tmp_path, 1, tensors=tensors, json_files=json_for(1))
    assert torch.equal(load_tensors(path / "model.safetensors")["count"], torch.tensor([7, 7]))
    verify_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_stale_tmp_dir_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "step-00000003.tmp"
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"junk")
    path = _save(tmp_path, 3)
    assert "junk.bin" not in verify_checkpoint(path)["files"]
    assert not (path / "junk.bin").exists() and not stale.exists()


def test_non_finite_model_tensor_refused_and_nothing_written(tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    tensors = tensors_for(1)
    tensors["model.safetensors"]["bad"] = torch.tensor([1.0, float("nan")])
    with pytest.raises(NonFiniteError, match=r"step 1: tensor bad in model\.safetensors"):
        save_checkpoint(root, 1, tensors=tensors, json_files=json_for(1))
    assert not root.exists()
    # Only the files named in check_finite are checked: an Inf optimizer moment is saved.
    tensors = tensors_for(1)
    tensors["optimizer.safetensors"]["exp_avg"] = torch.tensor([float("inf")])
    save_checkpoint(root, 1, tensors=tensors, json_files=json_for(1))
    assert _steps(root) == [1]


@pytest.mark.parametrize("name", ["../escape.json", "sub/x.json", "manifest.json", ""])
def test_bad_file_names_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(CheckpointError, match="file name"):
        save_checkpoint(tmp_path, 1, tensors={}, json_files={name: {}})
    assert list(tmp_path.iterdir()) == []


def test_corrupt_newest_falls_back_to_previous(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    target = newest / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF  # a byte inside tensor data: the header still parses, only sha256 notices
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 mismatch") as info:
        verify_checkpoint(newest)
    assert "\n" not in str(info.value)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert latest_checkpoint(tmp_path, verify=False) == newest


def test_verify_reports_missing_file_size_and_manifest(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    with (path / "config.json").open("ab") as f:
        f.write(b" ")
    with pytest.raises(CheckpointError, match=r"config\.json: size is"):
        verify_checkpoint(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: listed in the manifest"):
        verify_checkpoint(path)
    (path / "manifest.json").write_text('{"format_version": 99, "files": {}}')
    with pytest.raises(CheckpointError, match="unsupported format_version 99"):
        verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json: no such file"):
        verify_checkpoint(path)
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        verify_checkpoint(tmp_path / "step-00000009")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, str]]:
    """Run one crashing child per fault stage, all at once; stage -> (root, returncode, stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    procs = {}
    for stage in FAULT_STAGES:
        root = tmp_path_factory.mktemp(f"crash-{stage}")
        procs[stage] = (root, subprocess.Popen(
            [sys.executable, "-c", CHILD_SRC, str(root), stage], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results = {}
    for stage, (root, proc) in procs.items():
        _, stderr = proc.communicate(timeout=120)
        results[stage] = (root, proc.returncode, stderr)
    return results


@pytest.mark.parametrize("stage", FAULT_STAGES)
def test_kill_9_at_each_stage_keeps_a_valid_checkpoint(
        crashed: dict[str, tuple[Path, int, str]], stage: str) -> None:
    root, returncode, stderr = crashed[stage]
    assert returncode == -signal.SIGKILL, stderr
    expected = 2 if stage == "after_rename" else 1
    latest = latest_checkpoint(root)
    assert latest == root / f"step-{expected:08d}"
    assert verify_checkpoint(latest)["step"] == expected
    _assert_payload(latest, expected)
    # Crashing before the rename leaves the half-written step 2 as a .tmp dir, never as step 2.
    tmp = root / "step-00000002.tmp"
    assert tmp.is_dir() == (stage != "after_rename")
    if tmp.is_dir():
        written = {p.name for p in tmp.iterdir()}
        assert ("manifest.json" in written) == (stage == "after_manifest"), written
        assert (written == {"model.safetensors"}) == (stage == "after_first_file"), written
    path = _save(root, 3)
    _assert_payload(path, 3)
    assert _steps(root) == [expected, 3]
    assert not [p.name for p in root.iterdir() if p.suffix in (".tmp", ".old")]


def _write_safetensors(path: Path) -> bytes:
    save_file({"w": torch.randn(4, 4)}, path)
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "header_too_long"])
def test_load_tensors_corrupt_file_is_one_line_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.safetensors"
    good = _write_safetensors(path)
    bad = {"garbage": b"this is not a safetensors file at all" * 4,
           "empty": b"",
           "truncated": good[:-7],
           "header_too_long": struct.pack("<Q", len(good) * 10) + good[8:]}[kind]
    path.write_bytes(bad)
    with pytest.raises(CheckpointError, match="corrupt safetensors file") as info:
        load_tensors(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_tensors_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_tensors(tmp_path / "absent.safetensors")


def test_read_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "dim": 4,\n  "oops": }\n', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"config\.json:3:\d+: invalid JSON") as info:
        read_json(path)
    assert "\n" not in str(info.value)


def test_atomic_write_text_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second ✓")
    assert path.read_text(encoding="utf-8") == "second ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(CheckpointError, match="cannot write"):
        atomic_write_text(tmp_path / "missing-dir" / "x.json", "data")
