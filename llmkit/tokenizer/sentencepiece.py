"""SentencePiece `tokenizer.model` files (LLaMA-1/2, TinyLlama, Mistral v0.1, T5 …) read without the
sentencepiece library, and rebuilt as a `tokenizers` pipeline that encodes the same ids.

The file is a protobuf `ModelProto` (sentencepiece_model.proto); llmkit reads the few fields that
define tokenisation with a small wire-format reader:

    ModelProto     1 pieces (repeated)   2 trainer_spec   3 normalizer_spec
    SentencePiece  1 piece (string)      2 score (float)  3 type (1 normal, 2 unknown, 3 control,
                                                                   4 user-defined, 5 unused, 6 byte)
    TrainerSpec    3 model_type (1 unigram, 2 BPE)   22 split_by_whitespace   35 byte_fallback
    NormalizerSpec 2 precompiled_charsmap   3 add_dummy_prefix   4 remove_extra_whitespaces

SentencePiece's BPE merges the adjacent pair whose merged piece has the highest score; `tokenizers`'
BPE merges by rank, so each vocabulary piece becomes merges of its two-part splits, ranked by the
piece's score (the derivation transformers' converters also use). Unigram keeps its scores as they are.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from llmkit.errors import ModelFormatError
from llmkit.io.input_files import read_regular_bytes

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"  # "▁", SentencePiece's visible space


@dataclass
class SentencePieceModel:
    where: str  # the file, for errors
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = UNIGRAM
    split_by_whitespace: bool = True
    byte_fallback: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


class _Reader:
    """Protobuf wire format: (field number, wire type) keys, varints, fixed32/64, length-delimited."""

    def __init__(self, data: bytes, where: str) -> None:
        self.data, self.pos, self.where = data, 0, where

    def fail(self, what: str) -> None:
        raise ModelFormatError(f"{self.where}: not a SentencePiece model ({what} at byte {self.pos})")

    def varint(self) -> int:
        value = shift = 0
        while True:
            if self.pos >= len(self.data):
                self.fail("truncated varint")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
            if shift > 63:
                self.fail("varint longer than 10 bytes")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"field of {n} bytes past the end")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def fields(self):
        """Yield (field number, wire type, value): int for varints, bytes for the rest."""
        while self.pos < len(self.data):
            key = self.varint()
            number, wire = key >> 3, key & 7
            if wire == 0:
                yield number, wire, self.varint()
            elif wire == 1:
                yield number, wire, self.take(8)
            elif wire == 2:
                yield number, wire, self.take(self.varint())
            elif wire == 5:
                yield number, wire, self.take(4)
            else:
                self.fail(f"unsupported wire type {wire}")


def read_sentencepiece(path: str | Path) -> SentencePieceModel:
    """Parse a `tokenizer.model` file; a malformed one is a ModelFormatError naming the file."""
    path = Path(path)
    where = str(path)
    data = read_regular_bytes(path, error=ModelFormatError, what="SentencePiece model")  # a FIFO would block
    model = SentencePieceModel(where)
    for number, wire, value in _Reader(data, where).fields():
        if number == 1 and wire == 2:
            model.pieces.append(_piece(value, where))
        elif number == 2 and wire == 2:
            for n, w, v in _Reader(value, where).fields():
                if w == 0 and n == 3:
                    model.model_type = v
                elif w == 0 and n == 22:
                    model.split_by_whitespace = bool(v)
                elif w == 0 and n == 35:
                    model.byte_fallback = bool(v)
        elif number == 3 and wire == 2:
            for n, w, v in _Reader(value, where).fields():
                if n == 2 and w == 2:
                    model.precompiled_charsmap = v
                elif n == 3 and w == 0:
                    model.add_dummy_prefix = bool(v)
                elif n == 4 and w == 0:
                    model.remove_extra_whitespaces = bool(v)
    if not model.pieces:
        raise ModelFormatError(f"{where}: not a SentencePiece model (no pieces)")
    if model.model_type not in (UNIGRAM, BPE):
        raise ModelFormatError(f"{where}: SentencePiece model type {model.model_type} is not supported "
                               "(llmkit reads unigram and BPE models)")
    names = [p for p, _, _ in model.pieces]
    if len(set(names)) != len(names):
        raise ModelFormatError(f"{where}: a piece appears twice in the vocabulary")
    if sum(t == UNKNOWN for _, _, t in model.pieces) != 1:
        raise ModelFormatError(f"{where}: a SentencePiece model needs exactly one unknown piece")
    return model


def _piece(data: bytes, where: str) -> tuple[str, float, int]:
    piece, score, kind = None, 0.0, NORMAL
    for n, w, v in _Reader(data, where).fields():
        if n == 1 and w == 2:
            try:
                piece = v.decode("utf-8")
            except UnicodeDecodeError:
                raise ModelFormatError(f"{where}: a piece is not valid UTF-8") from None
        elif n == 2 and w == 5:
            score = struct.unpack("<f", v)[0]
        elif n == 3 and w == 0:
            kind = v
    if not piece:
        raise ModelFormatError(f"{where}: a piece without text")
    return piece, score, kind


def _bpe_merges(model: SentencePieceModel) -> list[tuple[str, str]]:
    vocab = {p: i for i, (p, _, _) in enumerate(model.pieces)}
    candidates = []
    for piece, score, kind in model.pieces:
        if kind != NORMAL and kind != USER_DEFINED:
            continue
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        candidates.extend((score, vocab[piece], left, right) for left, right in splits)
    candidates.sort(key=lambda c: (-c[0], c[1]))  # highest score first; stable by piece id
    return [(left, right) for _, _, left, right in candidates]


def sentencepiece_backend(model: SentencePieceModel) -> tokenizers.Tokenizer:
    """A `tokenizers` pipeline that encodes text to the ids SentencePiece gives."""
    where = model.where
    unk_id = next(i for i, (_, _, t) in enumerate(model.pieces) if t == UNKNOWN)
    if model.model_type == BPE:
        vocab = {p: i for i, (p, _, _) in enumerate(model.pieces)}
        backend = tokenizers.Tokenizer(models.BPE(vocab, _bpe_merges(model), unk_token=model.pieces[unk_id][0],
                                                  fuse_unk=True, byte_fallback=model.byte_fallback))
    else:
        backend = tokenizers.Tokenizer(models.Unigram([(p, s) for p, s, _ in model.pieces], unk_id=unk_id,
                                                      byte_fallback=model.byte_fallback))
    # SentencePiece's normaliser: the character map, then (optionally) no leading, trailing or
    # repeated spaces, then the dummy prefix — always one more "▁", even before a leading space —
    # and spaces made visible. It treats only " " as whitespace.
    steps = []
    if model.precompiled_charsmap:
        try:
            steps.append(normalizers.Precompiled(model.precompiled_charsmap))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ModelFormatError(f"{where}: corrupt normaliser character map ({exc})") from None
    if model.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    if model.model_type == UNIGRAM and model.split_by_whitespace:  # pieces never span a "▁" word start
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1, right=0)] if model.add_dummy_prefix else []))
    # Control pieces (<s>, </s>) never come from text in SentencePiece, but a chat template writes
    # them as text: register them, and user-defined pieces, so their literal text maps to their id.
    backend.add_special_tokens([AddedToken(p, special=True, normalized=False)
                                for p, _, t in model.pieces if t == CONTROL])
    backend.add_tokens([AddedToken(p, special=False, normalized=False)
                        for p, _, t in model.pieces if t == USER_DEFINED])
    return backend
