"""The one size dial: `--depth N` scales a preset's Transformer to N layers of width 64·N with heads of
64 (nanochat's rule), and `--depth auto` chooses N from the time budget and this machine's speed.

Why a ratio of tokens to parameters: at a fixed budget of compute, a bigger model learns more per token
but sees fewer tokens. Below some number of tokens per parameter the bigger model's extra capacity goes
unused (it stops the schedule while still far from what it could reach); above it the smaller model has
saturated. `auto` measures one training step of the preset's model, predicts every depth's tokens per
second from its floating-point operations per token, and takes the deepest model that still sees
TOKENS_PER_PARAM tokens per parameter in the time left. The constant was chosen by held-out bits per
byte at equal wall-clock time (benchmarks/learning.py; the table is in benchmarks/README.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError

HEAD_DIM = 64
DEPTHS = range(1, 33)
# Chosen by held-out bits per byte at equal wall-clock time (benchmarks/README.md). Depth 2 beat depth 3 on one
# Zen 5 core in 4 minutes (1.95 vs 2.01 bits/byte; predicted 3.6 and 0.8 tokens per parameter) and on two cores
# in 5 minutes (1.715 vs 1.736; predicted ~11 and ~2.4); with 1.0 here auto took depth 3 on two cores in fp32
# (AVX2 kernels, predicted ~1.2): 0.78x nanoGPT. Far below Chinchilla's ~20 tokens per parameter, which is for
# runs of days, and the prediction overstates small models' speed (small products run below the machine's
# peak), which this constant absorbs.
TOKENS_PER_PARAM = 4.0


def parse_depth(value: str | None) -> int | str | None:
    """None (the preset's own size), "auto", or a depth in DEPTHS; anything else is a ConfigError."""
    if value is None or value == "auto":
        return value
    try:
        depth = int(value)
    except (TypeError, ValueError):
        depth = None
    if depth is None or depth not in DEPTHS:
        raise ConfigError(f"--depth must be auto or an integer from {DEPTHS.start} to {DEPTHS.stop - 1}, "
                          f"got {value!r}")
    return depth


def at_depth(cfg: ModelConfig, depth: int) -> ModelConfig:
    """The preset's model with `depth` layers of width 64·depth and 64-wide heads; grouped-query
    attention keeps the preset's ratio of query to key/value heads where it divides."""
    if cfg.body != "transformer":
        raise ConfigError(f"--depth scales Transformer presets; this preset's body is {cfg.body}")
    ratio = cfg.n_heads // cfg.n_kv_heads
    heads = depth
    kv_heads = heads // ratio if heads % ratio == 0 else heads
    return cfg.replace(n_layers=depth, d_model=HEAD_DIM * depth, n_heads=heads, n_kv_heads=kv_heads,
                       head_dim=HEAD_DIM, d_ff=None)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward: 6 per weight of every matrix product (the head's included, the embedding
    lookup's not) plus attention's scores and weighted sums, 12·layers·context·width (Kaplan et al.)."""
    matmul = cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.d_model
    return 6.0 * matmul + 12.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


@dataclass(frozen=True)
class DepthChoice:
    depth: int
    params: int
    predicted_tokens: float
    reference_tokens_per_s: float
    line: str


def choose_depth(reference: ModelConfig, tokens_per_s: float, seconds: float, seq_len: int, *,
                 tokens_per_param: float = TOKENS_PER_PARAM) -> DepthChoice:
    """The deepest model predicted to see `tokens_per_param` tokens per parameter in `seconds`,
    scaling the measured `tokens_per_s` of `reference` by floating-point operations per token."""
    flops = train_flops_per_token(reference, seq_len) * tokens_per_s  # this machine's rate
    best = None
    for depth in DEPTHS:
        cfg = at_depth(reference, depth)
        tokens = flops / train_flops_per_token(cfg, seq_len) * seconds
        params = cfg.num_params()
        if best is None or tokens >= tokens_per_param * params:
            best = (depth, params, tokens)
    depth, params, tokens = best
    line = (f"depth {depth} ({params / 1e6:.2f}M parameters): {tokens / 1e6:.2f}M tokens predicted in "
            f"{seconds:.0f} s at this machine's measured speed ({tokens_per_s:,.0f} tokens/s at depth "
            f"{reference.n_layers}); auto takes the deepest model that sees ≥ {tokens_per_param:g} tokens "
            f"per parameter")
    return DepthChoice(depth, params, tokens, tokens_per_s, line)


def measure_tokens_per_s(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Any]],
                         batch: Any, autocast: Callable[[], Any], tokens: int, *, passes: int = 2) -> float:
    """Training tokens per second of forward + backward on one micro-batch: the best of `passes`
    (the first pays one-off costs: allocation, kernel selection). Gradients are discarded."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        with autocast():
            loss, _ = loss_fn(model, batch)
        loss.backward()
        best = min(best, time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return tokens / best
