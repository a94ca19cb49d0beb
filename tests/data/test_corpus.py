"""Corpus discovery, strict UTF-8 reading, deterministic file split and tokenization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmkit.data.corpus import (
    _chunks,
    find_text_files,
    read_text_file,
    split_files,
    tokenize_files,
)
from llmkit.errors import DatasetError
from llmkit.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    text = "the cat sat on the mat.\nhello world, hello there.\n我们学习。\n" * 30
    return Tokenizer.train([text], vocab_size=320)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / ".git").mkdir()
    (root / "a.txt").write_text("alpha text\n", encoding="utf-8")
    (root / "notes.md").write_text("# notes\n", encoding="utf-8")
    (root / "code.py").write_text("print('hi')\n", encoding="utf-8")
    (root / "sub" / "noext").write_text("no extension, still text\n", encoding="utf-8")
    (root / "sub" / "deeper" / "zh.txt").write_text("中文文本\n", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (root / "sub" / "empty.txt").write_bytes(b"")
    (root / "site-packages" / "lib.py").write_text("excluded = True\n", encoding="utf-8")
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n", encoding="utf-8")
    return root


def test_find_text_files_walks_and_counts(tree: Path) -> None:
    files, skipped = find_text_files([tree], exclude=["site-packages"])
    names = sorted(f.relative_to(tree).as_posix() for f in files)
    assert names == ["a.txt", "code.py", "notes.md", "sub/deeper/zh.txt", "sub/noext"]
    assert skipped == {"binary": 1, "not UTF-8": 1, "empty": 1}
    # Deterministic order.
    assert find_text_files([tree], exclude=["site-packages"])[0] == files


def test_exclude_is_needed_for_excluded_dir(tree: Path) -> None:
    files, _ = find_text_files([tree])
    assert tree / "site-packages" / "lib.py" in files
    assert all(".git" not in f.parts for f in files)


def test_explicit_files_and_dedup(tree: Path) -> None:
    files, _ = find_text_files([tree / "a.txt", tree, tree / "a.txt"], exclude=["site-packages"])
    assert files[0] == tree / "a.txt"
    assert len(files) == len(set(f.resolve() for f in files)) == 5


def test_explicit_latin1_file_names_path_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    prefix = "line one\nline two\ncaf"
    path.write_bytes((prefix + "\xe9 three\n").encode("latin-1"))
    with pytest.raises(DatasetError) as err:
        find_text_files([path])
    message = str(err.value)
    assert f"{path}:3:" in message
    assert "0xe9" in message and f"offset {len(prefix)})" in message


def test_utf16_bom(tmp_path: Path) -> None:
    path = tmp_path / "u16.txt"
    path.write_bytes("hello".encode("utf-16"))  # Python writes a BOM first
    with pytest.raises(DatasetError, match="UTF-16") as err:
        read_text_file(path)
    assert str(path) in str(err.value)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc\x00def")
    with pytest.raises(DatasetError, match="binary"):
        read_text_file(path)


def test_bom_stripped_and_crlf_normalised(tmp_path: Path) -> None:
    path = tmp_path / "win.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n\r\nthree\rfour")
    assert read_text_file(path) == "one\ntwo\n\nthree\rfour"


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="no such file or directory") as err:
        find_text_files([missing])
    assert str(missing) in str(err.value)


def test_directory_without_text(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(DatasetError, match="no UTF-8 text found") as err:
        find_text_files([tmp_path])
    assert "2 files skipped" in str(err.value) and str(tmp_path) in str(err.value)


def test_tokenize_files_joins_with_eos(tok: Tokenizer, tmp_path: Path) -> None:
    texts = ["the cat sat", "", "hello world\n", "我们 <|eos|> 学习"]
    files = []
    for i, text in enumerate(texts):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    stream = tokenize_files(tok, files, eos_id=tok.eos_id, batch_chars=10)
    assert stream.dtype == np.uint16
    expected = [i for t in texts if t for i in tok.encode(t) + [tok.eos_id]]
    assert stream.tolist() == expected
    no_eos = tokenize_files(tok, files, eos_id=None)
    assert no_eos.tolist() == [i for t in texts for i in tok.encode(t)]


def test_tokenize_files_all_empty(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(DatasetError):
        tokenize_files(tok, [tmp_path / "e.txt"], eos_id=tok.eos_id)


def test_long_documents_split_without_changing_tokens(tok: Tokenizer) -> None:
    text = "the cat sat.\nhello  world\n\n\n  indented\nx\ny\n" * 50
    pieces = _chunks(text, size=40)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [i for p in tok.encode_batch(pieces) for i in p] == tok.encode(text)


def test_split_files_deterministic(tmp_path: Path) -> None:
    files = [tmp_path / f"doc{i:03d}.txt" for i in range(200)]
    train, val = split_files(files, val_fraction=0.05)
    assert (train, val) == split_files(list(files), val_fraction=0.05)
    assert len(val) == 10 and len(train) == 190
    assert sorted(train + val) == sorted(files) and not set(train) & set(val)
    # Stable under reordering of the input: membership depends on the path only.
    train_r, val_r = split_files(files[::-1], val_fraction=0.05)
    assert set(val_r) == set(val)


def test_split_files_small(tmp_path: Path) -> None:
    two = [tmp_path / "a", tmp_path / "b"]
    train, val = split_files(two, val_fraction=0.001)
    assert len(train) == 1 and len(val) == 1
    assert split_files([tmp_path / "a"]) == ([tmp_path / "a"], [])


def test_token_dtype_fits_vocab() -> None:
    from llmkit.data.corpus import token_dtype

    assert token_dtype(65536) is np.uint16
    assert token_dtype(65537) is np.uint32
