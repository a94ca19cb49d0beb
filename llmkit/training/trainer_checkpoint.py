"""The one Trainer's checkpoints (llmkit/training/loop.py): what a save writes and a resume reads back.

A checkpoint holds all that exact resume needs: the weights (`model.safetensors`, in the format
`llmkit.load` reads), AdamW's moments, every rank's RNG state, and `train_state.json` (the step —
which fixes the data position, as batches are a pure function of their index — the run's plan, the
fingerprint a resume must match, the settings). An objective that collects its own data (PPO,
loop.Collector) adds its own tensor files and JSON fields. Under torchrun rank 0 alone writes;
under FSDP the shards are gathered whole first, so the format is the same.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from llmkit.errors import CheckpointError
from llmkit.io.checkpoint import latest_checkpoint, load_tensors, read_json, save_checkpoint
from llmkit.io.run_dir import repair_metrics
from llmkit.io.weights import check_model_tensors, load_model_tensors, model_tensors
from llmkit.training import distributed, sharding
from llmkit.training.optim import load_optimizer_tensors, optimizer_tensors

if TYPE_CHECKING:
    from llmkit.runtime import Runtime
    from llmkit.training.loop import Trainer


def save(trainer: "Trainer") -> Path:
    """Checkpoint the run (rank 0 writes; every rank's RNG state goes into it; the others wait)."""
    state = trainer.state
    state.speeds = dataclasses.asdict(trainer.speeds) if trainer.speeds is not None else None
    rng = {("torch_cpu" if rank == 0 else f"torch_cpu_rank{rank}"): rng_state
           for rank, rng_state in enumerate(distributed.gather_rng_states())}
    path = trainer.checkpoint_root / f"step-{state.step:08d}"
    opt_tensors, groups = optimizer_tensors(trainer.optimizer)
    weights = model_tensors(trainer.weights)
    if trainer.sharded:  # gathered whole (collectives: every rank takes part), so the format is the usual one
        opt_tensors, weights = sharding.full_tensors(opt_tensors), sharding.full_model_tensors(trainer.model)
    extra_tensors, extra_json = trainer.collector.checkpoint() if trainer.collector is not None else ({}, {})
    if trainer.world.main:
        train_state = dict(vars(state), train_config=trainer.cfg.to_dict(), fingerprint=trainer.fingerprint,
                           optimizer_groups=groups, runtime=trainer.runtime.to_dict(), world_size=trainer.world.size,
                           sharded=trainer.sharded, **extra_json)
        path = save_checkpoint(
            trainer.checkpoint_root, state.step,
            tensors={"model.safetensors": weights, "optimizer.safetensors": opt_tensors, "rng.safetensors": rng,
                     **extra_tensors},
            json_files={**trainer.checkpoint_json, "train_state.json": train_state},
            copy_files=trainer.checkpoint_files, keep=trainer.cfg.keep_checkpoints)
    distributed.barrier()  # nobody reads or resumes a checkpoint before it is complete
    return path


def load(trainer: "Trainer", path: Path) -> None:
    """Read the checkpoint at `path` into the trainer: weights, moments, RNG, state (and the collector's)."""
    from llmkit.training.loop import TrainState

    saved = read_json(path / "train_state.json")
    fingerprint = trainer.fingerprint
    mismatched = [k for k in fingerprint if saved.get("fingerprint", {}).get(k) != fingerprint[k]]
    if mismatched:
        raise CheckpointError(f"{path}: cannot resume, {', '.join(mismatched)} changed since the checkpoint")
    weights, moments = load_tensors(path / "model.safetensors"), load_tensors(path / "optimizer.safetensors")
    if trainer.sharded:  # every rank read the whole tensors; each keeps its shard
        check_model_tensors(trainer.model, weights, where=str(path))
        sharding.load_full_model_tensors(trainer.model, weights)
        moments = sharding.shard_like([p for g in trainer.optimizer.param_groups for p in g["params"]], moments)
    else:
        load_model_tensors(trainer.weights, weights, where=str(path))
    load_optimizer_tensors(trainer.optimizer, moments, saved["optimizer_groups"])
    rng = load_tensors(path / "rng.safetensors")
    # a rank the saving run did not have (resumed with more ranks) starts from rank 0's state
    torch.set_rng_state(rng.get(f"torch_cpu_rank{trainer.world.rank}", rng["torch_cpu"]))
    trainer.state = TrainState(**{k: saved[k] for k in vars(TrainState()) if k in saved})
    if trainer.collector is not None:
        trainer.collector.restore(path, saved)
    if trainer.cfg.time_budget is None and trainer.state.planned_steps is not None:
        trainer.state.plan_final = True  # resumed without a budget: finish the plan as it stands


def started_runtime(dtype_flag: str, runtime: "Runtime", checkpoint_root: Path) -> "Runtime":
    """`--dtype auto` keeps the precision a run started with (its newest checkpoint's), so a resumed run
    repeats its numbers even where the probe would now choose otherwise. Decided when the Trainer is
    built, before it wraps the model: FSDP fixes its mixed-precision policy when it shards."""
    path = latest_checkpoint(checkpoint_root, verify=False) if dtype_flag == "auto" else None
    if path is None:
        return runtime
    try:
        previous = read_json(path / "train_state.json").get("runtime", {})
    except CheckpointError:
        return runtime  # a damaged checkpoint: resume names it (and passes over it, or refuses)
    if (previous.get("dtype") in ("fp32", "bf16") and previous["dtype"] != runtime.dtype
            and str(previous.get("device", "")).split(":")[0] == runtime.device.type):
        return dataclasses.replace(runtime, dtype=previous["dtype"], reason="as chosen when the run started")
    return runtime


def repair_metrics_log(trainer: "Trainer", say: Callable[[str, dict[str, Any]], None]) -> None:
    """Cut metrics.jsonl to whole rows up to the trainer's step: the log then reads as one uninterrupted
    run (rank 0's file; what was dropped is told as "warning" events)."""
    if not trainer.world.main:
        return
    step, path = trainer.state.step, trainer.metrics_path
    counts = repair_metrics(path, step)
    if counts["after_step"]:
        why = ("of an attempt that stopped before its first checkpoint" if step == 0 else
               f"logged after step {step}, the checkpoint resumed from")
        say("warning", {"message": f"{path}: dropped {counts['after_step']} row(s) {why}"})
    if counts["unreadable"]:
        say("warning", {"message": f"{path}: dropped {counts['unreadable']} unreadable line(s) "
                                   "(a write cut short by a crash)"})
