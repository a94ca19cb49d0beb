"""Next-token pretraining from text files to a checkpoint: the pipeline behind `llmkit train`.

corpus files → (train a BPE tokenizer on a sample, or load one) → token streams (cached in
out/data/, keyed by a fingerprint of the files and tokenizer) → model from a preset → the one
training loop → metrics.jsonl, checkpoints/, loss.png. Progress is reported through `on_event`
callbacks; the library itself never prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from llmkit.config import ModelConfig, preset
from llmkit.data.batches import TokenBatches, eval_batches
from llmkit.data.corpus import (find_text_files, read_file_bytes, read_text_file, split_files, token_dtype,
                                tokenize_files)
from llmkit.errors import CheckpointError, ConfigError, DatasetError
from llmkit.io.checkpoint import atomic_write_bytes, atomic_write_text, list_checkpoints
from llmkit.io.output_dir import check_output_dir, run_config_json  # noqa: F401 (the fine-tunes import them from here)
from llmkit.io.run_dir import hold_run_dir
from llmkit.io.safe_json import read_json
from llmkit.memory import BPE_BYTES_PER_VOCAB_ENTRY, TRAIN_BYTES_PER_PARAM, require_memory, require_model_memory
from llmkit.io.weights import load_model_tensors
from llmkit.models.build import build_model
from llmkit.plots import plot_loss_curve
from llmkit.tokenizer import Tokenizer
from llmkit.training import distributed
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer, TrainState
from llmkit.training.objectives import evaluate_lm, next_token_loss
from llmkit.training.sizing import at_depth, choose_depth, measure_tokens_per_s, parse_depth
from llmkit.runtime import make_runtime, resolve_device, set_threads, to_device

Event = Callable[[str, dict[str, Any]], None]


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray
    val_bytes_per_token: float
    fingerprint: str


def _files_fingerprint(files: list[Path], extra: str) -> str:
    """A digest of the corpus's content and of each file's path relative to the files' common
    folder (how split_files sees them): `corpus`, `/abs/corpus` and a copy elsewhere all match,
    while an edited, added or renamed file does not."""
    root = os.path.commonpath([os.path.abspath(f) for f in files]) if len(files) > 1 else None
    h = hashlib.sha256(extra.encode())
    for f in files:
        relative = Path(os.path.relpath(os.path.abspath(f), root)).as_posix() if root else f.name
        h.update(f"{relative}\0{hashlib.blake2b(read_file_bytes(f)).hexdigest()}\n".encode())
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


def _cached_tokens(tokenizer: Tokenizer, files: list[Path], cache: Path, key: str, emit: Event) -> np.ndarray:
    """The token stream of `files`, from out/data/ when its key (corpus and tokenizer) and the
    checksum of its bytes match, else encoded again and cached; a cache that fails its checksum
    is rebuilt with one warning, never trusted (damaged bytes would be wrong or out-of-range ids)."""
    meta_path, bin_path = cache.with_suffix(".json"), cache.with_suffix(".bin")
    dtype = token_dtype(tokenizer.vocab_size)
    if meta_path.exists() and bin_path.exists():
        try:
            meta = read_json(meta_path, what="token cache metadata", error=CheckpointError)
            data = bin_path.read_bytes() if meta.get("key") == key and meta.get("blake2b") else None
        except (CheckpointError, OSError, AttributeError):
            data = None  # unreadable metadata: rebuilt like a stale cache
        if data is not None:
            if hashlib.blake2b(data).hexdigest() == meta.get("blake2b") and meta.get("dtype") == np.dtype(dtype).name:
                return np.frombuffer(data, dtype=dtype).copy()
            emit("warning", {"message": f"{bin_path}: token cache fails its checksum; rebuilding it"})
    tokens = tokenize_files(tokenizer, files, eos_id=tokenizer.eos_id)
    cache.parent.mkdir(parents=True, exist_ok=True)
    data = tokens.tobytes()
    atomic_write_bytes(bin_path, data)
    atomic_write_text(meta_path, json.dumps({"key": key, "count": int(tokens.size), "dtype": tokens.dtype.name,
                                             "blake2b": hashlib.blake2b(data).hexdigest()}))
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
        require_memory(f"training a BPE tokenizer (vocab {cfg.vocab_size:,})",
                       cfg.vocab_size * BPE_BYTES_PER_VOCAB_ENTRY + cfg.tokenizer_sample_bytes)
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
    train = _cached_tokens(tokenizer, train_files, out_dir / "data" / "train", key, emit)
    val = _cached_tokens(tokenizer, val_files, out_dir / "data" / "val", key, emit) if val_files else train[:0]
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


def sized_config(model_cfg: ModelConfig, cfg: TrainConfig, corpus: Corpus, seq_len: int, out_dir: Path, *,
                 resume: bool, started_at: float, emit: Event) -> ModelConfig:
    """--depth N: the preset's model at that depth. --depth auto: the depth for the time left, from one
    measured training pass of the preset's own model (a resumed run keeps the depth it started with)."""
    depth = parse_depth(cfg.depth)
    if depth is None:
        return model_cfg
    if depth == "auto":
        saved = list_checkpoints(out_dir / "checkpoints") if resume else []
        if saved:
            depth = read_json(saved[-1] / "config.json", what="checkpoint config")["model"]["n_layers"]
        else:
            torch.manual_seed(cfg.seed)
            model = build_model(model_cfg)
            runtime = make_runtime(cfg.device, cfg.dtype, cfg.threads, model=model, rows=cfg.batch_size * seq_len,
                                   training=True)
            model.to(runtime.device)
            loss_fn, get_batch, _ = objective(model_cfg, corpus, seq_len, cfg)
            rate = measure_tokens_per_s(model, loss_fn, to_device(get_batch(0), runtime.device), runtime.autocast,
                                        cfg.batch_size * seq_len)
            left = cfg.time_budget * 60 - (time.perf_counter() - started_at)
            choice = choose_depth(model_cfg, rate, left, seq_len)
            emit("depth", {"line": choice.line, "depth": choice.depth, "tokens_per_s": rate})
            depth = int(distributed.from_main([choice.depth])[0])  # under torchrun: rank 0's measurement
    return at_depth(model_cfg, depth)


