"""Byte-level BPE tokenizer: a thin, strict wrapper around the Hugging Face `tokenizers` library.

Text is mapped to bytes before BPE, and all 256 byte symbols are in every vocabulary, so any
Python `str` round-trips exactly: `decode(encode(s)) == s`. The special tokens of
`SPECIAL_TOKENS` are registered first and so own ids 0..6; their literal text in the input
encodes to those ids. The file format is the library's own `tokenizer.json`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.errors import CheckpointError, ConfigError, LlmkitError, ModelFormatError
from llmkit.io.checkpoint import atomic_write_bytes
from llmkit.io.input_files import read_regular_bytes
from llmkit.tokenizer.regex_check import check_tokenizer_regexes, is_rust_panic

SPECIAL_TOKENS: dict[str, str] = {
    "bos": "<|bos|>",
    "eos": "<|eos|>",
    "pad": "<|pad|>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end": "<|end|>",
}

# Masked-LM pretraining's [MASK]. Not in SPECIAL_TOKENS, so tokenizers trained before it existed
# keep their ids: `with_mask_token()` appends it (at id vocab_size) when a model needs one.
MASK_TOKEN = "<|mask|>"

FILE_NAME = "tokenizer.json"
_SURROGATE = re.compile("[\ud800-\udfff]")
_NUM_BYTES = 256


def _one_line(text: str) -> str:
    """Collapse a (possibly multi-line) library message into one line for an error."""
    return " ".join(str(text).split()) or "unknown error"


def lone_surrogate(text: str, what: str) -> str | None:
    """A one-line message naming the first lone surrogate in `text`, or None. Surrogates are not Unicode text: they
    come from invalid UTF-8 bytes (Python's surrogateescape, e.g. in command-line arguments) or from a
    JSON "\\ud800" escape, and no tokenizer can encode them."""
    found = _SURROGATE.search(text)
    if found is None:
        return None
    char = ord(found.group())
    detail = (f"byte 0x{char - 0xDC00:02x} is not valid UTF-8" if 0xDC80 <= char <= 0xDCFF
              else f"lone surrogate U+{char:04X}")
    return f"{what}: {detail} (at character {found.start()}); the text must be valid Unicode"


def _encode_failure(exc: BaseException, texts: list) -> BaseException:
    """What to raise when the backend fails: a one-line error for the failures input can cause (a lone
    surrogate; a Rust panic, which a hostile regex causes), else `exc` itself."""
    if isinstance(exc, TypeError):
        bad = next((e for e in (lone_surrogate(t, "text") for t in texts if isinstance(t, str)) if e), None)
        return LlmkitError(bad) if bad else exc
    if is_rust_panic(exc):
        return ModelFormatError(f"the tokenizer failed on this text ({_one_line(exc)[:160]}); its regular "
                                "expression backtracks too much, so the tokenizer file is unusable")
    return exc


class Tokenizer:
    """A byte-level BPE tokenizer; `encode` never adds special tokens, `decode` keeps them."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = SPECIAL_TOKENS["bos"],
        eos_token: str | None = SPECIAL_TOKENS["eos"],
        pad_token: str | None = SPECIAL_TOKENS["pad"],
        mask_token: str | None = MASK_TOKEN,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.mask_token = mask_token

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
        """Learn merges from `texts`; `vocab_size` counts the specials and the 256 bytes."""
        minimum = _NUM_BYTES + len(SPECIAL_TOKENS)
        if vocab_size < minimum:
            raise ConfigError(
                f"vocab_size: {vocab_size} is too small; a byte-level BPE needs at least "
                f"{minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        if min_frequency < 1:
            raise ConfigError(f"min_frequency: {min_frequency} must be >= 1")
        backend = tokenizers.Tokenizer(models.BPE())
        # add_prefix_space=False: a leading space would be invented on encode and break round trip.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=False,  # the library never prints
            special_tokens=list(SPECIAL_TOKENS.values()),  # trained first → ids 0..6 in order
            # Every byte gets a symbol even if unseen, otherwise unseen bytes would be dropped.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        bos_token: str | None = SPECIAL_TOKENS["bos"],
        eos_token: str | None = SPECIAL_TOKENS["eos"],
        pad_token: str | None = SPECIAL_TOKENS["pad"],
    ) -> Tokenizer:
        """Read a `tokenizer.json` file, or a directory holding one. The special-token strings default
        to llmkit's own; a Hugging Face directory names its own in tokenizer_config.json."""
        path = Path(path)
        file = path / FILE_NAME if path.is_dir() else path
        if not file.exists():
            raise CheckpointError(f"{path}: no {FILE_NAME} found")
        # A regular file of bounded size only (a FIFO would block); the Rust parser bounds nesting.
        data = read_regular_bytes(file, error=CheckpointError, what=FILE_NAME)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{file}: corrupt {FILE_NAME} ({_one_line(exc)})") from exc
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises a bare Exception for every parse error
            raise CheckpointError(f"{file}: corrupt {FILE_NAME} ({_one_line(exc)})") from exc
        check_tokenizer_regexes(text, backend, str(file))
        # A Hugging Face file may pad or truncate every encoding to a fixed length (BERT's: 128);
        # `encode` returns exactly the text's tokens, and batching pads explicitly.
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)

    def with_mask_token(self) -> Tokenizer:
        """This tokenizer, with `mask_token` added as a special token if it has none (MLM needs one)."""
        if self.mask_token is None:
            self.mask_token = MASK_TOKEN
        if self.mask_id is None:
            self.backend.add_special_tokens([self.mask_token])
        return self

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json` atomically and return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / FILE_NAME
        data = self.backend.to_str(pretty=True).encode("utf-8")
        atomic_write_bytes(target, data)  # readers never see a half-written file
        return target

    # ---- encoding -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token text inside it maps to the special ids."""
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except BaseException as exc:  # BaseException: a Rust panic (pyo3's PanicException) is one
            raise _encode_failure(exc, [text]) from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        texts = list(texts)
        # encode_batch_fast skips offset tracking, which we never use.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        try:
            return [enc.ids for enc in encode(texts, add_special_tokens=False)]
        except BaseException as exc:
            raise _encode_failure(exc, texts) from None

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens included."""
        try:
            return self.backend.decode(list(ids), skip_special_tokens=False)
        except BaseException as exc:  # a decoder's Replace regex can panic too
            raise _encode_failure(exc, []) from None

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _special_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._special_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._special_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._special_id(self.pad_token)

    @property
    def mask_id(self) -> int | None:
        return self._special_id(self.mask_token)

    def prefix_ids(self) -> list[int]:
        """The ids the tokenizer's own post-processor puts in front of every text (LLaMA's BOS; none
        for GPT-2 or llmkit's tokenizers). `encode` leaves them out; generation adds them."""
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON: equal fingerprints mean identical tokenization."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"
