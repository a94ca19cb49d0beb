"""GGUF corruption corpus (../shared/RELIABILITY.md L4, L5, L6), generated in-test.

A tiny valid "llama" file (1 layer, width 64, Q8_0 + F32 tensors, a toy GPT-2 vocabulary) is written
with gguf-py's GGUFWriter; it must load and round-trip every tensor exactly (against gguf-py's own
reader and dequantiser). Each hostile variant — byte edits of that file, hand-built headers for the
CVE-style cases, and well-formed files with hostile metadata — must fail with one line naming the
file and the problem, quickly, with no model or tensor buffer allocated.
"""

from __future__ import annotations

import math
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFValueType as V  # noqa: E402

import llmkit.io.gguf as gguf_io  # noqa: E402
from gguf_tiny import permute, toy_vocab, write_gguf  # noqa: E402
from llmkit.errors import ModelFormatError  # noqa: E402
from llmkit.io.gguf import SUPPORTED_TYPES, load_gguf  # noqa: E402

U64_MAX = 2**64 - 1


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "tiny.gguf"
    write_gguf(path, qtype=Q.Q8_0)
    return path.read_bytes()


def expect_rejected(path: Path, match: str, monkeypatch) -> str:
    """load_gguf fails with one ModelFormatError line naming the file, within a second, before any
    model or tensor is allocated, and with a small memory peak."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model or tensor was allocated for a bad file")

    monkeypatch.setattr(gguf_io, "CausalLM", forbidden)
    monkeypatch.setattr(gguf_io, "read_tensor", forbidden)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelFormatError) as info:
            load_gguf(path)
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert match.lower() in message.lower(), message
    assert elapsed < 1.0, f"{elapsed:.2f} s to reject"
    assert peak < 8 * 2**20 + 4 * path.stat().st_size, f"peak {peak / 2**20:.1f} MiB"
    return message


# ---- the valid file -----------------------------------------------------------------------------

def oracle_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor as gguf-py reads and dequantises it (GGUF names, file layout)."""
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}


def assert_round_trip(path: Path) -> None:
    loaded = load_gguf(path)
    oracle = oracle_tensors(path)
    params = dict(loaded.model.named_parameters())
    cfg = loaded.model.cfg
    permuted = gguf_io.ARCHITECTURES[gguf_io.read_header(path).metadata["general.architecture"]]
    for gguf_name, (ours, _) in gguf_io.tensor_names(cfg).items():
        got = params[ours].detach().numpy()
        if permuted and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            got = permute(got, cfg.n_heads if "attn_q" in gguf_name else cfg.n_kv_heads)  # back to the file's rows
        np.testing.assert_array_equal(got, oracle[gguf_name], err_msg=gguf_name)
    assert set(oracle) == set(gguf_io.tensor_names(cfg))


