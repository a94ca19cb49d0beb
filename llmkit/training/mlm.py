"""Masked-language-model objective for the one training loop: batches, loss and evaluation.

A training batch is a window of the token stream (the same windows as next-token pretraining, so
documents are separated by EOS, RoBERTa's "full sentences" packing) masked by BERT's recipe
(llmkit.data.masking). The loss is the cross-entropy at the selected positions only; evaluation
reports it with the accuracy of the top prediction there (`val_loss`, `val_ppl`, `val_mlm_accuracy`
in metrics.jsonl). Evaluation masks are fixed (seeded by batch number), so evaluations compare.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.data.batches import TokenBatches, eval_batches
from llmkit.data.masking import IGNORE, MaskingConfig, mask_tokens, special_ids, word_start_table
from llmkit.errors import DatasetError
from llmkit.runtime import model_device, to_device
from llmkit.tokenizer import Tokenizer

MLMBatch = tuple[Tensor, Tensor, Tensor | None]  # inputs, labels, attention mask (None: no padding)


class MLMMasker:
    """Masks a batch of ids as a pure function of (seed, index)."""

    def __init__(self, tokenizer: Tokenizer, seed: int, config: MaskingConfig = MaskingConfig()) -> None:
        if tokenizer.mask_id is None:
            raise DatasetError(f"the tokenizer has no mask token ({tokenizer.mask_token!r}) for MLM")
        self.mask_id, self.vocab_size, self.seed, self.config = tokenizer.mask_id, tokenizer.vocab_size, seed, config
        self.special = special_ids(tokenizer)
        self.word_starts = word_start_table(tokenizer) if config.whole_word else None

    def __call__(self, ids: Tensor, index: int, attention_mask: Tensor | None = None) -> MLMBatch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        inputs, labels = mask_tokens(ids, mask_id=self.mask_id, special=self.special, vocab_size=self.vocab_size,
                                     generator=generator, config=self.config, attention_mask=attention_mask,
                                     word_starts=self.word_starts)
        return inputs, labels, attention_mask


class MLMBatches:
    """Training batches: TokenBatches' windows, masked."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, masker: MLMMasker, seed: int) -> None:
        self.windows, self.masker = TokenBatches(tokens, seq_len, batch_size, seed), masker

    def batch(self, index: int) -> MLMBatch:
        return self.masker(self.windows.batch(index)[0], index)


def mlm_loss(model: nn.Module, batch: MLMBatch) -> tuple[Tensor, dict[str, float]]:
    """Mean cross-entropy over the selected (masked) positions."""
    inputs, labels, attention_mask = batch
    logits = model(inputs, attention_mask=attention_mask)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    picked = labels != IGNORE
    accuracy = float((logits.detach()[picked].argmax(-1) == labels[picked]).float().mean()) if picked.any() else 0.0
    return loss, {"tokens": inputs.numel(), "mlm_accuracy": accuracy}


@torch.inference_mode()
def evaluate_mlm(model: nn.Module, batches: Iterable[MLMBatch]) -> dict[str, float]:
    """Validation MLM loss (nats per masked token), its exponential, and top-1 accuracy at masked tokens."""
    total, correct, count = 0.0, 0, 0
    device = model_device(model)
    for batch in batches:
        inputs, labels, attention_mask = to_device(batch, device)
        logits = model(inputs, attention_mask=attention_mask)  # under the caller's autocast, if any
        picked = labels != IGNORE
        total += float(F.cross_entropy(logits.float()[picked], labels[picked], reduction="sum"))
        correct += int((logits[picked].argmax(-1) == labels[picked]).sum())
        count += int(picked.sum())
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_mlm_accuracy": correct / max(count, 1)}


def mlm_objective(tokenizer: Tokenizer, train: np.ndarray, val: np.ndarray, *, seq_len: int, batch_size: int,
                  seed: int, eval_batch_limit: int, whole_word: bool = False):
    """(loss_fn, get_batch, evaluate) for the Trainer."""
    masker = MLMMasker(tokenizer, seed, MaskingConfig(whole_word=whole_word))
    eval_masker = MLMMasker(tokenizer, seed + 1, MaskingConfig(whole_word=whole_word))
    batches = MLMBatches(train, seq_len, batch_size, masker, seed)

    def evaluate(model: nn.Module) -> dict[str, float]:
        windows = eval_batches(val, seq_len, batch_size, max_batches=eval_batch_limit)
        return evaluate_mlm(model, (eval_masker(x, i) for i, (x, _) in enumerate(windows)))

    return mlm_loss, batches.batch, evaluate
