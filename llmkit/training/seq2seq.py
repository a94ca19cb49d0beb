"""Encoder-decoder training for the one loop: batches, the teacher-forced loss and evaluation.

A batch is a `Seq2SeqBatch`: the encoder input (padded, with its mask), and the target as `labels`
(-100 on padding) with `decoder_input_ids` = the labels shifted right behind the model's
`decoder_start_token_id` (T5 and BART both train this way). Pretraining batches come from
`DenoisingBatches` (T5 span corruption or BART infilling over windows of a token stream), fine-tuning
batches from `PairBatches` (source/target pairs); both are pure functions of (seed, index), so a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.data.batches import TokenBatches
from llmkit.data.seq2seq_noise import SENTINEL_TOKENS, bart_noise, raw_length_for, sentence_end_table, span_corrupt
from llmkit.errors import ConfigError, DatasetError
from llmkit.models.seq2seq import shift_right
from llmkit.runtime import model_device, to_device
from llmkit.tokenizer import Tokenizer
from llmkit.tokenizer.bpe import MASK_TOKEN

IGNORE = -100  # label value that the loss skips (padding)
# The denoising objectives (T5's, BART's); `objective_for` picks one from the model config.
OBJECTIVES = ("span_corruption", "text_infilling")


@dataclass
class Seq2SeqBatch:
    input_ids: Tensor  # (B, T_enc)
    attention_mask: Tensor  # (B, T_enc) bool, True on real tokens
    decoder_input_ids: Tensor  # (B, T_dec)
    labels: Tensor  # (B, T_dec), IGNORE on padding


def denoising_tokens(objective: str) -> tuple[str, ...]:
    """The special tokens an objective needs in the tokenizer."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown denoising objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
    return SENTINEL_TOKENS if objective == "span_corruption" else (MASK_TOKEN,)


def add_special_tokens(tokenizer: Tokenizer, tokens: Sequence[str]) -> Tokenizer:
    """Append the missing `tokens` as special tokens (ids after the existing vocabulary, so nothing
    already tokenized moves); idempotent, so a resumed run's saved tokenizer is unchanged."""
    missing = [t for t in tokens if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.backend.add_special_tokens(missing)
    return tokenizer


def collate(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int, start_id: int) -> Seq2SeqBatch:
    """Pad (source ids, target ids) pairs into one batch; the targets already end with EOS."""
    src_len = max(len(s) for s, _ in pairs)
    tgt_len = max(len(t) for _, t in pairs)
    input_ids = torch.full((len(pairs), src_len), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), tgt_len), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (source, target) in enumerate(pairs):
        input_ids[row, :len(source)] = torch.tensor(source, dtype=torch.long)
        attention_mask[row, :len(source)] = True
        labels[row, :len(target)] = torch.tensor(target, dtype=torch.long)
    decoder_input_ids = shift_right(labels, start_id=start_id, pad_id=pad_id, ignore_index=IGNORE)
    return Seq2SeqBatch(input_ids, attention_mask, decoder_input_ids, labels)


def seq2seq_loss(model: nn.Module, batch: Seq2SeqBatch) -> tuple[Tensor, dict[str, float]]:
    """Mean cross-entropy of each target token given the source and the target tokens before it."""
    logits = model(batch.input_ids, batch.decoder_input_ids, attention_mask=batch.attention_mask)  # (B, T_dec, V)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                           ignore_index=IGNORE)
    # tokens/s counts every real token the model read: the encoder's and the decoder's
    tokens = int(batch.attention_mask.sum()) + int((batch.labels != IGNORE).sum())
    return loss, {"tokens": tokens}


@torch.inference_mode()
def evaluate_seq2seq(model: nn.Module, batches: Iterator[Seq2SeqBatch]) -> dict[str, float]:
    """Validation loss (nats per target token), perplexity and target-token accuracy (teacher forced)."""
    total, correct, count = 0.0, 0, 0
    device = model_device(model)
    for batch in batches:
        batch = to_device(batch, device)
        # under the caller's autocast (the Trainer's runtime), if any
        logits = model(batch.input_ids, batch.decoder_input_ids, attention_mask=batch.attention_mask)
        logits = logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum"))
        real = batch.labels != IGNORE
        correct += int((logits.argmax(-1) == batch.labels)[real].sum())
        count += int(real.sum())
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_acc": correct / max(count, 1)}


