"""Planning a run from a wall-clock budget: how many steps fit, given measured speeds.

`llmkit train --time-budget MINUTES` must end a complete schedule (warm-up, training, the final
decay, evaluations and the last checkpoint) when the budget does, on a CPU 20× slower as on a fast
one: the slow machine runs fewer steps of the same schedule, never a truncated warm-up. The plan is
made from timed steps before training starts and remade from the real step times while the
learning rate is still constant (WSD's stable phase), where a different length changes no learning
rate already used; once the decay has begun the plan is final. This module is the arithmetic; the
Trainer times things and keeps the plan in its checkpoints, so `--resume` continues it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Safety margin: plan to finish this share of the budget early (timings of a shared machine wander).
MARGIN = 0.05


@dataclass(frozen=True)
class Speeds:
    step_s: float  # one optimizer step (all its micro-batches)
    eval_s: float  # one evaluation
    save_s: float  # one checkpoint


def plan_steps(*, budget_s: float, elapsed_s: float, step: int, speeds: Speeds, eval_interval: int,
               max_steps: int) -> int:
    """The total step count that fits: the steps still to run at `speeds.step_s` each, the evaluation
    and checkpoint every `eval_interval` steps on the way, and the final evaluation and checkpoint,
    within what is left of `budget_s` less a margin. At least one step more than `step` is done,
    at most `max_steps`."""
    left = budget_s * (1 - MARGIN) - elapsed_s - speeds.eval_s - speeds.save_s  # the last eval + save
    per_step = speeds.step_s + (speeds.eval_s + speeds.save_s) / eval_interval  # evals on the way, spread
    more = math.floor(max(left, 0.0) / max(per_step, 1e-9))
    return max(step + 1, min(max_steps, step + more))


def warmup_for(planned: int, requested: int) -> int:
    """Warm-up steps for a planned run: as requested, but at most a tenth of the run, so a slow
    machine's short run still has a complete schedule."""
    return max(1, min(requested, planned // 10)) if requested > 0 else 0
