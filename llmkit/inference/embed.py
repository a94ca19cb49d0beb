"""Texts → encoder inputs → pooled sentence embeddings (the library side of `llmkit embed`).

An encoder sees a text as its tokenizer's post-processor frames it: BERT's `[CLS] text [SEP]`. A
tokenizer without one (llmkit's own BPE) gets EOS in front, the "document starts here" mark of
llmkit's pretraining streams. A text longer than the model's context is truncated to its first
tokens, keeping the closing special tokens ([SEP]), as transformers' tokenizers do.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from llmkit.errors import ConfigError
from llmkit.models.masked_lm import sentence_embeddings
from llmkit.tokenizer import Tokenizer


def encoder_ids(tokenizer: Tokenizer, text: str, max_len: int) -> tuple[list[int], bool]:
    """Token ids of `text` framed for an encoder, at most `max_len` of them; and whether it was cut."""
    if tokenizer.backend.post_processor is None:
        ids = ([tokenizer.eos_id] if tokenizer.eos_id is not None else []) + tokenizer.encode(text)
        return ids[:max_len], len(ids) > max_len
    enc = tokenizer.backend.encode(text, add_special_tokens=True)
    ids, special = enc.ids, enc.special_tokens_mask
    if len(ids) <= max_len:
        return ids, False
    tail = 0  # the closing special tokens ([SEP]) survive truncation
    while tail < len(special) and special[len(special) - 1 - tail]:
        tail += 1
    keep = max(max_len - tail, 0)
    return ids[:keep] + ids[len(ids) - tail:][: max_len - keep], True


def encoder_batch(tokenizer: Tokenizer, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor, int]:
    """Right-padded input ids and attention mask (B, T) for `texts`, and how many were truncated."""
    if not texts:
        raise ConfigError("no texts to encode")
    rows, cut = [], 0
    for text in texts:
        ids, truncated = encoder_ids(tokenizer, text, max_len)
        rows.append(ids or [tokenizer.pad_id or 0])
        cut += truncated
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_id or 0, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, cut


@torch.inference_mode()
def embed_texts(model, tokenizer: Tokenizer, texts: Sequence[str], *, normalize: bool = True,
                batch_size: int = 16) -> Tensor:
    """Sentence embeddings (N, d_model) of `texts`: mean pooling over real tokens, optionally L2-normalised."""
    if getattr(model.cfg, "arch", None) != "encoder":
        raise ConfigError(f"embeddings need an encoder-only model (BERT family); this one is "
                          f"arch={model.cfg.arch!r}")
    # Batches of similar lengths waste little compute on padding; the output keeps the input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.cfg.d_model)
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        chosen = order[start:start + batch_size]
        ids, mask, _ = encoder_batch(tokenizer, [texts[i] for i in chosen], model.cfg.max_seq_len)
        out[chosen] = sentence_embeddings(model, ids.to(device), mask.to(device), normalize=normalize).float().cpu()
    return out
