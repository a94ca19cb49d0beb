"""PPO for language models (RLHF): the outer loop behind `llmkit ppo`.

Per step: a rollout batch of prompts (seeded by the step, so a resumed run sees the same ones) →
responses, scores, KL-penalised per-token rewards and advantages (training/ppo_rollout.py) →
`ppo_epochs` passes over shuffled minibatches, each one AdamW step on the clipped policy loss +
vf_coef × clipped value loss → one metrics.jsonl row → a checkpoint every `eval_interval` steps.
The optimizer, learning-rate schedule, non-finite policy and checkpoint format are the shared ones
(training/optim.py, io/checkpoint.py); a checkpoint's `model.safetensors` holds the policy LM
alone, so the output directory loads with `llmkit.load`; the value head and AdamW moments sit next
to it for resume. The frozen reference is the --policy model, loaded again.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

import llmkit
from llmkit.errors import CheckpointError, ConfigError, NonFiniteError
from llmkit.io.checkpoint import list_checkpoints, load_tensors, read_json, save_checkpoint
from llmkit.io.run_dir import append_metrics, find_resume_checkpoint, hold_run_dir, repair_metrics
from llmkit.io.finetuned import chat_info_json
from llmkit.io.weights import load_model_tensors, model_tensors
from llmkit.training.config import TrainConfig, check_ranges, knob
from llmkit.training.optim import build_optimizer, load_optimizer_tensors, lr_at, optimizer_tensors
from llmkit.training.ppo_math import AdaptiveKLController
from llmkit.training.ppo_rollout import Experience, PolicyWithValue, RewardFn, make_experience, ppo_minibatch_loss
from llmkit.runtime import set_threads

Event = Callable[[dict[str, Any]], None]


@dataclass
class PPOConfig:
    """PPO's own knobs (TrainConfig has the shared ones: --steps counts rollout batches, --lr, …).
    Defaults follow the N+ implementation details paper and TRL's last PPO trainer."""
    rollout_batch: int = knob(16, "prompts sampled per PPO step", range=(1, 1 << 16))
    minibatch_size: int = knob(8, "sequences per PPO minibatch (one optimizer step each)", range=(1, 1 << 16))
    ppo_epochs: int = knob(2, "passes over each rollout batch", range=(1, 1000))
    max_new_tokens: int = knob(32, "response length budget", range=(1, 1 << 20))
    temperature: float = knob(1.0, "rollout sampling temperature (no top-k/top-p: rollouts sample the policy itself)")
    kl_coef: float = knob(0.05, "β of the per-token KL penalty (the starting value when --kl-target is set)")
    kl_target: float | None = knob(None, "adapt β towards this KL per response (Ziegler et al.; default: fixed β)")
    kl_horizon: int = knob(10000, "adaptive β horizon, in responses", range=(1, 10**12))
    kl_estimator: str = knob("k1", "per-token KL estimator: k1 (log ratio) or k3 (never negative)",
                             choices=("k1", "k3"))
    gamma: float = knob(1.0, "GAE discount γ")
    lam: float = knob(0.95, "GAE λ")
    clip_range: float = knob(0.2, "policy ratio clip ε")
    value_clip_range: float = knob(0.2, "value clip ε")
    vf_coef: float = knob(0.1, "value loss weight")
    no_eos_penalty: float = knob(1.0, "subtracted from the score of a response that never ends")

    def __post_init__(self) -> None:
        check_ranges(self)
        for name in ("rollout_batch", "minibatch_size", "ppo_epochs", "max_new_tokens", "kl_horizon"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.minibatch_size > self.rollout_batch:
            raise ConfigError(f"--minibatch-size {self.minibatch_size} exceeds --rollout-batch {self.rollout_batch}")
        for name in ("temperature", "kl_coef", "clip_range", "value_clip_range", "vf_coef", "no_eos_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 0, got {value}")
        if self.temperature == 0:
            raise ConfigError("--temperature must be > 0: PPO needs sampled (not greedy) rollouts")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"--gamma and --lam must be in [0, 1], got {self.gamma} and {self.lam}")
        if self.kl_target is not None and not (math.isfinite(self.kl_target) and self.kl_target > 0):
            raise ConfigError(f"--kl-target must be > 0, got {self.kl_target}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"--kl-estimator must be k1 or k3, got {self.kl_estimator!r}")


@dataclass
class PromptSet:
    """Prompts as the user wrote them (given to the reward) and as the policy reads them (ids)."""
    texts: list[str]
    ids: list[list[int]]


class PPOTrainer:
    def __init__(self, lm: "llmkit.LanguageModel", ref: nn.Module, reward_fn: RewardFn, prompts: PromptSet,
                 out_dir: str | Path, cfg: TrainConfig, ppo: PPOConfig, *, stop_id: int,
                 fingerprint: dict[str, Any] | None = None,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None) -> None:
        self.lm, self.ref, self.reward_fn, self.prompts = lm, ref.eval().requires_grad_(False), reward_fn, prompts
        self.cfg, self.ppo, self.stop_id = cfg, ppo, stop_id
        self.out_dir = Path(out_dir)
        self.policy = PolicyWithValue(lm.model)
        self.optimizer = build_optimizer(self.policy, cfg)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.kl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target or 1.0, ppo.kl_horizon)
        self.step, self.skipped, self.consecutive_skips = 0, 0, 0
        self.fingerprint = fingerprint or {}
        self.evaluate = evaluate
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.resume_notes: list[str] = []

    # -- checkpoints (the shared format; see the module docstring) -------------------------------
    def save(self) -> Path:
        opt_tensors, groups = optimizer_tensors(self.optimizer)
        tok_file = self.lm.tokenizer.save(self.out_dir)
        state = {"step": self.step, "kl_coef": self.kl.value, "skipped_steps": self.skipped,
                 "train_config": self.cfg.to_dict(), "ppo_config": asdict(self.ppo),
                 "fingerprint": self.fingerprint, "optimizer_groups": groups}
        return save_checkpoint(
            self.out_dir / "checkpoints", self.step,
            tensors={"model.safetensors": model_tensors(self.lm.model),
                     "value_head.safetensors": self.policy.value_head.state_dict(),
                     "optimizer.safetensors": opt_tensors,
                     "rng.safetensors": {"torch_cpu": torch.get_rng_state()}},
            json_files={"config.json": {"format": "llmkit", "version": llmkit.__version__,
                                        "model": self.lm.model.cfg.to_dict(), "chat": chat_info_json(self.lm),
                                        "trained_with": "ppo", "started_from": str(self.lm.path)},
                        "train_state.json": state},
            copy_files={"tokenizer.json": tok_file}, keep=self.cfg.keep_checkpoints)

    def resume(self) -> Path | None:
        """Load the newest complete checkpoint (None: there is none yet); what the resume passes
        over is kept in `resume_notes` (see llmkit.io.run_dir.find_resume_checkpoint)."""
        with hold_run_dir(self.out_dir):
            path, self.resume_notes = find_resume_checkpoint(self.out_dir / "checkpoints")
            if path is not None:
                self._load(path)
            counts = repair_metrics(self.metrics_path, self.step)  # the log reads as one run
            if counts["after_step"] or counts["unreadable"]:
                self.resume_notes.append(f"{self.metrics_path}: dropped {counts['after_step']} row(s) past step "
                                         f"{self.step} and {counts['unreadable']} unreadable line(s)")
        return path

    def _load(self, path: Path) -> None:
        saved = read_json(path / "train_state.json")
        changed = [k for k in self.fingerprint if saved.get("fingerprint", {}).get(k) != self.fingerprint[k]]
        if changed:
            raise CheckpointError(f"{path}: cannot resume, {', '.join(changed)} changed since the checkpoint")
        load_model_tensors(self.lm.model, load_tensors(path / "model.safetensors"), where=str(path))
        self.lm.model.tie_weights()
        self.policy.value_head.load_state_dict(load_tensors(path / "value_head.safetensors"))
        load_optimizer_tensors(self.optimizer, load_tensors(path / "optimizer.safetensors"), saved["optimizer_groups"])
        torch.set_rng_state(load_tensors(path / "rng.safetensors")["torch_cpu"])
        self.step, self.kl.value, self.skipped = saved["step"], saved["kl_coef"], saved["skipped_steps"]

    def log(self, row: dict[str, Any]) -> None:
        append_metrics(self.metrics_path, row)

    # -- one PPO step ------------------------------------------------------------------------------
    def rollout(self) -> Experience:
        rows = random.Random(self.cfg.seed * 1_000_003 + self.step).choices(range(len(self.prompts.ids)),
                                                                            k=self.ppo.rollout_batch)
        tok = self.lm.tokenizer
        return make_experience(self.policy, self.ref, [self.prompts.ids[i] for i in rows],
                               [self.prompts.texts[i] for i in rows], self.reward_fn, tok.decode,
                               stop_id=self.stop_id, pad_id=tok.pad_id or 0, seed=self.cfg.seed + self.step,
                               kl_coef=self.kl.value, cfg=self.ppo)

    def optimize(self, exp: Experience, lr: float) -> dict[str, float]:
        """ppo_epochs × (rollout_batch / minibatch_size) AdamW steps; the minibatch means."""
        self.policy.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        order = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.step)
        totals: dict[str, float] = {}
        updates = 0
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        for _ in range(self.ppo.ppo_epochs):
            perm = torch.randperm(len(exp.ids), generator=order)
            for first in range(0, len(perm), self.ppo.minibatch_size):
                loss, metrics = ppo_minibatch_loss(self.policy, exp.select(perm[first:first + self.ppo.minibatch_size]),
                                                   self.ppo)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                if not (math.isfinite(float(loss.detach())) and math.isfinite(grad_norm)):
                    self.optimizer.zero_grad(set_to_none=True)  # nothing non-finite reaches the weights
                    self.skipped += 1
                    self.consecutive_skips += 1
                    if self.consecutive_skips > self.cfg.skip_nonfinite_steps:
                        raise NonFiniteError(f"step {self.step + 1}: PPO loss or gradient norm is non-finite "
                                             f"({float(loss.detach())}, {grad_norm}); stopped before the update")
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.consecutive_skips = 0
                updates += 1
                for k, v in {**metrics, "grad_norm": grad_norm}.items():
                    totals[k] = totals.get(k, 0.0) + v
        return {k: v / max(updates, 1) for k, v in totals.items()}

    def train_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        lr = lr_at(self.step, self.cfg)
        exp = self.rollout()
        metrics = self.optimize(exp, lr)
        if self.ppo.kl_target is not None:
            self.kl.update(exp.stats["kl"], self.ppo.rollout_batch)
        self.step += 1
        row = {"step": self.step, **exp.stats, **metrics, "lr": lr, "seconds": time.perf_counter() - started}
        self.log(row)
        return row

    def run(self, *, on_step: Event | None = None, on_eval: Event | None = None) -> int:
        with hold_run_dir(self.out_dir):  # one writer per run directory
            if self.step == 0:  # rows of an attempt that died before its first checkpoint
                repair_metrics(self.metrics_path, 0)
            return self._run(on_step, on_eval)

    def _run(self, on_step: Event | None, on_eval: Event | None) -> int:
        started = time.perf_counter()
        try:
            while self.step < self.cfg.steps:
                row = self.train_step()
                if on_step is not None:
                    on_step(row)
                out_of_time = (self.cfg.max_minutes is not None
                               and time.perf_counter() - started > self.cfg.max_minutes * 60)
                if self.step % self.cfg.eval_interval == 0 or self.step == self.cfg.steps or out_of_time:
                    self.evaluate_and_save(on_eval)
                if out_of_time:
                    break
        except KeyboardInterrupt:
            if self.step > 0:
                self.save()
            raise
        return self.step

    def evaluate_and_save(self, on_eval: Event | None = None) -> None:
        if self.evaluate is not None:
            self.lm.model.eval()
            row = {"step": self.step, **self.evaluate(self.lm.model)}
            self.log(row)
            if on_eval is not None:
                on_eval(row)
        self.save()


