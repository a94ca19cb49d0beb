#!/usr/bin/env python
"""How much a recipe learns per second: the demo's recipe beside a nanoGPT-equivalent one.

Both recipes train on the same corpus (this interpreter's standard library, as `llmkit demo` does)
for the same wall-clock budget on the same machine, one after the other; each trains its own BPE
tokenizer and tokenises the corpus inside its budget. They are then scored in bits per byte — a
unit that does not depend on the tokenizer — on Python source that is not in the training corpus:
an installed package's source files, named in the output with their size and sha256.

- demo: `llmkit demo`'s settings (DEMO_DEFAULTS in llmkit/commands/pretraining.py), precision `auto`.
- nanogpt: nanoGPT's recipe built from llmkit's parts — GPT-2 style (learned positions, LayerNorm,
  GELU), 6 layers, 6 heads, width 384, context 256; AdamW lr 1e-3, betas (0.9, 0.99), weight
  decay 0.1, cosine decay over the planned steps; batch 16; vocabulary 8192; fp32, as nanoGPT runs
  on a CPU (its autocast context is off there).

    .venv/bin/python benchmarks/learning.py                  # 5-minute budget each (~11 minutes)
    .venv/bin/python benchmarks/learning.py --budget 1       # a quicker look

Run it alone: on a 2-core machine anything else running distorts the budget's use. Benchmarks
print; they never assert.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llmkit
from llmkit.commands.pretraining import DEMO_DEFAULTS
from llmkit.data.corpus import find_text_files, read_text_file
from llmkit.config import ModelConfig
from llmkit.runtime import cpu_capability, cpu_flags, native_bf16
from llmkit.training.config import TrainConfig
from llmkit.training.pretrain import pretrain

NANOGPT = dict(preset="gpt2-mini", batch_size=16, seq_len=256, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1,
               schedule="cosine", warmup_steps=20, min_lr_ratio=0.1, vocab_size=8192, dtype="fp32",
               eval_interval=50, eval_batches=10)
# Variants of the demo's recipe, for choosing it (`--recipes demo,muon,...`): (training, model) changes.
VARIANTS = {
    "demo": ({}, {}),
    "fp32": ({"dtype": "fp32"}, {}),
    "muon": ({"optimizer": "muon"}, {}),
    "qk-norm": ({}, {"qk_norm": True}),
    "relu2": ({}, {"mlp": "relu2"}),
    "zero-init": ({}, {"zero_init_residual": True}),
    "softcap": ({}, {"logit_softcap": 30.0}),
    "untied": ({}, {"tie_embeddings": False}),
    "gpt2": ({"preset": "gpt2-demo"}, {}),
    "seq128": ({"seq_len": 128, "batch_size": 32}, {}),
    "lr2e-3": ({"lr": 2e-3}, {}),
}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
HELD_OUT_PACKAGE = "jinja2"  # pure-Python source installed beside llmkit, not part of the stdlib corpus


def recipe(spec: str, recipes: dict[str, tuple[dict, dict]]) -> tuple[dict, dict]:
    """A named recipe, or one with changes: `demo+lr=2e-3+n_layers=3` (TrainConfig or ModelConfig fields)."""
    name, *changes = spec.split("+")
    if name not in recipes:
        sys.exit(f"error: unknown recipe {name!r}; choose from {', '.join(recipes)}")
    settings, model = dict(recipes[name][0]), dict(recipes[name][1])
    for change in changes:
        key, sep, raw = change.partition("=")
        if not sep or key not in TRAIN_FIELDS | MODEL_FIELDS:
            sys.exit(f"error: {change!r} in recipe {spec!r} is not FIELD=VALUE of TrainConfig or ModelConfig")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        (settings if key in TRAIN_FIELDS else model)[key] = value
    return settings, model


def held_out_text(package: str) -> tuple[str, str]:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: the held-out package {package} is not installed")
    root = Path(spec.submodule_search_locations[0])
    files = sorted(root.rglob("*.py"))
    text = "\n".join(read_text_file(f) for f in files)
    data = text.encode()
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    where = (f"{package} {version} source: {len(files)} files, "
             f"{len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}…")
    return text, where


@torch.inference_mode()
def bits_per_byte(run: Path, text: str) -> float:
    """Next-token loss over the text in windows of the model's context, in bits per byte of text."""
    lm = llmkit.load(run)
    ids = torch.tensor(lm.tokenizer.encode(text))
    context = lm.model.cfg.max_seq_len
    total = 0.0
    for start in range(0, ids.numel() - 1, context):
        window = ids[start:start + context + 1]
        if window.numel() < 2:
            break
        logits = lm.model(window[None, :-1])
        total += float(F.cross_entropy(logits[0].float(), window[1:], reduction="sum"))
    return total / math.log(2) / len(text.encode())


