"""Incremental detokenisation: characters split across byte tokens come out whole, stop strings are
caught across token boundaries and never emitted, and text that only might begin one is released
when it turns out not to."""

import pytest

from llmkit.inference.detokenize import TextStream
from post_training_helpers import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def pieces(tok, ids, stop=()):
    stream = TextStream(tok, stop)
    out = [stream.push(i) for i in ids]
    return out, stream.finish(), stream


def test_a_cjk_character_and_an_emoji_split_into_bytes_come_out_whole(tok):
    ids = tok.encode("a中🙂b")
    assert len(ids) == 1 + 3 + 4 + 1  # the tokenizer never saw these characters: one token per byte
    out, rest, _ = pieces(tok, ids)
    assert out == ["a", "", "", "中", "", "", "", "🙂", "b"] and rest == ""


def test_the_joined_pieces_equal_decoding_everything_at_once(tok):
    text = "the quick brown fox jumps over 中文 and 🙂 and hello world"
    ids = tok.encode(text)
    out, rest, _ = pieces(tok, ids)
    assert "".join(out) + rest == tok.decode(ids) == text


def test_an_incomplete_character_at_the_end_is_released_by_finish(tok):
    ids = tok.encode("ok中")[:-1]  # the last byte of 中 never comes
    out, rest, _ = pieces(tok, ids)
    assert "".join(out) == "ok" and rest == tok.decode(ids)[2:] and rest.endswith("\ufffd")


def test_a_stop_string_across_two_tokens_is_caught_and_not_emitted(tok):
    text = "the quick brown fox jumps"
    ids = tok.encode(text)
    texts = [tok.decode([i]) for i in ids]
    # a stop string made of the end of one token and the start of the next
    boundary = next(k for k in range(len(ids) - 1) if len(texts[k]) > 1 and len(texts[k + 1]) > 1)
    stop = texts[boundary][-1] + texts[boundary + 1][:2]
    assert text.find(stop) == len("".join(texts[:boundary + 1])) - 1  # its first occurrence spans them
    out, rest, stream = pieces(tok, ids, stop=[stop, "zzz"])
    assert "".join(out) + rest == text[:text.find(stop)]
    assert stream.stopped and stop not in "".join(out)
    assert out[boundary + 2:] == [""] * len(out[boundary + 2:])  # nothing after the stop


def test_text_that_may_begin_a_stop_string_is_held_then_released(tok):
    ids = tok.encode("fox jumps")
    out, rest, stream = pieces(tok, ids, stop=["x j!"])
    assert not stream.stopped
    assert "".join(out) + rest == "fox jumps"
    assert "".join(out) == "fox jumps"  # "x j" was held until "u" showed it is not the stop string
    out, rest, stream = pieces(tok, tok.encode("fox j"), stop=["x j!"])
    assert "".join(out) == "fo" and rest == "x j"  # held to the end, then released by finish


def test_the_earliest_of_several_stop_strings_wins(tok):
    out, rest, _ = pieces(tok, tok.encode("hello world yes no"), stop=["no", "world"])
    assert "".join(out) + rest == "hello "