def encode_prompts(lm: "llmkit.LanguageModel", texts: Sequence[str], *, chat: bool,
                   where: Sequence[str] | None = None) -> PromptSet:
    """Token ids of each prompt: as one user message in the model's chat template (`chat`), or as
    plain text after the model's prefix. A prompt that leaves no room for a response is refused."""
    from llmkit.errors import DatasetError

    ids = [lm.chat_ids([{"role": "user", "content": t}]) if chat else lm.prefix_ids + lm.tokenizer.encode(t)
           for t in texts]
    limit = lm.model.cfg.max_seq_len - 2  # one response token and the stop token must fit
    for i, p in enumerate(ids):
        if len(p) > limit:
            at = where[i] if where else f"prompt {i + 1}"
            raise DatasetError(f"{at}: prompt is {len(p)} tokens; the model's context ({lm.model.cfg.max_seq_len}) "
                               f"leaves room for at most {limit}")
    return PromptSet(list(texts), ids)


def stop_token(lm: "llmkit.LanguageModel", *, chat: bool) -> int:
    """The token that ends a response: the chat template's end-of-turn token when prompts are chat
    turns and the tokenizer has one (<|end|> for llmkit's default template), else the first EOS id."""
    end = lm.tokenizer.token_to_id("<|end|>") if chat and lm.chat_template is None else None
    if end is not None:
        return end
    if not lm.eos_ids:
        raise ConfigError(f"{lm.path}: the model has no EOS token, so responses could never end")
    return lm.eos_ids[0]


