"""Next-token pretraining from text files to a checkpoint: the pipeline behind `llmkit train`.

corpus files → (train a BPE tokenizer on a sample, or load one) → token streams (cached in
out/data/, keyed by a fingerprint of the files and tokenizer) → model from a preset → the one
training loop → metrics.jsonl, checkpoints/, loss.png. Progress is reported through `on_event`
callbacks; the library itself never prints.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import llmkit
from llmkit.config import ModelConfig, preset
from llmkit.data.batches import TokenBatches, eval_batches
from llmkit.data.corpus import find_text_files, read_text_file, split_files, token_dtype, tokenize_files
from llmkit.errors import ConfigError, DatasetError
from llmkit.io.checkpoint import atomic_write_bytes, atomic_write_text, list_checkpoints
from llmkit.io.weights import load_model_tensors
from llmkit.models.build import build_model
from llmkit.plots import plot_loss_curve
from llmkit.tokenizer import Tokenizer
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer, TrainState
from llmkit.training.objectives import evaluate_lm, next_token_loss
from llmkit.runtime import set_threads

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    val_bytes_per_token: float
    fingerprint: str


def _files_fingerprint(files: list[Path], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _tokenizer_sample(files: list[Path], budget: int, seed: int) -> list[str]:
    """Whole files in a seeded random order until `budget` bytes: a sample of every kind of text."""
    order = list(files)
    random.Random(seed).shuffle(order)
    texts, size = [], 0
    for f in order:
        if size >= budget:
            break
        text = read_text_file(f)
        texts.append(text[: budget - size + 1])
        size += len(texts[-1].encode())
    return texts


def _cached_tokens(tokenizer: Tokenizer, files: list[Path], cache: Path, key: str) -> np.ndarray:
    meta_path, bin_path = cache.with_suffix(".json"), cache.with_suffix(".bin")
    dtype = token_dtype(tokenizer.vocab_size)
    if meta_path.exists() and bin_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key and bin_path.stat().st_size == meta["count"] * np.dtype(dtype).itemsize:
                return np.fromfile(bin_path, dtype=dtype)
        except (ValueError, KeyError, OSError):
            pass  # a broken cache is rebuilt, never trusted
    tokens = tokenize_files(tokenizer, files, eos_id=tokenizer.eos_id)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(bin_path, tokens.tobytes())
    atomic_write_text(meta_path, json.dumps({"key": key, "count": int(tokens.size), "dtype": str(tokens.dtype)}))
    return tokens


def prepare_corpus(paths: Sequence[str | Path], out_dir: Path, cfg: TrainConfig, *, seq_len: int,
                   tokenizer_path: str | Path | None = None, exclude: Sequence[str] = (),
                   on_event: Event | None = None, mask_token: bool = False,
                   extra_tokens: Sequence[str] = ()) -> Corpus:
    emit = on_event or (lambda kind, info: None)
    files, skipped = find_text_files(paths, exclude=exclude)
    emit("files", {"files": len(files), "skipped": skipped})
    train_files, val_files = split_files(files, cfg.val_fraction)
    own_tokenizer = out_dir / "tokenizer.json"
    if tokenizer_path is not None:
        tokenizer = Tokenizer.load(tokenizer_path)
    elif own_tokenizer.exists():
        tokenizer = Tokenizer.load(own_tokenizer)  # a resumed or repeated run keeps its tokenizer
    else:
        emit("tokenizer", {"vocab_size": cfg.vocab_size, "sample_bytes": cfg.tokenizer_sample_bytes})
        tokenizer = Tokenizer.train(_tokenizer_sample(train_files, cfg.tokenizer_sample_bytes, cfg.seed),
                                    cfg.vocab_size)
    if tokenizer.eos_id is None:
        raise DatasetError(f"{tokenizer_path}: tokenizer has no <|eos|> token to separate documents")
    if mask_token:  # masked-LM pretraining (encoders) needs a [MASK]; older tokenizers get one appended
        tokenizer.with_mask_token()
    if extra_tokens:  # a denoising objective's sentinels or mask (llmkit.training.seq2seq), appended
        from llmkit.training.seq2seq import add_special_tokens

        add_special_tokens(tokenizer, extra_tokens)
    tokenizer.save(out_dir)
    key = _files_fingerprint(files, tokenizer.fingerprint())
    emit("tokenize", {"train_files": len(train_files), "val_files": len(val_files)})
    train = _cached_tokens(tokenizer, train_files, out_dir / "data" / "train", key)
    val = _cached_tokens(tokenizer, val_files, out_dir / "data" / "val", key) if val_files else train[:0]
    val_bytes = sum(len(read_text_file(f).encode()) for f in val_files)
    if val.size < seq_len + 1:
        # Too little held-out text (one file, or tiny files): hold out the stream's tail instead.
        stream = np.concatenate([train, val])
        n_val = max(seq_len + 1, int(stream.size * cfg.val_fraction))
        if stream.size < 2 * n_val:
            raise DatasetError(f"corpus too small: {stream.size} tokens; training at --seq-len {seq_len} "
                               f"needs at least {2 * n_val}")
        train, val = stream[:-n_val], stream[-n_val:]
        val_bytes = len(tokenizer.decode(val.tolist()).encode())
    emit("tokens", {"train_tokens": int(train.size), "val_tokens": int(val.size)})
    return Corpus(tokenizer, train, val, val_bytes / max(val.size, 1), key)


# `llmkit train --arch NAME`: the family picks the default preset and must match the preset's `arch`;
# the objective then follows the model config's `arch` (see `objective`).
ARCH_PRESETS = {"gpt": ("decoder", "gpt2-demo"), "llama": ("decoder", "llama-demo"), "bert": ("encoder", "bert-demo"),
                "t5": ("encoder-decoder", "t5v11-demo"), "bart": ("encoder-decoder", "bart-demo")}


def preset_for_arch(arch: str, preset_name: str, *, explicit: bool) -> str:
    """The preset to train for `--arch`: its default unless a preset was chosen, which must fit."""
    kind, default = ARCH_PRESETS[arch]
    name = preset_name if explicit or preset_name != TrainConfig().preset else default
    if preset(name).arch != kind:
        raise ConfigError(f"--arch {arch} needs an {kind} preset; --preset {name} is {preset(name).arch}")
    return name


def seq2seq_tokens(model_cfg: ModelConfig) -> tuple[str, ...]:
    """The special tokens an encoder-decoder's pretraining objective adds to the tokenizer."""
    if model_cfg.arch != "encoder-decoder":
        return ()
    from llmkit.training.seq2seq import denoising_tokens, objective_for

    return denoising_tokens(objective_for(model_cfg))