def test_valid_file_loads_and_round_trips(valid, tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(valid)
    assert_round_trip(path)
    loaded = load_gguf(path)
    reader = gguf.GGUFReader(path)  # the header parser agrees with gguf-py's on every key
    header = gguf_io.read_header(path)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert header.metadata[key] == field.contents(), key
    tokens, _, _ = toy_vocab()
    assert loaded.tokenizer.vocab_size == len(tokens) and loaded.eos_ids == [tokens.index("<|eos|>")]
    text = "hello <|user|> wörld 🎉"
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text
    assert torch.isfinite(loaded.model(torch.tensor([[1, 2, 3]]))).all()


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_every_supported_type_round_trips(qtype, tmp_path):
    write_gguf(tmp_path / "m.gguf", qtype=qtype, d=256, ff=256, heads=4, kv_heads=2)  # K-quants: rows of 256
    assert_round_trip(tmp_path / "m.gguf")


@pytest.mark.parametrize("alignment", [1, 64, 4096])
def test_custom_alignment_round_trips(alignment, tmp_path):
    write_gguf(tmp_path / "m.gguf", qtype=Q.Q4_0, alignment=alignment)
    assert_round_trip(tmp_path / "m.gguf")


def test_qwen2_with_biases_round_trips(tmp_path):
    write_gguf(tmp_path / "m.gguf", arch="qwen2", pre="qwen2", tied=False, qtype=Q.Q8_0)
    assert_round_trip(tmp_path / "m.gguf")


def test_add_bos_token_sets_the_prefix(tmp_path):
    write_gguf(tmp_path / "m.gguf", meta={"tokenizer.ggml.add_bos_token": True})
    loaded = load_gguf(tmp_path / "m.gguf")
    bos = loaded.tokenizer.bos_id
    assert loaded.prefix_ids == [bos] == loaded.tokenizer.prefix_ids()
    assert bos not in loaded.tokenizer.encode("hello")  # encode never adds it; generation does


def test_llama_bpe_family_takes_whole_tokens_and_adds_bos(tmp_path):
    """llama.cpp's LLAMA3 pre-tokenizers: ignore_merges (a piece that is a token is kept whole, even
    with no merge path to it) and BOS by default."""
    tokens, _, types = toy_vocab()
    meta = {"tokenizer.ggml.tokens": tokens + ["Ġzebra"], "tokenizer.ggml.token_type": types + [1],
            "tokenizer.ggml.add_bos_token": None}
    for pre, whole in (("llama-bpe", True), ("default", False)):
        write_gguf(tmp_path / f"{pre}.gguf", vocab_size=len(tokens) + 1, pre=pre, meta=meta)
        loaded = load_gguf(tmp_path / f"{pre}.gguf")
        assert (loaded.tokenizer.encode(" zebra") == [len(tokens)]) is whole
        assert loaded.prefix_ids == ([loaded.tokenizer.bos_id] if whole else [])


# ---- byte edits of the valid file ---------------------------------------------------------------

def tensor_info_fields(data: bytes, tmp_path: Path) -> list[dict[str, int]]:
    """Byte positions of each tensor info's n_dims, dims, type and offset, via gguf-py's reader."""
    path = tmp_path / "probe.gguf"
    path.write_bytes(data)
    out = []
    for t in gguf.GGUFReader(path).tensors:
        pos = t.field.offset
        sizes = [int(p.nbytes) for p in t.field.parts]  # name_len, name, n_dims, dims, type, offset
        starts = [pos + sum(sizes[:i]) for i in range(len(sizes))]
        out.append(dict(name_len=starts[0], n_dims=starts[2], dims=starts[3], type=starts[4], offset=starts[5],
                        n=len(t.shape)))
    return out


def patch(data: bytes, at: int, fmt: str, *values) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, at, *values)
    return bytes(buf)


def edited(valid: bytes, tmp_path: Path, case: str) -> bytes:
    infos = tensor_info_fields(valid, tmp_path)
    last, embd = infos[-1], infos[0]  # token_embd.weight: 2-D, Q8_0
    edits = {
        "bad magic": lambda d: b"GGUX" + d[4:],
        "empty file": lambda d: b"",
        "version 1": lambda d: patch(d, 4, "<I", 1),
        "version 4": lambda d: patch(d, 4, "<I", 4),
        "big-endian version": lambda d: patch(d, 4, ">I", 3),
        "n_tensors 2^64-1": lambda d: patch(d, 8, "<Q", U64_MAX),
        "n_kv 2^64-1": lambda d: patch(d, 16, "<Q", U64_MAX),
        "n_tensors 0x55555555555555a": lambda d: patch(d, 8, "<Q", 0x55555555555555A),
        "n_kv 0x55555555555555a": lambda d: patch(d, 16, "<Q", 0x55555555555555A),
        "key length 2^64-1": lambda d: patch(d, 24, "<Q", U64_MAX),
        "tensor name length 2^64-1": lambda d: patch(d, last["name_len"], "<Q", U64_MAX),
        "n_dims 5": lambda d: patch(d, last["n_dims"], "<I", 5),
        "n_dims 0": lambda d: patch(d, last["n_dims"], "<I", 0),
        "dim -1": lambda d: patch(d, last["dims"], "<q", -1),
        "dim 0": lambda d: patch(d, last["dims"], "<Q", 0),
        "dims product overflows": lambda d: patch(d, embd["dims"], "<2Q", 4 * (2**31 - 1), 4 * (2**31 - 1)),
        "ggml type id 99": lambda d: patch(d, last["type"], "<I", 99),
        "ggml type id 4 (removed Q4_2)": lambda d: patch(d, last["type"], "<I", 4),
        "row not a multiple of the block": lambda d: patch(d, embd["dims"], "<Q", 48),  # Q8_0 blocks of 32
        "offset overlaps the previous tensor": lambda d: patch(d, last["offset"], "<Q", 0),
        "offset leaves a gap": lambda d: patch(d, last["offset"], "<Q", read_u64(d, last["offset"]) + 32),
        "offset past EOF": lambda d: patch(d, last["offset"], "<Q", 2**40),
        "offset 2^64-1": lambda d: patch(d, last["offset"], "<Q", U64_MAX),
        "data one byte short": lambda d: d[:_data_end(d, tmp_path) - 1],
    }
    return edits[case](valid)


