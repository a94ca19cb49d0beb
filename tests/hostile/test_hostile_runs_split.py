"""The held-out split and the data fingerprint depend on the corpus, not on how its path is spelled
(issue 18, class 13): `corpus`, `/abs/corpus` and a copy elsewhere split alike and resume alike, while
an edited file changes the fingerprint (a resume then refuses it as "data changed")."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from conftest import make_corpus
from llmkit.tokenizer import Tokenizer
from llmkit.training.config import TrainConfig
from llmkit.training.pretrain import prepare_corpus


def test_split_and_fingerprint_ignore_how_the_data_path_is_spelled(tmp_path: Path, monkeypatch) -> None:
    corpus = make_corpus(tmp_path / "corpus")
    for i in range(12):  # enough files that a spelling-dependent split would differ
        (corpus / f"part{i:02d}.txt").write_text(f"file {i} says " + "words and more words\n" * (20 + i))
    copy = tmp_path / "elsewhere" / "deeper" / "corpus"
    shutil.copytree(corpus, copy)
    tokenizer_dir = tmp_path / "tok"
    Tokenizer.train([p.read_text() for p in sorted(corpus.iterdir())], 300).save(tokenizer_dir)
    cfg = TrainConfig(val_fraction=0.3, vocab_size=300)
    monkeypatch.chdir(tmp_path)

    def prepared(spelling: Path, out: str):
        return prepare_corpus([spelling], tmp_path / out, cfg, seq_len=16,
                              tokenizer_path=tokenizer_dir / "tokenizer.json")

    spellings = (Path(os.path.relpath(corpus)), corpus.resolve(), copy)
    runs = [prepared(spelling, f"out{i}") for i, spelling in enumerate(spellings)]
    assert len({r.fingerprint for r in runs}) == 1
    assert all(r.val.tolist() == runs[0].val.tolist() and r.train.tolist() == runs[0].train.tolist() for r in runs)
    (copy / "notes.txt").write_text("different words entirely\n" * 300, encoding="utf-8")
    assert prepared(copy, "out_edited").fingerprint != runs[0].fingerprint