def objective(model_cfg: ModelConfig, corpus: Corpus, seq_len: int, cfg: TrainConfig):
    """(loss_fn, get_batch, evaluate) for the model's arch: next-token prediction for decoders,
    masked-LM for encoders, denoising for encoder-decoders (T5 span corruption, BART infilling)."""
    if model_cfg.arch == "encoder-decoder":
        from llmkit.training.seq2seq import denoising_objective

        return denoising_objective(model_cfg, corpus.tokenizer, corpus.train, corpus.val, seq_len=seq_len,
                                   batch_size=cfg.batch_size, seed=cfg.seed, eval_batch_limit=cfg.eval_batches)
    if model_cfg.arch == "encoder":
        from llmkit.training.mlm import mlm_objective

        return mlm_objective(corpus.tokenizer, corpus.train, corpus.val, seq_len=seq_len, batch_size=cfg.batch_size,
                             seed=cfg.seed, eval_batch_limit=cfg.eval_batches,
                             whole_word=cfg.mlm_masking == "word")
    batches = TokenBatches(corpus.train, seq_len, cfg.batch_size, cfg.seed)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return evaluate_lm(model, eval_batches(corpus.val, seq_len, cfg.batch_size, max_batches=cfg.eval_batches),
                           bytes_per_token=corpus.val_bytes_per_token)

    return next_token_loss, batches.batch, evaluate


