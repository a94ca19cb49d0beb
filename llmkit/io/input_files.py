"""The one way llmkit opens a file that a user or a stranger named: regular files only, bounded reads.

A FIFO, a character device (`/dev/zero`, a terminal), a socket or a directory given where a file is
expected would block forever or read without end; every reader of a user-named path opens it with
`open_regular`, which refuses them in one line naming the path. Whole-file reads stop at a byte cap
(`read_regular_bytes`) and line readers at a per-line cap (`iter_lines`), so memory is bounded by the
cap, never by what the file claims or holds. Bounds and threat model: docs/security.md.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from llmkit.errors import DatasetError, LlmkitError

MAX_LINE_BYTES = 64 << 20  # one JSONL record or text line; a longer one is an error naming its line
MAX_WHOLE_FILE_BYTES = 256 << 20  # a JSON file parsed whole (configs, indexes, manifests)

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is ("a FIFO (named pipe)", ...), or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | Path, *, error: type[LlmkitError] = DatasetError, what: str = "file") -> BinaryIO:
    """Open `path` for binary reading if it is a regular file; else raise `error` naming the path.

    The mode is checked before opening (opening some devices has effects) and again on the open
    descriptor, which is opened non-blocking so that a FIFO swapped in between cannot block."""
    path = Path(path)
    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind is not None:
            raise error(f"{path}: is {kind}, not a regular {what}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path}: no such file or directory") from None
    except OSError as exc:  # permissions, a name too long, a loop of links, ...
        raise error(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    kind = _not_regular(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise error(f"{path}: is {kind}, not a regular {what}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular_bytes(path: str | Path, *, error: type[LlmkitError] = DatasetError, what: str = "file",
                       limit: int = MAX_WHOLE_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (a bigger one is an error, read or not)."""
    with open_regular(path, error=error, what=what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(f"{path}: {size:,} bytes, over the {limit:,}-byte limit for a {what}")
        # read(n) allocates n bytes up front, so ask for the size the file has, not for the limit;
        # then read on in small pieces, in case it grew (or, like /proc files, claims size 0).
        chunks = [f.read(size)]
        total = len(chunks[0])
        while chunk := f.read(min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise error(f"{path}: over the {limit:,}-byte limit for a {what} (it grew while being read)")
        return b"".join(chunks)


def iter_lines(path: str | Path, *, error: type[LlmkitError] = DatasetError, what: str = "file",
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes without the "\\n") for every physical line of a regular file, streamed:
    memory holds one line of at most `max_line_bytes`; a longer line is an error naming it."""
    with open_regular(path, error=error, what=what) as f:
        number = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            elif len(raw) > max_line_bytes:
                raise error(f"{path}:{number}: line longer than {max_line_bytes:,} bytes")
            yield number, raw
