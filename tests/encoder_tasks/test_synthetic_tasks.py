"""The NER and QA generators: seeded, well-formed (every record passes the strict readers), and
held-out data uses only names that training data never shows."""

from __future__ import annotations

import json
import re

from llmkit.data import ner_synthetic, qa_synthetic
from llmkit.data.ner_records import read_tagged
from llmkit.data.squad_records import read_squad
from llmkit.training.ner_metrics import entities


def names_in(records) -> dict[str, set[str]]:
    """Entity words by type; for organisations only the distinctive first word (the kind is shared)."""
    found: dict[str, set[str]] = {}
    for r in records:
        for kind, a, b in entities(r["tags"]):
            if kind != "DATE":
                words = r["tokens"][a:a + 1] if kind == "ORG" else r["tokens"][a:b + 1]
                found.setdefault(kind, set()).update(words)
    return found


def test_ner_generator_is_seeded_and_holds_out_unseen_names(tmp_path):
    assert ner_synthetic.generate(50, seed=3) == ner_synthetic.generate(50, seed=3)
    assert ner_synthetic.generate(50, seed=3) != ner_synthetic.generate(50, seed=4)
    train, held = ner_synthetic.write(tmp_path, train=600, heldout=200, seed=0)
    seen = names_in(json.loads(x) for x in train.read_text().splitlines())
    unseen = names_in(json.loads(x) for x in held.read_text().splitlines())
    assert set(seen) == set(unseen) == {"PER", "LOC", "ORG"}
    for kind in seen:
        assert not (seen[kind] - {"New", "San", "Cape", "Hong", "Buenos", "Rio", "de"}) & unseen[kind], kind
    sentences = read_tagged(held)  # the strict reader accepts every record
    assert len(sentences) == 200
    assert any(b > a for s in sentences for _, a, b in entities(s.tags))  # multi-word entities occur


def test_qa_generator_writes_valid_squad_with_unseen_names(tmp_path):
    train, held = qa_synthetic.write(tmp_path, train=30, heldout=10, seed=0)
    questions = read_squad(train).questions  # every answer_start holds its answer text
    assert len(questions) >= 30 * 2 * 4 and len({q.paragraph for q in questions}) == 30
    held_questions = read_squad(held).questions
    train_people = {q.question.rsplit(" ", 2)[-2] for q in questions if q.question.startswith("Where was")}
    held_people = {q.question.rsplit(" ", 2)[-2] for q in held_questions if q.question.startswith("Where was")}
    assert train_people and held_people and not train_people & held_people
    assert json.loads(train.read_text()) == qa_synthetic.generate(30, seed=0)


def test_qa_generator_adds_unanswerable_questions_that_have_no_answer(tmp_path):
    assert qa_synthetic.generate(20, seed=0, unanswerable=0.0) == qa_synthetic.generate(20, seed=0)  # v1.1 as before
    data = qa_synthetic.generate(60, seed=0, unanswerable=0.3)
    (tmp_path / "v2.json").write_text(json.dumps(data), encoding="utf-8")
    questions = read_squad(tmp_path / "v2.json").questions  # the strict reader accepts is_impossible records
    impossible = [q for q in questions if not q.answers]
    assert data["version"] == "v2.0" and 0.05 < len(impossible) / len(questions) < 0.5
    kinds = set()
    for q in impossible:
        first, last = re.search(r"\b([A-Z][a-z]+) ([A-Z][a-z]+)\b", q.question).groups()
        if "-absent-" in q.qid:  # someone the paragraph never mentions (a namesake at most shares the last name)
            assert f"{first} {last}" not in q.context
            kinds.add("namesake" if last in q.context else "stranger")
        else:  # a person whose work sentence was left out: their last name occurs once, where they were born
            assert q.context.count(last) == 1 and q.qid.endswith(("-org", "-job")), q
            kinds.add("no work sentence")
    assert kinds == {"namesake", "stranger", "no work sentence"}
