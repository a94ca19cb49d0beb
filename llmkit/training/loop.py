"""The one training loop: every objective (pretraining now; SFT, reward, DPO, MLM later) differs only
in `get_batch` and `loss_fn(model, batch) -> (loss, metrics)`.

Per optimizer step: the step's learning rate, `grad_accum` micro-batches (optionally under bf16
autocast), a non-finite guard on loss and gradient norm (nothing non-finite reaches the weights),
gradient clipping, AdamW. Every `eval_interval` steps: evaluation, then an atomic checkpoint that
holds all exact resume needs — weights, AdamW moments, RNG state and the step, which fixes both the
learning rate and the data position (batches are a pure function of their index).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from llmkit.errors import CheckpointError, NonFiniteError
from llmkit.io.checkpoint import list_checkpoints, load_tensors, read_json, require_checkpoint, save_checkpoint
from llmkit.io.weights import load_model_tensors, model_tensors
from llmkit.training.config import TrainConfig
from llmkit.training.optim import build_optimizer, load_optimizer_tensors, lr_at, optimizer_tensors

LossFn = Callable[[nn.Module, Any], tuple[Tensor, dict[str, float]]]
Event = Callable[[dict[str, Any]], None]


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    consecutive_skips: int = 0
    skipped_steps: int = 0


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, *, loss_fn: LossFn, get_batch: Callable[[int], Any],
                 out_dir: str | Path, evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 checkpoint_json: dict[str, Any] | None = None, checkpoint_files: dict[str, Path] | None = None,
                 fingerprint: dict[str, Any] | None = None) -> None:
        self.model, self.cfg, self.loss_fn, self.get_batch = model, cfg, loss_fn, get_batch
        self.out_dir = Path(out_dir)
        self.evaluate = evaluate
        self.checkpoint_json = checkpoint_json or {}
        self.checkpoint_files = checkpoint_files or {}
        self.fingerprint = fingerprint or {}
        self.optimizer = build_optimizer(model, cfg)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state = TrainState()
        self.metrics_path = self.out_dir / "metrics.jsonl"

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self) -> Path:
        opt_tensors, groups = optimizer_tensors(self.optimizer)
        train_state = dict(vars(self.state), train_config=self.cfg.to_dict(), fingerprint=self.fingerprint,
                           optimizer_groups=groups)
        return save_checkpoint(
            self.checkpoint_root, self.state.step,
            tensors={"model.safetensors": model_tensors(self.model), "optimizer.safetensors": opt_tensors,
                     "rng.safetensors": {"torch_cpu": torch.get_rng_state()}},
            json_files={**self.checkpoint_json, "train_state.json": train_state},
            copy_files=self.checkpoint_files, keep=self.cfg.keep_checkpoints)

    def resume(self) -> Path | None:
        """Load the newest complete checkpoint under out_dir; None when there has never been one.

        Checkpoints that exist but all fail verification are an error, not a fresh start."""
        if not list_checkpoints(self.checkpoint_root):
            return None
        path = require_checkpoint(self.checkpoint_root)
        saved = read_json(path / "train_state.json")
        mismatched = [k for k in self.fingerprint if saved.get("fingerprint", {}).get(k) != self.fingerprint[k]]
        if mismatched:
            raise CheckpointError(f"{path}: cannot resume, {', '.join(mismatched)} changed since the checkpoint")
        load_model_tensors(self.model, load_tensors(path / "model.safetensors"), where=str(path))
        load_optimizer_tensors(self.optimizer, load_tensors(path / "optimizer.safetensors"), saved["optimizer_groups"])
        torch.set_rng_state(load_tensors(path / "rng.safetensors")["torch_cpu"])
        self.state = TrainState(**{k: saved[k] for k in vars(TrainState())})
        self._truncate_metrics(self.state.step)
        return path

    def _truncate_metrics(self, step: int) -> None:
        """Drop log rows past the resumed step so metrics.jsonl reads as one uninterrupted run."""
        if self.metrics_path.exists():
            rows = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= step]
            self.metrics_path.write_text("".join(row + "\n" for row in rows))

    def log(self, row: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    # -- the loop -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float] | None:
        """One optimizer step; returns its metrics, or None when a non-finite step was skipped."""
        cfg, step = self.cfg, self.state.step
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total_loss, tokens = 0.0, 0
        extra: dict[str, float] = {}  # the objective's own metrics (reward accuracy, DPO margins), averaged
        for micro in range(cfg.grad_accum):
            batch = self.get_batch(step * cfg.grad_accum + micro)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bf16"):
                loss, metrics = self.loss_fn(self.model, batch)
            (loss / cfg.grad_accum).backward()
            total_loss += float(loss.detach()) / cfg.grad_accum
            tokens += int(metrics.get("tokens", 0))
            for key, value in metrics.items():
                if key != "tokens":
                    extra[key] = extra.get(key, 0.0) + float(value) / cfg.grad_accum
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        problem = ("loss" if not math.isfinite(total_loss) else
                   "gradient norm" if not math.isfinite(grad_norm) else None)
        if problem is not None:
            self.optimizer.zero_grad(set_to_none=True)  # nothing non-finite reaches the weights
            if self.state.consecutive_skips >= cfg.skip_nonfinite_steps:
                hint = "" if cfg.skip_nonfinite_steps else " (--skip-nonfinite-steps K skips such steps)"
                raise NonFiniteError(f"step {step + 1}: {problem} is non-finite "
                                     f"({total_loss if problem == 'loss' else grad_norm}) on rank 0; "
                                     f"stopped before the update{hint}")
            self.state.consecutive_skips += 1
            self.state.skipped_steps += 1
            self.state.step += 1
            return None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.consecutive_skips = 0
        self.state.tokens_seen += tokens
        return {"train_loss": total_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "extra": extra}

    def run(self, *, on_step: Event | None = None, on_eval: Event | None = None) -> TrainState:
        cfg = self.cfg
        self.model.train()
        started = time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while self.state.step < cfg.steps:
                metrics = self.train_step()
                step = self.state.step
                if metrics is not None:
                    window_tokens += metrics["tokens"]
                    tok_s = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    row = {"step": step, "train_loss": metrics["train_loss"], "lr": metrics["lr"],
                           "grad_norm": metrics["grad_norm"], "tokens_per_s": tok_s, **metrics["extra"]}
                    if step % cfg.log_interval == 0 or step == cfg.steps:
                        self.log(row)
                        window_tokens, window_start = 0, time.perf_counter()
                    if on_step is not None:
                        on_step(row)
                out_of_time = cfg.max_minutes is not None and time.perf_counter() - started > cfg.max_minutes * 60
                if step % cfg.eval_interval == 0 or step == cfg.steps or out_of_time:
                    self.evaluate_and_save(on_eval)
                    window_tokens, window_start = 0, time.perf_counter()  # tokens/s counts training only
                if out_of_time:
                    break
        except KeyboardInterrupt:
            if self.state.step > 0:
                self.save()  # Ctrl-C keeps the work done so far
            raise
        return self.state

    def evaluate_and_save(self, on_eval: Event | None = None) -> None:
        if self.evaluate is not None:
            self.model.eval()
            row = {"step": self.state.step, **self.evaluate(self.model)}
            self.model.train()
            self.log(row)
            if on_eval is not None:
                on_eval(row)
        self.save()
