"""Loss functions: each is `loss_fn(model, batch) -> (loss, metrics)` for the one training loop."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.runtime import model_device


def next_token_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Pretraining: mean cross-entropy of predicting token t+1 from tokens ≤ t."""
    x, y = batch
    logits = model(x)  # (B, T, V)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))
    return loss, {"tokens": y.numel()}


@torch.inference_mode()
def evaluate_lm(model: nn.Module, batches, *, bytes_per_token: float | None = None) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and, given the text's bytes per token, bits per byte
    — a unit that does not depend on the tokenizer, so models with different vocabularies compare."""
    total, count = 0.0, 0
    device = model_device(model)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)  # under the caller's autocast (the Trainer's runtime), if any
        total += float(F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    loss = total / max(count, 1)
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if bytes_per_token:
        out["val_bpb"] = loss / math.log(2) / bytes_per_token
    return out
