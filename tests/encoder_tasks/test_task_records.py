"""The NER and SQuAD readers: good files read as written; every bad record is one DatasetError naming
file:line (for SQuAD's nested JSON, the line where the faulty object starts, and its path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.data.ner_records import read_tagged, tag_set
from llmkit.data.squad_records import read_squad
from llmkit.errors import DatasetError

GOOD = {"tokens": ["Alice", "Smith", "visited", "New", "York", "."],
        "tags": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]}


def write_lines(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_ner_records_and_their_label_set(tmp_path):
    only_inside = {"tokens": ["on", "Monday"], "tags": ["O", "I-DATE"]}
    sentences = read_tagged(write_lines(tmp_path / "ner.jsonl", GOOD, "", only_inside))
    assert [s.where for s in sentences] == [f"{tmp_path / 'ner.jsonl'}:1", f"{tmp_path / 'ner.jsonl'}:3"]
    assert sentences[0].words == tuple(GOOD["tokens"]) and sentences[0].tags == tuple(GOOD["tags"])
    # O first, B- before I- per type, and a type seen only as I- still gets its B-
    assert tag_set(sentences) == ["O", "B-DATE", "I-DATE", "B-LOC", "I-LOC", "B-PER", "I-PER"]


@pytest.mark.parametrize("bad, message", [
    ({"tokens": ["a", "b"]}, ":2: field 'tags' must be a list of BIO tags (missing)"),
    ({"tokens": ["a", "b"], "tags": ["O"]}, ":2: 1 tags for 2 tokens"),
    ({"tokens": ["a", "b"], "tags": ["O", "PER"]}, ":2: tags[1]: not a BIO tag: 'PER'"),
    ({"tokens": ["a b", "c"], "tags": ["O", "O"]}, ":2: tokens[0] must be a non-empty string without whitespace"),
    ({"tokens": [], "tags": []}, ":2: field 'tokens' must be a non-empty list of words"),
    ({"tags": ["O"]}, ":2: field 'tokens' must be a non-empty list of words (missing)"),
    ('{"tokens": ["a"], "tags": ["O"]', ":2:"),  # invalid JSON: iter_jsonl's message, with the column
])
def test_bad_ner_record_names_its_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "bad.jsonl", GOOD, bad)
    with pytest.raises(DatasetError) as err:
        read_tagged(path)
    assert str(err.value).startswith(f"{path}:2") and message in str(err.value), err.value
    assert "\n" not in str(err.value)


def test_unknown_tag_with_a_fixed_label_set(tmp_path):
    path = write_lines(tmp_path / "ner.jsonl", GOOD)
    with pytest.raises(DatasetError, match=r"ner.jsonl:1: tags\[0\] 'B-PER' is not one of the labels"):
        read_tagged(path, ["O", "B-LOC", "I-LOC"])


def squad(paragraphs) -> dict:
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


def qa(qid, question, text, start):
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}]}


def test_squad_reads_questions_and_keeps_unanswerable(tmp_path):
    context = "Alice Smith was born in Paris on 3 May 1901."
    data = squad([{"context": context, "qas": [qa("a", "Where was Alice born?", "Paris", 24),
                                               {"id": "b", "question": "Why?", "answers": [], "is_impossible": True}]},
                  {"context": "Bob works for Acme.", "qas": [qa("c", "Who employs Bob?", "Acme", 14)]}])
    (tmp_path / "s.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    read = read_squad(tmp_path / "s.json")
    assert read.unanswerable == 1 and [q.qid for q in read.questions] == ["a", "b", "c"]
    assert read.questions[1].answers == () and read.questions[1].paragraph == 0  # SQuAD 2.0: no answer
    first = read.questions[0]
    assert first.answers == (("Paris", 24),) and first.context == context and first.paragraph == 0
    assert read.questions[2].paragraph == 1
    lines = (tmp_path / "s.json").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if '"id": "c"' in text) - 1  # the object's "{" is just above
    assert read.where(read.questions[2]) == f"{tmp_path / 's.json'}:{line}: data[0].paragraphs[1].qas[0]"


@pytest.mark.parametrize("change, path, message", [
    (lambda d: d["data"][0]["paragraphs"][1]["qas"][0]["answers"][0].update(answer_start=3),
     "data[0].paragraphs[1].qas[0].answers[0]", "answer_start 3 does not hold the answer text 'Berlin' "
                                                "(the context has ' capit' there)"),
    (lambda d: d["data"][0]["paragraphs"][1]["qas"][0]["answers"][0].update(answer_start=99),
     "data[0].paragraphs[1].qas[0].answers[0]", "answer_start 99 is outside the context"),
    (lambda d: d["data"][0]["paragraphs"][1].pop("context"),
     "data[0].paragraphs[1]", "field 'context' must be a string (missing)"),
    (lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(id="a"),
     "data[0].paragraphs[1].qas[0]", "question id 'a' appears twice"),
    (lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(answers=[]),
     "data[0].paragraphs[1].qas[0]", "field 'answers' is empty"),
    (lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(is_impossible=True),
     "data[0].paragraphs[1].qas[0]", "field 'answers' must be empty when 'is_impossible' is true"),
    (lambda d: d["data"][0]["paragraphs"][1]["qas"][0].update(is_impossible="yes"),
     "data[0].paragraphs[1].qas[0]", "field 'is_impossible' must be true or false"),
])
def test_bad_squad_record_names_line_and_path(tmp_path, change, path, message):
    data = squad([{"context": "Paris is big.", "qas": [qa("a", "What is big?", "Paris", 0)]},
                  {"context": "The capital is Berlin.", "qas": [qa("b", "What is the capital?", "Berlin", 15)]}])
    change(data)
    text = json.dumps(data, indent=1)
    (tmp_path / "s.json").write_text(text, encoding="utf-8")
    # the faulty object's line, found independently: a marker key put first in it lands on the line after its "{"
    node = data
    for key in path.replace("]", "").replace("[", ".").split("."):
        node = node[int(key)] if key.isdigit() else node[key]
    items = dict(node)
    node.clear()
    node.update({"__marker__": 1, **items})
    line = next(i for i, t in enumerate(json.dumps(data, indent=1).splitlines(), 1) if '"__marker__"' in t) - 1
    with pytest.raises(DatasetError) as err:
        read_squad(tmp_path / "s.json")
    assert str(err.value).startswith(f"{tmp_path / 's.json'}:{line}: {path}: ") and message in str(err.value), err.value


def test_squad_syntax_error_names_line_and_column(tmp_path):
    (tmp_path / "s.json").write_text('{"data": [\n  {"paragraphs": [}\n]}', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"s.json:2:\d+: invalid JSON"):
        read_squad(tmp_path / "s.json")
