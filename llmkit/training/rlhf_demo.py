"""`llmkit rlhf-demo`: the whole post-training pipeline on a task with a true score, on a laptop CPU.

Stages (each an output directory under --out, each resumable, so running again finishes or just
re-prints): task files (llmkit/training/rlhf_task.py) → `base`: a small LLaMA-style model pretrained
on noisy arithmetic text → `sft` on careless demonstrations → `rm`: a reward model from the SFT
model on (right, wrong) pairs → `ppo` from the SFT model against the reward model → `dpo` from the
SFT model on the same pairs. Then every model answers the held-out prompts and `true_score` grades
them. The library never prints: progress goes through `on_event`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import llmkit
from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams
from llmkit.training.config import TrainConfig
from llmkit.training.ppo import PPOConfig, encode_prompts, stop_token, train_ppo
from llmkit.training.ppo_rollout import pack, response_logprobs, sample_responses
from llmkit.training.rewards import read_prompts
from llmkit.training.rlhf_plots import plot_reward_kl
from llmkit.training.rlhf_task import true_score, write_task_files

DEMO_OUT = "runs/rlhf-demo"
Event = Callable[[str, dict[str, Any]], None]

# Sizes and budgets, chosen by measuring on 2 CPU cores (see the README's RLHF section).
BASE_MODEL = dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64)
STAGES = {
    "base": dict(preset="llama-tiny", steps=500, batch_size=16, seq_len=64, lr=3e-3, warmup_steps=20,
                 eval_interval=250, eval_batches=5, vocab_size=400, tokenizer_sample_bytes=2_000_000),
    "sft": dict(steps=200, batch_size=16, lr=1e-3, warmup_steps=10, eval_interval=50, eval_batches=4,
                val_fraction=0.05),
    "rm": dict(steps=150, batch_size=16, lr=1e-3, warmup_steps=10, eval_interval=50, eval_batches=8,
               val_fraction=0.1),
    "ppo": dict(steps=60, lr=5e-5, warmup_steps=0, eval_interval=20, min_lr_ratio=1.0),
    "ppo-rule": dict(steps=40, lr=1e-4, warmup_steps=0, eval_interval=20, min_lr_ratio=1.0),
    "dpo": dict(steps=100, batch_size=16, lr=5e-5, warmup_steps=5, eval_interval=50, eval_batches=8,
                val_fraction=0.1),
}
# The reward model cannot check the arithmetic well (see the README), so PPO against it is held close
# to the SFT model (β 0.5, small lr); PPO against the rule (the true score itself) may move further.
PPO_SETTINGS = {"ppo": dict(rollout_batch=32, minibatch_size=16, ppo_epochs=2, max_new_tokens=6, kl_coef=0.5),
                "ppo-rule": dict(rollout_batch=32, minibatch_size=16, ppo_epochs=2, max_new_tokens=6, kl_coef=0.1)}
RULE_REWARD = "llmkit.training.rlhf_task:true_score"
MODELS = (("base", "base (pretrained)"), ("sft", "SFT"), ("ppo", "PPO (reward model)"),
          ("ppo-rule", "PPO (rule reward = true score)"), ("dpo", "DPO"))
DPO_BETA = 0.5  # β 0.1 (lr 1e-4) drifted to KL 2.4 and lowered the greedy score more
TASK = dict(sft_examples=600, pairs=1500)  # how many SFT demonstrations and preference pairs to generate
SAMPLES_PER_PROMPT = 4


@dataclass
class PipelineResult:
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model → {sampled, greedy, kl}
    rm_accuracy: float = float("nan")  # on the held-out split of prefs.jsonl, from the reward run's metrics
    rm_pairs: int = 0
    rm_by_kind: dict[str, float] = field(default_factory=dict)  # on held-out prompts: chatter / wrong-number pairs
    heldout_prompts: int = 0
    ppo_final_kl: dict[str, float] = field(default_factory=dict)  # PPO run → KL of its last rollout batch
    seconds: dict[str, float] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)


def _cfg(stage: str, seed: int, threads: int | None) -> TrainConfig:
    return TrainConfig(**{**STAGES[stage], "seed": seed, "threads": threads})


def _last(metrics: Path, key: str) -> float:
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else float("nan")


@torch.no_grad()
def evaluate_model(lm: "llmkit.LanguageModel", texts: list[str], *, reference: torch.nn.Module | None, seed: int,
                   max_new_tokens: int) -> dict[str, float]:
    """True score on `texts` with sampling at temperature 1 (the policy's own distribution, which PPO
    optimises; SAMPLES_PER_PROMPT draws per prompt) and greedy; and the mean KL to `reference`
    (Σ log π − log π_ref over sampled responses, nats per response)."""
    prompts = encode_prompts(lm, texts, chat=True)
    stop, pad = stop_token(lm, chat=True), lm.tokenizer.pad_id or 0
    ids = prompts.ids * SAMPLES_PER_PROMPT
    responses, ended = sample_responses(lm.model, ids, max_new_tokens=max_new_tokens, temperature=1.0,
                                        stop_id=stop, pad_id=pad, seed=seed)
    decode = lambda r, e: lm.tokenizer.decode(r[:-1] if e else r)  # noqa: E731
    sampled = [true_score(t, decode(r, e)) for t, r, e in zip(texts * SAMPLES_PER_PROMPT, responses, ended)]
    greedy = generate(lm.model, prompts.ids, max_new_tokens=max_new_tokens, params=SamplingParams(temperature=0.0),
                      eos_ids=[stop], pad_id=pad)
    out = {"sampled": sum(sampled) / len(sampled),
           "greedy": sum(true_score(t, lm.tokenizer.decode(r)) for t, r in zip(texts, greedy)) / len(texts)}
    if reference is not None:
        seq, attention, start, mask = pack(ids, responses, pad)
        own = response_logprobs(lm.model, seq, attention, start)
        ref = response_logprobs(reference, seq, attention, start)
        out["kl"] = float(((own - ref) * mask).sum(1).mean())
    return out


def run_pipeline(out: str | Path, *, seed: int = 0, threads: int | None = None,
                 on_event: Event | None = None) -> PipelineResult:
    """Run (or resume) every stage and grade the models; see the module docstring."""
    from llmkit.training.preference import dpo, train_reward_model
    from llmkit.training.pretrain import pretrain
    from llmkit.training.sft import sft

    out = Path(out)
    started = time.perf_counter()
    emit = on_event or (lambda kind, info: None)
    result = PipelineResult()
    if threads:
        torch.set_num_threads(threads)

    def stage(name: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        fn()
        result.seconds[name] = time.perf_counter() - t0
        emit(name, {"seconds": result.seconds[name], "elapsed": time.perf_counter() - started})

    files = write_task_files(out / "data", seed, **TASK)
    stage("base", lambda: pretrain([files["corpus.txt"]], out / "base", _cfg("base", seed, threads),
                                   model_overrides=BASE_MODEL, resume=True))
    stage("sft", lambda: sft(out / "base", files["sft.jsonl"], out / "sft", _cfg("sft", seed, threads), resume=True))
    stage("rm", lambda: train_reward_model(out / "sft", files["prefs.jsonl"], out / "rm", _cfg("rm", seed, threads),
                                           resume=True))
    for name, reward in (("ppo", str(out / "rm")), ("ppo-rule", RULE_REWARD)):
        stage(name, lambda: train_ppo(out / "sft", reward, files["prompts.jsonl"], out / name, _cfg(name, seed, threads),
                                      PPOConfig(**PPO_SETTINGS[name]), resume=True))
    stage("dpo", lambda: dpo(out / "sft", files["prefs.jsonl"], out / "dpo", _cfg("dpo", seed, threads),
                             beta=DPO_BETA, resume=True))

    t0 = time.perf_counter()
    texts, _ = read_prompts(files["heldout.jsonl"])
    result.heldout_prompts = len(texts)
    sft_model = llmkit.load(out / "sft").model
    for name, _ in MODELS:
        lm = llmkit.load(out / name)
        result.scores[name] = evaluate_model(lm, texts, reference=sft_model if name != "base" else None,
                                             seed=seed + 99, max_new_tokens=PPO_SETTINGS["ppo"]["max_new_tokens"])
        emit("score", {"model": name, **result.scores[name], "elapsed": time.perf_counter() - started})
    result.seconds["evaluate"] = time.perf_counter() - t0
    result.rm_accuracy = _last(out / "rm" / "metrics.jsonl", "val_accuracy")
    result.rm_by_kind = reward_model_accuracy_by_kind(out / "rm", texts, seed)
    result.rm_pairs = round(TASK["pairs"] * STAGES["rm"]["val_fraction"])
    for name, label in MODELS[2:4]:
        result.ppo_final_kl[name] = _last(out / name / "metrics.jsonl", "kl")
        result.plots.append(plot_reward_kl(out / name / "metrics.jsonl", out / f"{name}_reward_kl.png",
                                           title=f"{label}: score and KL to the SFT model per PPO step"))
    result.seconds["total"] = time.perf_counter() - started
    return result


def reward_model_accuracy_by_kind(rm_dir: Path, texts: list[str], seed: int) -> dict[str, float]:
    """How often the reward model prefers the bare right answer on held-out prompts, against the same
    answer wrapped in chatter, and against a wrong number."""
    import random

    from llmkit.training.rewards import reward_model_scorer
    from llmkit.training.rlhf_task import CHATTER, wrong_answer

    score, rng = reward_model_scorer(rm_dir), random.Random(seed + 3)
    right = [next(str(n) for n in range(19) if true_score(t, str(n))) for t in texts]
    chosen = score(texts, right)
    out = {}
    for kind, rejected in (("chatter", [rng.choice(CHATTER).format(n=r) for r in right]),
                           ("wrong number", [str(wrong_answer(int(r), rng)) for r in right])):
        out[kind] = sum(c > r for c, r in zip(chosen, score(texts, rejected))) / len(texts)
    return out


def format_table(r: PipelineResult) -> str:
    """The demo's one table (Markdown, so it pastes into the README as is)."""
    lines = [f"true score on {r.heldout_prompts} held-out prompts (exact answer; sampled: temperature 1, "
             f"{SAMPLES_PER_PROMPT} draws per prompt)", "",
             "| model | true score, sampled | true score, greedy | KL to SFT (nats/response) |",
             "|-------|--------------------:|-------------------:|--------------------------:|"]
    for name, label in MODELS:
        s = r.scores.get(name)
        if s is None:
            continue
        kl = f"{s['kl']:.3f}" if "kl" in s else "—"
        lines.append(f"| {label} | {s['sampled']:.3f} | {s['greedy']:.3f} | {kl} |")
    lines += ["", f"reward model held-out accuracy: {r.rm_accuracy:.3f} ({r.rm_pairs} pairs); on the held-out prompts, "
              "right answer preferred over " + ", ".join(f"{k}: {v:.3f}" for k, v in r.rm_by_kind.items()),
              "PPO final KL to the reference (last rollout batch, nats/response): "
              + ", ".join(f"{name} {kl:.3f}" for name, kl in r.ppo_final_kl.items()),
              "plots of score and KL over PPO steps: " + ", ".join(str(p) for p in r.plots),
              "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items())]
    return "\n".join(lines)
