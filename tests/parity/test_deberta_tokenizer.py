"""DeBERTa's tokenizer, `spm.model`, read without the sentencepiece library.

A tiny SentencePiece unigram model is trained here (the `sentencepiece` package, a dev extra, as the
reference only) with DeBERTa's layout: [PAD] [CLS] [SEP] control pieces and [UNK] first, the
nmt_nfkc normaliser. llmkit must give sentencepiece's ids on varied text (spaces, punctuation,
digits, CJK, accents, full-width forms, characters it never saw), with and without byte fallback;
and a tiny random DebertaV2 directory holding only that spm.model must tokenise through `llmkit.load`
as transformers' DebertaV2Tokenizer does — [CLS]/[SEP] framing, pairs with their token types,
[MASK] appended to the vocabulary — and give transformers' logits on those ids.
"""

from __future__ import annotations

import random

import pytest
import torch

import llmkit
from llmkit.errors import ModelFormatError
from llmkit.inference.token_tasks import framing
from llmkit.tokenizer.sentencepiece import read_sentencepiece, sentencepiece_backend
from test_deberta import TOLERANCE, V3, hf_config

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

WORDS = ("the a model reads tokens and predicts next word while training moves weights closer to data "
         "Paris London Tokyo café naïve über 東京 学习 语言 模型 today tomorrow question answer").split()
PROBES = ["Hello world", "The model reads tokens.", "  leading and  double  spaces  ", "numbers 12345 and 3.14159",
          "punctuation: (a), [b]; {c}! \"d\" 'e'?", "東京で学习语言模型", "café naïve über", "emoji 🙂 and ☃ unseen",
          "ﬁ ligature, full-width ＡＢＣ１２３", "\t tab \n newline", "", " ", "x" * 40, "Ω≈ç√ rare symbols",
          "Paris is the [MASK] of France."]
PAIRS = [("Who reads tokens?", "The model reads tokens and predicts the next word."), ("東京?", "  Tokyo  is 東京. ")]


def generated_text(n: int = 400) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        lines.append(" ".join(words).capitalize() + rng.choice(".?!,;:") + rng.choice(["", " (x)", " \"y\""]))
    return lines


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory) -> dict[bool, object]:
    """byte_fallback → the path of a DeBERTa-layout unigram model trained on generated text."""
    root = tmp_path_factory.mktemp("deberta_spm")
    (root / "corpus.txt").write_text("\n".join(generated_text()), encoding="utf-8")
    models = {}
    for fallback in (False, True):
        prefix = root / f"spm_{fallback}"
        spm.SentencePieceTrainer.train(
            input=str(root / "corpus.txt"), model_prefix=str(prefix), model_type="unigram",
            vocab_size=500 if fallback else 300,  # + the 256 byte pieces
            character_coverage=1.0, byte_fallback=fallback, pad_id=0, pad_piece="[PAD]", bos_id=1,
            bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]", minloglevel=2)
        models[fallback] = prefix.with_suffix(".model")
    return models


@pytest.mark.parametrize("fallback", [False, True])
def test_ids_equal_sentencepiece(spm_models, fallback):
    reference = spm.SentencePieceProcessor(model_file=str(spm_models[fallback]))
    ours = sentencepiece_backend(read_sentencepiece(spm_models[fallback]))
    assert ours.get_vocab_size() == reference.get_piece_size()
    unknown = 0
    for text in PROBES + generated_text(40):
        if "[MASK]" in text:
            continue  # sentencepiece has no [MASK] piece; DeBERTa's tokenizer adds one (next test)
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text), text
        unknown += reference.unk_id() in ids
    # the probes hold characters the corpus never had: [UNK] without byte fallback, byte pieces with it
    assert (unknown > 0) == (not fallback)


@pytest.fixture(scope="module")
def deberta_dir(spm_models, tmp_path_factory):
    directory = tmp_path_factory.mktemp("deberta_dir")
    vocab = spm.SentencePieceProcessor(model_file=str(spm_models[False])).get_piece_size() + 1  # + [MASK]
    torch.manual_seed(0)
    config = hf_config(**V3)
    config.vocab_size = vocab
    hf = transformers.DebertaV2ForMaskedLM(config).eval()
    hf.save_pretrained(directory, safe_serialization=True)
    (directory / "spm.model").write_bytes(spm_models[False].read_bytes())
    return directory, hf


def transformers_tokenizer(model_file):
    """transformers' DebertaV2Tokenizer as its from_pretrained builds one from spm.model: the pieces with
    their scores, and the normaliser's character map. Built directly, because from_pretrained reads the
    file with the protobuf package, which the dev extras do not install; the pieces and scores come
    from sentencepiece, the map (opaque bytes both hand to `tokenizers`) from llmkit's reader."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    charsmap = read_sentencepiece(model_file).precompiled_charsmap
    assert charsmap  # nmt_nfkc's
    return transformers.DebertaV2Tokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap)


def test_a_deberta_directory_tokenises_as_transformers(deberta_dir):
    directory, hf = deberta_dir
    reference = transformers_tokenizer(directory / "spm.model")
    lm = llmkit.load(directory)
    tok = lm.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0) and tok.mask_id == reference.mask_token_id == 300
    assert lm.prefix_ids == [reference.cls_token_id]
    backend = framing(tok)
    for text in PROBES:
        assert tok.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text
        assert backend.encode(text).ids == reference(text)["input_ids"], text
    for first, second in PAIRS:
        ours, theirs = backend.encode(first, second), reference(first, second)
        assert ours.ids == theirs["input_ids"] and ours.type_ids == theirs["token_type_ids"], (first, second)
    texts = ["Paris is the [MASK] of France.", "The model reads tokens."]
    ids = [backend.encode(t).ids for t in texts]
    batch = reference(texts, padding=True, return_tensors="pt")
    assert [row[:len(i)] for row, i in zip(batch["input_ids"].tolist(), ids)] == ids
    with torch.no_grad():
        ours = lm.model(batch["input_ids"], attention_mask=batch["attention_mask"])
        theirs = hf(**batch).logits
    real = batch["attention_mask"].bool()
    assert (ours - theirs)[real].abs().max() < TOLERANCE  # the parity tests' fp32 summation-order bound


def test_malformed_spm_model_is_one_line_naming_the_file(deberta_dir, tmp_path):
    directory, _ = deberta_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in directory.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "spm.model").write_bytes(b"\x0a\xff\xff")  # a piece whose length is a truncated varint
    with pytest.raises(ModelFormatError) as error:
        llmkit.load(broken)
    message = str(error.value)
    assert message.startswith(str(broken / "spm.model")) and "\n" not in message, message
    (broken / "spm.model").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json: no such file .*spm.model"):
        llmkit.load(broken)
