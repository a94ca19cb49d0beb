"""PPO for language models (RLHF): what `llmkit ppo` runs through the one Trainer (training/loop.py).

PPO is a Collector of the Trainer: before each step it rolls out a batch of prompts (chosen by the
step's seed, so a resumed run sees the same ones) → responses, scores, KL-penalised per-token
rewards and advantages (training/ppo_rollout.py), and hands back `ppo_epochs` passes over shuffled
minibatches, each one optimizer update of the clipped policy loss + vf_coef × clipped value loss.
The Trainer owns everything else: learning rate, accumulation, clipping, the non-finite guard,
autocast, metrics.jsonl (one row per step), progress, checkpoints and resume. A checkpoint's
`model.safetensors` holds the policy LM alone, so the output directory loads with `llmkit.load`;
the value head (and the KL coefficient) sit next to it for resume. The frozen reference is the
--policy model, loaded again, and never saved.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import llmkit
from llmkit.errors import ConfigError
from llmkit.io.checkpoint import list_checkpoints, load_tensors
from llmkit.io.finetuned import chat_info_json
from llmkit.io.output_dir import check_output_dir, run_config_json
from llmkit.io.run_dir import hold_run_dir
from llmkit.runtime import Runtime, make_runtime, set_threads
from llmkit.training import distributed
from llmkit.training.config import TrainConfig, check_ranges, knob
from llmkit.training.loop import MicroBatches, Trainer
from llmkit.training.ppo_math import AdaptiveKLController
from llmkit.training.ppo_rollout import (Experience, PolicyWithValue, RewardFn, Samples, ppo_minibatch_loss,
                                         sample_and_score, score_experience)

Event = Callable[[dict[str, Any]], None]
Notify = Callable[[str, dict[str, Any]], None]


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


# PPO moves a trained policy a little: a small learning rate, no warm-up, a checkpoint every 20 steps,
# a metrics row every step. (`llmkit ppo`'s defaults; TrainConfig's own for the knobs not named.)
PPO_TRAIN_DEFAULTS = dict(steps=100, lr=1e-5, warmup_steps=0, eval_interval=20, log_interval=1)
# TrainConfig knobs PPO never reads, so `llmkit ppo` has no flag for them: the model is the policy's,
# the data are sampled (no batches of records, no held-out split, no evaluation batches), and its step
# time depends on the responses, so no --time-budget plan (loop.Trainer refuses one for a collector).
NOT_PPO_KNOBS = ("preset", "depth", "batch_size", "seq_len", "eval_batches", "vocab_size", "tokenizer_sample_bytes",
                 "val_fraction", "time_budget", "mlm_masking")


@dataclass
class PromptSet:
    """Prompts as the user wrote them (given to the reward) and as the policy reads them (ids)."""
    texts: list[str]
    ids: list[list[int]]


class PPOCollector:
    """PPO's side of the Trainer (loop.Collector): the rollout before each step, the step's minibatch
    updates, and the state a checkpoint needs beyond the Trainer's (value head, KL coefficient).

    Every source of randomness in a step is seeded by the step (prompt choice, sampling, minibatch
    order), so nothing about the rollouts needs saving for an exact resume."""

    def __init__(self, lm: "llmkit.LanguageModel", policy: PolicyWithValue, ref: nn.Module, reward_fn: RewardFn,
                 prompts: PromptSet, cfg: TrainConfig, ppo: PPOConfig, *, stop_id: int) -> None:
        self.lm, self.policy, self.ref, self.reward_fn, self.prompts = lm, policy, ref, reward_fn, prompts
        self.cfg, self.ppo, self.stop_id = cfg, ppo, stop_id
        self.kl = AdaptiveKLController(ppo.kl_coef, ppo.kl_target or 1.0, ppo.kl_horizon)
        self.experience: Experience | None = None

    def loss(self, policy: nn.Module, batch: Experience) -> tuple[Tensor, dict[str, float]]:
        return ppo_minibatch_loss(policy, batch, self.ppo)

    def rollout(self, step: int, runtime: Runtime) -> Experience:
        rows = random.Random(self.cfg.seed * 1_000_003 + step).choices(range(len(self.prompts.ids)),
                                                                       k=self.ppo.rollout_batch)
        prompts, texts = [self.prompts.ids[i] for i in rows], [self.prompts.texts[i] for i in rows]
        tok = self.lm.tokenizer
        pad_id = tok.pad_id or 0
        # Under torchrun rank r samples and scores block r of the rows, each row with the seed it has in
        # one process (seed + row) and the whole batch's context budget; every rank then holds it all.
        world = distributed.world()
        first, last = world.rank * len(rows) // world.size, (world.rank + 1) * len(rows) // world.size
        share = sample_and_score(self.policy.lm, prompts[first:last], texts[first:last], self.reward_fn, tok.decode,
                                 stop_id=self.stop_id, pad_id=pad_id, seed=self.cfg.seed + step + first,
                                 cfg=self.ppo, width=max(len(p) for p in prompts))
        samples = gather_samples(share)
        # the log-probs that the updates' ratios compare with come from the updates' precision
        with runtime.autocast():
            return score_experience(self.policy, self.ref, prompts, samples, pad_id=pad_id, kl_coef=self.kl.value,
                                    cfg=self.ppo)

    def collect(self, step: int, runtime: Runtime) -> list[MicroBatches]:
        """Roll out, then ppo_epochs passes over the batch in shuffled minibatches (one update each),
        each minibatch cut into grad_accum micro-batches."""
        exp = self.experience = self.rollout(step, runtime)
        self.policy.train()
        order = torch.Generator().manual_seed(self.cfg.seed * 7919 + step)
        updates = []
        for _ in range(self.ppo.ppo_epochs):
            perm = torch.randperm(len(exp.ids), generator=order)
            for first in range(0, len(perm), self.ppo.minibatch_size):
                parts = perm[first:first + self.ppo.minibatch_size].tensor_split(self.cfg.grad_accum)
                updates.append(lambda micro, parts=parts: exp.select(parts[micro]))
        return updates

    def finish(self) -> dict[str, float]:
        stats, self.experience = self.experience.stats, None  # (the batch is not needed past its step)
        if self.ppo.kl_target is not None:
            self.kl.update(stats["kl"], self.ppo.rollout_batch)
        return stats

    def checkpoint(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        return ({"value_head.safetensors": self.policy.value_head.state_dict()},
                {"kl_coef": self.kl.value, "ppo_config": asdict(self.ppo)})

    def restore(self, path: Path, saved: dict[str, Any]) -> None:
        self.policy.value_head.load_state_dict(load_tensors(path / "value_head.safetensors"))
        self.kl.value = saved["kl_coef"]


def gather_samples(share: Samples) -> Samples:
    """Every rank's share of a rollout, on every rank, in rank order (the rows' own order)."""
    if distributed.world().size == 1:
        return share
    responses = distributed.gather_rows([[float(t) for t in r] for r in share.responses])
    flags_scores = distributed.gather_rows([[float(e), s] for e, s in zip(share.ended, share.scores)])
    return Samples([[int(t) for t in r] for r in responses], [bool(e) for e, _ in flags_scores],
                   [s for _, s in flags_scores])


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


def check_batches(cfg: TrainConfig, ppo: PPOConfig) -> None:
    """Every minibatch must cut into grad_accum micro-batches of equal size (no empty one)."""
    if cfg.grad_accum > 1 and (ppo.minibatch_size % cfg.grad_accum or ppo.rollout_batch % ppo.minibatch_size):
        raise ConfigError(f"--grad-accum {cfg.grad_accum} cuts each minibatch into equal micro-batches: "
                          f"--minibatch-size ({ppo.minibatch_size}) must be a multiple of it and divide "
                          f"--rollout-batch ({ppo.rollout_batch})")


def train_ppo(policy: str | Path, reward: str | RewardFn, prompts: str | Path | Sequence[str], out_dir: str | Path,
              cfg: TrainConfig, ppo: PPOConfig, *, chat: bool = True, resume: bool = False,
              skip_bad_lines: int = 0, evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
              on_event: Notify | None = None, on_step: Event | None = None, on_eval: Event | None = None,
              ) -> Trainer:
    """Run PPO from the model at `policy` against `reward` (a reward model directory, `module:function`,
    or a RewardFn) on `prompts` (a JSONL file of {"prompt"} objects, or the texts); see the module
    docstring. Everything is checked before the output directory is created; `skip_bad_lines` bad
    lines of the prompts file may be dropped. `on_event(kind, info)` gets "prompts" (count, the
    skipped lines' errors), then the Trainer's events (resume, runtime, start, warnings, …)."""
    from llmkit.data.records import read_prompts
    from llmkit.training.rewards import load_reward

    out_dir = Path(out_dir)
    emit = on_event or (lambda kind, info: None)
    set_threads(cfg.threads)
    distributed.check_split(cfg.grad_accum)
    check_batches(cfg, ppo)
    check_output_dir(out_dir, resume)
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
    runtime = make_runtime(cfg.device, cfg.dtype, cfg.threads, model=lm.model, training=True,
                           rows=ppo.minibatch_size // cfg.grad_accum * lm.model.cfg.max_seq_len)
    ref.to(runtime.device).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    model = PolicyWithValue(lm.model)
    collector = PPOCollector(lm, model, ref, reward_fn, prompt_set, cfg, ppo, stop_id=stop_token(lm, chat=chat))
    fingerprint = {"policy": str(Path(policy).resolve()), "reward": reward if isinstance(reward, str) else "function",
                   "prompts": [len(texts), hash_texts(texts)], "ppo": asdict(ppo), "chat": chat}
    meta = run_config_json(lm.model.cfg, chat=chat_info_json(lm), trained_with="ppo", started_from=str(lm.path))
    trainer = Trainer(model, cfg, loss_fn=collector.loss, collector=collector, weights=lm.model, out_dir=out_dir,
                      evaluate=(lambda m: evaluate(m.lm)) if evaluate is not None else None,
                      checkpoint_json={"config.json": meta},
                      checkpoint_files={"tokenizer.json": out_dir / "tokenizer.json"},
                      fingerprint=fingerprint, runtime=runtime)
    main, created = trainer.world.main, not out_dir.exists()
    with hold_run_dir(out_dir) if main else contextlib.nullcontext():  # rank 0 alone writes
        try:
            if main:
                lm.tokenizer.save(out_dir)
            emit("prompts", {"prompts": len(texts), "skipped": skipped})
            if resume:
                path = trainer.resume(emit)
                emit("resume", {"path": str(path) if path else None, "step": trainer.state.step})
            trainer.announce(emit)
            trainer.run(on_step=on_step, on_eval=on_eval, on_event=emit)
        except Exception:
            if main and created and not list_checkpoints(out_dir / "checkpoints"):
                shutil.rmtree(out_dir, ignore_errors=True)  # failed before its first checkpoint: leave nothing
            raise
    return trainer


def hash_texts(texts: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()[:16]
