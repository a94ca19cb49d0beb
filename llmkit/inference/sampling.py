"""Turning next-token logits into a token: penalties, temperature, truncation, then a draw.

The chain, applied in this documented order (Hugging Face's: temperature before truncation):
  1. repetition penalty (CTRL, Keskar et al. 2019) over prompt + generated tokens;
     presence / frequency penalties (OpenAI) over generated tokens only;
  2. temperature (below GREEDY_BELOW → greedy argmax, nothing else below applies); the logits are
     shifted so their maximum is 0 before dividing, so no temperature can overflow them;
  3. top-k: keep the k most likely;
  4. top-p (nucleus, Holtzman et al. 2019): keep the smallest set whose probability reaches p;
  5. min-p: drop tokens whose probability is below min_p × the top probability;
  6. draw from the renormalised distribution with the caller's torch.Generator (repeatable by seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.errors import GenerationError

MAX_TEMPERATURE = 100.0  # past it every distribution is uniform to float32 precision
# Below it sampling is argmax: logits a hundredth apart differ by e^-10000 in probability, and a smaller
# t (5e-324 is a valid Python float) is 0 in float32, where x / t is NaN.
GREEDY_BELOW = 1e-6
# A repetition penalty divides or multiplies logits: beyond this factor either way it only overflows.
PENALTY_RANGE = (1e-3, 1e3)
_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages repeats
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        low, high = PENALTY_RANGE
        checks = [
            ("temperature", lambda t: 0 <= t <= MAX_TEMPERATURE, f"in [0, {MAX_TEMPERATURE:g}]"),
            ("top_p", lambda p: 0 < p <= 1, "in (0, 1]"),
            ("min_p", lambda p: 0 <= p <= 1, "in [0, 1]"),
            ("repetition_penalty", lambda r: low <= r <= high, f"in [{low:g}, {high:g}]"),
            ("presence_penalty", lambda p: abs(p) <= 2, "in [-2, 2]"),
            ("frequency_penalty", lambda p: abs(p) <= 2, "in [-2, 2]"),
        ]
        for name, ok, expected in checks:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise GenerationError(f"{name} must be a number {expected}, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer ≥ 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def apply_penalties(logits: Tensor, params: SamplingParams, seen: Tensor, generated_counts: Tensor) -> Tensor:
    """logits (B, V); seen (B, V) bool over prompt + output; generated_counts (B, V) over output."""
    if params.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.presence_penalty or params.frequency_penalty:
        counts = generated_counts.to(logits.dtype)
        logits = logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    return logits


class PenaltyState:
    """What the penalties read, kept by the generation loops: `seen` (B, vocab) marks tokens in the
    context or generated, `counts` (B, vocab) counts generated ones. Both are None when no penalty is
    on, so greedy and plain sampling pay nothing."""

    def __init__(self, params: SamplingParams, context: Tensor, vocab_size: int, real: Tensor | None = None) -> None:
        self.seen = self.counts = None
        if params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty:
            real = torch.ones_like(context) if real is None else real  # padding does not count as seen
            B, device = context.shape[0], context.device
            self.seen = torch.zeros(B, vocab_size, dtype=torch.long, device=device).scatter_add_(1, context, real) > 0
            self.counts = torch.zeros(B, vocab_size, dtype=torch.long, device=device)

    def record(self, token: Tensor, finished: Tensor) -> None:
        """Add this step's tokens (B, 1); rows that already stopped are not counted."""
        if self.seen is not None:
            self.seen.scatter_(1, token, True)
            self.counts.scatter_add_(1, token, (~finished).long()[:, None])


def apply_temperature(logits: Tensor, params: SamplingParams) -> Tensor:
    """Divide by the temperature, each row's maximum shifted to 0 first (softmax is unchanged): then
    x / t ≤ 0 for every t > 0, and the top token stays at 0 however small t is, where plain x / 1e-45
    overflows to inf and then NaN."""
    return (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature


def apply_top_k(logits: Tensor, params: SamplingParams) -> Tensor:
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def apply_top_p(logits: Tensor, params: SamplingParams) -> Tensor:
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop_sorted[..., 0] = False  # a p below float32's smallest number would otherwise drop them all
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_min_p(logits: Tensor, params: SamplingParams) -> Tensor:
    if params.min_p > 0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


# The truncation half of the chain, in order; `filter_logits`, `sample` and `sampling_stages` all run it.
FILTERS = (("temperature", apply_temperature), ("top_k", apply_top_k), ("top_p", apply_top_p),
           ("min_p", apply_min_p))
STAGES = ("raw", "penalties") + tuple(name for name, _ in FILTERS)


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, top-k, top-p, min-p on (B, V) logits; filtered entries become -inf, and each row's
    most likely token always stays, so the result is a distribution for any valid params."""
    logits = logits.float()
    for _, stage in FILTERS:
        logits = stage(logits, params)
    return logits


def penalised_logits(logits: Tensor, params: SamplingParams, seen: Tensor | None,
                     generated_counts: Tensor | None) -> Tensor:
    """float32 logits after the penalties, clamped to finite values."""
    if bool(torch.isnan(logits).any()):  # weights are checked at load, but activations can still overflow
        raise GenerationError("the model computed NaN logits (its activations overflow in this precision; "
                              "try --dtype fp32)")
    logits = logits.float()
    if seen is not None:
        logits = apply_penalties(logits, params, seen, generated_counts)
    return logits.clamp(-_FLOAT32_MAX, _FLOAT32_MAX)  # an inf (from overflow) would make the shift NaN


def sample(logits: Tensor, params: SamplingParams, *, generator: torch.Generator | None = None,
           seen: Tensor | None = None, generated_counts: Tensor | None = None) -> Tensor:
    """Pick the next token for each row of (B, V) logits → (B,) LongTensor."""
    logits = penalised_logits(logits, params, seen, generated_counts)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_stages(logits: Tensor, params: SamplingParams, *, seen: Tensor | None = None,
                    generated_counts: Tensor | None = None) -> list[tuple[str, Tensor]]:
    """The logits (B, V) after each stage of the chain `sample` runs, named as in STAGES; a stage that
    is off repeats the one before it. Greedy (temperature below GREEDY_BELOW) keeps only the argmax
    from "temperature" on, which is what `sample` picks. `softmax` of any stage is a distribution."""
    stages = [("raw", logits.float())]
    logits = penalised_logits(logits, params, seen, generated_counts)
    stages.append(("penalties", logits))
    if params.greedy:
        only = torch.full_like(logits, float("-inf")).scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
        return stages + [(name, only) for name, _ in FILTERS]
    for name, stage in FILTERS:
        logits = stage(logits, params)
        stages.append((name, logits))
    return stages
