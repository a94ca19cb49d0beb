"""Wall-clock budgets (llmkit/training/budget.py and the Trainer): the plan's arithmetic, a budgeted
run that ends a complete schedule within its budget, and exact resume of a planned run.

The runs use a fake clock that advances by fixed amounts when work is done (a training micro-batch,
an evaluation), so their plans are deterministic; one run uses the real clock."""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from llmkit.runtime import Runtime
from llmkit.training.budget import MARGIN, Speeds, plan_steps, warmup_for
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer
from llmkit.training.optim import lr_at

CPU_FP32 = Runtime(torch.device("cpu"), "fp32", 1, "test")


def test_plan_fits_steps_evaluations_and_the_last_checkpoint():
    speeds = Speeds(step_s=1.0, eval_s=4.0, save_s=1.0)
    total = plan_steps(budget_s=300, elapsed_s=20, step=0, speeds=speeds, eval_interval=50, max_steps=10_000)
    # the arithmetic it promises: every step, an eval + save every 50 steps, the final eval + save
    used = 20 + total * 1.0 + (total // 50) * 5.0 + 5.0
    assert used <= 300 * (1 - MARGIN) + 5.0 and total > 200
    assert plan_steps(budget_s=300, elapsed_s=20, step=0, speeds=speeds, eval_interval=50, max_steps=100) == 100
    # a budget already spent still runs one step (and says so through the plan)
    assert plan_steps(budget_s=10, elapsed_s=20, step=7, speeds=speeds, eval_interval=50, max_steps=100) == 8


def test_warmup_is_at_most_a_tenth_of_a_planned_run():
    assert warmup_for(1000, 50) == 50
    assert warmup_for(70, 20) == 7  # a slow machine: fewer steps of a complete schedule
    assert warmup_for(5, 20) == 1
    assert warmup_for(100, 0) == 0


def test_wsd_is_constant_then_decays_linearly_to_the_final_value():
    cfg = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=5, schedule="wsd", decay_fraction=0.2, steps=100)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[4] == pytest.approx(1e-3) and lrs[0] == pytest.approx(2e-4)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[5:80])
    assert lrs[-1] == pytest.approx(1e-4)  # the last step uses the schedule's final value
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    # the stable phase does not depend on the length: a longer plan changes no learning rate used so far
    assert [lr_at(s, cfg, steps=300) for s in range(80)] == lrs[:80]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def toy_run(tmp_path, clock: FakeClock, *, budget_min: float, step_s: float = 1.0, eval_s: float = 3.0, **cfg):
    """A linear-regression 'model' whose micro-batches and evaluations advance the fake clock."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    data = torch.Generator().manual_seed(1)
    xs = torch.randn(4096, 8, generator=data)
    ys = xs.sum(-1, keepdim=True).sin()

    def get_batch(i: int):
        rows = torch.arange(i * 16, i * 16 + 16) % xs.shape[0]
        return xs[rows], ys[rows]

    def loss_fn(m, batch):
        clock.now += step_s
        x, y = batch
        return ((m(x) - y) ** 2).mean(), {"tokens": x.shape[0]}

    def evaluate(m):
        clock.now += eval_s
        with torch.no_grad():
            return {"val_loss": float(((m(xs[:256]) - ys[:256]) ** 2).mean())}

    config = TrainConfig(**{**dict(steps=100_000, lr=3e-3, warmup_steps=20, time_budget=budget_min, eval_interval=25,
                                   log_interval=5, dtype="fp32", threads=1), **cfg})
    trainer = Trainer(model, config, loss_fn=loss_fn, get_batch=get_batch, out_dir=tmp_path, evaluate=evaluate,
                      runtime=CPU_FP32, clock=clock)
    return trainer


def rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("eval_interval", [25, 1000])  # 1000: no checkpoint until the end
def test_a_budgeted_run_ends_a_complete_schedule_within_its_budget(tmp_path, eval_interval):
    clock = FakeClock()
    # 120 s at 1 s a step and 3 s an evaluation
    trainer = toy_run(tmp_path, clock, budget_min=2.0, eval_interval=eval_interval)
    events = []
    state = trainer.run(on_event=lambda kind, info: events.append((kind, info)))
    used = clock.now - 1000.0
    assert used <= 120 * 1.10, f"used {used} s of a 120 s budget"
    assert used >= 120 * 0.75, f"used only {used} s of a 120 s budget: the plan wastes it"
    assert state.step == state.planned_steps and state.plan_final
    train = [r for r in rows(tmp_path) if "lr" in r]
    assert train[-1]["step"] == state.step
    assert train[-1]["lr"] == pytest.approx(3e-3 * 0.1), "the last step must use the schedule's final value"
    plans = [info for kind, info in events if kind == "plan"]
    assert plans[0]["first"] and plans[-1]["final"]
    assert [kind for kind, _ in events].count("stopped") == 0
    assert state.planned_warmup <= max(1, state.planned_steps // 10)


def test_a_slower_machine_runs_fewer_steps_of_the_same_complete_schedule(tmp_path):
    fast = toy_run(tmp_path / "fast", FakeClock(), budget_min=2.0, step_s=0.5)
    slow = toy_run(tmp_path / "slow", FakeClock(), budget_min=2.0, step_s=10.0)
    fast_state, slow_state = fast.run(), slow.run()
    assert slow_state.step < fast_state.step / 10
    last = [r for r in rows(tmp_path / "slow") if "lr" in r][-1]
    assert last["lr"] == pytest.approx(3e-4)  # ended its decay, not cut off in warm-up


def test_resume_of_a_budgeted_run_is_exact(tmp_path):
    whole = toy_run(tmp_path / "whole", FakeClock(), budget_min=2.0)
    whole_state = whole.run()
    # the same run killed at step 33 (after its checkpoint at step 25), then resumed from it
    clock = FakeClock()
    first = toy_run(tmp_path / "split", clock, budget_min=2.0)
    loss_fn = first.loss_fn

    def dies_at_step_33(model, batch):
        if first.state.step == 32:
            raise RuntimeError("killed")
        return loss_fn(model, batch)

    first.loss_fn = dies_at_step_33
    with pytest.raises(RuntimeError, match="killed"):
        first.run()
    clock.now += 500.0  # time between the two sessions does not count against the budget
    second = toy_run(tmp_path / "split", clock, budget_min=2.0)
    assert second.resume().name == "step-00000025"
    second_state = second.run()
    assert second_state.planned_steps == whole_state.planned_steps and second_state.step == whole_state.step
    assert second_state.elapsed_s == pytest.approx(whole_state.elapsed_s)
    a = {r["step"]: r for r in rows(tmp_path / "whole") if "train_loss" in r}
    b = {r["step"]: r for r in rows(tmp_path / "split") if "train_loss" in r}
    assert a.keys() == b.keys()
    for step in a:
        assert (a[step]["train_loss"], a[step]["lr"]) == (b[step]["train_loss"], b[step]["lr"]), step


def test_max_minutes_stops_mid_schedule_and_says_so(tmp_path):
    trainer = toy_run(tmp_path, FakeClock(), budget_min=2.0, max_minutes=0.5)
    events = []
    state = trainer.run(on_event=lambda kind, info: events.append((kind, info)))
    stopped = [info for kind, info in events if kind == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] == state.step < state.planned_steps
    assert "--max-minutes 0.5 reached" in stopped[0]["reason"]


def test_a_real_clock_budget_is_kept(tmp_path):
    """The real clock on a real (toy) run: 6 s of budget, within 10 %, whatever this CPU's speed."""
    start = time.perf_counter()
    trainer = toy_run(tmp_path, FakeClock(), budget_min=0.1, step_s=0.0, eval_s=0.0)
    trainer.clock = time.perf_counter
    trainer.started_at = start
    state = trainer.run()
    assert time.perf_counter() - start <= 6 * 1.10
    assert state.step == state.planned_steps and state.plan_final