def train(name: str, settings: dict, budget_min: float, out: Path, data: list[str],
          model: dict | None = None) -> dict:
    cfg = TrainConfig(**{**settings, "steps": 100_000, "time_budget": budget_min})
    started = time.perf_counter()
    events: dict[str, dict] = {}
    state = pretrain(data, out / name, cfg, exclude=("site-packages", "__pycache__"), model_overrides=model,
                     on_event=lambda kind, info: events.setdefault(kind, info))
    seconds = time.perf_counter() - started
    return {"name": name, "steps": state.step, "tokens": state.tokens_seen, "seconds": seconds,
            "params": events["model"]["params"], "runtime": events["runtime"]["line"],
            "prep_s": events["plan"]["elapsed_s"] if "plan" in events else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=5.0, help="minutes per recipe (default: 5)")
    parser.add_argument("--out", default="runs/learning-benchmark", help="where the runs go (replaced)")
    parser.add_argument("--held-out", default=HELD_OUT_PACKAGE, help="installed package whose source is scored")
    parser.add_argument("--recipes", default="nanogpt,demo",
                        help=f"comma-separated, the first is the baseline: nanogpt, {', '.join(VARIANTS)}, "
                             "each optionally with changes, e.g. demo+lr=2e-3+n_layers=3 (default: nanogpt,demo)")
    args = parser.parse_args()
    import shutil

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    stdlib = sysconfig.get_paths()["stdlib"]
    text, where = held_out_text(args.held_out)
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx", "avx2", "avx512f")))
    print(f"CPU: torch capability {cpu_capability()}, native bf16 {native_bf16()}, flags {' '.join(flags)}; "
          f"{torch.get_num_threads()} threads")
    print(f"corpus: {stdlib} ({len(find_text_files([stdlib], exclude=('site-packages', '__pycache__'))[0])} files)")
    print(f"held out: {where}")
    demo = {k: v for k, v in DEMO_DEFAULTS.items() if k not in ("steps", "time_budget")}
    recipes = {"nanogpt": (NANOGPT, {})}
    recipes.update({name: ({**demo, **changes}, model) for name, (changes, model) in VARIANTS.items()})
    results = []
    for name in args.recipes.split(","):
        settings, model = recipe(name, recipes)
        print(f"training {name} for {args.budget:g} minutes …", flush=True)
        row = train(name, settings, args.budget, out, [stdlib], model)
        row["bpb"] = bits_per_byte(out / name, text)
        results.append(row)
        print(f"  {row['runtime']}; {row['steps']} steps, {row['tokens']:,} tokens in {row['seconds']:.0f} s; "
              f"held-out {row['bpb']:.3f} bits/byte", flush=True)
    base = results[0]["bpb"]
    print(f"\n| recipe | params | steps | tokens | wall s | of which data s | held-out bits/byte | "
          f"vs {results[0]['name']} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        print(f"| {row['name']} | {row['params'] / 1e6:.2f}M | {row['steps']} | {row['tokens']:,} | "
              f"{row['seconds']:.0f} | {row['prep_s']:.0f} | {row['bpb']:.3f} | {row['bpb'] / base:.2f}× |")


if __name__ == "__main__":
    main()
