"""Progress: the plain lines a long command prints when stderr is not a terminal (the bar is tqdm's)."""

from __future__ import annotations

import io

from llmkit.commands.ppo import ppo_fields
from llmkit.commands.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(progress: Progress, clock: Clock, rows: list[dict], seconds_per_step: float) -> None:
    progress.on_event("start", {"step": 0, "steps": len(rows)})
    for row in rows:
        clock.now += seconds_per_step
        progress.on_step(row)


def test_plain_lines_come_every_interval_and_at_the_last_step():
    out, clock = io.StringIO(), Clock()
    progress = Progress(stream=out, interval_s=10.0, clock=clock, bar=False)
    rows = [{"step": s, "train_loss": 5.0 - s / 10, "tokens_per_s": 1234.5, "lr": 1e-3} for s in range(1, 31)]
    run(progress, clock, rows, seconds_per_step=1.0)
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["step 10/30", "step 20/30", "step 30/30"]
    assert lines[0] == "step 10/30 (33%), loss 4.0000, tok/s 1,234, lr 1.00e-03, elapsed 0:10, ETA 0:20"
    assert lines[-1].endswith("ETA 0:00")


def test_a_command_chooses_what_a_step_shows():
    out, clock = io.StringIO(), Clock()
    progress = Progress(stream=out, clock=clock, bar=False, fields=ppo_fields)
    rows = [{"step": s, "score": 0.25 * s, "kl": -0.01, "response_length": 7.5} for s in (1, 2)]
    run(progress, clock, rows, seconds_per_step=0.1)  # no loss or tokens/s in a PPO row: never read
    assert out.getvalue().splitlines() == ["step 2/2 (100%), score 0.500, kl -0.010, len 7.5, elapsed 0:00, ETA 0:00"]


def test_on_a_terminal_the_bar_carries_the_fields():
    out = io.StringIO()
    progress = Progress(stream=out, bar=True, fields=ppo_fields)
    progress.on_event("start", {"step": 0, "steps": 2})
    progress.on_step({"step": 1, "score": 0.5, "kl": 0.02, "response_length": 3.0})
    progress.bar.refresh()
    assert "score 0.500, kl 0.020, len 3.0" in out.getvalue()
    progress.close()
