"""SQuAD-format JSON for extractive question answering, read strictly.

The file is SQuAD v1.1's or v2.0's layout: `{"data": [{"title"?, "paragraphs": [{"context": str, "qas":
[{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}`. It is read whole through
llmkit.io.safe_json (a regular UTF-8 file of at most 256 MiB, nesting bounded). Every problem is a
DatasetError naming the file, the line of the object at fault and its path in the file, e.g.
`squad.json:41: data[0].paragraphs[3].qas[1].answers[0]: answer_start 17 does not hold the answer
text 'Paris' (the context has 'Berli' there)`. Line numbers come from a second, position-keeping
parse run only when there is an error to report. SQuAD 2.0's unanswerable questions are marked
`"is_impossible": true` with an empty `answers` list: they are kept with no answers (their target
is "no answer"); an empty `answers` without that mark, or the mark with answers, is an error.
"""

from __future__ import annotations

import json
import json.scanner
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import DatasetError
from llmkit.io.input_files import read_regular_bytes
from llmkit.io.safe_json import parse_json


@dataclass(frozen=True)
class Question:
    qid: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]  # (text, character offset in context); the first is trained on;
    # none: SQuAD 2.0's unanswerable question
    paragraph: int  # index of its paragraph in the file: questions on one context are held out together
    at: tuple  # its path in the file: ("data", 0, "paragraphs", 3, "qas", 1)


@dataclass
class SquadFile:
    questions: list[Question]
    unanswerable: int  # SQuAD 2.0 questions without an answer (kept, with answers == ())
    reader: "_Reader"

    def where(self, question: Question) -> str:
        """"file:line: data[0].paragraphs[3].qas[1]", for an error about `question` found later."""
        return self.reader.where(list(question.at))


def read_squad(path: str | Path) -> SquadFile:
    raw = read_regular_bytes(path, what="SQuAD file")
    data = parse_json(raw.removeprefix(b"\xef\xbb\xbf"), where=str(path))
    reader = _Reader(Path(path), raw)
    articles = reader.field(data, [], "data", list)
    questions, unanswerable, seen, n_paragraph = [], 0, set(), 0
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(reader.field(article, ["data", a], "paragraphs", list)):
            at = ["data", a, "paragraphs", p]
            context = reader.field(paragraph, at, "context", str)
            if not context.strip():
                reader.fail(at, "field 'context' is empty")
            for q, qa in enumerate(reader.field(paragraph, at, "qas", list)):
                qat = [*at, "qas", q]
                question = reader.field(qa, qat, "question", str)
                if not question.strip():
                    reader.fail(qat, "field 'question' is empty")
                qid = qa.get("id", f"{a}.{p}.{q}")
                if not isinstance(qid, (str, int)) or isinstance(qid, bool):
                    reader.fail(qat, f"field 'id' must be a string, got {qid!r:.40}")
                if str(qid) in seen:
                    reader.fail(qat, f"question id {str(qid)!r} appears twice")
                seen.add(str(qid))
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    reader.fail(qat, f"field 'is_impossible' must be true or false, got {impossible!r:.40}")
                answers = reader.field(qa, qat, "answers", list)
                if impossible and answers:
                    reader.fail(qat, "field 'answers' must be empty when 'is_impossible' is true")
                if not answers and not impossible:
                    reader.fail(qat, "field 'answers' is empty (an answerable question needs at least one; "
                                     "mark an unanswerable one \"is_impossible\": true)")
                unanswerable += impossible
                spans = tuple(reader.answer(ans, [*qat, "answers", i], context) for i, ans in enumerate(answers))
                questions.append(Question(str(qid), question, context, spans, n_paragraph, tuple(qat)))
            n_paragraph += 1
    if not questions:
        raise DatasetError(f"{path}: no questions")
    return SquadFile(questions, unanswerable, reader)


class _Reader:
    """Field checks that fail with `file:line: path: what`."""

    def __init__(self, path: Path, raw: bytes) -> None:
        self.path, self.raw = path, raw
        self._tree: Any = None
        self._text = ""
        self._starts: dict[int, int] = {}

    def field(self, obj: Any, at: list, key: str, kind: type) -> Any:
        if not isinstance(obj, dict):
            self.fail(at, f"must be a JSON object, got {type(obj).__name__}")
        value = obj.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            name = {list: "a list", str: "a string", int: "an integer"}[kind]
            self.fail(at, f"field {key!r} must be {name}" + ("" if key in obj else " (missing)"))
        return value

    def answer(self, ans: Any, at: list, context: str) -> tuple[str, int]:
        text = self.field(ans, at, "text", str)
        start = self.field(ans, at, "answer_start", int)
        if not text.strip():
            self.fail(at, "field 'text' is empty")
        if not 0 <= start <= len(context) - len(text):
            self.fail(at, f"answer_start {start} is outside the context ({len(context)} characters) for an answer "
                          f"of {len(text)}")
        found = context[start:start + len(text)]
        if found != text:
            self.fail(at, f"answer_start {start} does not hold the answer text {text!r:.60} "
                          f"(the context has {found!r:.60} there)")
        return text, start

    def fail(self, at: list, message: str) -> None:
        raise DatasetError(f"{self.where(at)}: {message}")

    def where(self, at: list) -> str:
        path = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in at).removeprefix(".")
        return f"{self.path}:{self.line(at)}" + (f": {path}" if path else "")

    def line(self, at: list) -> int:
        """The line where the innermost object or array on the path `at` starts."""
        if self._tree is None:
            self._tree = self._parse_keeping_positions()
        node, start = self._tree, self._starts.get(id(self._tree), 0)
        for key in at:
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                break
            start = self._starts.get(id(node), start)
        return self._text.count("\n", 0, start) + 1

    def _parse_keeping_positions(self) -> Any:
        self._text = text = self.raw.decode("utf-8").removeprefix("\ufeff")
        decoder = json.JSONDecoder()
        plain_object, plain_array = decoder.parse_object, decoder.parse_array

        def parse_object(s_and_end, *args):
            value, end = plain_object(s_and_end, *args)
            self._starts[id(value)] = s_and_end[1] - 1
            return value, end

        def parse_array(s_and_end, *args):
            value, end = plain_array(s_and_end, *args)
            self._starts[id(value)] = s_and_end[1] - 1
            return value, end

        decoder.parse_object, decoder.parse_array = parse_object, parse_array
        decoder.scan_once = json.scanner.py_make_scanner(decoder)  # the C scanner never calls the hooks
        return decoder.decode(text)
