"""GGUF container parsing: a strict header reader and a tensor dequantiser.

GGUF is llama.cpp's single-file format (ggml-org/ggml `docs/gguf.md`; block layouts in
`ggml-common.h`): magic, version, tensor and key/value counts, typed key/values, tensor infos, then
aligned tensor data, each tensor's dims listed innermost first (`ne[0]` = the row length). Every read
here is bounds-checked against the file size and every count against the bytes left, and tensors must
lie in order, aligned and inside the file, as llama.cpp requires: a hostile header fails with one line
before anything is allocated (../shared/RELIABILITY.md L4). gguf-py's `GGUFReader` trusts the counts
(an array count of 2^63 in a 49-byte file loops forever) and takes ~4 s on SmolLM2's 49k-entry
vocabulary, so it is the tests' oracle only; dequantisation is gguf-py's own `gguf.quants.dequantize`.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from torch import Tensor

from llmkit.errors import ModelFormatError
from llmkit.io.gguf_quants import dequantize_simple

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts; 2 and 3 (big-endian allowed) share one layout
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY, UINT32 = 8, 9, 4
MAX_NAME = 63  # GGML_MAX_NAME is 64 bytes including the terminating NUL
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 16


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order, ne[0] (the row length) first; the PyTorch shape is reversed
    qtype: int
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    alignment: int


def is_gguf_file(path: str | Path) -> bool:
    """A regular file named *.gguf or starting with the GGUF magic (then `load_gguf` owns its errors)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


# ---- header -------------------------------------------------------------------------------------

class _Cursor:
    """Reads little-endian values from the mapped file; never past its end."""

    def __init__(self, buf: mmap.mmap, where: str) -> None:
        self.buf, self.pos, self.where = buf, 0, where

    def fail(self, what: str) -> NoReturn:
        raise ModelFormatError(f"{self.where}: {what}")

    def take(self, n: int, what: str) -> int:
        left = len(self.buf) - self.pos
        if n > left:
            self.fail(f"truncated file: {what} at byte {self.pos} needs {n} bytes, {left} left")
        self.pos += n
        return self.pos - n

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        start = self.take(self.scalar("<Q", f"{what} length"), what)
        try:
            return self.buf[start:self.pos].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        itype, count = self.scalar("<I", f"{what} item type"), self.scalar("<Q", f"{what} count")
        if itype == ARRAY:
            self.fail(f"{what} is an array of arrays (not supported)")
        if itype != STRING and itype not in SCALARS:
            self.fail(f"{what} has unknown item type {itype}")
        size = 8 if itype == STRING else struct.calcsize(SCALARS[itype])  # a string is at least its length
        if count > (len(self.buf) - self.pos) // size:  # checked before the loop: no 2^63-step hang
            self.fail(f"{what} claims {count} items, more than the {len(self.buf) - self.pos} bytes left hold")
        if itype == STRING:
            return [self.string(f"{what}[{i}]") for i in range(count)]
        return np.frombuffer(self.buf[self.take(count * size, what):self.pos], dtype=SCALARS[itype]).tolist()


