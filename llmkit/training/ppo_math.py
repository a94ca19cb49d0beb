"""The arithmetic of PPO for language models, as pure functions on (B, T) response tensors.

Every tensor here covers the response tokens only, right-padded, with `mask` (B, T) marking the
real ones (1.0) and the padding (0.0). References: Schulman et al. 2017 (PPO, clipped losses),
Schulman et al. 2015 (GAE), Ziegler et al. 2019 (per-token KL penalty, adaptive coefficient),
"The N+ Implementation Details of RLHF with PPO" (arXiv 2403.17031) for the LM-specific choices:
the score is added at the last real token, advantages are whitened, values are clipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance over the real tokens (Bessel's correction, as the reference trainers do)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1.0)


def whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """Scale to unit variance (and zero mean) over the real tokens; padding becomes 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) under `logits` (B, T, V) for `tokens` (B, T), in float32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens[..., None]).squeeze(-1)


def token_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of each position's next-token distribution, (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Estimate of KL(policy ‖ reference) at each sampled token (tokens drawn from the policy).

    k1 = log π − log π_ref is unbiased but can be negative per token; k3 = (r − 1) − log r with
    r = π_ref/π is unbiased and never negative (Schulman, "Approximating KL divergence", 2020).
    Both are exactly 0 when the policy equals the reference.
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def token_rewards(score: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token reward: −β·KL at every response token, plus the sequence's score at its last
    real token (where the reward model judged it)."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # right padding: the last real token's index
    rows = torch.arange(len(score), device=score.device)
    rewards[rows, last] += score
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation: A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t, with
    V = 0 after the last real token. Returns (advantages, returns = advantages + values)."""
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        clip: float) -> tuple[Tensor, Tensor]:
    """PPO's pessimistic objective, as a loss: mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)),
    ρ = π/π_old. Returns (loss, fraction of tokens where the clipped term was the larger)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip: float) -> tuple[Tensor, Tensor]:
    """½·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, −ε, ε): the value function
    cannot move far from where the rollout's values were in one PPO update. Returns (loss, clip fraction)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var(R − V)/Var(R): 1 when the values predict the returns, ≤ 0 when they do not help."""
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: β grows when the measured KL is above the target,
    shrinks when below, by at most ±20 %·(n_steps / horizon) per update."""

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
