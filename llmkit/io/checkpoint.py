"""Crash-safe checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a directory `step-NNNNNNNN/`. It is written as `step-NNNNNNNN.tmp/`, every file
fsynced, then `manifest.json` (size and sha256 of each file) last, then renamed into place. A
directory without a parseable manifest is never a checkpoint, so a crash at any moment leaves the
previous checkpoint as the newest complete one. Tests simulate such crashes with the
LLMKIT_FAULT_AT environment variable (see FAULT_STAGES). No pickle is ever read or written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmkit.errors import CheckpointError, NonFiniteError
from llmkit.io import safe_json
from llmkit.io.safetensors_header import check_unique_keys

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAULT_ENV = "LLMKIT_FAULT_AT"
# The points, in order, where a test may SIGKILL the process during save_checkpoint.
FAULT_STAGES = ("after_first_file", "before_manifest", "after_manifest", "after_rename")
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_LEFTOVER_DIR = re.compile(r"^step-\d{8,}\.(tmp|old)$")


def _fault(stage: str) -> None:
    """Die with SIGKILL (no cleanup, no flush) if the test hook names `stage`."""
    if os.environ.get(FAULT_ENV) == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory so that entries created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)  # POSIX only: Windows cannot open a directory this way
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so that large tensor files need no extra memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_synced(path: Path, data: bytes) -> None:
    """Write a new file and fsync it before returning."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` so readers see the old or the new content, never a mix. The temp file sits
    in the same directory because os.replace is atomic only within one filesystem."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        tmp.unlink(missing_ok=True)  # already gone after a successful replace
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | Path) -> Any:
    """Parse a UTF-8 JSON file (a manifest, config.json, tokenizer_config.json, ...); every failure,
    hostile ones included (a FIFO, deep nesting, huge integers), is a one-line CheckpointError."""
    return safe_json.read_json(path, what="JSON file", error=CheckpointError)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU; a missing or corrupt file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        check_unique_keys(path)
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__  # library messages may span lines
        raise CheckpointError(f"{path}: corrupt safetensors file ({reason})") from exc


def _all_finite(t: torch.Tensor) -> bool:
    """True when a floating or complex tensor has no NaN/Inf (integer tensors always are)."""
    if not (t.is_floating_point() or t.is_complex()):
        return True
    t = t.float() if t.element_size() == 1 else t  # isfinite has no float8 kernels
    return bool(torch.isfinite(t).all())


def _plain_name(name: Any) -> bool:
    """A checkpoint file name: no directory parts (a manifest must not point outside its dir)."""
    return (isinstance(name, str) and name not in ("", ".", "..", MANIFEST)
            and "/" not in name and "\\" not in name)


def _prepare(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
             json_files: dict[str, Any], copy_files: dict[str, Path],
             check_finite: Sequence[str]) -> dict[str, bytes]:
    """Check everything before the first write, so a refused save leaves the disk untouched."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{root}: checkpoint step must be a non-negative int, got {step!r}")
    names = [*tensors, *json_files, *copy_files]
    for i, name in enumerate(names):
        if not _plain_name(name) or name in names[:i]:
            raise CheckpointError(f"{root}: checkpoint file name {name!r} is invalid or repeated")
    for file, group in tensors.items():
        for name, t in group.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{file}: entry {name!r} is a {type(t).__name__}, "
                                      "expected a str name and a tensor")
            if file in check_finite and not _all_finite(t):
                raise NonFiniteError(f"refusing to save step {step}: tensor {name} in {file} "
                                     "has non-finite values")
    for name, src in copy_files.items():
        if not src.is_file():
            raise CheckpointError(f"{src}: no such file (to copy into the checkpoint as {name})")
    encoded = {}
    for name, obj in json_files.items():
        try:
            encoded[name] = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{root}: {name} is not JSON-serialisable ({exc})") from None
    return encoded


def _unshared(group: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (safetensors refuses shared ones)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in group.items():
        t = t.detach().to("cpu").contiguous()
        # Tied weights arrive as one storage under two names; the clone costs memory only for them.
        out[name] = t.clone() if (ptr := t.untyped_storage().data_ptr()) in seen else t
        seen.add(ptr)
    return out


def _write_payload(tmp: Path, tensors: dict[str, dict[str, torch.Tensor]],
                   encoded: dict[str, bytes], copy_files: dict[str, Path]) -> None:
    """Write every non-manifest file into `tmp`, each fsynced; fires the after_first_file fault."""
    for i, (file, group) in enumerate(tensors.items()):
        save_file(_unshared(group), tmp / file, metadata={"format": "pt"})
        fsync_path(tmp / file)
        if i == 0:
            _fault("after_first_file")
    for name, data in encoded.items():
        write_synced(tmp / name, data)
    for name, src in copy_files.items():
        shutil.copyfile(src, tmp / name)
        fsync_path(tmp / name)


def _purge(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step`; drop older ones and crash leftovers.
    Checkpoints with a higher step (an abandoned run resumed from earlier) are left alone."""
    done = [p for p in list_checkpoints(root) if int(p.name[5:]) <= step]
    for path in done[:-keep]:
        # Rename first: a crash mid-delete leaves `.old` debris, not a half-deleted "checkpoint".
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rename(path, old)
    for path in root.iterdir():
        if _LEFTOVER_DIR.match(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # a failed purge must not fail the save


def save_checkpoint(root: str | Path, step: int, *, tensors: dict[str, dict[str, torch.Tensor]],
                    json_files: dict[str, Any], copy_files: dict[str, Path] | None = None,
                    keep: int = 2, check_finite: Sequence[str] = ("model.safetensors",)) -> Path:
    """Write `root/step-{step:08d}/` crash-safely, purge old checkpoints, return its path."""
    root = Path(root)
    copy_files = {name: Path(src) for name, src in (copy_files or {}).items()}
    encoded = _prepare(root, step, tensors, json_files, copy_files, check_finite)
    final = root / f"step-{step:08d}"
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fsync_path(root.parent)  # a freshly created root must survive a crash too
        shutil.rmtree(tmp, ignore_errors=True)  # a stale tmp dir from a crashed save of this step
        tmp.mkdir()
        _write_payload(tmp, tensors, encoded, copy_files)
        _fault("before_manifest")
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(tmp.iterdir())}
        manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
        write_synced(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        fsync_path(tmp)
        _fault("after_manifest")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():  # re-saving a step (after a resume): move the old copy aside
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, SafetensorError) as exc:  # disk full, permissions: the last one stays newest
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())
        raise CheckpointError(f"{final}: cannot write checkpoint ({reason})") from exc
    _fault("after_rename")
    _purge(root, step, max(keep, 2))
    return final


