"""The calibration set of GPTQ, AWQ, Wanda and SparseGPT: a few thousand tokens that the quantised
or pruned layers should reproduce well, as a (samples, length) tensor of token ids, and the one way
they are run through a model to collect per-layer input statistics (`collect_inputs`).

From `--calibration PATH` (text files or directories, read like training data): the text is
tokenised and cut into consecutive windows of `length` tokens, the first `samples` of them. Without a
path the model writes its own: `samples` sequences sampled at temperature 1 from the empty prompt,
which follow the distribution the model has learnt (no text leaves the model; slower, since it
generates them token by token).

The calibrated methods go one transformer block at a time (`CalibrationPass`): each named layer's
input is fed to its statistic while the calibration rows run through one block, and a block's layers
see inputs computed by the blocks before it as already compressed. The hidden states entering the
next block are kept between calls, so measuring every block costs two block forwards per row and
block, not a forward from the embedding up for each block (O(layers) rather than O(layers²): SmolLM2
has 30). Units that are not blocks (the LM head) get one whole forward per row (`collect_inputs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

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


class InputStatistic(Protocol):
    def add(self, x: Tensor) -> None: ...


class _StopForward(Exception):
    """Raised after the block being measured: the rest of the forward is not needed."""


def collect_inputs(model: nn.Module, unit: str, stats: dict[str, InputStatistic], calibration: Tensor) -> None:
    """Run every calibration row through `model` up to the end of module `unit` (a block; or a layer
    named in `stats`, such as the head, where the whole forward runs), adding each layer's input to
    stats[layer name]."""
    hooks = [model.get_submodule(name).register_forward_pre_hook(lambda _m, args, s=stat: s.add(args[0]))
             for name, stat in stats.items()]
    if unit not in stats:  # a block: nothing after it is needed

        def stop(*_: Any) -> None:
            raise _StopForward

        hooks.append(model.get_submodule(unit).register_forward_hook(stop))
    try:
        with torch.no_grad():
            for row in calibration:
                try:
                    model(row[None])
                except _StopForward:
                    pass
    finally:
        for hook in hooks:
            hook.remove()


class CalibrationPass:
    """The calibration rows carried through a decoder's blocks in order (see the module docstring).
    `collect(unit, stats)` must be called for blocks in increasing order, each after the blocks before
    it were compressed; asking for an earlier block starts again from the embedding."""

    def __init__(self, model: nn.Module, calibration: Tensor) -> None:
        self.model, self.calibration = model, calibration
        self.blocks = list(model.stack.blocks)
        self.states: list[tuple[Tensor, dict[str, Any]]] = []  # per row: (hidden state, block kwargs)
        self.position = -1  # the block whose inputs `states` holds; -1: none captured yet

    def collect(self, unit: str, stats: dict[str, InputStatistic]) -> None:
        prefix, _, index = unit.rpartition(".")
        if prefix != "stack.blocks" or not index.isdigit():
            collect_inputs(self.model, unit, stats, self.calibration)
            return
        self._advance(int(index))
        hooks = [self.model.get_submodule(name).register_forward_pre_hook(lambda _m, args, s=stat: s.add(args[0]))
                 for name, stat in stats.items()]
        try:
            with torch.no_grad():
                for x, kwargs in self.states:
                    self.blocks[self.position](x, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    def _advance(self, index: int) -> None:
        if self.position < 0 or index < self.position:
            self._capture()
        with torch.no_grad():
            while self.position < index:  # through the blocks before `index`, as they are now
                block = self.blocks[self.position]
                self.position += 1
                self.states = [(block(x, **kwargs), {**kwargs, "layer": self.position}) for x, kwargs in self.states]

    def _capture(self) -> None:
        """Every row's input to the first block, with the keyword arguments the stack passes it."""
        self.states = []

        def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.states.append((args[0], kwargs))
            raise _StopForward

        hook = self.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for row in self.calibration:
                    try:
                        self.model(row[None])
                    except _StopForward:
                        pass
        finally:
            hook.remove()
        self.position = 0