def read_header(path: str | Path) -> Header:
    """Parse and check a GGUF header: key/values, tensor infos, and that every tensor lies in the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != MAGIC:
            raise ModelFormatError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
        if len(head) < 24:
            raise ModelFormatError(f"{path}: truncated file: {size} bytes, a GGUF header needs at least 24")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
        if version not in VERSIONS:
            endian = " (a big-endian file?)" if version and not version & 0xFFFF else ""
            raise ModelFormatError(f"{path}: unsupported GGUF version {version}{endian} (supported: 2, 3)")
        # A key/value takes at least 13 bytes, a tensor info at least 32: bound the counts by the file size.
        if n_kv * 13 + n_tensors * 32 > size - 24:
            raise ModelFormatError(f"{path}: header claims {n_tensors} tensors and {n_kv} key/values, "
                                   f"more than a {size}-byte file can hold")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, str(path))
            cur.pos = 24
            metadata = _read_metadata(cur, n_kv)
            alignment = _alignment(metadata, cur)
            tensors = _read_tensor_infos(cur, n_tensors, alignment)
            data_start = -cur.pos % alignment + cur.pos
    for info in tensors:
        end = data_start + info.offset + info.nbytes
        if end > size:
            raise ModelFormatError(f"{path}: tensor {info.name} ends at byte {end}, past the end of the file "
                                   f"({size} bytes)")
    return Header(metadata, {t.name: TensorInfo(t.name, t.dims, t.qtype, data_start + t.offset, t.nbytes)
                             for t in tensors}, alignment)


def _read_metadata(cur: _Cursor, count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(count):
        key = cur.string(f"key #{i}")
        if not key:
            cur.fail(f"key #{i} is empty")
        if key in metadata:
            cur.fail(f"duplicate key {key!r}")
        vtype = cur.scalar("<I", f"type of {key!r}")
        if key == "general.alignment" and vtype != UINT32:
            cur.fail(f"general.alignment must be a uint32, got value type {vtype}")
        metadata[key] = cur.value(vtype, repr(key))
    return metadata


def _alignment(metadata: dict[str, Any], cur: _Cursor) -> int:
    alignment = metadata.get("general.alignment", 32)
    if not 1 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
        cur.fail(f"general.alignment={alignment} must be a power of two from 1 to {MAX_ALIGNMENT}")
    return alignment


def _read_tensor_infos(cur: _Cursor, count: int, alignment: int) -> list[TensorInfo]:
    infos: list[TensorInfo] = []
    seen: set[str] = set()
    expected = 0  # llama.cpp's rule: tensors lie in order, each at the aligned end of the one before
    for i in range(count):
        name = cur.string(f"name of tensor #{i}")
        if len(name.encode("utf-8")) > MAX_NAME or not name:
            cur.fail(f"tensor #{i} name {name[:80]!r} must be 1 to {MAX_NAME} bytes")
        if name in seen:
            cur.fail(f"duplicate tensor {name}")
        seen.add(name)
        n_dims = cur.scalar("<I", f"tensor {name} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            cur.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = struct.unpack_from(f"<{n_dims}Q", cur.buf, cur.take(8 * n_dims, f"tensor {name} dims"))
        qtype, offset = cur.scalar("<I", f"tensor {name} type"), cur.scalar("<Q", f"tensor {name} offset")
        if any(d == 0 or d >= 2**63 for d in dims) or math.prod(dims) >= 2**63:
            cur.fail(f"tensor {name} has invalid dimensions {list(dims)} (each ≥ 1, product < 2^63)")
        try:
            qt = GGMLQuantizationType(qtype)
            block, type_size = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            cur.fail(f"tensor {name} has unknown ggml type id {qtype}")
        if dims[0] % block:
            cur.fail(f"tensor {name}: row length {dims[0]} is not a multiple of {qt.name}'s block size {block}")
        if offset != expected:
            cur.fail(f"tensor {name} starts at data offset {offset}, expected {expected} (tensors must be "
                     f"contiguous, in order, aligned to {alignment})")
        nbytes = math.prod(dims) // block * type_size
        infos.append(TensorInfo(name, tuple(dims), qtype, offset, nbytes))
        expected = offset + nbytes + -(offset + nbytes) % alignment
    return infos


# ---- tensor data -------------------------------------------------------------------------------

def read_raw_blocks(data: np.ndarray, info: TensorInfo) -> np.ndarray:
    """A tensor's bytes, not dequantised, as (rows, ..., blocks · bytes per block): quant blocks run
    along rows (GGUF's first dimension)."""
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.qtype)]
    raw = data[info.offset:info.offset + info.nbytes]
    return raw.reshape(*reversed(info.dims[1:]), info.dims[0] // block * type_size)


def read_tensor_into(dst: Tensor, data: np.ndarray, info: TensorInfo, *, rows: int = 4096) -> None:
    """`read_tensor` written into `dst` a few thousand rows at a time: dequantising a whole table first
    held it three times over (the raw copy, float codes, the product: 340 MB for SmolLM2's embedding)."""
    raw = read_raw_blocks(data, info)
    if raw.ndim != 2:
        dst.copy_(read_tensor(data, info))
        return
    for start in range(0, raw.shape[0], rows):
        part = TensorInfo(info.name, (info.dims[0], min(rows, raw.shape[0] - start)), info.qtype,
                          info.offset + start * raw.shape[1], min(rows, raw.shape[0] - start) * raw.shape[1])
        dst[start:start + rows].copy_(read_tensor(data, part))


def read_tensor(data: np.ndarray, info: TensorInfo) -> Tensor:
    """One tensor, dequantised to float32, in PyTorch's (rows, ..., row length) order."""
    raw = read_raw_blocks(data, info)
    fast = dequantize_simple(raw, GGMLQuantizationType(info.qtype))
    if fast is not None:
        assert tuple(fast.shape) == tuple(reversed(info.dims)), (info.name, fast.shape)
        return fast
    out = dequantize(raw, GGMLQuantizationType(info.qtype))
    assert out.shape == tuple(reversed(info.dims)), (info.name, out.shape)
    return torch.from_numpy(np.array(out, dtype=np.float32, copy=not out.flags.writeable or out.dtype != np.float32))