def read_u64(data: bytes, at: int) -> int:
    return struct.unpack_from("<Q", data, at)[0]


def _data_end(data: bytes, tmp_path: Path) -> int:
    """Where the last tensor's bytes end (the writer pads after it)."""
    path = tmp_path / "probe.gguf"
    path.write_bytes(data)
    t = gguf.GGUFReader(path).tensors[-1]
    return t.data_offset + t.n_bytes


EDIT_CASES = {
    "bad magic": "not a GGUF file", "empty file": "not a GGUF file", "version 1": "version 1",
    "version 4": "version 4", "big-endian version": "big-endian", "n_tensors 2^64-1": "more than",
    "n_kv 2^64-1": "more than", "n_tensors 0x55555555555555a": "more than", "n_kv 0x55555555555555a": "more than",
    "key length 2^64-1": "truncated", "tensor name length 2^64-1": "truncated", "n_dims 5": "dimensions",
    "n_dims 0": "dimensions", "dim -1": "dimensions", "dim 0": "dimensions", "dims product overflows": "dimensions",
    "ggml type id 99": "type id 99", "ggml type id 4 (removed Q4_2)": "type id 4",
    "row not a multiple of the block": "block size", "offset overlaps the previous tensor": "expected",
    "offset leaves a gap": "expected", "offset past EOF": "expected", "offset 2^64-1": "expected",
    "data one byte short": "past the end",
}


@pytest.mark.parametrize("case", list(EDIT_CASES))
def test_byte_edits_are_rejected(case, valid, tmp_path, monkeypatch):
    path = tmp_path / "bad.gguf"
    path.write_bytes(edited(valid, tmp_path, case))
    expect_rejected(path, EDIT_CASES[case], monkeypatch)