def build_model_config(cfg: TrainConfig, vocab_size: int, overrides: dict[str, Any] | None = None) -> ModelConfig:
    return preset(cfg.preset, **{"vocab_size": vocab_size, **(overrides or {})})


def pretrain(paths: Sequence[str | Path], out_dir: str | Path, cfg: TrainConfig, *,
             model_overrides: dict[str, Any] | None = None, tokenizer_path: str | Path | None = None,
             resume: bool = False, exclude: Sequence[str] = (), on_event: Event | None = None,
             on_step: Callable[[dict], None] | None = None,
             init_tensors: dict[str, torch.Tensor] | None = None, fsdp: bool = False) -> TrainState:
    """Train a causal LM on text files; see the module docstring. `init_tensors` starts from trained
    weights instead of a fresh initialisation (fine-tuning: `llmkit extend --finetune-steps`); `fsdp`
    shards the model over torchrun's ranks (llmkit/training/distributed.py)."""
    started_at = time.perf_counter()  # --time-budget counts data preparation too
    out_dir = Path(out_dir)
    emit = on_event or (lambda kind, info: None)
    set_threads(cfg.threads)
    distributed.check_split(cfg.grad_accum, fsdp=fsdp)
    probe = preset(cfg.preset, **(model_overrides or {}))  # validates the preset before any data work
    seq_len = cfg.seq_len or probe.max_seq_len
    if seq_len > probe.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context ({probe.max_seq_len})")
    # Will the model fit? Checked before any file is written, with the vocabulary the run will
    # train (or the preset's, for a given tokenizer), then again with the real one.
    device = resolve_device(cfg.device)
    planned = probe.replace(vocab_size=cfg.vocab_size) if tokenizer_path is None else probe
    require_model_memory(planned, bytes_per_param=TRAIN_BYTES_PER_PARAM, device=device, what="training the model")
    created = not out_dir.exists()
    main = distributed.world().main  # under torchrun, rank 0 holds the lock and prepares the data first
    with hold_run_dir(out_dir) if main else contextlib.nullcontext():  # one writer: a second run is refused
        check_output_dir(out_dir, resume=resume)
        try:
            with distributed.main_rank_first():  # the others then find its tokenizer and token caches
                corpus = prepare_corpus(paths, out_dir, cfg, seq_len=seq_len, tokenizer_path=tokenizer_path,
                                        exclude=exclude, on_event=on_event, mask_token=probe.arch == "encoder",
                                        extra_tokens=seq2seq_tokens(probe))
            model_cfg = build_model_config(cfg, corpus.tokenizer.vocab_size, model_overrides)
            model_cfg = sized_config(model_cfg, cfg, corpus, seq_len, out_dir, resume=resume, started_at=started_at,
                                     emit=emit)
            require_model_memory(model_cfg, bytes_per_param=TRAIN_BYTES_PER_PARAM, device=device,
                                 what="training the model")
            torch.manual_seed(cfg.seed)
            model = build_model(model_cfg)
        except Exception:
            if created and main:  # bad input leaves nothing behind
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
        if init_tensors is not None:
            load_model_tensors(model, init_tensors, where="initial weights")
            model.tie_weights()
        emit("model", {"params": model_cfg.num_params(), "config": model_cfg.to_dict()})
        loss_fn, get_batch, evaluate = objective(model_cfg, corpus, seq_len, cfg)
        trainer = Trainer(
            model, cfg, loss_fn=loss_fn, get_batch=get_batch, out_dir=out_dir, evaluate=evaluate,
            checkpoint_json={"config.json": run_config_json(model_cfg)},
            checkpoint_files={"tokenizer.json": out_dir / "tokenizer.json"},
            fingerprint={"model_config": model_cfg.non_default_fields(), "data": corpus.fingerprint,
                         "tokenizer": corpus.tokenizer.fingerprint(), "seq_len": seq_len,
                         "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum},
            started_at=started_at, fsdp=fsdp)
        return run_trainer(trainer, out_dir, resume=resume, emit=emit, on_step=on_step)


# ---- what every training command shares: its output directory and config.json (llmkit/io/output_dir.py,
# imported from here by the fine-tunes), its run ---------------------------------------------------------

def run_trainer(trainer: Trainer, out_dir: Path, *, resume: bool, emit: Event,
                on_step: Callable[[dict], None] | None = None):
    """Resume when asked, then train, reporting resume/start/eval events and redrawing loss.png at
    each evaluation: every training command (pretrain, fine-tunes) ends with this."""
    if resume:
        path = trainer.resume(emit)
        emit("resume", {"path": str(path) if path else None, "step": trainer.state.step})
    trainer.announce(emit)

    def on_eval(row: dict) -> None:
        emit("eval", row)
        plot_loss_curve(trainer.metrics_path, Path(out_dir) / "loss.png")

    state = trainer.run(on_step=on_step, on_eval=on_eval, on_event=emit)
    if trainer.world.main:
        plot_loss_curve(trainer.metrics_path, Path(out_dir) / "loss.png")
    return state
