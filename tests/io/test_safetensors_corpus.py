"""RELIABILITY.md L3: a corpus of corrupt safetensors files, generated here. Every one is refused
with a one-line error naming the file, by both readers (llmkit checkpoints and Hugging Face dirs)."""

import json
import struct

import numpy as np
import pytest

from llmkit.errors import CheckpointError, ModelFormatError
from llmkit.io.checkpoint import load_tensors
from llmkit.io.hf_weights import read_headers

A = np.arange(6, dtype=np.float32).tobytes()
B = np.arange(4, dtype=np.float32).tobytes()
ENTRY_A = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
ENTRY_B = {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}
HEADER = {"__metadata__": {"format": "pt"}, "a": ENTRY_A, "b": ENTRY_B}


def blob(header: dict | bytes = HEADER, data: bytes = A + B, *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def with_b(**entry) -> dict:
    return {**HEADER, "b": {**ENTRY_B, **entry}}


CORPUS = {
    "header length past the end of the file": blob(length=10**6),
    "header length over the 100 MB cap": blob(length=200 * 10**6),
    "header length over 2^63": blob(length=2**63 + 5),
    "header is not an object": blob(b"[1, 2, 3]"),
    "header does not start with {": blob(b" x" + json.dumps(HEADER).encode()[2:]),
    "header is not UTF-8": blob(b'{"a\xff": 1}'),
    "duplicate tensor key, different entries": blob(
        f'{{"a": {json.dumps(ENTRY_A)}, "a": {json.dumps(ENTRY_B)}}}'.encode()),
    "duplicate tensor key, identical entries": blob(
        f'{{"a": {json.dumps(ENTRY_A)}, "b": {json.dumps(ENTRY_B)}, "a": {json.dumps(ENTRY_A)}}}'.encode()),
    "non-string __metadata__ value": blob({**HEADER, "__metadata__": {"format": 3}}),
    "overlapping offsets": blob(with_b(data_offsets=[8, 24])),
    "a hole between tensors": blob(with_b(data_offsets=[28, 44]), A + B + bytes(4)),
    "trailing bytes after the last tensor": blob(data=A + B + b"POLYGLOT"),
    "end before begin": blob(with_b(data_offsets=[40, 24])),
    "shape product overflows u64": blob(with_b(shape=[2**62, 2**62])),
    "byte size is not shape x dtype": blob(with_b(shape=[3])),
    "unknown dtype": blob(with_b(dtype="Q9")),
    "file one byte short": blob()[:-1],
    "overlapping-offsets bomb": blob({f"t{i}": {"dtype": "F32", "shape": [25000], "data_offsets": [0, 100000]}
                                      for i in range(10_000)}, bytes(100_000)),
}


def test_the_uncorrupted_file_loads(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(blob())
    tensors = load_tensors(path)
    assert tensors["a"].tolist() == [[0, 1, 2], [3, 4, 5]] and tensors["b"].tolist() == [0, 1, 2, 3]
    assert set(read_headers([path], None)) == {"a", "b"}


@pytest.mark.parametrize("case", list(CORPUS))
def test_corrupt_file_is_refused_by_both_readers(tmp_path, case):
    path = tmp_path / "model.safetensors"
    path.write_bytes(CORPUS[case])
    with pytest.raises(CheckpointError) as checkpoint_error:
        load_tensors(path)
    with pytest.raises(ModelFormatError) as hf_error:
        read_headers([path], None)
    for error in (checkpoint_error.value, hf_error.value):
        message = str(error)
        assert message.startswith(str(path)) and "corrupt safetensors" in message and "\n" not in message
