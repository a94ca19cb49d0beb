"""BERT's masking for masked-language-model pretraining (Devlin et al. 2018, arXiv 1810.04805, §3.1).

Each eligible token (not a special token, not padding) is selected with probability 0.15; a
selected token becomes [MASK] with probability 0.8, a random ordinary token with 0.1, and stays
unchanged with 0.1. The model must predict the original token at every selected position
(labels = -100 elsewhere, cross-entropy's ignore index). Whole-word masking selects words instead
of tokens and masks all of a selected word's tokens; a word starts at a token marked by
`word_start_table` (WordPiece: no "##" prefix; byte-level BPE: a leading space or a non-letter).

Masks are drawn from a generator seeded by (seed, batch index), so a batch is a pure function of
its index and training resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmkit.errors import ConfigError
from llmkit.tokenizer import Tokenizer

IGNORE = -100  # label of positions the loss skips (F.cross_entropy's default ignore_index)


@dataclass(frozen=True)
class MaskingConfig:
    mlm_probability: float = 0.15
    mask_fraction: float = 0.8  # of the selected tokens, → [MASK]
    random_fraction: float = 0.1  # of the selected tokens, → a random ordinary token; the rest stay
    whole_word: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ConfigError(f"mask_fraction {self.mask_fraction} + random_fraction {self.random_fraction} "
                              "must be within [0, 1]")


def special_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of every special token the tokenizer knows (never masked, never drawn as random tokens)."""
    decoder = tokenizer.backend.get_added_tokens_decoder()
    return sorted(i for i, token in decoder.items() if token.special)


def word_start_table(tokenizer: Tokenizer) -> Tensor:
    """Bool (vocab,): True where a token starts a new word (for whole-word masking)."""
    table = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
    vocab = tokenizer.backend.get_vocab(with_added_tokens=False)
    wordpiece = any(token.startswith("##") for token in vocab)
    for token, i in vocab.items():
        if wordpiece:  # "##ing" continues a word
            table[i] = not token.startswith("##")
        else:  # byte-level BPE: "Ġthe" (leading space) or punctuation starts a word, "ing" continues one
            table[i] = token[:1] in ("Ġ", "Ċ", "") or not token[:1].isalnum()
    for i in special_ids(tokenizer):
        table[i] = True
    return table


def mask_tokens(ids: Tensor, *, mask_id: int, special: list[int], vocab_size: int, generator: torch.Generator,
                config: MaskingConfig = MaskingConfig(), attention_mask: Tensor | None = None,
                word_starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(inputs, labels) for MLM from ids (B, T); `word_starts` (vocab,) enables whole-word masking."""
    special_t = torch.tensor(special, dtype=torch.long)
    eligible = ~torch.isin(ids, special_t)
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    if config.whole_word:
        assert word_starts is not None, "whole-word masking needs word_start_table(tokenizer)"
        starts = word_starts[ids] | ~eligible  # a special token or padding ends any word
        word = starts.long().cumsum(dim=1)  # word number of every token within its row
        B, T = ids.shape
        chosen_word = torch.rand((B, T + 1), generator=generator) < config.mlm_probability  # words 0..T
        selected = torch.gather(chosen_word, 1, word) & eligible
    else:
        selected = (torch.rand(ids.shape, generator=generator) < config.mlm_probability) & eligible
    labels = ids.masked_fill(~selected, IGNORE)
    action = torch.rand(ids.shape, generator=generator)  # one draw decides mask / random / keep
    to_mask = selected & (action < config.mask_fraction)
    to_random = selected & (action >= config.mask_fraction) & (action < config.mask_fraction + config.random_fraction)
    ordinary = torch.ones(vocab_size, dtype=torch.bool)
    ordinary[special_t[special_t < vocab_size]] = False
    pool = ordinary.nonzero().squeeze(1)
    random_tokens = pool[torch.randint(len(pool), ids.shape, generator=generator)]
    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_tokens, inputs)
    return inputs, labels