def build_model_config(cfg: TrainConfig, vocab_size: int, overrides: dict[str, Any] | None = None) -> ModelConfig:
    return preset(cfg.preset, **{"vocab_size": vocab_size, **(overrides or {})})


def pretrain(paths: Sequence[str | Path], out_dir: str | Path, cfg: TrainConfig, *,
             model_overrides: dict[str, Any] | None = None, tokenizer_path: str | Path | None = None,
             resume: bool = False, exclude: Sequence[str] = (), on_event: Event | None = None,
             on_step: Callable[[dict], None] | None = None,
             init_tensors: dict[str, torch.Tensor] | None = None) -> TrainState:
    """Train a causal LM on text files; see the module docstring. `init_tensors` starts from trained
    weights instead of a fresh initialisation (fine-tuning: `llmkit extend --finetune-steps`)."""
    started_at = time.perf_counter()  # --time-budget counts data preparation too
    out_dir = Path(out_dir)
    emit = on_event or (lambda kind, info: None)
    set_threads(cfg.threads)
    probe = preset(cfg.preset, **(model_overrides or {}))  # validates the preset before any data work
    seq_len = cfg.seq_len or probe.max_seq_len
    if seq_len > probe.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context ({probe.max_seq_len})")
    if not resume and list_checkpoints(out_dir / "checkpoints"):
        raise ConfigError(f"{out_dir}: already holds checkpoints; pass --resume to continue, or choose "
                          f"another --out")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        corpus = prepare_corpus(paths, out_dir, cfg, seq_len=seq_len, tokenizer_path=tokenizer_path,
                                exclude=exclude, on_event=on_event, mask_token=probe.arch == "encoder",
                                extra_tokens=seq2seq_tokens(probe))
    except Exception:
        if created:  # bad input leaves nothing behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    model_cfg = build_model_config(cfg, corpus.tokenizer.vocab_size, model_overrides)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    if init_tensors is not None:
        load_model_tensors(model, init_tensors, where="initial weights")
        model.tie_weights()
    emit("model", {"params": model_cfg.num_params(), "config": model_cfg.to_dict()})
    loss_fn, get_batch, evaluate = objective(model_cfg, corpus, seq_len, cfg)
    trainer = Trainer(
        model, cfg, loss_fn=loss_fn, get_batch=get_batch, out_dir=out_dir, evaluate=evaluate,
        checkpoint_json={"config.json": {"format": "llmkit", "version": llmkit.__version__,
                                         "model": model_cfg.to_dict()}},
        checkpoint_files={"tokenizer.json": out_dir / "tokenizer.json"},
        fingerprint={"model_config": model_cfg.non_default_fields(), "data": corpus.fingerprint,
                     "tokenizer": corpus.tokenizer.fingerprint(), "seq_len": seq_len,
                     "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum},
        started_at=started_at)
    return run_trainer(trainer, out_dir, resume=resume, emit=emit, on_step=on_step)


def run_trainer(trainer: Trainer, out_dir: Path, *, resume: bool, emit: Event,
                on_step: Callable[[dict], None] | None = None):
    """Resume when asked, then train, reporting resume/start/eval events and redrawing loss.png at
    each evaluation: every training command (pretrain, fine-tunes) ends with this."""
    if resume:
        path = trainer.resume()
        emit("resume", {"path": str(path) if path else None, "step": trainer.state.step})
    trainer.announce(emit)

    def on_eval(row: dict) -> None:
        emit("eval", row)
        plot_loss_curve(trainer.metrics_path, Path(out_dir) / "loss.png")

    state = trainer.run(on_step=on_step, on_eval=on_eval, on_event=emit)
    plot_loss_curve(trainer.metrics_path, Path(out_dir) / "loss.png")
    return state