def test_every_truncation_is_rejected(valid, tmp_path, monkeypatch):
    header_end = tensor_info_fields(valid, tmp_path)[-1]["offset"] + 8
    cuts = sorted({*range(0, header_end, max(1, header_end // 60)), header_end, len(valid) - 40, len(valid) - 100})
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(valid[:cut])
        expect_rejected(path, "", monkeypatch)


# ---- hand-built headers: the CVE-style structures -----------------------------------------------

def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def header(kvs: list[bytes], infos: list[bytes] = (), *, n_kv: int | None = None, n_tensors: int | None = None,
           tail: bytes = b"") -> bytes:
    n_kv = len(kvs) if n_kv is None else n_kv
    n_tensors = len(infos) if n_tensors is None else n_tensors
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos) + tail


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def info(name: str, dims: list[int], qtype: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


ARCH = kv("general.architecture", V.STRING, s("llama"))
HEADER_CASES = {
    # CVE-2024-25665/23496: a string length far past the file
    "string length 2^64-1": (header([kv("a", V.STRING, struct.pack("<Q", U64_MAX))]), "truncated"),
    "string longer than the bytes left": (header([kv("a", V.STRING, struct.pack("<Q", 100) + b"x" * 20)]),
                                          "truncated"),
    # gguf-py loops 2^63 times over an array in a 49-byte file
    "array count 2^63 in 49 bytes": (header([kv("a", V.ARRAY, struct.pack("<IQ", V.UINT8, 2**63))]), "claims"),
    # CVE-2024-25668: count × item size overflows
    "array of strings count overflow": (header([kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 2**61 + 1))]),
                                        "claims"),
    "nested arrays depth 10^4": (header([kv("a", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 10_000)]),
                                 "array of arrays"),
    "value type id 13": (header([kv("a", 13, b"\0" * 8)]), "unknown value type 13"),
    "value type id 2^32-1": (header([kv("a", 2**32 - 1, b"\0" * 8)]), "unknown value type"),
    "array item type 99": (header([kv("a", V.ARRAY, struct.pack("<IQ", 99, 1) + b"\0" * 8)]), "item type 99"),
    "duplicate key": (header([ARCH, ARCH]), "duplicate key"),
    "empty key": (header([kv("", V.UINT8, b"\0")]), "empty"),
    "key not UTF-8": (header([kv(b"\xff\xfe", V.UINT8, b"\0")]), "UTF-8"),
    "alignment of type uint64": (header([kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]), "uint32"),
    "alignment of type string": (header([kv("general.alignment", V.STRING, s("32"))]), "uint32"),
    "alignment 0": (header([kv("general.alignment", V.UINT32, struct.pack("<I", 0))]), "power of two"),
    "alignment 13": (header([kv("general.alignment", V.UINT32, struct.pack("<I", 13))]), "power of two"),
    "alignment 2^31": (header([kv("general.alignment", V.UINT32, struct.pack("<I", 2**31))]), "power of two"),
    "duplicate tensor name": (header([ARCH], [info("t", [8]), info("t", [8], offset=32)], tail=b"\0" * 128),
                              "duplicate tensor"),
    "tensor name of 64 bytes": (header([ARCH], [info("x" * 64, [8])], tail=b"\0" * 128), "63 bytes"),
    "tensors out of order": (header([ARCH], [info("a", [8], offset=32), info("b", [8], offset=0)], tail=b"\0" * 128),
                             "expected 0"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_hand_built_headers_are_rejected(case, tmp_path, monkeypatch):
    data, match = HEADER_CASES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    expect_rejected(path, match, monkeypatch)


def test_gguf_py_would_hang_where_llmkit_refuses(tmp_path, monkeypatch):
    """gguf-py's reader has no count check and would loop 2^63 times; ours refuses by arithmetic."""
    data, _ = HEADER_CASES["array count 2^63 in 49 bytes"]
    assert len(data) == 49
    path = tmp_path / "bomb.gguf"
    path.write_bytes(data)
    expect_rejected(path, "claims 9223372036854775808 items", monkeypatch)


# ---- well-formed files with hostile metadata (L5, L6) -------------------------------------------

NAN, INF = math.nan, math.inf
META_CASES = {
    "no architecture": (dict(meta={"general.architecture": None}), "general.architecture"),
    "architecture gpt2": (dict(meta={"general.architecture": "gpt2"}), "unsupported architecture 'gpt2'"),
    "architecture mamba": (dict(meta={"general.architecture": "mamba"}), "supported: llama, qwen2"),
    "no context_length": (dict(meta={"llama.context_length": None}), "llama.context_length"),
    "no embedding_length": (dict(meta={"llama.embedding_length": None}), "llama.embedding_length"),
    "no block_count": (dict(meta={"llama.block_count": None}), "llama.block_count"),
    "no feed_forward_length": (dict(meta={"llama.feed_forward_length": None}), "feed_forward_length"),
    "no head_count": (dict(meta={"llama.attention.head_count": None}), "head_count"),
    "no rms epsilon": (dict(meta={"llama.attention.layer_norm_rms_epsilon": None}), "layer_norm_rms_epsilon"),
    "no tokens": (dict(meta={"tokenizer.ggml.tokens": None}), "tokenizer.ggml.tokens"),
    "no merges": (dict(meta={"tokenizer.ggml.merges": None}), "tokenizer.ggml.merges"),
    "block_count 0": (dict(meta={"llama.block_count": 0}), "out of range"),
    "block_count 2000": (dict(meta={"llama.block_count": 2000}), "out of range"),
    "head_count 0": (dict(meta={"llama.attention.head_count": 0}), "out of range"),
    "head_count as string": (dict(meta={"llama.attention.head_count": "4"}), "must be int"),
    "width not divisible by heads": (dict(meta={"llama.attention.head_count": 5}), "not divisible"),
    "kv heads not dividing heads": (dict(meta={"llama.attention.head_count_kv": 3}), "does not divide"),
    "context_length 0": (dict(meta={"llama.context_length": 0}), "out of range"),
    "context_length 2^25": (dict(meta={"llama.context_length": 2**25}), "out of range"),
    "rope theta NaN": (dict(meta={"llama.rope.freq_base": NAN}), "finite"),
    "rope theta Inf": (dict(meta={"llama.rope.freq_base": INF}), "finite"),
    "rope theta negative": (dict(meta={"llama.rope.freq_base": -1.0}), "out of range"),
    "rms epsilon NaN": (dict(meta={"llama.attention.layer_norm_rms_epsilon": NAN}), "finite"),
    "partial rotary": (dict(meta={"llama.rope.dimension_count": 8}), "partial rotary"),
    "rope scaling longrope": (dict(meta={"llama.rope.scaling.type": "longrope"}), "rope.scaling.type"),
    "vocab rows differ from tokens": (dict(vocab_size=320), "token_embd.weight has shape"),
    "missing tensor": (dict(tensors={"blk.0.ffn_up.weight": None}), "missing tensor blk.0.ffn_up.weight"),
    "extra tensor": (dict(tensors={"blk.1.ffn_up.weight": np.zeros((128, 64), np.float32)}), "unexpected tensor"),
    "llama3 rope_freqs": (dict(tensors={"rope_freqs.weight": np.ones(8, np.float32)}), "rope_freqs"),
    "unsupported tensor type F64": (dict(tensors={"blk.0.ffn_norm.weight": np.ones(64, np.float64)}),
                                    "blk.0.ffn_norm.weight has type F64"),
    "bos id = vocab size": (dict(meta={"tokenizer.ggml.bos_token_id": 300}), "bos_token_id=300"),
    "eos id 2^32-1": (dict(meta={"tokenizer.ggml.eos_token_id": 2**32 - 1}), "eos_token_id"),
    "pad id negative": (dict(meta={"tokenizer.ggml.padding_token_id": (-1, V.INT32)}), "padding_token_id=-1"),
    "tokenizer model llama": (dict(meta={"tokenizer.ggml.model": "llama"}), "SentencePiece"),
    "unknown pre-tokenizer": (dict(meta={"tokenizer.ggml.pre": "made-up"}), "tokenizer.ggml.pre 'made-up'"),
    "merge of unknown tokens": (dict(meta={"tokenizer.ggml.merges": ["zz qq"]}), "merge 0"),
    "token of 65 KiB": (dict(meta={"tokenizer.ggml.tokens": ["a" * 66_000] + toy_vocab()[0][1:]}), "65536 bytes"),
    "duplicate token": (dict(meta={"tokenizer.ggml.tokens": toy_vocab()[0][:-1] + [toy_vocab()[0][0]]}), "repeats"),
    "tokens as integers": (dict(meta={"tokenizer.ggml.tokens": list(range(300))}), "list of strings"),
    "token types short": (dict(meta={"tokenizer.ggml.token_type": [1, 1]}), "token_type"),
    "chat template not a string": (dict(meta={"tokenizer.chat_template": 7}), "chat_template"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_hostile_metadata_is_rejected(case, tmp_path, monkeypatch):
    kwargs, match = META_CASES[case]
    path = tmp_path / "bad.gguf"
    write_gguf(path, **kwargs)
    expect_rejected(path, match, monkeypatch)


def test_known_but_unsupported_quant_type_names_the_supported_ones(tmp_path, monkeypatch):
    write_gguf(tmp_path / "bad.gguf", tensors={"blk.0.ffn_norm.weight": np.ones(64, np.float64)})
    message = expect_rejected(tmp_path / "bad.gguf", "F64", monkeypatch)
    assert all(t.name in message for t in SUPPORTED_TYPES)
