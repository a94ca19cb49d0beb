"""A seeded generator of NER sentences: people, places, organisations and dates from fixed lists,
in sentence templates, tagged in BIO (`{"tokens": [...], "tags": [...]}` records for finetune-tokens).

Every list of names is cut once, by a fixed seed, into a training part (three quarters) and a
held-out part: held-out sentences use only names never seen in training, so their score measures
whether a model recognises a name it has not memorised (from its context and from what the
pretrained encoder knows about words), not recall of the list. Dates and the templates are shared.
Organisation names are made of a distinctive first word (split like the other names) and a kind
("Bank", "Labs", ...). Some templates admit several types in one slot position ("visited LOC"
and "visited ORG"), so the slot's words decide.

    python -m llmkit.data.ner_synthetic OUT_DIR [--train N] [--heldout N] [--seed S]

writes OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ("Alice Bruno Chen Dmitri Elena Farah Gustav Hana Ibrahim Julia Kenji Lucia Mateo Nadia Oskar Priya "
         "Quentin Rosa Samir Tomas Ursula Viktor Wei Ximena Yusuf Zara Amara Bjorn Carmen Diego Emeka Fatima "
         "Goran Ingrid Javier Kofi Leila Marco Nia Olga").split()
LAST = ("Smith Garcia Nakamura Okafor Schmidt Rossi Kowalski Dubois Silva Novak Haddad Johansson Kim Patel "
        "Moreau Fischer Ivanova Mensah Costa Larsen Nguyen Romero Tanaka Weber Yilmaz Andersen Becker Castillo "
        "Demir Eriksen Ferreira Grant Hughes Ito Jensen Keller Lopez Murphy Nilsson Ortiz").split()
PLACES = ("Paris|Berlin|Madrid|Rome|Vienna|Prague|Warsaw|Lisbon|Dublin|Oslo|Stockholm|Helsinki|Athens|Cairo|"
          "Lagos|Nairobi|Accra|Tokyo|Osaka|Seoul|Hanoi|Manila|Jakarta|Delhi|Mumbai|Istanbul|Moscow|Toronto|"
          "Chicago|Denver|Boston|Seattle|Lima|Quito|Bogota|Sydney|New York|Buenos Aires|Cape Town|San Diego|"
          "Hong Kong|Rio de Janeiro").split("|")
ORG_NAMES = ("Northwind Bluestone Redwood Silverline Greenfield Ironbridge Brightwater Oakridge Stonegate "
             "Clearview Riverside Summit Harbor Evergreen Goldleaf Westbrook Crescent Pinecrest Lakeshore "
             "Highland Falcon Meridian Copperfield Starling").split()
ORG_KINDS = "Bank Labs Motors Airlines Foods Systems Insurance Media Energy Pharma".split()
MONTHS = "January February March April May June July August September October November December".split()

TEMPLATES = [t.split() for t in (
    "PER was born in LOC on DATE .", "PER moved to LOC in DATE .", "PER joined ORG in DATE .",
    "ORG opened an office in LOC .", "ORG hired PER as an engineer .", "On DATE , PER visited LOC .",
    "PER met PER in LOC .", "PER works for ORG in LOC .", "The report by PER was published on DATE .",
    "ORG and ORG signed a deal on DATE .", "Yesterday PER flew from LOC to LOC .", "PER left ORG after DATE .",
    "Shares of ORG fell in LOC on DATE .", "According to PER , the meeting in LOC went well .",
    "PER visited ORG .", "PER visited LOC last week .", "PER spoke with PER about ORG .",
    "The weather in LOC was cold on DATE .", "Nobody expected the news .", "PER said that prices rose .",
    "In DATE ORG moved its headquarters to LOC .", "A spokesperson for ORG declined to comment .",
)]
SPLIT_SEED = 20240531  # fixes which names are held out, whatever the generator's seed


def _split(names: list[str], held_out: bool) -> list[str]:
    order = sorted(names)
    random.Random(SPLIT_SEED).shuffle(order)
    cut = len(order) * 3 // 4
    return order[cut:] if held_out else order[:cut]


class Names:
    """The name lists of one side of the split."""

    def __init__(self, held_out: bool) -> None:
        self.first, self.last = _split(FIRST, held_out), _split(LAST, held_out)
        self.places, self.orgs = _split(PLACES, held_out), _split(ORG_NAMES, held_out)

    def person(self, rng: random.Random) -> list[str]:
        first, last = rng.choice(self.first), rng.choice(self.last)
        return rng.choice([[first, last], [first, last], [first], [last]])

    def place(self, rng: random.Random) -> list[str]:
        return rng.choice(self.places).split()

    def org(self, rng: random.Random) -> list[str]:
        return [rng.choice(self.orgs), rng.choice(ORG_KINDS)]

    @staticmethod
    def date(rng: random.Random) -> list[str]:
        month, day, year = rng.choice(MONTHS), str(rng.randint(1, 28)), str(rng.randint(1900, 2024))
        return rng.choice([[day, month, year], [month, day], [month, year], [year]])


def sentence(rng: random.Random, names: Names) -> dict[str, list[str]]:
    words, tags = [], []
    fill = {"PER": names.person, "LOC": names.place, "ORG": names.org, "DATE": names.date}
    for slot in rng.choice(TEMPLATES):
        if slot in fill:
            entity = fill[slot](rng)
            words += entity
            tags += [f"B-{slot}"] + [f"I-{slot}"] * (len(entity) - 1)
        else:
            words.append(slot)
            tags.append("O")
    return {"tokens": words, "tags": tags}


def generate(n: int, *, seed: int, held_out: bool = False) -> list[dict[str, list[str]]]:
    rng, names = random.Random(seed), Names(held_out)
    return [sentence(rng, names) for _ in range(n)]


def write(out_dir: str | Path, *, train: int, heldout: int, seed: int) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "heldout.jsonl"
    for path, records in zip(paths, (generate(train, seed=seed), generate(heldout, seed=seed + 1, held_out=True))):
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m llmkit.data.ner_synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in write(args.out_dir, train=args.train, heldout=args.heldout, seed=args.seed):
        print(path)


if __name__ == "__main__":
    main()
