"""BERT's masking collator: proportions (statistical), what is never masked, whole words, determinism.

Tolerances: with N Bernoulli(p) draws the observed rate has standard deviation sqrt(p(1-p)/N). Each
check allows 5 standard deviations (a false alarm about once in 3.5 million runs).
"""

from __future__ import annotations

import math

import torch

from llmkit.data.masking import IGNORE, MaskingConfig, mask_tokens, special_ids, word_start_table
from llmkit.tokenizer import Tokenizer

VOCAB, MASK, PAD = 1000, 3, 0
SPECIAL = [0, 1, 2, 3]  # pad, two separators, [MASK]


def tolerance(p: float, n: int) -> float:
    return 5 * math.sqrt(p * (1 - p) / n)


def make_ids(rows: int = 200, cols: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (rows, cols), generator=g)
    ids[:, ::50] = 1  # separators every 50 tokens
    ids[:, 1::97] = 2
    lengths = torch.randint(cols // 2, cols + 1, (rows,), generator=g)
    attention = (torch.arange(cols)[None, :] < lengths[:, None]).long()
    return ids.masked_fill(attention == 0, PAD), attention


def test_proportions_match_bert_recipe():
    ids, attention = make_ids()
    inputs, labels = mask_tokens(ids, mask_id=MASK, special=SPECIAL, vocab_size=VOCAB,
                                 generator=torch.Generator().manual_seed(1), attention_mask=attention)
    eligible = (ids > 3) & attention.bool()
    selected = labels != IGNORE
    n_eligible, n_selected = int(eligible.sum()), int(selected.sum())
    assert abs(n_selected / n_eligible - 0.15) < tolerance(0.15, n_eligible)
    assert torch.equal(labels[selected], ids[selected])  # labels are the original tokens
    masked = selected & (inputs == MASK)
    unchanged = selected & (inputs == ids)
    replaced = selected & ~masked & ~unchanged
    # a random draw equal to the original counts as "unchanged": 0.1/996 of selections, far inside the tolerance
    for observed, p in ((masked, 0.8), (replaced, 0.1), (unchanged, 0.1)):
        assert abs(int(observed.sum()) / n_selected - p) < tolerance(p, n_selected), (p, int(observed.sum()))
    assert not torch.isin(inputs[replaced], torch.tensor(SPECIAL)).any()  # random tokens are ordinary ones
    assert torch.equal(inputs[~selected], ids[~selected])  # nothing else changes


def test_special_tokens_and_padding_are_never_masked():
    ids, attention = make_ids(50, 200)
    config = MaskingConfig(mlm_probability=0.9)  # select nearly everything eligible
    inputs, labels = mask_tokens(ids, mask_id=MASK, special=SPECIAL, vocab_size=VOCAB,
                                 generator=torch.Generator().manual_seed(2), config=config, attention_mask=attention)
    protected = (ids <= 3) | (attention == 0)
    assert (labels[protected] == IGNORE).all() and torch.equal(inputs[protected], ids[protected])
    assert (labels[~protected] != IGNORE).float().mean() > 0.85


def test_same_seed_and_index_give_the_same_masks():
    ids, attention = make_ids(8, 64)

    def run(seed):
        return mask_tokens(ids, mask_id=MASK, special=SPECIAL, vocab_size=VOCAB,
                           generator=torch.Generator().manual_seed(seed), attention_mask=attention)

    assert all(torch.equal(a, b) for a, b in zip(run(5), run(5)))
    assert not torch.equal(run(5)[1], run(6)[1])


def test_whole_word_masking_masks_every_piece_of_a_selected_word():
    backend_tok = Tokenizer.train(["playing played player plays the cat sat on the mat " * 50], vocab_size=300)
    tok = backend_tok.with_mask_token()
    text = " ".join(["the unplayable replayers misplayed on the mat"] * 300)  # unseen words: several pieces
    ids = torch.tensor([tok.encode(text)])
    starts = word_start_table(tok)
    config = MaskingConfig(whole_word=True)
    inputs, labels = mask_tokens(ids, mask_id=tok.mask_id, special=special_ids(tok), vocab_size=tok.vocab_size,
                                 generator=torch.Generator().manual_seed(3), config=config, word_starts=starts)
    word = starts[ids[0]].long().cumsum(0)
    selected = labels[0] != IGNORE
    words = {}
    for w, s in zip(word.tolist(), selected.tolist()):
        words.setdefault(w, set()).add(s)
    assert all(len(states) == 1 for states in words.values())  # all or none of each word's tokens
    assert any(len(p) > 1 for p in [[i for i, x in enumerate(word.tolist()) if x == w] for w in list(words)[:50]])
    rate = sum(states == {True} for states in words.values()) / len(words)
    assert abs(rate - 0.15) < tolerance(0.15, len(words))


def test_mask_token_is_appended_backward_compatibly():
    old = Tokenizer.train(["some text to learn merges from " * 20], vocab_size=280)
    size, ids = old.vocab_size, old.encode("some text")
    assert old.mask_id is None  # a tokenizer trained before the mask token existed
    new = old.with_mask_token()
    assert new.mask_id == size and new.encode("some text") == ids  # appended; existing ids unchanged
    assert new.encode("a <|mask|> b").count(new.mask_id) == 1
    assert new.mask_id in special_ids(new)


def test_mlm_objective_batches_are_a_pure_function_of_the_index():
    import numpy as np

    from llmkit.training.mlm import mlm_objective

    tok = Tokenizer.train(["the unplayable replayers misplayed on the mat " * 30], vocab_size=300).with_mask_token()
    stream = np.array(tok.encode("the unplayable replayers misplayed on the mat " * 200), dtype=np.int64)
    for whole_word in (False, True):
        _, get_batch, _ = mlm_objective(tok, stream, stream[:200], seq_len=32, batch_size=4, seed=0,
                                        eval_batch_limit=1, whole_word=whole_word)
        inputs, labels, mask = get_batch(3)
        again = get_batch(3)
        assert inputs.shape == labels.shape == (4, 32) and mask is None
        assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])
        assert (labels != IGNORE).any() and (inputs == tok.mask_id).any()
