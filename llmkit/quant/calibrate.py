"""The calibration set of GPTQ and AWQ: a few thousand tokens that the quantised layers should
reproduce well, as a (samples, length) tensor of token ids.

From `--calibration PATH` (text files or directories, read like training data): the text is
tokenised and cut into consecutive windows of `length` tokens, the first `samples` of them. Without a
path the model writes its own: `samples` sequences sampled at temperature 1 from the empty prompt,
which follow the distribution the model has learnt (no text leaves the model; slower, since it
generates them token by token).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from llmkit.data.corpus import find_text_files, read_text_file
from llmkit.errors import DatasetError
from llmkit.inference.generate import generate
from llmkit.inference.sampling import SamplingParams

DEFAULT_SAMPLES = 32
MAX_LENGTH = 256  # tokens per sample (fewer where the model's context is shorter)


def sample_length(max_seq_len: int) -> int:
    return min(MAX_LENGTH, max_seq_len)


def text_calibration(lm, path: str | Path, *, samples: int, length: int) -> Tensor:
    """The first `samples` windows of `length` tokens of the text files under `path`."""
    files, _ = find_text_files([path])
    ids: list[int] = []
    for file in files:
        ids += lm.tokenizer.encode(read_text_file(file))
        if len(ids) >= samples * length:
            break
    windows = min(samples, len(ids) // length)
    if windows == 0:
        raise DatasetError(f"{path}: {len(ids)} tokens of text, fewer than one calibration sample of {length}")
    return torch.tensor(ids[:windows * length]).view(windows, length)


def model_calibration(lm, *, samples: int, length: int, seed: int = 0) -> Tensor:
    """`samples` sequences of `length` tokens sampled from the model itself."""
    start = list(lm.prefix_ids) or [lm.tokenizer.eos_id or 0]
    rows = []
    for i in range(samples):
        new = generate(lm.model, [start], max_new_tokens=length - len(start), params=SamplingParams(temperature=1.0),
                       eos_ids=(), seed=seed + i)[0]
        rows.append(start + new)
    return torch.tensor(rows)
