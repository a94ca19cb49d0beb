"""The one training loop: every objective (pretraining, SFT, reward, DPO, MLM, seq2seq, PPO) differs
only in its data — `get_batch(index)`, or a Collector that gathers each step's own (PPO's rollouts) —
and `loss_fn(model, batch) -> (loss, metrics)`.

Per step: the step's learning rate, then its optimizer updates — one, or as many as a Collector
returns (PPO: epochs × minibatches) — each over `grad_accum` micro-batches (moved to the model's
device, under the run's one autocast context, llmkit/runtime.py), with a non-finite guard on loss and
gradient norm (nothing non-finite reaches the weights), gradient clipping, AdamW. Every
`eval_interval` steps: evaluation, then an atomic checkpoint that holds all exact resume needs
(llmkit/training/trainer_checkpoint.py).

With `time_budget`, the length is planned from timed steps (training/trainer_budget.py, budget.py) and
remade at each log line and checkpoint from the measured speeds, until the learning rate starts to
decay; the speeds and time used are checkpointed, so a resumed run plans as the uninterrupted one would.

Under torchrun (llmkit/training/distributed.py) the same loop runs on every rank: the model and its
loss are one module under DistributedDataParallel, a step's micro-batches are dealt out across the
ranks, metrics are averaged over them, rank 0's plan is everyone's, and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from llmkit.errors import ConfigError, NonFiniteError
from llmkit.io.checkpoint import latest_checkpoint
from llmkit.io.run_dir import append_metrics, find_resume_checkpoint, hold_run_dir
from llmkit.runtime import Runtime, make_runtime, to_device
from llmkit.training import distributed, trainer_budget, trainer_checkpoint
from llmkit.training.budget import Speeds
from llmkit.training.config import TrainConfig
from llmkit.training.optim import build_optimizer, lr_at

LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]]
MicroBatches = Callable[[int], Any]  # one optimizer update's data: micro-batch i (0 ≤ i < grad_accum) → batch
Event = Callable[[dict[str, Any]], None]
Notify = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    consecutive_skips: int = 0
    skipped_steps: int = 0  # updates skipped as non-finite (one per step, but a collector's step has several)
    # The plan of a budgeted run (None otherwise): total steps and warm-up, whether the decay has
    # begun (then the plan no longer changes), and the budget's seconds used so far.
    planned_steps: int | None = None
    planned_warmup: int | None = None
    plan_final: bool = False
    elapsed_s: float = 0.0
    speeds: dict[str, float] | None = None  # the measured Speeds the plan was last made from


class Collector(Protocol):
    """An objective that gathers its own data before each step (PPO: roll out the policy, score the
    responses, compute advantages) instead of reading `get_batch`. The Trainer keeps the learning
    rate, the optimizer updates, logging, progress and checkpoints; the collector adds its own state."""

    def collect(self, step: int, runtime: Runtime) -> list[MicroBatches]:
        """Gather step `step`'s data (on `runtime`'s device; its autocast is the updates'); one entry
        per optimizer update of the step, in order."""

    def finish(self) -> dict[str, float]:
        """After the step's updates: the step's own metrics (PPO: its rollout's score, KL, …)."""

    def checkpoint(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """Extra tensor files and train_state.json fields for a checkpoint (every rank calls it)."""

    def restore(self, path: Path, saved: dict[str, Any]) -> None:
        """Read back what `checkpoint` wrote, from the checkpoint at `path` (train_state.json: `saved`)."""


class Objective(nn.Module):
    """The model and its loss as one module: what DistributedDataParallel wraps, so that every use of
    the model in a step (an objective may call it twice, or through methods other than forward) is
    inside one forward whose gradients DDP averages."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, float]]:
        return self.loss_fn(self.model, batch)


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, *, loss_fn: LossFn, out_dir: str | Path,
                 get_batch: Callable[[int], Any] | None = None, collector: Collector | None = None,
                 weights: nn.Module | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 checkpoint_json: dict[str, Any] | None = None, checkpoint_files: dict[str, Path] | None = None,
                 fingerprint: dict[str, Any] | None = None, runtime: Runtime | None = None,
                 clock: Callable[[], float] = time.perf_counter, started_at: float | None = None,
                 fsdp: bool = False) -> None:
        """Data: `get_batch(index)` (the run's micro-batch `index`), or a `collector` (see Collector).
        `weights`: the part of `model` saved as model.safetensors (default: all; PPO saves the policy
        without its value head). `runtime`: device and precision (default: chosen from cfg.device/
        dtype/threads on this model's shapes). `clock`: seconds, for budgets (tests pass a fake).
        `started_at`: the clock reading when the run's work began (data preparation counts against
        --time-budget too); default: now. `fsdp`: under torchrun, shard the model, its gradients and
        AdamW's moments over the ranks (FSDP2) instead of replicating them (DDP); bf16 on CUDA gathers
        the weights in bf16 (sharding.mixed_precision)."""
        assert (get_batch is None) != (collector is None), "a Trainer reads get_batch or a collector"
        assert weights is None or not fsdp, "FSDP checkpoints the whole model"
        if collector is not None and cfg.time_budget is not None:
            raise ConfigError("--time-budget plans steps from timed batches; it does not apply to a run that "
                              "collects its own data each step (PPO): use --steps and --max-minutes")
        self.model, self.cfg, self.get_batch, self.collector = model, cfg, get_batch, collector
        self.weights = model if weights is None else weights
        self.out_dir = Path(out_dir)
        self.evaluate = evaluate
        self.checkpoint_json = checkpoint_json or {}
        self.checkpoint_files = checkpoint_files or {}
        self.fingerprint = fingerprint or {}
        seq_len = cfg.seq_len or getattr(getattr(model, "cfg", None), "max_seq_len", 256)
        self.runtime = trainer_checkpoint.started_runtime(
            cfg.dtype, runtime or make_runtime(cfg.device, cfg.dtype, cfg.threads, model=model,
                                               rows=cfg.batch_size * seq_len, training=True),
            self.checkpoint_root)
        model.to(self.runtime.device)
        self.world = distributed.world()
        distributed.check_split(cfg.grad_accum)
        self.objective = distributed.wrap(Objective(model, loss_fn), fsdp=fsdp, runtime=self.runtime)
        self.sharded = fsdp
        self.optimizer = build_optimizer(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state = TrainState()
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.clock = clock
        self.started_at = clock() if started_at is None else started_at
        self.speeds: Speeds | None = None
        self._session_start: float | None = None  # clock reading this session's time counts from (run)

    @property
    def loss_fn(self) -> LossFn:
        return getattr(self.objective, "module", self.objective).loss_fn  # (inside DDP: .module)

    @loss_fn.setter
    def loss_fn(self, loss_fn: LossFn) -> None:
        getattr(self.objective, "module", self.objective).loss_fn = loss_fn

    @property
    def total_steps(self) -> int:
        """The run's length: the plan of a budgeted run, else --steps."""
        return self.state.planned_steps or self.cfg.steps

    @property
    def warmup(self) -> int:
        return self.cfg.warmup_steps if self.state.planned_warmup is None else self.state.planned_warmup

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self) -> Path:
        """Checkpoint the run (llmkit/training/trainer_checkpoint.py: rank 0 writes, the others wait)."""
        return trainer_checkpoint.save(self)

    def resume(self, notify: Notify | None = None) -> Path | None:
        """Load the newest complete checkpoint under out_dir; None when there is none yet.

        Damaged checkpoints with no complete one beside them are an error, not a fresh start; what
        a resume passes over (a corrupt newer checkpoint, an interrupted save, metrics rows past
        the checkpoint or cut by a crash) is told through `notify` as "warning" events."""
        say = notify if notify is not None and self.world.main else (lambda kind, info: None)
        with self._run_dir_lock():
            path, notes = find_resume_checkpoint(self.checkpoint_root)  # (reads only: every rank finds the same)
            for note in notes:
                say("warning", {"message": note})
            if path is not None:
                trainer_checkpoint.load(self, path)
            trainer_checkpoint.repair_metrics_log(self, say)
        return path

    def _run_dir_lock(self):
        """The run directory's lock (llmkit.io.run_dir), held by rank 0 for the whole run."""
        return hold_run_dir(self.out_dir) if self.world.main else contextlib.nullcontext(self.out_dir)

    def log(self, row: dict[str, Any]) -> None:
        if self.world.main:
            append_metrics(self.metrics_path, row)

    # -- the loop -------------------------------------------------------------------------------
    def _micro_batches(self, batch_at: MicroBatches) -> tuple[float, int, dict[str, float], list[bool]]:
        """Forward and backward over this rank's share of one update's micro-batches; (mean loss, tokens,
        metrics — each over every rank — and which ranks' own losses were non-finite)."""
        cfg, world = self.cfg, self.world
        mine = range(world.rank, cfg.grad_accum, world.size)  # micro-batches r, r + N, …: disjoint data
        total_loss, tokens = 0.0, 0
        extra: dict[str, float] = {}  # the objective's own metrics (reward accuracy, DPO margins), averaged
        for micro in mine:
            batch = to_device(batch_at(micro), self.runtime.device)
            with self.runtime.autocast():
                loss, metrics = self.objective(batch)
            # Under DDP every backward averages the accumulated gradients over the ranks; the part
            # already averaged is the same on every rank, so the sum stays right. (DDP's no_sync would
            # save those all-reduces, but its static graph — needed for unused weights — refuses it.)
            (loss / len(mine)).backward()
            total_loss += float(loss.detach()) / len(mine)
            tokens += int(metrics.get("tokens", 0))
            for key, value in metrics.items():
                if key != "tokens":
                    extra[key] = extra.get(key, 0.0) + float(value) / len(mine)
        nonfinite = distributed.gather_flags(not math.isfinite(total_loss))
        if world.size > 1:
            keys = sorted(extra)
            values = distributed.mean([total_loss, float(tokens), *(extra[k] for k in keys)])
            total_loss, tokens = values[0], round(values[1] * world.size)
            extra = dict(zip(keys, values[2:]))
        return total_loss, tokens, extra, nonfinite

    def _batches_of(self, step: int) -> MicroBatches:
        return lambda micro: self.get_batch(step * self.cfg.grad_accum + micro)

    def train_step(self) -> dict[str, Any] | None:
        """One step: its optimizer update (a collector's: its updates, in order); returns its metrics, or
        None when it had no update (non-finite ones are skipped, see update)."""
        cfg, step = self.cfg, self.state.step
        lr = lr_at(step, cfg, steps=self.total_steps, warmup=self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        updates = [self._batches_of(step)] if self.collector is None else self.collector.collect(step, self.runtime)
        done = [m for m in map(self.update, updates) if m is not None]
        own = self.collector.finish() if self.collector is not None else {}
        self.state.step += 1
        if not done:
            return None
        extra = {key: sum(m["extra"][key] for m in done) / len(done) for key in done[0]["extra"]}
        return {"train_loss": sum(m["train_loss"] for m in done) / len(done), "lr": lr,
                "grad_norm": sum(m["grad_norm"] for m in done) / len(done),
                "tokens": sum(m["tokens"] for m in done), "extra": {**own, **extra}}

    def update(self, batch_at: MicroBatches) -> dict[str, Any] | None:
        """One optimizer update over `grad_accum` micro-batches: its metrics, or None when its loss or
        gradient norm was non-finite and it was skipped (--skip-nonfinite-steps; else NonFiniteError)."""
        cfg, step = self.cfg, self.state.step
        total_loss, tokens, extra, nonfinite_ranks = self._micro_batches(batch_at)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # (FSDP: a DTensor)
        problem = ("loss" if not math.isfinite(total_loss) else
                   "gradient norm" if not math.isfinite(grad_norm) else None)
        if problem is not None:
            self.optimizer.zero_grad(set_to_none=True)  # nothing non-finite reaches the weights
            if self.state.consecutive_skips >= cfg.skip_nonfinite_steps:
                hint = "" if cfg.skip_nonfinite_steps else " (--skip-nonfinite-steps K skips such steps)"
                ranks = [r for r, bad in enumerate(nonfinite_ranks) if bad] if problem == "loss" else []
                # (a gradient norm is taken after DDP's average: non-finite on one rank is on all)
                where = (f"rank {', '.join(map(str, ranks))}" if ranks else
                         "every rank" if self.world.size > 1 else "rank 0")
                raise NonFiniteError(f"step {step + 1}: {problem} is non-finite "
                                     f"({total_loss if problem == 'loss' else grad_norm}) on {where}; "
                                     f"stopped before the update{hint}")
            self.state.consecutive_skips += 1
            self.state.skipped_steps += 1
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.consecutive_skips = 0
        self.state.tokens_seen += tokens
        return {"train_loss": total_loss, "grad_norm": grad_norm, "tokens": tokens, "extra": extra}

    def announce(self, emit: Notify) -> None:
        """The events a training command prints before the first step: the device and precision
        chosen, and where the run starts (the step count of a budgeted run comes with its plan)."""
        emit("runtime", {"line": self.runtime.describe(), "warning": self.runtime.warning})
        emit("start", {"step": self.state.step, "steps": self.total_steps, "budget_min": self.cfg.time_budget})

    def elapsed(self) -> float:
        """Seconds of the budget used: earlier sessions' (checkpointed) and this one's."""
        return self.state.elapsed_s + (self.clock() - self._session_start)

    def run(self, *, on_step: Event | None = None, on_eval: Event | None = None,
            on_event: Notify | None = None) -> TrainState:
        """Train to the end of the schedule, holding the run directory's lock (llmkit.io.run_dir)."""
        if not self.world.main:  # rank 0 alone prints and reports
            on_step = on_eval = on_event = None
        notify = on_event or (lambda kind, info: None)
        with self._run_dir_lock():
            if self.state.step == 0:  # rows of an attempt that died before its first checkpoint
                trainer_checkpoint.repair_metrics_log(self, notify)
            return self._run(on_step, on_eval, notify)

    def _run(self, on_step: Event | None, on_eval: Event | None, notify: Notify) -> TrainState:
        cfg = self.cfg
        self.model.train()
        started = self.clock()
        # A fresh run's budget counts from when its work began (data preparation included); a
        # resumed one adds this session's time to what its checkpoint recorded.
        self._session_start = self.started_at if self.state.step == 0 else started
        if cfg.time_budget is not None and not self.state.plan_final and self.state.step < self.total_steps:
            # a resumed plan goes on from the speeds it was made from, as it would have without the stop
            self.speeds = Speeds(**self.state.speeds) if self.state.speeds else trainer_budget.probe_speeds(self)
            trainer_budget.replan(self, notify)
        window_tokens, window_start, window_steps = 0, self.clock(), 0
        stopped: str | None = None
        try:
            while self.state.step < self.total_steps:
                metrics = self.train_step()
                step = self.state.step
                window_steps += 1
                if metrics is not None:
                    window_tokens += metrics["tokens"]
                    elapsed_window = max(self.clock() - window_start, 1e-9)
                    row = {"step": step, "train_loss": metrics["train_loss"], "lr": metrics["lr"],
                           "grad_norm": metrics["grad_norm"], "tokens_per_s": window_tokens / elapsed_window,
                           **metrics["extra"]}
                    if step % cfg.log_interval == 0 or step == self.total_steps:
                        self.log(row)
                        if self.speeds is not None:  # the real step time replaces the probe's
                            self.speeds = dataclasses.replace(self.speeds, step_s=elapsed_window / window_steps)
                        window_tokens, window_start, window_steps = 0, self.clock(), 0
                        trainer_budget.replan(self, notify)
                    if on_step is not None:
                        on_step({**row, "steps": self.total_steps})
                out_of_time = cfg.max_minutes is not None and bool(distributed.from_main(
                    [self.clock() - started > cfg.max_minutes * 60])[0])
                if step % cfg.eval_interval == 0 or step >= self.total_steps or out_of_time:
                    self.evaluate_and_save(on_eval, notify)
                    window_tokens, window_start, window_steps = 0, self.clock(), 0  # tokens/s counts training only
                if out_of_time and self.state.step < self.total_steps:
                    stopped = f"--max-minutes {cfg.max_minutes:g} reached"
                    break
        except KeyboardInterrupt:
            reason = "interrupted"
            if self.state.step > 0 and self.world.size == 1:
                self._bank_elapsed()
                self.save()  # Ctrl-C keeps the work done so far
            elif self.world.size > 1 and self.world.main:
                # No save: Ctrl-C reached every rank, each at its own point of the step, and the others
                # may be gone; the newest checkpoint on disk stays complete.
                newest = latest_checkpoint(self.checkpoint_root, verify=False)
                since = f"the checkpoint of step {int(newest.name.split('-')[1])}" if newest else "step 0"
                reason += f" (under torchrun nothing is saved at Ctrl-C: --resume goes back to {since})"
            notify("stopped", {"step": self.state.step, "steps": self.total_steps, "reason": reason,
                               "lr": lr_at(max(self.state.step - 1, 0), cfg, steps=self.total_steps,
                                           warmup=self.warmup)})
            raise
        if stopped is not None:
            notify("stopped", {"step": self.state.step, "steps": self.total_steps, "reason": stopped,
                               "lr": lr_at(max(self.state.step - 1, 0), cfg, steps=self.total_steps,
                                           warmup=self.warmup)})
        if cfg.time_budget is not None:
            notify("budget", {"elapsed_s": self.elapsed(), "budget_s": cfg.time_budget * 60,
                              "steps": self.state.step})
        return self.state

    def _bank_elapsed(self) -> None:
        """Fold this session's time into the state (what a checkpoint records)."""
        now = self.clock()
        self.state.elapsed_s += now - self._session_start
        self._session_start = now

    def evaluate_and_save(self, on_eval: Event | None = None, notify: Notify | None = None) -> None:
        """Evaluate (when there is an evaluation), remake a budgeted run's plan from the measured
        speeds and the time used so far, then checkpoint all of it."""
        start = self.clock()
        if self.evaluate is not None:
            self.model.eval()
            with self.runtime.autocast():
                row = {"step": self.state.step, **self.evaluate(self.model)}
            self.model.train()
            self.log(row)
            if on_eval is not None:
                on_eval(row)
        if self.speeds is not None and self.evaluate is not None:
            self.speeds = dataclasses.replace(self.speeds, eval_s=self.clock() - start)
        if self._session_start is not None:
            self._bank_elapsed()
            trainer_budget.replan(self, notify or (lambda kind, info: None))
        self.save()
