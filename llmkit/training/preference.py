"""Learning from preference pairs: the reward model (`llmkit reward`) and DPO (`llmkit dpo`).

Both read {"prompt", "chosen", "rejected"} records and render each response as a one-turn chat
(user: prompt, assistant: response) with the model's template, exactly as SFT does. A batch of B
pairs is one (2B, T) tensor: the B chosen rows, then the B rejected rows.

- Reward model: Bradley–Terry, loss −log σ(r_chosen − r_rejected), the reward read at the last
  real token (llmkit/models/heads.py).
- DPO (Rafailov et al. 2023): with log-probabilities of the responses summed over their tokens
  under the policy π and the frozen starting model π_ref, loss
  −log σ(β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]). The implicit rewards
  β·(log π − log π_ref) of chosen and rejected, their margin and how often chosen wins are logged.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.data.chat_examples import IGNORE, Example, fit_length, pad_batch, render_prompt_response, sample_order
from llmkit.data.records import PreferencePair, ReadStats, read_preference_pairs
from llmkit.data.split import hold_out
from llmkit.errors import ConfigError, DatasetError
from llmkit.layers.lora import LoraConfig
from llmkit.models.heads import REWARD_HEAD, RewardModel, bradley_terry_loss
from llmkit.runtime import model_device, to_device
from llmkit.training import finetune
from llmkit.training.config import TrainConfig
from llmkit.training.loop import TrainState

Pair = tuple[Example, Example]
Batch = tuple[Tensor, Tensor, Tensor]
Event = Callable[[str, dict[str, Any]], None]


# ---- losses (pure functions of small tensors) ----------------------------------------------------

def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO loss from summed response log-probs (each (B,)), and the implicit-reward statistics."""
    chosen = beta * (policy_chosen.float() - ref_chosen.float())
    rejected = beta * (policy_rejected.float() - ref_rejected.float())
    loss = -F.logsigmoid(chosen - rejected).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    return loss, {"reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
                  "reward_margin": (chosen - rejected).mean(), "reward_accuracy": (chosen > rejected).float().mean()}


