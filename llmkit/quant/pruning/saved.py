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

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from safetensors.torch import save_file

import llmkit
from llmkit.io.finetuned import chat_info_json
from llmkit.io.weights import model_tensors
from llmkit.quant.saved import check_destination


@contextlib.contextmanager
def new_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block ends without an error and
    removed when it does not."""
    check_destination(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the model readable by its writer alone
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pruned_meta(lm: Any, pruning: dict[str, Any] | None) -> dict[str, Any]:
    meta = {"format": "llmkit", "version": llmkit.__version__, "model": lm.model.cfg.to_dict(),
            "chat": chat_info_json(lm)}
    return meta if pruning is None else {**meta, "pruning": pruning}


def write_pruned(lm: Any, directory: Path, pruning: dict[str, Any] | None) -> None:
    """The model files of pruned `lm` into an existing `directory` (pruning None: a plain llmkit model
    directory, as the compression benchmark writes its fp32 row)."""
    tensors = {k: v.detach().contiguous() for k, v in model_tensors(lm.model).items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "llmkit-pruned"})
    lm.tokenizer.save(directory)
    (directory / "config.json").write_text(json.dumps(pruned_meta(lm, pruning), indent=1), encoding="utf-8")


def save_pruned(lm: Any, out: str | Path, pruning: dict[str, Any] | None) -> Path:
    """Write pruned `lm` as the new directory `out`."""
    out = Path(out)
    with new_directory(out) as tmp:
        write_pruned(lm, tmp, pruning)
    return out
