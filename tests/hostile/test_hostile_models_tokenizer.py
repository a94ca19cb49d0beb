"""Hostile tokenizer input, through the library (issue 18, classes 3 and 6).

- tokenizer.json regexes that backtrack for ever are refused at load (nested repeats, and a probe
  such as "a" * 30 + "b" that must encode), and no Rust panic escapes as a BaseException;
- lone surrogates in text to encode or generate from are a one-line LlmkitError.
"""

from __future__ import annotations

import json
import time

import pytest

from llmkit.errors import LlmkitError, ModelFormatError
from llmkit.tokenizer import Tokenizer
from llmkit.tokenizer.regex_check import nested_repeat
from post_training_helpers import save_tiny_model

REAL_PATTERNS = [  # the shapes real tokenizers use: GPT-2, LLaMA 3 / Qwen2, o200k, DeepSeek-like
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}|[一-龥぀-ゟ゠-ヿ]+|[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+",
]
HOSTILE_PATTERNS = [r"(a+)+b", r"(\w+\s?)*$", r"((a+)+)+c", r"(a{1,30})*b", r"(?:x|(?:y+)+)*z", r"(.*a){12}"]


@pytest.fixture(scope="module")
def tokenizer_json() -> dict:
    tok = Tokenizer.train(["hello world aaa bbb 123"] * 4, vocab_size=300, min_frequency=1)
    return json.loads(tok.backend.to_str())


def with_regex(base: dict, pattern: str, where: str) -> dict:
    regex = {"Regex": pattern}
    if where == "pre_tokenizer":
        return dict(base, pre_tokenizer={"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": regex, "behavior": "Isolated", "invert": False}, base["pre_tokenizer"]]})
    if where == "normalizer":
        return dict(base, normalizer={"type": "Replace", "pattern": regex, "content": "x"})
    return dict(base, decoder={"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": regex, "content": "x"}, base["decoder"]]})


@pytest.mark.parametrize("where", ["pre_tokenizer", "normalizer", "decoder"])
@pytest.mark.parametrize("pattern", HOSTILE_PATTERNS)
def test_backtracking_regexes_are_refused_at_load(tokenizer_json, tmp_path, pattern, where):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(with_regex(tokenizer_json, pattern, where)), encoding="utf-8")
    started = time.monotonic()
    with pytest.raises(ModelFormatError, match="tokenizer.json: .*(repeats a group|backtracks)"):
        Tokenizer.load(path)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("pattern", REAL_PATTERNS)
def test_real_patterns_load_and_encode_the_probe_within_a_second(tokenizer_json, tmp_path, pattern):
    assert nested_repeat(pattern) is None
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(with_regex(tokenizer_json, pattern, "pre_tokenizer")), encoding="utf-8")
    tok = Tokenizer.load(path)
    started = time.monotonic()
    text = "a" * 30 + "b" + " héllo wörld 🙂" * 100
    assert tok.decode(tok.encode(text)) == text
    assert time.monotonic() - started < 1


def test_a_panic_while_encoding_is_a_one_line_error(tokenizer_json):
    """A pattern the load-time checks would refuse, built directly: encoding it panics in Rust, and
    the panic (a BaseException) comes out as a ModelFormatError."""
    import tokenizers

    backend = tokenizers.Tokenizer.from_str(json.dumps(with_regex(tokenizer_json, r"(a+)+b", "pre_tokenizer")))
    with pytest.raises(ModelFormatError, match="backtracks too much"):
        Tokenizer(backend).encode("a" * 5000 + "!")


@pytest.mark.parametrize("text", ["a\ud800b", "\udcff", "ok \udc80 bytes", "\ud83d"])
def test_lone_surrogates_are_a_one_line_error(tokenizer_json, text):
    import tokenizers

    tok = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(tokenizer_json)))
    for encode in (lambda: tok.encode(text), lambda: tok.encode_batch(["fine", text])):
        with pytest.raises(LlmkitError, match="valid UTF-8|lone surrogate") as caught:
            encode()
        assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import llmkit

    return llmkit.load(save_tiny_model(tmp_path_factory.mktemp("lm") / "run"))


def test_generate_refuses_a_lone_surrogate_in_the_prompt(tiny_lm):
    with pytest.raises(LlmkitError, match="lone surrogate U\\+D800"):
        tiny_lm.generate("hi \ud800", max_new_tokens=2)
