"""The RLHF demo's task: small-number arithmetic in words, with a score a program computes.

A prompt asks for a sum or a difference of numbers 0–9 in one of several phrasings ("What is 7
plus 5?", "Compute 9 - 4.", …); the wanted response is the right number and nothing else ("12").
`true_score` checks exactly that (a right number wrapped in chatter, "The answer is 12.", scores 0),
so improvements are real and not reward-model artifacts; it doubles as a rule-based reward
(`--reward llmkit.training.rlhf_task:true_score`).

Everything is generated from a seed, the way a real post-training pipeline meets imperfect data:
- pretraining text: statements "7 plus 5 is 12." / "7 + 5 = 12" and questions with their answer
  on the next line ("What is 7 plus 5?\\n12", training combinations only), 5 % of the numbers wrong;
- SFT demonstrations from careless annotators: 30 % wrap the answer in chatter ("Sure! 12"),
  5 % give a wrong number;
- preference pairs: the bare right number (chosen) against a near miss, off by one or two
  (`wrong_pair_rate`: 60 % in the demo), or against the right number in chatter (rejected);
- held-out prompts: (phrasing, problem) combinations that no training file contains.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llmkit.io.checkpoint import atomic_write_text

PHRASINGS = ("What is {a} {word} {b}?", "Compute {a} {sign} {b}.", "How much is {a} {word} {b}?",
             "{a} {sign} {b} = ?", "Please tell me {a} {word} {b}.", "Calculate: {a} {word} {b}")
OPS = {"+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b)}
CHATTER = ("The answer is {n}.", "Sure! {n}", "{n}, I think.", "It is {n}.", "Easy: {n}")
FILLER = ("Numbers are fun to learn.", "The cat sat on the mat.", "We count apples and pears.",
          "Math is a useful tool.", "Small sums are easy.", "Practice makes perfect.")
_PROBLEM = re.compile(r"(\d+)\s*(plus|minus|\+|-)\s*(\d+)")


def problems() -> list[tuple[int, str, int]]:
    """Every (a, op, b) with a, b in 0..9 and a non-negative result: 100 sums and 55 differences."""
    return [(a, op, b) for op in OPS for a in range(10) for b in range(10) if op == "+" or a >= b]


def answer(a: int, op: str, b: int) -> int:
    return OPS[op][1](a, b)


def render_prompt(a: int, op: str, b: int, phrasing: int) -> str:
    return PHRASINGS[phrasing].format(a=a, b=b, word=OPS[op][0], sign=op)


def true_score(prompt: str, response: str) -> float:
    """1.0 when the response is exactly the right number (surrounding whitespace aside), else 0.0."""
    match = _PROBLEM.search(prompt)
    if match is None:
        return 0.0
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    op = {"plus": "+", "minus": "-"}.get(op, op)
    return 1.0 if response.strip() == str(answer(a, op, b)) else 0.0


def wrong_answer(right: int, rng: random.Random) -> int:
    """A plausible mistake: off by one or two (never negative)."""
    candidates = [right + d for d in (-2, -1, 1, 2) if right + d >= 0]
    return rng.choice(candidates)


def any_other_number(right: int, rng: random.Random) -> int:
    """A wild mistake: any other result the task can have (0–18); no training file holds one."""
    return rng.choice([n for n in range(19) if n != right])


def split_prompts(seed: int, heldout_fraction: float = 0.2) -> tuple[list[tuple], list[tuple]]:
    """(problem, phrasing) combinations, split into training and held-out sets."""
    combos = [(p, k) for p in problems() for k in range(len(PHRASINGS))]
    random.Random(seed).shuffle(combos)
    n_held = int(len(combos) * heldout_fraction)
    return combos[n_held:], combos[:n_held]


def pretraining_text(seed: int, train: list[tuple], *, sentences: int = 30000, error_rate: float = 0.05) -> str:
    """Statements of every fact, and questions (training combinations only) followed by their answer —
    the shape of the task without its chat format; `error_rate` of the numbers are wrong."""
    rng = random.Random(seed + 1)
    lines = []
    for _ in range(sentences):
        draw = rng.random()
        if draw < 0.05:
            lines.append(rng.choice(FILLER))
            continue
        if draw < 0.5:
            (a, op, b), k = rng.choice(train)
        else:
            (a, op, b), k = rng.choice(problems()), None
        right = answer(a, op, b)
        said = wrong_answer(right, rng) if rng.random() < error_rate else right
        if k is not None:
            lines.append(f"{render_prompt(a, op, b, k)}\n{said}")  # the answer on its own line, as in a chat reply
        elif rng.random() < 0.5:
            lines.append(f"{a} {OPS[op][0]} {b} {rng.choice(('is', 'equals', 'makes'))} {said}.")
        else:
            lines.append(f"{a} {op} {b} = {said}")
    return "\n".join(lines) + "\n"


def write_task_files(data_dir: Path, seed: int, *, sft_examples: int = 600, pairs: int = 1500,
                     chatter_rate: float = 0.3, error_rate: float = 0.05, wrong_pair_rate: float = 0.25,
                     ) -> dict[str, Path]:
    """Write corpus.txt, sft.jsonl, prefs.jsonl, prompts.jsonl (training prompts) and heldout.jsonl."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 2)
    train, held = split_prompts(seed)
    files = {name: data_dir / name for name in ("corpus.txt", "sft.jsonl", "prefs.jsonl", "prompts.jsonl",
                                                "heldout.jsonl")}
    _write_if_changed(files["corpus.txt"], pretraining_text(seed, train))

    def jsonl(path: Path, rows: list[dict]) -> None:
        _write_if_changed(path, "".join(json.dumps(r) + "\n" for r in rows))

    sft_rows = []
    for _ in range(sft_examples):
        (a, op, b), k = rng.choice(train)
        right = answer(a, op, b)
        draw = rng.random()
        said = (rng.choice(CHATTER).format(n=right) if draw < chatter_rate else
                str(wrong_answer(right, rng)) if draw < chatter_rate + error_rate else str(right))
        sft_rows.append({"instruction": render_prompt(a, op, b, k), "output": said})
    jsonl(files["sft.jsonl"], sft_rows)
    pref_rows = []
    for _ in range(pairs):
        (a, op, b), k = rng.choice(train)
        right = answer(a, op, b)
        wrong = rng.random() < wrong_pair_rate
        rejected = str(wrong_answer(right, rng)) if wrong else rng.choice(CHATTER).format(n=right)
        pref_rows.append({"prompt": render_prompt(a, op, b, k), "chosen": str(right), "rejected": rejected})
    jsonl(files["prefs.jsonl"], pref_rows)
    jsonl(files["prompts.jsonl"], [{"prompt": render_prompt(a, op, b, k)} for (a, op, b), k in train])
    jsonl(files["heldout.jsonl"], [{"prompt": render_prompt(a, op, b, k)} for (a, op, b), k in held])
    return files


def _write_if_changed(path: Path, text: str) -> None:
    """Leave an identical file untouched: a rerun must not change the corpus's mtime, which the
    pretraining run's resume fingerprint includes."""
    if not (path.exists() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)
