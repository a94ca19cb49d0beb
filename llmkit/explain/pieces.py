"""Tokens as a reader sees them: each id's bytes, and the characters of the input it covers.

A byte-level BPE (GPT-2, LLaMA-3, SmolLM2, llmkit's own) spells every token in a 256-symbol alphabet
that stands for bytes (GPT-2's `bytes_to_unicode`), so a token can hold part of a character: 猫 is
three UTF-8 bytes and may be split over two tokens. Showing the symbols gives mojibake ("çĮ«"); here
each token's bytes are recovered and mapped back to the characters of the input they overlap, and a
token that starts or ends inside a character is marked with "…". Concatenating the tokens' bytes
rebuilds the input exactly; other tokenizers (WordPiece, SentencePiece) are labelled by the character
offsets the tokenizer reports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

from llmkit.tokenizer import Tokenizer


@dataclass
class Piece:
    id: int
    token: str  # the vocabulary's own spelling (byte symbols for a byte-level BPE)
    label: str  # what to show: the input characters it covers, "…" where it cuts a character
    start: int  # character span of the input it covers, [start, end); -1 for special tokens
    end: int
    hex: str  # its bytes, when the tokenizer is byte-level (else "")
    special: bool

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def byte_symbols() -> dict[str, int]:
    """GPT-2's byte alphabet inverted: symbol → byte. Printable bytes stand for themselves; the rest
    are shifted to code points 256 and up, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shift)] = b
            shift += 1
    return table


def is_byte_level(tokenizer: Tokenizer) -> bool:
    return type(tokenizer.backend.decoder).__name__ == "ByteLevel"


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes | None:
    """The bytes a byte-level token stands for; None when its spelling is not in the byte alphabet."""
    symbols = byte_symbols()
    token = tokenizer.id_to_token(token_id) or ""
    if not token or any(ch not in symbols for ch in token):
        return None
    return bytes(symbols[ch] for ch in token)


def visible(text: str) -> str:
    """Whitespace drawn so a label never looks empty."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def special_ids(tokenizer: Tokenizer) -> set[int]:
    return {i for i, added in tokenizer.backend.get_added_tokens_decoder().items() if added.special}


def text_pieces(tokenizer: Tokenizer, text: str) -> tuple[list[Piece], bool]:
    """The pieces of `tokenizer.encode(text)`, and whether their bytes rebuild `text` exactly."""
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = encoding.ids
    raw = [token_bytes(tokenizer, i) for i in ids] if is_byte_level(tokenizer) else [None] * len(ids)
    if all(b is not None for b in raw) and b"".join(raw) == text.encode("utf-8"):
        return _byte_pieces(tokenizer, text, ids, raw), True
    pieces = []
    for token_id, (start, end) in zip(ids, encoding.offsets):
        label = visible(text[start:end]) if end > start else visible(tokenizer.id_to_token(token_id) or "?")
        pieces.append(Piece(token_id, tokenizer.id_to_token(token_id) or "", label, start, end, "", False))
    return pieces, False


def _byte_pieces(tokenizer: Tokenizer, text: str, ids: list[int], raw: list[bytes]) -> list[Piece]:
    char_of_byte = [i for i, ch in enumerate(text) for _ in ch.encode("utf-8")]  # byte offset → character
    char_start = {len(char_of_byte)} | {b for b in range(len(char_of_byte))
                                        if b == 0 or char_of_byte[b] != char_of_byte[b - 1]}
    pieces, offset = [], 0
    for token_id, data in zip(ids, raw):
        first, last = offset, offset + len(data)  # the token's bytes are [first, last) of the input's
        start, end = char_of_byte[first], char_of_byte[last - 1] + 1
        label = ("" if first in char_start else "…") + visible(text[start:end]) + ("" if last in char_start else "…")
        pieces.append(Piece(token_id, tokenizer.id_to_token(token_id) or "", label, start, end, data.hex(" "), False))
        offset = last
    return pieces


def frame_pieces(tokenizer: Tokenizer, text: str, ids: list[int]) -> tuple[list[Piece], bool]:
    """Pieces of `ids`, a framing of the text (BOS + text, [CLS] text [SEP], text </s>): the text's own
    tokens where they sit, every other id a special piece labelled by its spelling."""
    inner, exact = text_pieces(tokenizer, text)
    plain = [p.id for p in inner]
    at = next((s for s in range(len(ids) - len(plain) + 1) if ids[s:s + len(plain)] == plain), None)
    if at is None:  # the frame changed the text's tokens: label every id by its spelling
        return [Piece(i, tokenizer.id_to_token(i) or "", visible(tokenizer.id_to_token(i) or "?"), -1, -1, "",
                      i in special_ids(tokenizer)) for i in ids], False

    def outside(i: int) -> Piece:
        spelling = tokenizer.id_to_token(i) or ""
        return Piece(i, spelling, spelling or "?", -1, -1, "", True)

    return [outside(i) for i in ids[:at]] + inner + [outside(i) for i in ids[at + len(plain):]], exact


def positions_of(pieces: list[Piece], text: str, word: str) -> list[int]:
    """Indices of the pieces covering the first occurrence of `word` in `text` ([] if absent)."""
    start = text.find(word) if word else -1  # no word (None: a text without a default focus) is absent too
    if start < 0:
        return []
    end = start + len(word)
    return [i for i, p in enumerate(pieces) if not p.special and p.start < end and p.end > start]


def id_label(tokenizer: Tokenizer, token_id: int) -> str:
    """A readable label for a token out of context (a prediction): its text, or its bytes in <hex>
    when they are part of a character."""
    data = token_bytes(tokenizer, token_id) if is_byte_level(tokenizer) else None
    if data is None:
        return visible(tokenizer.decode([token_id]))
    try:
        return visible(data.decode("utf-8"))
    except UnicodeDecodeError:
        return "<" + data.hex(" ") + ">"
