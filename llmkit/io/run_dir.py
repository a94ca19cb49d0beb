"""A training run's directory: one writer at a time, and a metrics log that survives a crash.

Two `llmkit train --out D` at once would interleave checkpoints and metrics; `hold_run_dir` takes a
non-blocking `fcntl.flock` on `D/.llmkit.lock` (the pid of the holder written inside) so the second
is refused in one line naming the first. The lock is per process and re-entrant (the pipelines and
the Trainer both hold it), released when the last holder leaves or the process dies.

metrics.jsonl is appended one whole line per write(2) on an O_APPEND descriptor, so a crash leaves
at most a partial last line, and `repair_metrics` cuts it (and rows past the resumed step) on
resume, rewriting the file through a temp file and a rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator

from llmkit.errors import CheckpointError, ConfigError
from llmkit.io.checkpoint import (_STEP_DIR, atomic_write_bytes, latest_checkpoint, list_checkpoints,
                                   require_checkpoint, verify_checkpoint)
from llmkit.plots import read_metrics

LOCK_NAME = ".llmkit.lock"
_held: dict[Path, tuple[int, int]] = {}  # resolved run dir -> (lock fd, holders in this process)


def _acquire(lock_path: Path) -> int:
    """An fd holding the flock on `lock_path`; the file may be unlinked by a releasing holder
    between our open and our lock, so the lock counts only if the path still names our file."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{lock_path.parent}: in use by another llmkit run (pid {holder}); wait for "
                                  "it to finish or choose another --out") from None
            raise CheckpointError(f"{lock_path}: cannot lock ({exc.strerror or exc})") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # we locked a file that its holder had just removed: try the new one


@contextlib.contextmanager
def hold_run_dir(out_dir: str | Path) -> Iterator[Path]:
    """Create `out_dir` if needed and hold its lock for the block; a second process gets a one-line
    ConfigError naming the holder's pid. Nested holds in one process share the lock."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"{out_dir}: cannot create the output directory ({exc.strerror or exc})") from None
    key = out_dir.resolve()
    if key in _held:
        fd, count = _held[key]
        _held[key] = (fd, count + 1)
    else:
        try:
            _held[key] = (_acquire(out_dir / LOCK_NAME), 1)
        except PermissionError as exc:
            raise CheckpointError(f"{out_dir}: cannot write the lock file ({exc.strerror})") from None
    try:
        yield out_dir
    finally:
        fd, count = _held[key]
        if count > 1:
            _held[key] = (fd, count - 1)
        else:
            del _held[key]
            with contextlib.suppress(OSError):  # unlink while locked: a waiter re-checks the inode
                (out_dir / LOCK_NAME).unlink()
            os.close(fd)


def append_metrics(path: str | Path, row: dict[str, Any]) -> None:
    """Append one JSON line with a single write(2): a crash cannot leave half of a middle row."""
    path = Path(path)
    data = (json.dumps(row) + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot append metrics ({exc.strerror or exc})") from None
    if written != len(data):  # a full disk mid-write; the partial line is cut at the next resume
        raise CheckpointError(f"{path}: cannot append metrics (wrote {written} of {len(data)} bytes)")


def repair_metrics(path: str | Path, step: int) -> dict[str, int]:
    """Keep the whole rows up to `step` (a resumed run's log then reads as one uninterrupted run),
    rewritten atomically; returns counts of the rows kept, dropped past `step` and unreadable (a
    last line a crash cut short, a row without an integer step). Damage before the last line is
    not a crash's doing and stays an error naming file:line (llmkit.plots.read_metrics)."""
    path = Path(path)
    if not path.exists():
        return {"kept": 0, "after_step": 0, "unreadable": 0}
    rows = read_metrics(path)  # a regular file; a last line that does not parse is left out
    data = path.read_bytes()
    stepped = [r for r in rows if isinstance(r.get("step"), int) and not isinstance(r["step"], bool)]
    kept = [r for r in stepped if r["step"] <= step]
    unreadable = sum(1 for line in data.split(b"\n") if line.strip()) - len(stepped)
    if len(kept) < len(stepped) or unreadable or not data.endswith(b"\n"):
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
    return {"kept": len(kept), "after_step": len(stepped) - len(kept), "unreadable": unreadable}


def find_resume_checkpoint(root: str | Path) -> tuple[Path | None, list[str]]:
    """The newest verified checkpoint under `root` (None: start from step 0) and one line for each
    thing a resume passes over, so that no work is discarded without a word.

    A `step-N` directory without a readable manifest was complete once (only finished saves are
    renamed into place) and is now damaged; with no complete checkpoint beside it, resuming from
    step 0 would later overwrite it, so that is an error. An interrupted save (`step-N.tmp`) is
    named, then restarting is right: nothing in it was ever complete."""
    root = Path(root)
    complete = list_checkpoints(root)
    entries = sorted(root.iterdir()) if root.is_dir() else []
    damaged = [p.name for p in entries if _STEP_DIR.match(p.name) and p not in complete]
    interrupted = [p.name for p in entries if p.name.endswith(".tmp") and _STEP_DIR.match(p.name[:-4])]
    if damaged and not complete:
        raise CheckpointError(f"{root}: {', '.join(damaged)} {'has' if len(damaged) == 1 else 'have'} no readable "
                              "manifest.json and no complete checkpoint remains; cannot resume (move "
                              f"{'it' if len(damaged) == 1 else 'them'} away to start over)")
    notes = [f"{root / name}: damaged (no readable manifest.json), passed over" for name in damaged]
    if not complete:
        if interrupted:
            notes.append(f"{root}: no complete checkpoint ({', '.join(interrupted)}: a save that was "
                         "interrupted); starting from step 0")
        return None, notes
    path = latest_checkpoint(root)
    if path is None:
        path = require_checkpoint(root)  # raises, naming why the newest is unusable
    for newer in complete[complete.index(path) + 1:]:
        try:
            verify_checkpoint(newer)
        except CheckpointError as exc:
            notes.append(f"{exc}; resuming from the older {path.name}")
    return path, notes
