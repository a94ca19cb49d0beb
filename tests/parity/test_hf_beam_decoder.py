"""Beam search for decoder-only models (GPT-2, LLaMA) equals transformers' `num_beams` generation:
length penalties of both signs, the three early-stopping rules, an EOS the models actually produce,
and a left-padded batch of prompts of different lengths. It runs through the same decoding-state
interface as sampling and as T5/BART's beam search (llmkit/inference/beam.py)."""

from __future__ import annotations

import pytest
import torch

import llmkit
from llmkit.inference.beam import beam_generate
from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams
from hf_tiny import PAD, TEXTS, build_hf_model, train_tokenizer

transformers = pytest.importorskip("transformers")

SETTINGS = [(1.0, False), (0.5, True), (2.0, "never"), (-1.0, False)]  # (length_penalty, early_stopping)
NEW = 10


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"beam-{request.param}")
    hf = build_hf_model(request.param, directory, tok)
    return hf, llmkit.load(directory)


def prompts(lm) -> list[list[int]]:
    return [lm.prefix_ids + lm.tokenizer.encode(text) for text in (TEXTS[0][:20], TEXTS[3][:9], TEXTS[1][:4])]


def theirs(hf, rows: list[list[int]], eos: int, **options) -> list[list[int]]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding, as decoder-only generation needs
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW, eos_token_id=eos,
                          pad_token_id=PAD, **options)
    new = [row[width:].tolist() for row in out]
    return [row[:row.index(eos)] if eos in row else row for row in new]


@pytest.mark.parametrize("length_penalty, early_stopping", SETTINGS)
def test_beam_search_matches_transformers(pair, length_penalty, early_stopping):
    hf, lm = pair
    rows = prompts(lm)
    options = dict(num_beams=3, length_penalty=length_penalty, early_stopping=early_stopping)
    # an EOS the search does meet: the third token of the first prompt's best beam without one
    eos = beam_generate(lm.model, rows[:1], max_new_tokens=NEW, **options)[0][2]
    expected = theirs(hf, rows, eos, **options)
    ours = beam_generate(lm.model, rows, max_new_tokens=NEW, eos_ids=[eos], pad_id=PAD, **options)
    assert ours == expected
    assert ours[0] != beam_generate(lm.model, rows[:1], max_new_tokens=NEW, **options)[0]  # EOS changed it
    # a prompt's best beam does not depend on the batch it is in
    assert [beam_generate(lm.model, [r], max_new_tokens=NEW, eos_ids=[eos], **options)[0] for r in rows] == ours


def test_one_beam_is_greedy_and_the_api_and_cli_path_agree(pair):
    _, lm = pair
    rows = prompts(lm)
    greedy = generate(lm.model, rows, max_new_tokens=NEW, params=SamplingParams(temperature=0.0))
    assert beam_generate(lm.model, rows, max_new_tokens=NEW, num_beams=1) == greedy
    text = "def add(a,"
    best = beam_generate(lm.model, [lm.prefix_ids + lm.tokenizer.encode(text)], max_new_tokens=6, num_beams=2,
                         eos_ids=lm.eos_ids)[0]
    assert lm.beam_search(text, num_beams=2, max_new_tokens=6) == lm.tokenizer.decode(best)
