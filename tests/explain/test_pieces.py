"""Token pieces: their bytes rebuild the input exactly (Chinese, emoji, code), characters split over
tokens are labelled as such, and words map to the tokens that cover them."""

from __future__ import annotations

import pytest

from explain_helpers import tiny_lm, tiny_tokenizer
from llmkit.explain.pieces import byte_symbols, frame_pieces, positions_of, text_pieces
from llmkit.explain.subject import Subject

TEXTS = ["猫坐在垫子上", "The cat sat on the mat.", "emoji 🐱🙂 and 👩‍💻 (a joined one)",
         "def add(x, y):\n\treturn x + y  # 加法\n", "mixed 中文 and ASCII, tabs\tand\r\nCRLF", "𠀋 is outside the BMP"]


def test_the_byte_alphabet_covers_every_byte_once():
    table = byte_symbols()
    assert sorted(table.values()) == list(range(256)) and len(table) == 256


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_rebuild_the_input_exactly(text):
    tok = tiny_tokenizer()
    pieces, exact = text_pieces(tok, text)
    assert exact
    assert [p.id for p in pieces] == tok.encode(text)
    assert b"".join(bytes.fromhex(p.hex) for p in pieces).decode("utf-8") == text
    # every character is covered, in order, and the spans never go backwards
    assert pieces[0].start == 0 and pieces[-1].end == len(text)
    assert all(a.end <= b.end and a.start <= b.start for a, b in zip(pieces, pieces[1:]))


def test_a_character_split_over_tokens_is_shown_as_that_character():
    tok = tiny_tokenizer()
    text = "猫吃鱼"  # 吃 and 鱼 are not in the training lines: their three bytes stay apart
    pieces, exact = text_pieces(tok, text)
    assert exact
    split = [p for p in pieces if "…" in p.label]
    assert split, "expected tokens holding part of a character"
    for p in split:  # labelled by the characters it touches, the cut marked
        assert p.label.strip("…") == text[p.start:p.end]
    assert any(p.label == "…吃…" for p in split)  # a token holding only the middle byte of 吃
    assert not any("\ufffd" in p.label or "å" in p.label for p in pieces)  # no replacement chars, no mojibake


def test_framing_marks_special_tokens_and_keeps_the_text_tokens():
    lm = tiny_lm()
    s = Subject.create(lm, "猫坐在垫子上")
    assert s.ids == lm.prefix_ids + lm.tokenizer.encode("猫坐在垫子上")
    assert [p.special for p in s.pieces] == [True] * len(lm.prefix_ids) + [False] * (len(s.ids) - len(lm.prefix_ids))
    pieces, exact = frame_pieces(lm.tokenizer, "猫坐在垫子上", s.ids)
    assert exact and pieces == s.pieces


def test_words_map_to_the_tokens_covering_them():
    s = Subject.create(tiny_lm(), "猫坐在垫子上")
    found = positions_of(s.pieces, s.text, "垫子")
    assert found and all(not s.pieces[i].special for i in found)
    covered = "".join(dict.fromkeys(s.text[s.pieces[i].start:s.pieces[i].end] for i in found))
    assert "垫子" in covered
    assert positions_of(s.pieces, s.text, "狗") == []