class DenoisingBatches:
    """Pretraining batches: windows of a token stream, corrupted by T5 span corruption or BART
    sentence permutation + text infilling; the noise of batch i is drawn from rng(seed, i)."""

    def __init__(self, tokens: np.ndarray, objective: str, *, seq_len: int, batch_size: int, seed: int,
                 tokenizer: Tokenizer, start_id: int) -> None:
        denoising_tokens(objective)  # validates the name
        self.tokens, self.objective, self.seq_len = tokens, objective, seq_len
        self.batch_size, self.seed, self.start_id = batch_size, seed, start_id
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id
        if self.eos_id is None or self.pad_id is None:
            raise DatasetError("the tokenizer needs <|eos|> and <|pad|> tokens for seq2seq training")
        ids = [tokenizer.token_to_id(t) for t in denoising_tokens(objective)]
        if any(i is None for i in ids):
            raise DatasetError(f"the tokenizer lacks the {objective} special tokens (see add_special_tokens)")
        self.sentinel_ids, self.mask_id = ids, ids[0]
        if objective == "span_corruption":
            self.raw_len = raw_length_for(seq_len)  # corrupted input and target both fit in seq_len
        else:
            self.raw_len = seq_len - 1  # the target is the window itself plus EOS
            self.ends_sentence = sentence_end_table([tokenizer.decode([i]) for i in range(tokenizer.vocab_size)])
        self.windows = TokenBatches(tokens, self.raw_len, batch_size, seed)  # raises on a too-small corpus

    def _pair(self, window: np.ndarray, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        if self.objective == "span_corruption":
            source, target = span_corrupt(window.tolist(), self.sentinel_ids, rng)
        else:
            source = bart_noise(window.tolist(), self.mask_id, self.ends_sentence, rng)[: self.seq_len - 1]
            target = window.tolist()
        return source + [self.eos_id], target + [self.eos_id]

    def _batch(self, tokens: np.ndarray, windows: Sequence[int], rng: np.random.Generator, *,
               n: int | None = None) -> Seq2SeqBatch:
        n = n or self.raw_len
        pairs = [self._pair(tokens[w * n: w * n + n], rng) for w in windows]
        return collate(pairs, pad_id=self.pad_id, start_id=self.start_id)

    def batch(self, index: int) -> Seq2SeqBatch:
        return self._batch(self.tokens, self.windows.windows(index).tolist(),
                           np.random.default_rng([self.seed, 0, index]))

    def eval_batches(self, tokens: np.ndarray, *, max_batches: int) -> Iterator[Seq2SeqBatch]:
        """Held-out windows in order, with noise fixed by (seed, batch number): every evaluation of a
        run scores the same corrupted texts, so its numbers compare across steps."""
        # A held-out stream shorter than a T5 window (which is longer than the context) is scored as
        # one shorter window: its corrupted input and target only get shorter.
        n = min(self.raw_len, len(tokens) - 1)
        if n < 2:
            raise DatasetError(f"validation split has {len(tokens)} tokens; denoising needs at least 3")
        count = (len(tokens) - 1) // n
        for b in range(min(max_batches, -(-count // self.batch_size))):
            windows = range(b * self.batch_size, min(count, (b + 1) * self.batch_size))
            yield self._batch(tokens, list(windows), np.random.default_rng([self.seed, 1, b]), n=n)


class PairBatches:
    """Fine-tuning batches of (source ids, target ids) pairs: batch i takes examples
    perm_e[k mod n] of epoch e = k div n, as TokenBatches does with windows."""

    def __init__(self, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int, seed: int, pad_id: int,
                 start_id: int) -> None:
        if not pairs:
            raise DatasetError("no training examples")
        self.pairs, self.batch_size, self.seed = list(pairs), batch_size, seed
        self.pad_id, self.start_id = pad_id, start_id

    def batch(self, index: int) -> Seq2SeqBatch:
        n = len(self.pairs)
        ks = range(index * self.batch_size, (index + 1) * self.batch_size)
        perms = {e: np.random.default_rng([self.seed, e]).permutation(n) for e in {k // n for k in ks}}
        return collate([self.pairs[perms[k // n][k % n]] for k in ks], pad_id=self.pad_id, start_id=self.start_id)

    def in_order(self, *, max_batches: int | None = None) -> Iterator[Seq2SeqBatch]:
        """Every pair once, in file order (evaluation)."""
        for b, start in enumerate(range(0, len(self.pairs), self.batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield collate(self.pairs[start:start + self.batch_size], pad_id=self.pad_id, start_id=self.start_id)


def objective_for(model_cfg: ModelConfig) -> str:
    """The denoising objective an encoder-decoder pretrains with: T5's span corruption for models with
    relative position bias (T5), BART's text infilling for the others (learned positions, BART)."""
    return "span_corruption" if model_cfg.position == "relative" else "text_infilling"


def denoising_objective(model_cfg: ModelConfig, tokenizer: Tokenizer, train: np.ndarray, val: np.ndarray, *,
                        seq_len: int, batch_size: int, seed: int, eval_batch_limit: int):
    """(loss_fn, get_batch, evaluate) for `llmkit train --arch t5|bart` (see llmkit.training.pretrain).
    The tokenizer must already hold the objective's tokens (pretrain adds `denoising_tokens`)."""
    batches = DenoisingBatches(train, objective_for(model_cfg), seq_len=seq_len, batch_size=batch_size, seed=seed,
                               tokenizer=tokenizer, start_id=model_cfg.decoder_start_token_id)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return evaluate_seq2seq(model, batches.eval_batches(val, max_batches=eval_batch_limit))

    return seq2seq_loss, batches.batch, evaluate
