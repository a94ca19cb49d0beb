"""Byte-level BPE: exact round trip for any text, special-token ids, save/load, load errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmkit.errors import CheckpointError, ConfigError
from llmkit.tokenizer import SPECIAL_TOKENS, Tokenizer


def _corpus() -> list[str]:
    code = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n"
    english = "The quick brown fox jumps over the lazy dog. It was the best of times.\n"
    chinese = "我们在学习如何训练语言模型。今天天气很好。\n"
    emoji = "Party time 🎉🎉 with friends 👩‍👩‍👧 and cake 🍰!\n"
    return [code * 20, english * 20, chinese * 20, emoji * 20]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_corpus(), vocab_size=400)


def test_vocab_holds_bytes_specials_and_merges(tok: Tokenizer) -> None:
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400
    # The training text compresses: merges were learned.
    text = _corpus()[1]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_special_token_ids_are_0_to_6_in_order(tok: Tokenizer) -> None:
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS.values()]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.encode("<|eos|>") == [tok.eos_id]
    assert tok.encode(SPECIAL_TOKENS["user"] + "hi")[0] == tok.token_to_id("<|user|>")


def test_encode_never_adds_specials(tok: Tokenizer) -> None:
    ids = tok.encode("hello")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.encode("") == []


@pytest.mark.parametrize(
    "text",
    [
        "我们在学习如何训练语言模型",
        "emoji 🎉 and a family 👩‍👩‍👧 (ZWJ) ✓",
        "   leading spaces and trailing   ",
        "para one\n\n\n\npara two\n",
        "windows\r\nline endings\r\n",
        "\ttabs\t\there",
        "<|bos|>hello<|eos|><|pad|><|system|>s<|user|>u<|assistant|>a<|end|>",
        " <|eos|> spaced <|end|>\n",
        "<|eos| not quite <|eo|> special",
        "\x00\x01 control \x7f\u200b\ufeff",
        "never seen: ῼ ℵ 𝔘",
    ],
)
def test_round_trip_explicit(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_special_text_maps_to_special_ids(tok: Tokenizer) -> None:
    ids = tok.encode("a<|eos|>b")
    assert ids.count(tok.eos_id) == 1
    assert tok.decode(ids) == "a<|eos|>b"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_round_trip_property(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",))), max_size=8))
def test_encode_batch_matches_encode(tok: Tokenizer, texts: list[str]) -> None:
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_identical(tok: Tokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    sample = "".join(_corpus()) + " <|eos|> ünïcödé"
    for loaded in (Tokenizer.load(path.parent), Tokenizer.load(path)):
        assert loaded.fingerprint() == tok.fingerprint()
        assert loaded.encode(sample) == tok.encode(sample)
        assert loaded.vocab_size == tok.vocab_size


def test_fingerprint_differs_between_vocabularies(tok: Tokenizer) -> None:
    other = Tokenizer.train(_corpus(), vocab_size=300)
    assert other.fingerprint() != tok.fingerprint()
    assert len(tok.fingerprint()) == 64


def test_training_is_deterministic(tok: Tokenizer) -> None:
    assert Tokenizer.train(_corpus(), vocab_size=400).fingerprint() == tok.fingerprint()


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no tokenizer.json found") as err:
        Tokenizer.load(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(CheckpointError, match="no tokenizer.json found"):
        Tokenizer.load(tmp_path / "absent.json")


@pytest.mark.parametrize("content", [b"{not json", b'{"version": "1.0"}', b"\xff\xfe\x00garbage"])
def test_load_corrupt(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt tokenizer.json") as err:
        Tokenizer.load(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "\n" not in str(err.value)


def test_load_without_default_specials(tok: Tokenizer, tmp_path: Path) -> None:
    # A tokenizer.json whose vocabulary lacks our special tokens: the id properties are None.
    spec = json.loads(tok.backend.to_str())
    spec["added_tokens"] = []
    vocab = spec["model"]["vocab"]
    for t in SPECIAL_TOKENS.values():
        del vocab[t]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(sorted(vocab, key=vocab.__getitem__))}
    spec["model"]["merges"] = []
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (None, None, None)
    assert loaded.decode(loaded.encode("plain <|eos|> text")) == "plain <|eos|> text"


@pytest.mark.parametrize("size", [0, 100, 262])
def test_tiny_vocab_rejected(size: int) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        Tokenizer.train(["hello"], vocab_size=size)