def sequence_logprobs(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """Σ log p(token) over each row's supervised tokens (labels ≠ IGNORE), shape (B,)."""
    logits = model(ids)[:, :-1].float()
    targets = labels[:, 1:]
    keep = targets != IGNORE
    picked = torch.gather(logits.log_softmax(-1), -1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


# ---- data ----------------------------------------------------------------------------------------

def prepare_pairs(lm: Any, data: str | Path | tuple[list[PreferencePair], ReadStats], max_len: int, policy: str,
                  emit: Event) -> tuple[list[Pair], str]:
    """Render and length-check every pair of a file (or of what read_preference_pairs returned); pairs
    that truncation makes identical, or that lose all of a response, are dropped and counted
    (RELIABILITY D5, D6). Returns the pairs and a fingerprint."""
    records, stats = read_preference_pairs(data) if isinstance(data, (str, Path)) else data
    data_path = stats.path
    counts: Counter = Counter(stats.dropped)
    pairs = []
    rendered: dict[tuple[str, str], Example] = {}  # files repeat (prompt, response)s; rendering is the slow part

    def render(rec: PreferencePair, text: str) -> Example:
        key = (rec.prompt, text)
        if key not in rendered:
            rendered[key] = render_prompt_response(lm, rec.prompt, text, rec.where)
        return Example(rendered[key].ids, rendered[key].labels, rec.where)  # errors name this record's line

    for rec in records:
        fitted = [fit_length(render(rec, text), max_len, policy) for text in (rec.chosen, rec.rejected)]
        for _, what in fitted:
            if what == "truncated":
                counts["truncated"] += 1
        (chosen, why_c), (rejected, why_r) = fitted
        if chosen is None or rejected is None:
            counts[why_c if chosen is None else why_r] += 1
        elif chosen.ids == rejected.ids:
            counts["identical after truncation"] += 1
        else:
            pairs.append((chosen, rejected))
    emit("pairs", {"pairs": len(pairs), "counts": dict(counts)})
    degenerate = counts["chosen == rejected"] + counts["identical after truncation"]
    too_long = sum(n for why, n in counts.items() if why in ("too long", "prompt fills the context"))
    if pairs and too_long > 0.1 * len(records):
        emit("warning", {"message": f"{too_long} of {len(records)} pairs were dropped for length "
                                    f"(context {max_len} tokens; see --seq-len, --overlength)"})
    if not pairs:
        raise DatasetError(f"0 usable pairs in {data_path} ({stats.lines} lines read; dropped: "
                           + ", ".join(f"{n} {why}" for why, n in counts.items() if n) + ")")
    if degenerate > 0.5 * (len(records) + counts["chosen == rejected"]):
        emit("warning", {"message": f"{degenerate} degenerate pairs (chosen == rejected) were dropped: more than "
                                    "half of the file"})
    return pairs, finetune.fingerprint_of([(c.ids, r.ids) for c, r in pairs])


def pair_batch(pairs: list[Pair], pad_id: int) -> Batch:
    """(2B, T) ids, labels and attention mask: chosen rows first, then rejected rows."""
    return pad_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def _pad_id(lm: Any) -> int:
    return lm.tokenizer.pad_id if lm.tokenizer.pad_id is not None else (lm.eos_ids or [0])[0]


def _setup(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
           overlength: str, resume: bool, skip_bad_lines: int, emit: Event, kind: str, fsdp: bool,
           ) -> tuple[Any, Path, list[Pair], list[Pair], str]:
    out_dir = finetune.check_output_dir(out_dir, resume)
    records = read_preference_pairs(data_path, skip_bad_lines=skip_bad_lines)  # checked before any model work
    emit("records", {"summary": records[1].summary(), "unknown_keys": dict(records[1].unknown_keys),
                     "skipped": records[1].skipped})
    lm = finetune.load_start_model(model_path, cfg, kind=kind, fsdp=fsdp)
    pairs, fingerprint = prepare_pairs(lm, records, finetune.context_length(lm, cfg), overlength, emit)
    train_pairs, val_pairs = hold_out(pairs, cfg.val_fraction, cfg.seed, source=str(data_path), unit="usable pair")
    emit("split", {"train": len(train_pairs), "val": len(val_pairs)})
    return lm, out_dir, train_pairs, val_pairs, fingerprint


def _batches(pairs: list[Pair], cfg: TrainConfig, pad_id: int) -> Callable[[int], Batch]:
    return lambda index: pair_batch([pairs[i] for i in sample_order(len(pairs), cfg.batch_size, index, cfg.seed)],
                                    pad_id)


def _eval_batches(pairs: list[Pair], cfg: TrainConfig, pad_id: int):
    for first in range(0, min(len(pairs), cfg.eval_batches * cfg.batch_size), cfg.batch_size):
        chunk = pairs[first:first + cfg.batch_size]
        yield len(chunk), pair_batch(chunk, pad_id)


# ---- reward model --------------------------------------------------------------------------------

def reward_loss(model: RewardModel, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    ids, _, mask = batch
    rewards = model(ids, attention_mask=mask)
    chosen, rejected = rewards.chunk(2)
    return bradley_terry_loss(chosen, rejected), {
        "tokens": int(mask.sum()), "accuracy": float((chosen > rejected).float().mean()),
        "reward_margin": float((chosen - rejected).detach().mean())}


@torch.inference_mode()
def evaluate_reward(model: RewardModel, pairs: list[Pair], cfg: TrainConfig, pad_id: int) -> dict[str, float]:
    """Held-out Bradley–Terry loss and pairwise accuracy (how often chosen outscores rejected)."""
    loss, correct, n = 0.0, 0, 0
    for size, batch in _eval_batches(pairs, cfg, pad_id):
        ids, _, mask = to_device(batch, model_device(model))
        chosen, rejected = model(ids, attention_mask=mask).chunk(2)  # under the caller's autocast, if any
        loss += float(bradley_terry_loss(chosen, rejected)) * size
        correct += int((chosen > rejected).sum())
        n += size
    return {"val_loss": loss / n, "val_accuracy": correct / n}


def train_reward_model(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                       lora: LoraConfig | None = None, overlength: str = "truncate", resume: bool = False,
                       skip_bad_lines: int = 0, on_event: Event | None = None,
                       on_step: Callable[[dict], None] | None = None, fsdp: bool = False) -> TrainState:
    """Train a reward model (LM backbone + scalar head) on preference pairs; see the module docstring.
    `fsdp`: under torchrun, shard the model over the ranks (llmkit/training/distributed.py)."""
    emit = on_event or (lambda kind, info: None)
    lm, out_dir, train_pairs, val_pairs, fingerprint = _setup(model_path, data_path, out_dir, cfg,
                                                              overlength=overlength, resume=resume,
                                                              skip_bad_lines=skip_bad_lines, emit=emit,
                                                              kind="reward", fsdp=fsdp)
    torch.manual_seed(cfg.seed)
    model = RewardModel.from_lm(lm.model).train()
    lm.model = model  # the reward model holds the backbone now; lm keeps the tokenizer and chat format
    finetune.maybe_lora(model, lora, emit, seed=cfg.seed)
    model.reward_head.requires_grad_(True)  # a new head always trains, adapters or not
    pad_id = _pad_id(lm)
    run = finetune.FinetuneRun(lm, model, cfg, out_dir, "reward", fingerprint, lora=lora, heads=(REWARD_HEAD,),
                               fsdp=fsdp)
    evaluate = (lambda m: evaluate_reward(m, val_pairs, cfg, pad_id)) if val_pairs else None
    return finetune.train(run, loss_fn=reward_loss, get_batch=_batches(train_pairs, cfg, pad_id), evaluate=evaluate,
                          resume=resume, on_event=on_event, on_step=on_step)


# ---- DPO -----------------------------------------------------------------------------------------

def make_dpo_loss(reference: nn.Module, beta: float) -> Callable[[nn.Module, Batch], tuple[Tensor, dict]]:
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        ids, labels, mask = batch
        policy_c, policy_r = sequence_logprobs(model, ids, labels).chunk(2)
        if model_device(reference) != ids.device:  # the frozen copy follows the policy to its device
            reference.to(ids.device)
        with torch.no_grad():
            ref_c, ref_r = sequence_logprobs(reference, ids, labels).chunk(2)
        loss, stats = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)
        return loss, {"tokens": int(mask.sum()), **{k: float(v) for k, v in stats.items()}}

    return loss_fn


def dpo(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
        beta: float = 0.1, lora: LoraConfig | None = None, overlength: str = "truncate", resume: bool = False,
        skip_bad_lines: int = 0, on_event: Event | None = None,
        on_step: Callable[[dict], None] | None = None, fsdp: bool = False) -> TrainState:
    """Direct preference optimisation of the model at `model_path` against a frozen copy of itself (under
    torchrun the copy is whole on every rank; `fsdp` shards only the policy that trains)."""
    if not beta > 0 or beta != beta or beta == float("inf"):
        raise ConfigError(f"--beta must be a positive number, got {beta}")
    emit = on_event or (lambda kind, info: None)
    lm, out_dir, train_pairs, val_pairs, fingerprint = _setup(model_path, data_path, out_dir, cfg,
                                                              overlength=overlength, resume=resume,
                                                              skip_bad_lines=skip_bad_lines, emit=emit,
                                                              kind="dpo", fsdp=fsdp)
    reference = copy.deepcopy(lm.model).eval().requires_grad_(False)
    finetune.maybe_lora(lm.model, lora, emit, seed=cfg.seed)
    pad_id = _pad_id(lm)
    loss_fn = make_dpo_loss(reference, beta)

    @torch.inference_mode()
    def evaluate(model: nn.Module) -> dict[str, float]:
        sums: Counter = Counter()
        n = 0
        for size, batch in _eval_batches(val_pairs, cfg, pad_id):
            loss, stats = loss_fn(model, to_device(batch, model_device(model)))  # under the Trainer's autocast
            sums["val_loss"] += float(loss) * size
            for key in ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"):
                sums[f"val_{key}"] += stats[key] * size
            n += size
        return {k: v / n for k, v in sums.items()}

    run = finetune.FinetuneRun(lm, lm.model, cfg, out_dir, "dpo", finetune.fingerprint_of(fingerprint, beta),
                               lora=lora, fsdp=fsdp)
    return finetune.train(run, loss_fn=loss_fn, get_batch=_batches(train_pairs, cfg, pad_id),
                          evaluate=evaluate if val_pairs else None, resume=resume, on_event=on_event,
                          on_step=on_step)
