"""RELIABILITY L1: nothing in the package can unpickle. (a) Statically: no pickle-based loader appears
in llmkit's source. (b) Dynamically: with every unpickler patched to raise, a checkpoint saved by
training, its resume and llmkit.load all work, also under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
(Hugging Face directories: tests/parity/test_hf_bad_input.py)."""

import pickle
import re
from pathlib import Path

import pytest
import torch

import llmkit
from conftest import make_corpus
from llmkit.training.config import TrainConfig
from llmkit.training.pretrain import pretrain

PACKAGE = Path(llmkit.__file__).parent
FORBIDDEN = re.compile(r"\bpickle\.loads?\b|\bUnpickler\b|\btorch\.load\b|allow_pickle\s*=\s*True|\bimport (joblib|dill)\b"
                       r"|\bdistributed\.checkpoint\.load\b")


def test_package_source_has_no_unpickling_calls():
    offenders = [f"{path.relative_to(PACKAGE)}:{n}" for path in PACKAGE.rglob("*.py")
                 for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if FORBIDDEN.search(line.split("#")[0])]
    assert offenders == []


def _refuse(*args, **kwargs):
    raise AssertionError("something tried to unpickle")


class _RefusingUnpickler(pickle.Unpickler):  # a class still, since torch subclasses pickle.Unpickler
    def load(self):
        _refuse()


def test_train_resume_and_load_never_unpickle(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, _refuse)
    monkeypatch.setattr(pickle, "Unpickler", _RefusingUnpickler)
    corpus = make_corpus(tmp_path / "corpus")
    flags = dict(preset="gpt2-tiny", batch_size=2, seq_len=32, vocab_size=300, eval_interval=2, eval_batches=1,
                 threads=1)
    pretrain([corpus], tmp_path / "run", TrainConfig(steps=2, **flags))
    pretrain([corpus], tmp_path / "run", TrainConfig(steps=4, **flags), resume=True)
    lm = llmkit.load(tmp_path / "run")
    assert lm.path.name == "step-00000004"
    assert isinstance(lm.generate("def ", max_new_tokens=2, temperature=0), str)
