"""What a training command tells the person running it: one status line per stage, then progress.

On a terminal, progress is a tqdm bar (step, loss, tokens/s, ETA); anywhere else — a file, a pipe,
CI — it is a plain line about every 10 s, so a long run is never silent. Every training command
(train, demo, the fine-tunes, post-training) prints through this one class; the library only emits
events (kind, info) and never prints.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

# How the evaluation metrics read in a line; other keys are printed as `name value`.
EVAL_NAMES = {"val_loss": ("val loss", "{:.4f}"), "val_ppl": ("ppl", "{:.2f}"), "val_bpb": ("", "{:.3f} bits/byte"),
              "val_mlm_accuracy": ("masked-token accuracy", "{:.3f}"), "val_acc": ("token accuracy", "{:.3f}"),
              "val_accuracy": ("accuracy", "{:.3f}")}


def eval_line(info: dict[str, Any]) -> str:
    parts = []
    for key, value in info.items():
        if key == "step":
            continue
        name, fmt = EVAL_NAMES.get(key, (key, "{:.4f}"))
        text = fmt.format(value) if isinstance(value, (int, float)) else str(value)
        parts.append(f"{name} {text}".strip())
    return f"step {info['step']}: " + ", ".join(parts)


def clock_text(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def training_fields(row: dict[str, Any]) -> list[tuple[str, str]]:
    """What a step of a gradient-descent run shows: loss, tokens/s, learning rate."""
    return [("loss", f"{row['train_loss']:.4f}"), ("tok/s", f"{row['tokens_per_s']:,.0f}"), ("lr", f"{row['lr']:.2e}")]


class Progress:
    """`fields(row)` → the (name, text) pairs a step row shows, in the bar and in the plain lines
    (default: training_fields; PPO shows its score, KL and response length)."""

    def __init__(self, *, stream: TextIO | None = None, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, bar: bool | None = None,
                 fields: Callable[[dict[str, Any]], list[tuple[str, str]]] = training_fields) -> None:
        self.stream = stream or sys.stderr
        self.fields = fields
        self.interval_s, self.clock = interval_s, clock
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.use_bar = isatty() if bar is None else bar
        self.bar = None
        self.total: int | None = None
        self.first_step: int | None = None
        self.started = self.last_line = 0.0
        self.waiting_for_plan = False

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    # -- events -----------------------------------------------------------------------------------
    def on_event(self, kind: str, info: dict[str, Any]) -> bool:
        """Print what a common training event says; False for kinds this class does not know."""
        if kind == "runtime":
            self.say(info["line"])
            if info.get("warning"):
                self.say(info["warning"])
        elif kind == "model":
            self.say(f"model: {info['params'] / 1e6:.2f}M parameters")
        elif kind == "depth":
            self.say(f"model size: {info['line']}")
        elif kind == "resume":
            if info["path"]:
                self.say(f"resuming from {info['path']} (step {info['step']})")
        elif kind == "start":
            if info["step"] >= info["steps"]:
                self.say(f"already trained to step {info['step']} of {info['steps']}; nothing to do")
            elif info.get("budget_min"):
                self.waiting_for_plan = True  # the length is known once the first steps are timed
                self.first_step = info["step"]
            else:
                self._start(info["step"], info["steps"])
        elif kind == "plan":
            self._plan(info)
        elif kind == "eval":
            self.say(eval_line(info))
        elif kind == "stopped":
            self.say(f"stopped early at step {info['step']} of {info['steps']}: {info['reason']}; the schedule did "
                     f"not finish (last learning rate {info['lr']:.2e}); --resume continues it")
        elif kind == "budget":
            self.say(f"time: {clock_text(info['elapsed_s'])} of the {clock_text(info['budget_s'])} budget, "
                     f"{info['steps']} steps")
        elif kind == "warning":
            self.say(f"warning: {info['message']}")
        else:
            return False
        return True

    def _plan(self, info: dict[str, Any]) -> None:
        if info["first"]:
            rate = f"{info['step_s']:.2f} s/step" if info["step_s"] >= 0.1 else f"{1 / info['step_s']:.1f} steps/s"
            self.say(f"plan: {info['steps']} steps ({info['warmup']} warm-up, {info['schedule']} schedule) in the "
                     f"{clock_text(info['budget_s'])} budget at {rate}, measured; "
                     f"{clock_text(info['elapsed_s'])} used so far")
        if self.waiting_for_plan:
            self.waiting_for_plan = False
            self._start(self.first_step or 0, info["steps"])
        elif self.bar is not None:
            self.bar.total = info["steps"]
            self.bar.refresh()
        self.total = info["steps"]
        if info["final"] and not info["first"]:
            self.say(f"plan final at step {info['step']}: {info['steps']} steps (the learning rate now decays)")

    def _start(self, step: int, steps: int) -> None:
        self.total, self.first_step = steps, step
        self.started = self.last_line = self.clock()
        if self.use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=step, unit="step", dynamic_ncols=True, file=self.stream)

    def on_step(self, row: dict[str, Any]) -> None:
        self.total = row.get("steps", self.total)
        shown = self.fields(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(", ".join(f"{name} {text}" for name, text in shown), refresh=False)
            return
        now = self.clock()
        if self.total is None or (now - self.last_line < self.interval_s and row["step"] < self.total):
            return
        self.last_line = now
        done = row["step"] - (self.first_step or 0)
        left = self.total - row["step"]
        eta = (now - self.started) / done * left if done > 0 else 0.0
        self.say(f"step {row['step']}/{self.total} ({100 * row['step'] / self.total:.0f}%), "
                 + "".join(f"{name} {text}, " for name, text in shown)
                 + f"elapsed {clock_text(now - self.started)}, ETA {clock_text(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
