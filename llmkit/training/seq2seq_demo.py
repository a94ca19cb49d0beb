"""The encoder-decoder demo: learn to spell numbers in English words, from scratch, in minutes on a CPU.

The task is synthetic, so it needs no download and its answer is checkable: "40721" → "forty
thousand seven hundred twenty-one". Random numbers below 10^6 are drawn with a seed; the held-out
numbers never occur in training, so exact-match accuracy on them measures whether the model learned
the rule (digit place → word, the "-" of 21..99, "thousand" placement) rather than the examples. A
BPE tokenizer is trained on the answers only, so every digit stays its own token and every number
word becomes one. The model is a T5- or BART-style preset trained with the one loop and decoded
greedily.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from llmkit.config import preset
from llmkit.data.seq2seq_records import Seq2SeqExample, tokenize_examples
from llmkit.errors import ConfigError
from llmkit.inference.sampling import SamplingParams
from llmkit.inference.seq2seq_generate import seq2seq_generate, source_ids
from llmkit.models.build import build_model
from llmkit.plots import plot_loss_curve
from llmkit.tokenizer import Tokenizer
from llmkit.training.config import TrainConfig
from llmkit.training.pretrain import run_config_json
from llmkit.io.run_dir import hold_run_dir
from llmkit.training.loop import Trainer
from llmkit.training.seq2seq import PairBatches, evaluate_seq2seq, seq2seq_loss
from llmkit.runtime import set_threads

Event = Callable[[str, dict[str, Any]], None]

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
LIMIT = 1_000_000


def number_to_words(n: int) -> str:
    """American English without "and": 0 → "zero", 40721 → "forty thousand seven hundred twenty-one"."""
    if not 0 <= n < LIMIT:
        raise ValueError(f"{n} is outside 0..{LIMIT - 1}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + number_to_words(n % 100) if n % 100 else "")
    return number_to_words(n // 1000) + " thousand" + (" " + number_to_words(n % 1000) if n % 1000 else "")


def make_task(n_train: int, n_test: int, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Disjoint train/test sets of (digits, words) pairs. Numbers are drawn with 1 to 6 digits equally
    often, so small numbers are not drowned out by the 900,000 six-digit ones; the test numbers are
    all ≥ 100 and none occurs in training (below 100 there are too few to hold any out)."""
    rng = random.Random(seed)

    def draw() -> int:
        digits = rng.randint(1, 6)
        return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)

    train = [draw() for _ in range(n_train)]
    seen, test = set(train), []
    while len(test) < n_test:
        n = draw()
        if n >= 100 and n not in seen:
            seen.add(n)
            test.append(n)
    return [(str(n), number_to_words(n)) for n in train], [(str(n), number_to_words(n)) for n in test]


@dataclass
class DemoResult:
    exact_match: float
    correct: int
    total: int
    seconds: float
    examples: list[tuple[str, str, str]]  # (source, expected, predicted)


def _encode(tok: Tokenizer, pairs: list[tuple[str, str]], context: int) -> list[tuple[list[int], list[int]]]:
    """Token ids as fine-tuning makes them (and generation reads them): text + EOS on both sides."""
    examples = [Seq2SeqExample(source, target, "demo") for source, target in pairs]
    return tokenize_examples(examples, tok, max_source_len=context, max_target_len=context).pairs


def run_demo(out_dir: str | Path, cfg: TrainConfig, *, n_train: int, n_test: int,
             model_overrides: dict[str, Any] | None = None, on_event: Event | None = None,
             on_step: Callable[[dict], None] | None = None) -> DemoResult:
    """Train (or resume, or reuse a finished run) and score exact match on the held-out numbers."""
    out_dir = Path(out_dir)
    emit = on_event or (lambda kind, info: None)
    set_threads(cfg.threads)
    started = time.perf_counter()
    train, test = make_task(n_train, n_test, cfg.seed)
    emit("data", {"train": len(train), "test": len(test), "example": train[2]})
    own = out_dir / "tokenizer.json"
    tokenizer = Tokenizer.load(own) if own.exists() else Tokenizer.train([t for _, t in train], cfg.vocab_size)
    model_cfg = preset(cfg.preset, **{"vocab_size": tokenizer.vocab_size, **(model_overrides or {})})
    if model_cfg.arch != "encoder-decoder":
        raise ConfigError(f"--preset {cfg.preset} is a {model_cfg.arch} model; the seq2seq demo needs an "
                          "encoder-decoder preset (t5v11-tiny, bart-tiny, …)")
    with hold_run_dir(out_dir):  # one writer per run directory (llmkit.io.run_dir)
        tokenizer.save(out_dir)
        torch.manual_seed(cfg.seed)
        model = build_model(model_cfg)
        emit("model", {"params": sum(p.numel() for p in model.parameters()), "preset": cfg.preset})
        options = dict(batch_size=cfg.batch_size, seed=cfg.seed, pad_id=tokenizer.pad_id,
                       start_id=model_cfg.decoder_start_token_id)
        batches = PairBatches(_encode(tokenizer, train, model_cfg.max_seq_len), **options)
        held_out = PairBatches(_encode(tokenizer, test, model_cfg.max_seq_len), **options)
        trainer = Trainer(
            model, cfg, loss_fn=seq2seq_loss, get_batch=batches.batch, out_dir=out_dir,
            evaluate=lambda m: evaluate_seq2seq(m, held_out.in_order(max_batches=cfg.eval_batches),
                                                ),
            checkpoint_json={"config.json": run_config_json(model_cfg)},
            checkpoint_files={"tokenizer.json": own},
            fingerprint={"model_config": model_cfg.non_default_fields(), "tokenizer": tokenizer.fingerprint(),
                         "task": [n_train, n_test], "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum})
        path = trainer.resume(emit)  # the demo always continues its run; None: there is none yet
        if path is not None:
            emit("resume", {"path": str(path), "step": trainer.state.step})
        trainer.announce(emit)

        def on_eval(row: dict) -> None:
            emit("eval", row)
            plot_loss_curve(trainer.metrics_path, out_dir / "loss.png")

        trainer.run(on_step=on_step, on_eval=on_eval)
        plot_loss_curve(trainer.metrics_path, out_dir / "loss.png")
    result = score_exact_match(model.eval(), tokenizer, test, batch_size=max(cfg.batch_size, 64))
    result.seconds = time.perf_counter() - started
    return result


def score_exact_match(model: torch.nn.Module, tokenizer: Tokenizer, pairs: list[tuple[str, str]], *,
                      batch_size: int = 64, show: int = 8) -> DemoResult:
    """Greedy-decode every source (the encoder input is text + EOS, as in training) and count the
    outputs that equal the expected text exactly."""
    predictions: list[str] = []
    greedy = SamplingParams(temperature=0.0)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        sources = [source_ids(tokenizer, s) for s, _ in chunk]
        outputs = seq2seq_generate(model, sources, max_new_tokens=32, params=greedy, eos_ids=[tokenizer.eos_id],
                                   pad_id=tokenizer.pad_id)
        predictions += [tokenizer.decode(o) for o in outputs]
    correct = sum(p == t for p, (_, t) in zip(predictions, pairs))
    shown = [(s, t, p) for (s, t), p in zip(pairs[:show], predictions[:show])]
    return DemoResult(correct / max(len(pairs), 1), correct, len(pairs), 0.0, shown)
