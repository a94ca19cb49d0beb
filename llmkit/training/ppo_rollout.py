"""PPO's experience: sample responses with the KV-cache generator, score them, and turn the scores
into per-token rewards, advantages and returns.

One rollout: the policy samples a response per prompt (plain temperature sampling — top-k/top-p
would make the samples leave the policy's own distribution, and the KL estimate go negative);
one forward pass of the policy (log-probs and values) and one of the frozen reference (log-probs)
over prompt + response; the reward function scores the decoded texts; responses that never emit
the stop token lose `no_eos_penalty`; the KL penalty is added per token; GAE gives advantages,
which are whitened over the batch. Two halves: `sample_and_score` works row by row (under torchrun
each rank takes its share of the rows), `score_experience` on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams
from llmkit.models.heads import ScalarHead
from llmkit.training import ppo_math as pm

# (prompts, responses) -> one score per pair; rule-based functions and reward models alike.
RewardFn = Callable[[list[str], list[str]], list[float]]


class PolicyWithValue(nn.Module):
    """The policy LM plus a scalar value head on its last hidden states (a shared backbone).

    The head starts at zero, so the first values are 0 and the first advantages are the rewards."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = ScalarHead(lm.cfg.d_model)
        nn.init.zeros_(self.value_head.proj.weight)

    def forward(self, ids: Tensor, attention_mask: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Logits (B, R, V) and values (B, R) for the tokens at positions start.. of `ids`: both read
        the hidden state one position earlier, the state in which that token was chosen."""
        hidden = self.lm.hidden_states(ids, attention_mask=attention_mask)[:, start - 1:-1]  # (B, R, C)
        return self.lm.lm_head(hidden), self.value_head(hidden).float()


def response_logprobs(lm: nn.Module, ids: Tensor, attention_mask: Tensor, start: int) -> Tensor:
    """log π(token) of every token at positions start.. under a plain LM (the reference)."""
    logits = lm(ids, attention_mask=attention_mask)[:, start - 1:-1]
    return pm.token_logprobs(logits, ids[:, start:])


@dataclass
class Experience:
    """One rollout batch; every (B, R) tensor covers the response tokens, right-padded."""
    ids: Tensor  # (B, W + R) left-padded prompt, then the response
    attention_mask: Tensor  # (B, W + R)
    start: int  # W: where responses begin
    mask: Tensor  # (B, R) float, 1 on response tokens (stop token included)
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    stats: dict[str, float]

    def select(self, rows: Tensor) -> "Experience":
        pick = lambda t: t[rows]  # noqa: E731
        return Experience(pick(self.ids), pick(self.attention_mask), self.start, pick(self.mask),
                          pick(self.logprobs), pick(self.ref_logprobs), pick(self.values),
                          pick(self.advantages), pick(self.returns), self.stats)


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
         ) -> tuple[Tensor, Tensor, int, Tensor]:
    """(ids, attention_mask, start, response_mask): prompts left-padded to one width W, responses
    right-padded after them — so every response starts at column W."""
    W, R = max(len(p) for p in prompts), max(max(len(r) for r in responses), 1)
    ids = torch.full((len(prompts), W + R), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids[row, W - len(p):W] = torch.tensor(list(p), dtype=torch.long)
        ids[row, W:W + len(r)] = torch.tensor(list(r), dtype=torch.long)
        attention[row, W - len(p):W + len(r)] = 1
    return ids, attention, W, attention[:, W:].float()


def sample_responses(lm: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     temperature: float, stop_id: int, pad_id: int, seed: int,
                     width: int | None = None) -> tuple[list[list[int]], list[bool]]:
    """Sampled responses, each ending with `stop_id` when the policy chose to stop, and whether it did;
    row i samples with seed + i (llmkit.inference.generate).

    The budget is capped so that prompt + response + stop token fit the context (`width`: the widest
    prompt of the whole batch when these rows are part of one, default: of these rows); a response
    shorter than the budget therefore ended with the stop token."""
    width = max(len(p) for p in prompts) if width is None else width
    budget = min(max_new_tokens, lm.cfg.max_seq_len - width)
    outs = generate(lm, prompts, max_new_tokens=budget, params=SamplingParams(temperature=temperature),
                    eos_ids=[stop_id], pad_id=pad_id, seed=seed)
    ended = [len(o) < budget for o in outs]
    return [o + [stop_id] if e else o for o, e in zip(outs, ended)], ended


@dataclass
class Samples:
    """Rollout rows before the forward passes: responses (stop token included when they ended), whether
    each ended, and the reward function's score of each."""
    responses: list[list[int]]
    ended: list[bool]
    scores: list[float]


@torch.no_grad()
def sample_and_score(lm: nn.Module, prompts: Sequence[Sequence[int]], prompt_texts: Sequence[str],
                     reward_fn: RewardFn, decode: Callable[[list[int]], str], *, stop_id: int, pad_id: int,
                     seed: int, cfg, width: int | None = None) -> Samples:
    """Sample a response to each prompt (row i with seed + i) and score the decoded texts (cfg: a PPOConfig)."""
    lm.eval()
    responses, ended = sample_responses(lm, prompts, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                        stop_id=stop_id, pad_id=pad_id, seed=seed, width=width)
    texts = [decode(r[:-1] if e else r) for r, e in zip(responses, ended)]
    return Samples(responses, ended, [float(s) for s in reward_fn(list(prompt_texts), texts)])


@torch.no_grad()
def make_experience(policy: PolicyWithValue, ref: nn.Module, prompts: Sequence[Sequence[int]],
                    prompt_texts: Sequence[str], reward_fn: RewardFn, decode: Callable[[list[int]], str], *,
                    stop_id: int, pad_id: int, seed: int, kl_coef: float, cfg) -> Experience:
    """Roll out, score and compute advantages for one batch of prompts (cfg is a PPOConfig)."""
    samples = sample_and_score(policy.lm, prompts, prompt_texts, reward_fn, decode, stop_id=stop_id, pad_id=pad_id,
                               seed=seed, cfg=cfg)
    return score_experience(policy, ref, prompts, samples, pad_id=pad_id, kl_coef=kl_coef, cfg=cfg)


@torch.no_grad()
def score_experience(policy: PolicyWithValue, ref: nn.Module, prompts: Sequence[Sequence[int]], samples: Samples,
                     *, pad_id: int, kl_coef: float, cfg) -> Experience:
    """The whole batch's forward passes (policy log-probs and values, reference log-probs), KL-penalised
    rewards, GAE advantages whitened over the batch, and its statistics."""
    policy.eval()
    device = next(policy.parameters()).device
    scores = torch.tensor(samples.scores, dtype=torch.float32, device=device)
    ended_t = torch.tensor(samples.ended, device=device)
    scores_after_penalty = scores - cfg.no_eos_penalty * (~ended_t).float()

    ids, attention, start, mask = (t.to(device) if isinstance(t, Tensor) else t
                                   for t in pack(prompts, samples.responses, pad_id))
    assert bool((mask.sum(1) > 0).all()), "every response holds at least one token (RELIABILITY T7)"
    logits, values = policy(ids, attention, start)
    logprobs = pm.token_logprobs(logits, ids[:, start:])
    entropy = pm.token_entropy(logits)
    ref_logprobs = response_logprobs(ref, ids, attention, start)
    kl = pm.kl_per_token(logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = pm.token_rewards(scores_after_penalty, kl, mask, kl_coef)
    advantages, returns = pm.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    advantages = pm.whiten(advantages, mask)
    values = values * mask
    lengths = mask.sum(1)
    stats = {
        "score": float(scores.mean()),  # the reward function's mean, before penalties
        "reward": float(rewards.sum(1).mean()),  # what PPO maximises: score − no-EOS penalty − β·KL
        "kl": float(kl.sum(1).mean()),  # per response, summed over its tokens
        "kl_coef": kl_coef,
        "entropy": float(pm.masked_mean(entropy, mask)),
        "explained_variance": pm.explained_variance(values, returns, mask),
        "response_length": float(lengths.mean()),
        "no_eos_fraction": float((~ended_t).float().mean()),
    }
    return Experience(ids, attention, start, mask, logprobs, ref_logprobs, values, advantages, returns, stats)


def ppo_minibatch_loss(policy: PolicyWithValue, batch: Experience, cfg) -> tuple[Tensor, dict[str, float]]:
    """Clipped policy loss + vf_coef × clipped value loss on one minibatch of an Experience."""
    logits, values = policy(batch.ids, batch.attention_mask, batch.start)
    logprobs = pm.token_logprobs(logits, batch.ids[:, batch.start:])
    pg_loss, pg_clip = pm.clipped_policy_loss(logprobs, batch.logprobs, batch.advantages, batch.mask,
                                              cfg.clip_range)
    vf_loss, vf_clip = pm.clipped_value_loss(values, batch.values, batch.returns, batch.mask,
                                             cfg.value_clip_range)
    with torch.no_grad():
        approx_kl = float(pm.masked_mean(0.5 * (logprobs - batch.logprobs) ** 2, batch.mask))
    loss = pg_loss + cfg.vf_coef * vf_loss
    return loss, {"tokens": float(batch.mask.sum()), "policy_loss": float(pg_loss.detach()),
                  "value_loss": float(vf_loss.detach()), "clip_fraction": float(pg_clip),
                  "value_clip_fraction": float(vf_clip), "approx_kl": approx_kl}
