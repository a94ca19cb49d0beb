"""Conversations → token ids with a loss mask, length policy, packing and padded batches.

Rendering. A conversation is rendered with the model's chat template (llmkit's DEFAULT_CHAT_TEMPLATE
when it has none) one assistant turn at a time: the text up to the generation prompt
(`add_generation_prompt=True`) is prompt, and what the template adds for the assistant message —
its content and end-of-turn marker, e.g. "4<|im_end|>", without the whitespace after the marker —
is the reply. Each piece is tokenized
on its own, which is exactly how chat generation sees it: the prompt is encoded, the reply is
generated token by token. Labels are the token ids on reply tokens and -100 elsewhere.

Length policy (`overlength`), for examples longer than `max_len` tokens:
- "truncate" (default): cut the tail; an example left with no supervised token is dropped;
- "drop": drop every overlong example;
- "error": stop with a DatasetError naming file:line.
Either way no example reaches training without a supervised token (RELIABILITY T7), and the
counts are reported.

Packing (optional) concatenates consecutive examples into rows of at most `max_len` tokens to cut
padding. Packed examples attend to the earlier examples in their row (as classic packing in TRL
does); the loss mask is unchanged.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from llmkit.errors import ConfigError, DatasetError
from llmkit.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, render_chat

IGNORE = -100
OVERLENGTH_POLICIES = ("truncate", "drop", "error")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # == ids on supervised (reply) tokens, IGNORE elsewhere
    where: str

    @property
    def supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def render_supervised(lm: Any, messages: Sequence[dict[str, str]], where: str = "") -> Example:
    """Token ids and loss labels of a conversation for LanguageModel `lm` (see the module docstring)."""
    tok = lm.tokenizer
    template = lm.chat_template or DEFAULT_CHAT_TEMPLATE
    specials = dict(bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(template, messages[:i], add_generation_prompt=True, **specials)
        full = render_chat(template, messages[: i + 1], add_generation_prompt=False, **specials)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DatasetError(f"{where}: the chat template does not render this conversation turn by turn "
                               "(an earlier turn changes when a later one is added); cannot mask the prompt")
        # The reply ends at the end-of-turn marker, where generation stops; whitespace the template
        # writes after it ("\n") belongs to whatever follows (the next prompt, or nothing).
        reply = full[len(prompt):].rstrip() or full[len(prompt):]
        prompt_ids, reply_ids = tok.encode(prompt[len(done):]), tok.encode(reply)
        ids += prompt_ids + reply_ids
        labels += [IGNORE] * len(prompt_ids) + reply_ids
        done = prompt + reply
    # Most templates write the BOS token themselves; add the model's prefix only when they did not.
    prefix = list(lm.prefix_ids or [])
    if prefix and ids[: len(prefix)] != prefix:
        ids, labels = prefix + ids, [IGNORE] * len(prefix) + labels
    return Example(ids, labels, where)


def render_prompt_response(lm: Any, prompt: str, response: str, where: str = "") -> Example:
    """A single-turn exchange (a preference pair's prompt and one of its responses)."""
    return render_supervised(lm, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                             where)


def fit_length(example: Example, max_len: int, policy: str) -> tuple[Example | None, str | None]:
    """Apply the length policy: (example, None), (truncated example, "truncated") or (None, reason)."""
    if policy not in OVERLENGTH_POLICIES:
        raise ConfigError(f"--overlength must be one of {', '.join(OVERLENGTH_POLICIES)}, got {policy!r}")
    if len(example.ids) <= max_len:
        return example, None
    if policy == "error":
        raise DatasetError(f"{example.where}: {len(example.ids)} tokens, longer than the context of {max_len} "
                           "(--overlength truncate or drop handles such records)")
    if policy == "drop":
        return None, "too long"
    cut = Example(example.ids[:max_len], example.labels[:max_len], example.where)
    if cut.supervised == 0:
        return None, "prompt fills the context"
    return cut, "truncated"


def length_summary(lengths: Sequence[int]) -> dict[str, int]:
    ordered = sorted(lengths) or [0]
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p95": pick(0.95), "max": ordered[-1]}


def prepare_examples(lm: Any, conversations: Sequence[Any], max_len: int, policy: str,
                     counts: Counter) -> list[Example]:
    """Render and length-check SFT conversations; `counts` gains "truncated" and drop reasons."""
    out = []
    for conv in conversations:
        example, what = fit_length(render_supervised(lm, conv.messages, conv.where), max_len, policy)
        if what is not None:
            counts[what] += 1
        if example is not None:
            out.append(example)
    return out


def pack(examples: Sequence[Example], max_len: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most max_len tokens (order kept)."""
    rows: list[Example] = []
    for ex in examples:
        if rows and len(rows[-1].ids) + len(ex.ids) <= max_len:
            rows[-1] = Example(rows[-1].ids + ex.ids, rows[-1].labels + ex.labels, rows[-1].where)
        else:
            rows.append(Example(list(ex.ids), list(ex.labels), ex.where))
    return rows


def pad_batch(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (ids, labels, attention_mask), each (B, T) with T the longest example."""
    T = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.ids)
        ids[row, :n] = torch.tensor(ex.ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return ids, labels, mask


def sample_order(n: int, batch_size: int, index: int, seed: int) -> list[int]:
    """The item indices of batch `index`: epochs of seeded shuffles, a pure function of the index
    (so a resumed run sees the same batches)."""
    out = []
    for position in range(index * batch_size, (index + 1) * batch_size):
        epoch, offset = divmod(position, n)
        out.append(_epoch_order(n, seed, epoch)[offset])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)
