"""A pruned model on disk: an ordinary llmkit model directory that `llmkit.load` and every `--model`
command read, its config.json recording what was done under "pruning".

    DIR/config.json        {"format": "llmkit", "model": ModelConfig (structured: the smaller sizes),
                            "chat": …, "pruning": {method, pattern, sparsity, scope, measured_sparsity, …}}
    DIR/model.safetensors  every tensor, dense (unstructured and 2:4 zeros are stored as zeros)
    DIR/tokenizer.json

With a recovery fine-tune, DIR is instead a training run directory (checkpoints/, metrics.jsonl,
loss.png) whose checkpoint config.json carries the same "pruning" object. Either way the directory is
built under a temporary name beside DIR and renamed at the end, so a refused or failed run leaves
nothing at DIR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from llmkit.io.finetuned import chat_info_json
from llmkit.io.output_dir import run_config_json, write_config_json
from llmkit.io.weights import model_tensors
from llmkit.quant.saved import new_directory


def pruned_meta(lm: Any, pruning: dict[str, Any] | None) -> dict[str, Any]:
    return run_config_json(lm.model.cfg, chat=chat_info_json(lm), **({} if pruning is None else {"pruning": pruning}))


def write_pruned(lm: Any, directory: Path, pruning: dict[str, Any] | None) -> None:
    """The model files of pruned `lm` into an existing `directory` (pruning None: a plain llmkit model
    directory, as the compression benchmark writes its fp32 row)."""
    tensors = {k: v.detach().contiguous() for k, v in model_tensors(lm.model).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "llmkit-pruned"})
    lm.tokenizer.save(directory)
    write_config_json(directory, pruned_meta(lm, pruning))


def save_pruned(lm: Any, out: str | Path, pruning: dict[str, Any] | None) -> Path:
    """Write pruned `lm` as the new directory `out`."""
    out = Path(out)
    with new_directory(out) as tmp:
        write_pruned(lm, tmp, pruning)
    return out
