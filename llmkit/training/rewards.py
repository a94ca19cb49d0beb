"""Where PPO's scores come from: a trained reward model, or a Python function (a rule).

`--reward DIR` scores with a `llmkit reward` model (the prompt rendered as a chat turn, then the
response, read at the last real token). `--reward module:function` imports `module` (from the
working directory or sys.path) and calls `function(prompt: str, response: str) -> float` once per
response — rule-based rewards such as "is the arithmetic right", which users of other PPO trainers
ask for. Anything that is not a finite number is refused with a message naming the function.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from pathlib import Path
import torch

from llmkit.errors import ConfigError
from llmkit.training.ppo_rollout import RewardFn

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def load_reward(spec: str) -> RewardFn:
    """A reward model directory, or `module:function`."""
    if Path(spec).exists():
        return reward_model_scorer(spec)
    if ":" in spec:
        return function_reward(spec)
    raise ConfigError(f"--reward {spec!r}: no such reward model directory, and not of the form module:function")


def function_reward(spec: str) -> RewardFn:
    module_name, _, name = spec.partition(":")
    if not _DOTTED.match(module_name) or not name.isidentifier():
        raise ConfigError(f"--reward {spec!r}: expected module:function (e.g. my_rewards:exact_match)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward {spec!r}: module {module_name!r} has no function {name!r}")

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for prompt, response in zip(prompts, responses):
            value = fn(prompt, response)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ConfigError(f"--reward {spec}: returned {value!r} for response {response[:40]!r}; "
                                  "expected a finite number")
            out.append(float(value))
        return out

    return score


def reward_model_scorer(path: str | Path, *, batch_size: int = 32) -> RewardFn:
    """Score (prompt, response) pairs with a trained reward model, as its training rendered them."""
    from llmkit.data.chat_examples import render_prompt_response
    from llmkit.inference.generate import left_pad
    from llmkit.models.heads import load_reward_model

    rm, lm = load_reward_model(path)
    rendered: dict[tuple[str, str], list[int]] = {}  # rollouts repeat (prompt, response)s; rendering is slow

    def render(prompt: str, response: str) -> list[int]:
        # As `llmkit reward` rendered its training pairs; an over-long pair keeps its tail.
        if (prompt, response) not in rendered:
            if len(rendered) >= 100_000:  # bounded: a long run sees ever new responses
                rendered.clear()
            rendered[prompt, response] = render_prompt_response(lm, prompt, response).ids[-rm.cfg.max_seq_len:]
        return rendered[prompt, response]

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        rows = [render(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        for first in range(0, len(rows), batch_size):
            ids, mask = left_pad(rows[first:first + batch_size], lm.tokenizer.pad_id or 0)
            out += rm(ids, attention_mask=mask if mask is not None else torch.ones_like(ids)).tolist()
        return out

    return score
