"""Tiny models for the explain tests: random weights of a preset, built in-test, with a byte-level BPE
trained on a few lines of Chinese, English, emoji and code (so some characters merge into one token and
others stay split into bytes). The Chinese words are spaced apart so their tokens stay words."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from llmkit.api import LanguageModel
from llmkit.config import preset
from llmkit.models.build import build_model
from llmkit.tokenizer import Tokenizer

LINES = ["猫 坐 在 垫子 上。 猫 在 垫子 上 睡觉。", "The cat sat on the mat. The dog sat on the log.",
         "def add(x, y):\n    return x + y\n", "emoji 🐱 and 🙂 too"]


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([line * 30 for line in LINES], vocab_size=360)


def tiny_lm(preset_name: str = "llama-tiny", seed: int = 0, **overrides) -> LanguageModel:
    tok = tiny_tokenizer()
    cfg = preset(preset_name, vocab_size=tok.vocab_size, **overrides)
    torch.manual_seed(seed)
    return LanguageModel(build_model(cfg).eval(), tok, Path(preset_name))
