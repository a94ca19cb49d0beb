"""Find, read, split and tokenize a plain-text corpus.

A corpus is any set of files and directories. Every file that is strict UTF-8 text counts,
whatever its extension; inside directories, binary, non-UTF-8 and empty files are skipped and
counted, while a file named explicitly must be text. Token streams join documents with EOS and
use the smallest unsigned dtype that fits the vocabulary.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmkit.errors import ConfigError, DatasetError
from llmkit.io.input_files import read_regular_bytes

if TYPE_CHECKING:
    from llmkit.tokenizer import Tokenizer

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF32_BOMS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")  # checked first: UTF-32 LE starts like UTF-16 LE
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
SKIP_KINDS = ("binary", "not UTF-8", "empty")

# A split point that cannot change byte-level pre-tokenization: a lone "\n" between two printable
# ASCII non-space characters always ends one pre-token and starts the next, whole or split.
_SAFE_SPLIT = re.compile(r"(?<=[!-~])\n(?=[!-~])")
_CHUNK_CHARS = 1 << 20
# Bounds on one file (read whole, then cut into chunks) and one chunk (encoded at once); the
# memory of tokenizing a file is a few times its size (docs/security.md).
MAX_TEXT_FILE_BYTES = 1 << 30
MAX_CHUNK_CHARS = 64 << 20


def _problem(data: bytes) -> str | None:
    """Why `data` is not usable UTF-8 text (one of SKIP_KINDS), or None when it is."""
    if not data:
        return "empty"
    if data.startswith(_UTF32_BOMS) or data.startswith(_UTF16_BOMS):
        return "not UTF-8"
    if b"\x00" in data:  # real text never holds NUL; binaries nearly always do
        return "binary"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    return None


def _decode(path: Path, data: bytes) -> str:
    """Strict UTF-8 decode of a file's bytes, or a DatasetError that names the place."""
    for boms, name in ((_UTF32_BOMS, "UTF-32"), (_UTF16_BOMS, "UTF-16")):
        if data.startswith(boms):
            raise DatasetError(f"{path}: file is {name}; convert it to UTF-8")
    if b"\x00" in data:
        raise DatasetError(f"{path}: binary file, not text")
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise DatasetError(
            f"{path}:{line}: not UTF-8 text (invalid byte 0x{data[offset]:02x} at offset {offset})"
        ) from None
    return text.replace("\r\n", "\n")


def read_text_file(path: Path) -> str:
    """The text of a strict UTF-8 file, with any BOM stripped and CRLF turned into LF."""
    path = Path(path)
    return _decode(path, read_file_bytes(path))


def read_file_bytes(path: Path) -> bytes:
    """A text file's bytes, or a one-line DatasetError naming it: missing, unreadable, not a regular
    file (a FIFO would block, /dev/zero never ends) or over MAX_TEXT_FILE_BYTES."""
    return read_regular_bytes(path, error=DatasetError, what="text file", limit=MAX_TEXT_FILE_BYTES)


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError:
        return 0


