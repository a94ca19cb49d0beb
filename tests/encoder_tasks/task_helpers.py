"""A tiny randomly initialised encoder saved as an llmkit checkpoint, with a tokenizer trained on the
task's own text (so names are whole tokens and a 2-layer model learns in seconds)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterable

from safetensors.torch import save_file

from llmkit.config import preset
from llmkit.io.weights import model_tensors
from llmkit.models.build import build_model
from llmkit.tokenizer import Tokenizer
from llmkit_command import llmkit_cmd


def tiny_encoder(directory: Path, texts: Iterable[str], *, name: str = "bert-tiny", vocab: int = 700,
                 seed: int = 0) -> Path:
    import torch

    tokenizer = Tokenizer.train(list(texts), vocab_size=vocab)
    torch.manual_seed(seed)
    model = build_model(preset(name, vocab_size=tokenizer.vocab_size))
    directory.mkdir(parents=True)
    tokenizer.save(directory)
    save_file({k: v.contiguous() for k, v in model_tensors(model).items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"format": "llmkit", "model": model.cfg.to_dict()}))
    return directory


class Runner:
    """Starts `llmkit` processes in one working directory, at once, and collects them by name."""

    def __init__(self, cwd: Path) -> None:
        import os

        self.cwd, self.procs, self.results = cwd, {}, {}
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(self, name: str, *args) -> None:
        self.procs[name] = subprocess.Popen([*llmkit_cmd(), *map(str, args)], cwd=self.cwd, env=self.env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            encoding="utf-8", errors="replace")

    def wait(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            out, err = proc.communicate(timeout=300)
            self.results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