def train_ppo(policy: str | Path, reward: str | RewardFn, prompts: str | Path | Sequence[str], out_dir: str | Path,
              cfg: TrainConfig, ppo: PPOConfig, *, chat: bool = True, resume: bool = False,
              skip_bad_lines: int = 0, evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
              on_start: Event | None = None, on_step: Event | None = None, on_eval: Event | None = None,
              ) -> PPOTrainer:
    """Run PPO from the model at `policy` against `reward` (a reward model directory, `module:function`,
    or a RewardFn) on `prompts` (a JSONL file of {"prompt"} objects, or the texts); see the module
    docstring. Everything is checked before the output directory is created; `skip_bad_lines` bad
    lines of the prompts file may be dropped (their errors reach `on_start` as "skipped")."""
    from llmkit.data.records import read_prompts
    from llmkit.training.rewards import load_reward

    out_dir = Path(out_dir)
    set_threads(cfg.threads)
    if not resume and list_checkpoints(out_dir / "checkpoints"):
        raise ConfigError(f"{out_dir}: already holds checkpoints; pass --resume to continue, or choose another --out")
    reward_fn = load_reward(reward) if isinstance(reward, str) else reward
    skipped: list[str] = []
    if isinstance(prompts, (str, Path)):
        records, stats = read_prompts(prompts, skip_bad_lines=skip_bad_lines)
        texts, where, skipped = [p.text for p in records], [p.where for p in records], stats.skipped
    else:
        texts, where = list(prompts), None
    lm = llmkit.load(policy)
    ref = llmkit.load(policy).model  # the frozen reference: the starting policy, also after a resume
    prompt_set = encode_prompts(lm, texts, chat=chat, where=where)
    torch.manual_seed(cfg.seed)
    fingerprint = {"policy": str(Path(policy).resolve()), "reward": reward if isinstance(reward, str) else "function",
                   "prompts": [len(texts), hash_texts(texts)], "ppo": asdict(ppo), "chat": chat}
    trainer = PPOTrainer(lm, ref, reward_fn, prompt_set, out_dir, cfg, ppo, stop_id=stop_token(lm, chat=chat),
                         fingerprint=fingerprint, evaluate=evaluate)
    created = not out_dir.exists()
    with hold_run_dir(out_dir):
        try:
            if resume:
                trainer.resume()
            if on_start is not None:
                on_start({"step": trainer.step, "steps": cfg.steps, "prompts": len(texts), "skipped": skipped,
                          "warnings": trainer.resume_notes})
            trainer.run(on_step=on_step, on_eval=on_eval)
        except Exception:
            if created and not list_checkpoints(out_dir / "checkpoints"):
                shutil.rmtree(out_dir, ignore_errors=True)  # failed before its first checkpoint: leave nothing
            raise
    return trainer


def hash_texts(texts: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()[:16]
