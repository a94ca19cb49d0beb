"""The held-out split of every fine-tune: which records train and which are held out for evaluation.

One rule for `sft`, `reward`, `dpo`, `finetune-seq2seq`, `finetune-classifier`, `finetune-tokens` and
`finetune-qa` (whose items are whole paragraphs, so no held-out context is trained on):

- how many: round(n × fraction) of n items (Python's round, half to even), at least 1 and at most
  n − 1, so both sides are never empty;
- which: the first of a seeded shuffle of the indices (`random.Random(seed)`), so the same items,
  fraction and seed hold out the same ones on every machine and every run (an exact resume needs
  that); both sides keep the items' own order;
- tiny data: fewer than 2 items cannot be split, which is one DatasetError naming the data (there
  is no silent "train on everything, evaluate nothing").

`llmkit train` splits whole text files instead (llmkit.data.corpus.split_files, keyed by path so a
copy of the corpus splits alike), with the same count.
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

from llmkit.errors import DatasetError

T = TypeVar("T")


def held_out_count(n: int, fraction: float) -> int:
    """How many of n ≥ 2 items are held out: round(n × fraction), clamped to [1, n − 1]."""
    assert n >= 2 and 0 < fraction < 1, (n, fraction)
    return min(max(1, round(n * fraction)), n - 1)


def hold_out(items: Sequence[T], fraction: float, seed: int, *, source: str, unit: str = "record",
             alternative: str | None = None) -> tuple[list[T], list[T]]:
    """(train, held_out) of `items` by the rule above. `source` names the data and `unit` one item
    in the error for fewer than 2; `alternative` is another way out it suggests (e.g. "pass --val-data")."""
    n = len(items)
    if n < 2:
        raise DatasetError(f"{source}: {n} {unit}{'' if n == 1 else 's'}; holding some out for evaluation needs "
                           f"at least 2" + (f" (or {alternative})" if alternative else ""))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:held_out_count(n, fraction)])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
