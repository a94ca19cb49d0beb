"""Beam search: the same output as transformers' `num_beams=4` decoding (length penalty, early
stopping) on tiny random T5 and BART models, and the search itself on a hand-made distribution where
the greedy path is not the best sequence."""

from __future__ import annotations

import math

import pytest
import torch

import llmkit
from llmkit.errors import GenerationError
from llmkit.inference.beam import beam_search
from llmkit.inference.seq2seq_generate import seq2seq_beam_search
from seq2seq_helpers import bart_model, padded_batch, save_hf_dir, t5_model, until_eos

pytest.importorskip("transformers")

MAX_NEW = 10


def _compare(hf, model, eos: int, settings) -> list[int]:
    ids, mask = padded_batch([9, 4, 7, 5], seed=3)
    sources = [row[:n].tolist() for row, n in zip(ids, mask.sum(1))]
    lengths = []
    for length_penalty, early_stopping in settings:
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False,
                              num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping)
        ours = seq2seq_beam_search(model, sources, max_new_tokens=MAX_NEW, num_beams=4, length_penalty=length_penalty,
                                   early_stopping=early_stopping, eos_ids=[eos])
        assert ours == [until_eos(row[1:].tolist(), eos) for row in ref], (length_penalty, early_stopping)
        lengths += [len(o) for o in ours]
    return lengths


def test_t5_beam_search_matches_transformers(tmp_path):
    hf = t5_model(gated=False, eos_scale=2.0)  # EOS likely enough that hypotheses finish at many lengths
    model = llmkit.load(save_hf_dir(hf, tmp_path / "t5", "t5")).model
    lengths = _compare(hf, model, 1, [(1.0, False), (-1.0, True), (2.0, "never")])
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW  # finished at EOS and at the limit both occur


def test_bart_beam_search_matches_transformers(tmp_path):
    hf = bart_model(eos_bias=4.0)
    model = llmkit.load(save_hf_dir(hf, tmp_path / "bart", "bart")).model
    lengths = _compare(hf, model, 2, [(1.0, False), (-1.0, True)])
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW


# ---- the search itself ---------------------------------------------------------------------------

START, EOS, A, B = 0, 1, 2, 3
# next-token probabilities given the newest token: A is the likelier first step, but after A the
# sequence goes on unlikely, while B is followed by EOS almost surely
TABLE = {START: {A: 0.5, B: 0.4, EOS: 0.1}, A: {EOS: 0.3, A: 0.35, B: 0.35}, B: {EOS: 0.9, A: 0.05, B: 0.05}}


def _toy_logits(tokens: torch.Tensor, parents) -> torch.Tensor:
    logits = torch.full((len(tokens), 4), -30.0)
    for row, token in enumerate(tokens.tolist()):
        for nxt, p in TABLE.get(token, {EOS: 1.0}).items():
            logits[row, nxt] = math.log(p)
    return logits


def test_beam_search_finds_the_better_sequence_that_greedy_misses():
    greedy_first = max(TABLE[START], key=TABLE[START].get)
    assert greedy_first == A
    best = beam_search(_toy_logits, batch=2, start_id=START, max_new_tokens=5, num_beams=2, eos_ids=[EOS])
    assert best == [[B], [B]]  # log(.4·.9)/2 = -0.51 beats A's best ending, log(.5·.3)/2 = -0.95


def test_length_penalty_trades_length_for_probability():
    # with a strongly negative length penalty, the shortest ending wins: EOS at once (p = 0.1)
    short = beam_search(_toy_logits, batch=1, start_id=START, max_new_tokens=5, num_beams=3, eos_ids=[EOS],
                        length_penalty=-3.0, early_stopping=True)
    assert short == [[]]


def test_bad_beam_settings_are_refused():
    with pytest.raises(GenerationError, match="num_beams"):
        beam_search(_toy_logits, batch=1, start_id=START, max_new_tokens=3, num_beams=0, eos_ids=[EOS])
    with pytest.raises(GenerationError, match="early_stopping"):
        beam_search(_toy_logits, batch=1, start_id=START, max_new_tokens=3, eos_ids=[EOS], early_stopping="soon")


def test_beam_search_of_a_decoder_only_model_runs_and_an_encoder_is_refused_by_name(tmp_path):
    """Decoder-only beam search goes through the same loop (parity with transformers:
    tests/parity/test_hf_beam_decoder.py); an encoder-only model has nothing to generate."""
    from llmkit.api import LanguageModel
    from llmkit.config import preset
    from llmkit.models.build import build_model
    from llmkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(["a b c d e f g"] * 5, vocab_size=270)
    lm = LanguageModel(build_model(preset("gpt2-tiny", vocab_size=270)).eval(), tokenizer, tmp_path)
    assert isinstance(lm.beam_search("a b", num_beams=2, max_new_tokens=3), str)
    encoder = LanguageModel(build_model(preset("bert-tiny", vocab_size=270)).eval(), tokenizer, tmp_path)
    with pytest.raises(GenerationError, match="encoder-only"):
        encoder.beam_search("a b")
