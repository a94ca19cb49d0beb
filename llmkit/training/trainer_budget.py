"""The one Trainer's time budget (llmkit/training/loop.py): time the first steps, plan the run's
length so the schedule, evaluations and last checkpoint fit --time-budget (llmkit/training/budget.py),
and remake the plan from the measured speeds until the learning rate starts to decay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from llmkit.training import distributed
from llmkit.training.budget import Speeds, plan_steps, warmup_for
from llmkit.training.optim import decay_steps

if TYPE_CHECKING:
    from llmkit.training.loop import Trainer

Notify = Callable[[str, dict[str, Any]], None]


def probe_speeds(trainer: "Trainer") -> Speeds:
    """Time two forward/backward passes of the first step's micro-batches (the weights and the
    RNG are left as they were) and estimate an evaluation and a checkpoint from them."""
    rng = torch.get_rng_state()
    times = []
    for _ in range(2):  # the first pass pays for kernel selection and first touches of memory
        start = trainer.clock()
        trainer._micro_batches(trainer._batches_of(trainer.state.step))
        trainer.optimizer.zero_grad(set_to_none=True)
        times.append(trainer.clock() - start)
    torch.set_rng_state(rng)
    step_s = times[-1]
    # An evaluation is eval_batches forward passes (about a third of a forward + backward each);
    # a checkpoint writes weights and two AdamW moments. Evaluations are measured when they
    # happen; the checkpoint stays an estimate, as its own time cannot be recorded in it.
    eval_s = step_s / 3 / trainer.cfg.grad_accum * trainer.cfg.eval_batches if trainer.evaluate is not None else 0.0
    n_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters()) * 3
    return Speeds(step_s, eval_s, 0.2 + n_bytes / 200e6)


def replan(trainer: "Trainer", notify: Notify) -> None:
    """Plan (or remake the plan of) a budgeted run from the current speeds; final once the decay
    has begun, as the learning rates from there on depend on the length."""
    cfg, state = trainer.cfg, trainer.state
    if cfg.time_budget is None or state.plan_final or trainer.speeds is None:
        return
    if state.planned_steps is not None and cfg.lr_schedule == "wsd" and \
            state.step >= state.planned_steps - decay_steps(state.planned_steps, cfg):
        state.plan_final = True  # the decay has begun: its length is fixed
        notify_plan(trainer, notify, first=False)
        return
    total = plan_steps(budget_s=cfg.time_budget * 60, elapsed_s=trainer.elapsed(), step=state.step,
                       speeds=trainer.speeds, eval_interval=cfg.eval_interval, max_steps=cfg.steps)
    total = int(distributed.from_main([total])[0])  # one plan: rank 0's clock decides for every rank
    if state.planned_warmup is None:
        state.planned_warmup = warmup_for(total, cfg.warmup_steps)
    decay_start = total - (decay_steps(total, cfg) if cfg.lr_schedule == "wsd" else total)
    first = state.planned_steps is None
    if cfg.lr_schedule != "wsd" or state.step >= decay_start:
        state.plan_final = True  # cosine decays from the first step after warm-up: plan once
    if first or total != state.planned_steps or state.plan_final:
        state.planned_steps = total
        notify_plan(trainer, notify, first=first)


def notify_plan(trainer: "Trainer", notify: Notify, *, first: bool) -> None:
    cfg, state = trainer.cfg, trainer.state
    notify("plan", {"steps": state.planned_steps, "warmup": state.planned_warmup, "step": state.step,
                    "step_s": trainer.speeds.step_s, "budget_s": cfg.time_budget * 60,
                    "elapsed_s": trainer.elapsed(),
                    "final": state.plan_final, "first": first, "schedule": cfg.lr_schedule})