def _walk(root: Path, exclude: frozenset[str]) -> Iterator[Path]:
    """Regular files under `root`, sorted, skipping hidden and excluded directories."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # Pruning in place stops os.walk from descending; sorting makes the order deterministic.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in exclude)
        for name in sorted(filenames):
            file = Path(dirpath) / name
            if file.is_file():  # skips broken links, sockets and FIFOs (reading one would block)
                yield file


def find_text_files(
    paths: Sequence[str | Path], *, exclude: Sequence[str] = ()
) -> tuple[list[Path], dict[str, int]]:
    """The UTF-8 text files named by `paths` and how many files were skipped, by reason."""
    excluded = frozenset(exclude)
    files: list[Path] = []
    seen: set[Path] = set()
    skipped = dict.fromkeys(SKIP_KINDS, 0)

    def keep(file: Path) -> None:
        key = file.resolve()
        if key not in seen:  # a file named twice, or also inside a named directory
            seen.add(key)
            files.append(file)

    for item in paths:
        path = Path(item)
        if path.is_dir():
            for file in _walk(path, excluded):
                try:
                    data = read_file_bytes(file)
                except DatasetError:
                    if _size(file) > MAX_TEXT_FILE_BYTES:
                        raise  # too big to read is not "unusable": say so rather than skip it
                    skipped["binary"] += 1  # unreadable: treated like any other unusable file
                    continue
                problem = _problem(data)
                if problem is None:
                    keep(file)
                else:
                    skipped[problem] += 1
        elif path.exists():
            if read_text_file(path) == "":  # raises for a named file that is not text
                skipped["empty"] += 1
            else:
                keep(path)
        else:
            raise DatasetError(f"{path}: no such file or directory")
    if not files:
        total = sum(skipped.values())
        detail = ", ".join(f"{n} {kind}" for kind, n in skipped.items() if n) or "none"
        names = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise DatasetError(f"no UTF-8 text found in {names} ({total} files skipped: {detail})")
    return files, skipped


def split_files(files: list[Path], val_fraction: float = 0.02) -> tuple[list[Path], list[Path]]:
    """(train, val) chosen by a stable hash of each path relative to the files' common folder, so
    `corpus`, `/abs/corpus` and a copy elsewhere split alike; at least one of each from 2 files."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction: {val_fraction} must be in [0, 1)")
    if len(files) < 2:
        return list(files), []  # the caller splits the single token stream instead
    n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))

    root = os.path.commonpath([os.path.abspath(f) for f in files])

    def rank(path: Path) -> tuple[str, str]:
        relative = Path(os.path.relpath(os.path.abspath(path), root)).as_posix()
        return hashlib.sha1(relative.encode("utf-8")).hexdigest(), relative

    val_set = set(sorted(files, key=rank)[:n_val])
    # Both lists keep the caller's order so the token stream is reproducible.
    train = [f for f in files if f not in val_set]
    val = [f for f in files if f in val_set]
    return train, val


def _chunks(text: str, size: int = _CHUNK_CHARS, *, where: Path | str = "text") -> list[str]:
    """Cut a long document at safe newlines so one big file still encodes in parallel. A piece
    with no safe split in MAX_CHUNK_CHARS is an error: the encoder's memory grows with a piece."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        match = _SAFE_SPLIT.search(text, start + size, start + MAX_CHUNK_CHARS + 1)
        if match is None:
            break
        pieces.append(text[start : match.end()])
        start = match.end()
    if len(text) - start > MAX_CHUNK_CHARS:
        line = text.count("\n", 0, start) + 1
        raise DatasetError(f"{where}:{line}: the {MAX_CHUNK_CHARS:,} characters from this line on hold no line break "
                           "between printable ASCII characters (where llmkit cuts text to encode it); add line breaks")
    pieces.append(text[start:])
    return pieces


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned integer type holding every id below `vocab_size`."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _encode_group(
    tokenizer: Tokenizer, docs: list[list[str]], eos_id: int | None, dtype: type
) -> list[np.ndarray]:
    """Encode a group of documents (each a list of chunks) in one parallel batch call."""
    flat = [chunk for doc in docs for chunk in doc]
    encoded = iter(tokenizer.encode_batch(flat))
    arrays: list[np.ndarray] = []
    for doc in docs:
        ids: list[int] = []
        for _chunk in doc:
            ids += next(encoded)
        if not ids:
            continue  # an empty document adds nothing, not even EOS
        if eos_id is not None:
            ids.append(eos_id)
        arrays.append(np.asarray(ids, dtype=dtype))
    return arrays


def tokenize_files(
    tokenizer: Tokenizer,
    files: list[Path],
    *,
    eos_id: int | None,
    batch_chars: int = 4_000_000,
) -> np.ndarray:
    """One token stream of all `files` in order, with `eos_id` after each document."""
    dtype = token_dtype(tokenizer.vocab_size)
    arrays: list[np.ndarray] = []
    group: list[list[str]] = []
    group_chars = 0
    for file in files:
        text = read_text_file(file)
        group.append(_chunks(text, where=file))
        group_chars += len(text)
        if group_chars >= batch_chars:
            arrays += _encode_group(tokenizer, group, eos_id, dtype)
            group, group_chars = [], 0
    if group:
        arrays += _encode_group(tokenizer, group, eos_id, dtype)
    if not arrays:
        raise DatasetError(f"no tokens in {len(files)} files (all empty)")
    return np.concatenate(arrays)
