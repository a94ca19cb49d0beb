"""A seeded generator of extractive-QA data in SQuAD v1.1's JSON: short biographies and questions
about them, with each answer's character offset.

A paragraph tells of two to four people (names, places and organisations from
llmkit.data.ner_synthetic's lists, held-out paragraphs drawing only on its held-out names): where
and when each was born, whom they worked for and as what, in one of several phrasings. The
questions ask for those facts by the person's full name, so the reader has to find the right
person among several with facts of the same kinds: the answer type alone does not decide.

    python -m llmkit.data.qa_synthetic OUT_DIR [--train N] [--heldout N] [--seed S]

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


def paragraph(rng: random.Random, names: Names, index: int, people_per: tuple[int, int] = (2, 4)) -> dict[str, Any]:
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
        for templates in (BIRTH, WORK):
            context, at = _fill(rng.choice(templates) + " ", person, context)
            where.update(at)
        for fact, phrasings in QUESTIONS.items():
            qas.append({"id": f"{index}-{p}-{fact}", "question": rng.choice(phrasings).format(name=person["name"]),
                        "answers": [{"text": person[fact], "answer_start": where[fact]}]})
    return {"context": context.strip(), "qas": qas}


def generate(n: int, *, seed: int, held_out: bool = False, people_per: tuple[int, int] = (2, 4)) -> dict[str, Any]:
    """`n` paragraphs (one per article) of `people_per` people each, four questions per person."""
    rng, names = random.Random(seed), Names(held_out)
    return {"version": "1.1", "data": [{"title": f"synthetic biographies {i}",
                                        "paragraphs": [paragraph(rng, names, i, people_per)]} for i in range(n)]}


def write(out_dir: str | Path, *, train: int, heldout: int, seed: int) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.json", out / "heldout.json"
    for path, data in zip(paths, (generate(train, seed=seed), generate(heldout, seed=seed + 1, held_out=True))):
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmkit.data.qa_synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in write(args.out_dir, train=args.train, heldout=args.heldout, seed=args.seed):
        print(path)


if __name__ == "__main__":
    main()
