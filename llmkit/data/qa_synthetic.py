"""A seeded generator of extractive-QA data in SQuAD's JSON: short biographies and questions
about them, with each answer's character offset (v1.1), and optionally unanswerable ones (v2.0).

A paragraph tells of two to four people (names, places and organisations from
llmkit.data.ner_synthetic's lists, held-out paragraphs drawing only on its held-out names): where
and when each was born, whom they worked for and as what, in one of several phrasings. The
questions ask for those facts by the person's full name, so the reader has to find the right
person among several with facts of the same kinds: the answer type alone does not decide.

With `unanswerable` > 0 (a probability), SQuAD 2.0's unanswerable questions are added, marked
`"is_impossible": true` with no answers, of two kinds: each person's work sentence is left out with
that probability, and their employer and job are still asked for (other people's employers and
jobs in the paragraph are plausible but wrong); and with that probability a paragraph gets two
questions about someone it does not mention (a stranger, or a namesake sharing a last name with
someone in it, whose work sentences name people by last name only — their "employer" is asked).

    python -m llmkit.data.qa_synthetic OUT_DIR [--train N] [--heldout N] [--seed S] [--unanswerable P]

writes OUT_DIR/train.json and OUT_DIR/heldout.json (N paragraphs each).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from llmkit.data.ner_synthetic import MONTHS, Names

JOBS = ("pilot chemist teacher nurse architect journalist baker lawyer carpenter surgeon librarian "
        "photographer").split()
BIRTH = ("{name} was born in {place} on {date}.", "Born on {date} in {place}, {name} grew up there.",
         "{name}, who was born in {place} on {date}, had two brothers.")
WORK = ("{last} later worked for {org} as a {job}.", "At {org}, {last} was employed as a {job}.",
        "{last} spent years as a {job} at {org}.")
QUESTIONS = {"place": ("Where was {name} born?", "In which city was {name} born?"),
             "date": ("When was {name} born?", "On what date was {name} born?"),
             "org": ("Which company did {name} work for?", "Who employed {name}?"),
             "job": ("What was the job of {name}?", "What did {name} work as?")}


def _fill(template: str, values: dict[str, str], context: str) -> tuple[str, dict[str, int]]:
    """`template` filled in, appended to `context`: the new context and where each value landed."""
    at, out = {}, context
    parts = template.replace("}", "{").split("{")  # text, field, text, field, ...
    for i, part in enumerate(parts):
        if i % 2:
            at[part] = len(out)
            out += values[part]
        else:
            out += part
    return out, at


def paragraph(rng: random.Random, names: Names, index: int, people_per: tuple[int, int] = (2, 4),
              unanswerable: float = 0.0) -> dict[str, Any]:
    people, used, count = [], set(), rng.randint(*people_per)
    while len(people) < count:
        first, last = rng.choice(names.first), rng.choice(names.last)
        if first in used or last in used:
            continue
        used.update((first, last))
        people.append({"name": f"{first} {last}", "last": last, "place": rng.choice(names.places),
                       "date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1900, 2010)}",
                       "org": " ".join(names.org(rng)), "job": rng.choice(JOBS)})
    context, qas = "", []
    for p, person in enumerate(people):
        where: dict[str, int] = {}
        # rng is drawn only when unanswerable questions are asked for, so v1.1 data stays as it was
        without_work = unanswerable > 0 and rng.random() < unanswerable
        for templates in (BIRTH,) if without_work else (BIRTH, WORK):
            context, at = _fill(rng.choice(templates) + " ", person, context)
            where.update(at)
        for fact, phrasings in QUESTIONS.items():
            question = {"id": f"{index}-{p}-{fact}", "question": rng.choice(phrasings).format(name=person["name"])}
            if fact in where:
                qas.append({**question, "answers": [{"text": person[fact], "answer_start": where[fact]}]})
            else:
                qas.append({**question, "answers": [], "is_impossible": True})
    if unanswerable > 0 and rng.random() < unanswerable:
        qas += _absent_person_questions(rng, names, index, people, used)
    return {"context": context.strip(), "qas": qas}


def _absent_person_questions(rng: random.Random, names: Names, index: int, people: list[dict[str, str]],
                             used: set[str]) -> list[dict[str, Any]]:
    """Two unanswerable questions about someone the paragraph does not mention."""
    first = rng.choice([n for n in names.first if n not in used])
    if rng.random() < 0.5:  # a namesake: "Smith later worked for ..." is about the paragraph's own Smith
        last, facts = rng.choice(people)["last"], ["org", rng.choice(["place", "date", "job"])]
    else:
        last, facts = rng.choice([n for n in names.last if n not in used]), rng.sample(list(QUESTIONS), 2)
    return [{"id": f"{index}-absent-{fact}", "question": rng.choice(QUESTIONS[fact]).format(name=f"{first} {last}"),
             "answers": [], "is_impossible": True} for fact in facts]


def generate(n: int, *, seed: int, held_out: bool = False, people_per: tuple[int, int] = (2, 4),
             unanswerable: float = 0.0) -> dict[str, Any]:
    """`n` paragraphs (one per article) of `people_per` people each, four questions per person, with
    unanswerable ones at rate `unanswerable` (see the module's docstring)."""
    if not 0 <= unanswerable <= 1:
        raise ValueError(f"unanswerable must be a probability, got {unanswerable}")
    rng, names = random.Random(seed), Names(held_out)
    return {"version": "v2.0" if unanswerable else "1.1",
            "data": [{"title": f"synthetic biographies {i}",
                      "paragraphs": [paragraph(rng, names, i, people_per, unanswerable)]} for i in range(n)]}


def write(out_dir: str | Path, *, train: int, heldout: int, seed: int,
          unanswerable: float = 0.0) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.json", out / "heldout.json"
    sets = (generate(train, seed=seed, unanswerable=unanswerable),
            generate(heldout, seed=seed + 1, held_out=True, unanswerable=unanswerable))
    for path, data in zip(paths, sets):
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmkit.data.qa_synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unanswerable", type=float, default=0.0, metavar="P",
                   help="rate of SQuAD 2.0 unanswerable questions (a person's work left out, someone absent)")
    args = p.parse_args(argv)
    if not 0 <= args.unanswerable <= 1:
        p.error(f"--unanswerable must be in [0, 1], got {args.unanswerable}")
    for path in write(args.out_dir, train=args.train, heldout=args.heldout, seed=args.seed,
                      unanswerable=args.unanswerable):
        print(path)


if __name__ == "__main__":
    main()
