"""The optimizer (AdamW, or Muon for hidden matrices beside AdamW) and the learning-rate schedule.

Weight decay pulls weights towards zero; applied to norm gains, biases or embeddings it only hurts
(nanoGPT, LLaMA), so those go in a group without it. The schedule is a pure function of the step and
the run's length — linear warmup, then cosine decay to min_lr_ratio·lr, or WSD (warmup, stable,
decay: constant, then linear to min_lr_ratio·lr over the last decay_fraction of the steps, reaching
it at the last step) — so resuming needs no scheduler state. WSD (MiniCPM, arXiv:2404.06395) suits
a run whose length is planned from measured speed: until the decay starts, a longer or shorter plan
does not change any learning rate already used.

Muon (`--optimizer muon`, torch.optim.Muon; Jordan et al. 2024, the optimizer of the modded-nanoGPT
speed records) orthogonalises each update of a 2-D hidden weight by Newton–Schulz iterations; with
its learning rate matched to AdamW's update size (Moonshot's rule, `adjust_lr_fn="match_rms_adamw"`)
one --lr serves both. Embeddings, the head, norm gains and biases stay with AdamW, as Muon's
authors prescribe.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmkit.training.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters drops tied duplicates
        if not p.requires_grad:
            continue
        # A parameter can opt out by name (`no_weight_decay`), e.g. Mamba's A_log: decay would pull
        # every channel's rate towards the same value.
        wants_decay = p.dim() >= 2 and id(p) not in embedding_params and not getattr(p, "no_weight_decay", False)
        (decay if wants_decay else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> "torch.optim.Optimizer | Optimizers":
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    fused = device.type in ("cpu", "cuda")
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    hidden = muon_params(model)
    for group in groups:
        group["params"] = [p for p in group["params"] if id(p) not in hidden]
    muon = torch.optim.Muon([p for p in model.parameters() if id(p) in hidden], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                              fused=fused)
    return Optimizers(muon, adamw)


def muon_params(model: nn.Module) -> set[int]:
    """ids of the 2-D hidden weights Muon updates: matrices that are neither embeddings nor heads."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {id(p) for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and id(p) not in embedding_params and "head" not in name}


class Optimizers:
    """Several optimizers over disjoint parameters, used as one: the Trainer sets each group's lr,
    steps and zeroes them together, and a checkpoint stores one state dict (parameter ids numbered
    across the optimizers in order, as one optimizer would number them)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + pid: st for pid, st in sd["state"].items()})
            groups += [{**g, "params": [offset + pid for pid in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in sd["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        offset, first = 0, 0
        for opt in self.optimizers:
            n_groups = len(opt.param_groups)
            groups = saved["param_groups"][first:first + n_groups]
            count = sum(len(g["params"]) for g in opt.param_groups)
            opt.load_state_dict({
                "state": {pid - offset: st for pid, st in saved["state"].items() if offset <= pid < offset + count},
                "param_groups": [{**g, "params": [pid - offset for pid in g["params"]]} for g in groups]})
            offset, first = offset + count, first + n_groups


def decay_steps(steps: int, cfg: TrainConfig) -> int:
    """WSD: how many of `steps` decay the learning rate (at least one)."""
    return max(1, math.ceil(cfg.decay_fraction * steps))


def lr_at(step: int, cfg: TrainConfig, *, steps: int | None = None, warmup: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `steps` steps (default: cfg.steps)
    with `warmup` warm-up steps (default: cfg.warmup_steps)."""
    steps = cfg.steps if steps is None else steps
    warmup = cfg.warmup_steps if warmup is None else warmup
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.lr_schedule == "wsd":
        decay = decay_steps(steps, cfg)
        start = steps - decay
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start + 1) / decay)
        return cfg.lr + (floor - cfg.lr) * progress
    span = max(1, steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """AdamW's state as flat safetensors entries ("<param id>.<key>") plus its JSON param groups:
    what a checkpoint stores for exact resume."""
    opt = optimizer.state_dict()
    flat = {f"{pid}.{key}": value for pid, st in opt["state"].items() for key, value in st.items()}
    return flat, opt["param_groups"]


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, flat: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in flat.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
