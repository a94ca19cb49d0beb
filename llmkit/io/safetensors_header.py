"""The one check llmkit adds before handing a file to the `safetensors` library.

The library validates lengths, offsets (contiguous, in bounds, no holes or overlaps, no trailing
bytes), shapes and dtypes (tests/io/test_safetensors_corpus.py holds the corpus that proves it), but
its JSON reader keeps the last of two identical keys, so a header naming one tensor twice with the
same entry loads silently. A file that says two things about one name is corrupt: refuse it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the library's own cap


class HeaderError(ValueError):
    """A safetensors header llmkit refuses (the caller adds the file and the error type)."""


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderError(f"header names {key!r} twice")
        seen[key] = value
    return seen


def check_unique_keys(path: str | Path) -> None:
    """Raise HeaderError when the header repeats a key; leave every other check to the library
    (a header that is too long or not JSON is passed through for the library to reject)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            return
        raw = f.read(length)
    try:
        json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