def _verify_entry(path: Path, name: Any, entry: Any) -> None:
    """Check one manifest entry against the file on disk."""
    if not _plain_name(name):
        raise CheckpointError(f"{path / MANIFEST}: invalid file name {name!r} in manifest")
    if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)):
        raise CheckpointError(f"{path / MANIFEST}: malformed entry for {name}")
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{file}: listed in the manifest but missing")
    if (size := file.stat().st_size) != entry["size"]:
        raise CheckpointError(f"{file}: size is {size} bytes, manifest says {entry['size']}")
    if sha256_file(file) != entry["sha256"]:
        raise CheckpointError(f"{file}: sha256 mismatch (file is corrupt)")


def verify_checkpoint(path: str | Path) -> dict:
    """Check every file listed in the manifest (presence, size, sha256); return the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    manifest_path = path / MANIFEST
    manifest = read_json(manifest_path)  # missing: "<dir>/manifest.json: no such file"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: malformed manifest (no 'files' object)")
    if (version := manifest.get("format_version")) != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: unsupported format_version {version!r} "
                              f"(expected {FORMAT_VERSION})")
    for name, entry in manifest["files"].items():
        _verify_entry(path, name, entry)
    return manifest


def _complete_step(path: Path) -> int | None:
    """The step of a finished checkpoint dir (`step-N` holding a manifest object), else None."""
    match = _STEP_DIR.match(path.name)
    try:
        done = bool(match) and path.is_dir() and isinstance(read_json(path / MANIFEST), dict)
    except CheckpointError:
        return None
    return int(match.group(1)) if done else None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint dirs under `root`, oldest step first; crash leftovers are ignored."""
    root = Path(root)
    paths = root.iterdir() if root.is_dir() else ()
    steps = {p: step for p in paths if (step := _complete_step(p)) is not None}
    return sorted(steps, key=lambda p: steps[p])


def latest_checkpoint(root: str | Path, *, verify: bool = True) -> Path | None:
    """The newest checkpoint (the newest that verifies, when `verify`), or None."""
    for path in reversed(list_checkpoints(root)):
        try:
            if verify:
                verify_checkpoint(path)
            return path
        except CheckpointError:
            continue  # a corrupt newer checkpoint falls back to the previous one
    return None


def require_checkpoint(root: str | Path) -> Path:
    """The newest checkpoint that verifies, or a CheckpointError that says why there is none."""
    path = latest_checkpoint(root)
    if path is not None:
        return path
    candidates = list_checkpoints(root)
    if not candidates:
        raise CheckpointError(f"{root}: no complete checkpoint")
    try:
        verify_checkpoint(candidates[-1])
    except CheckpointError as exc:
        raise CheckpointError(f"{root}: no usable checkpoint; the newest is corrupt: {exc}") from None
    raise AssertionError("unreachable: a verified checkpoint was not returned")  # pragma: no cover
