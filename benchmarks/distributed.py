#!/usr/bin/env python
"""One process against two ranks (DDP, and FSDP2 with --fsdp) training the same model: tokens/s and the
peak memory of the largest process (issue 15).

    .venv/bin/python benchmarks/distributed.py                 # depth 8 (~27 M parameters), 12 steps each
    .venv/bin/python benchmarks/distributed.py --depth 4 --steps 6
    .venv/bin/python benchmarks/distributed.py --device cuda --ranks 4   # a machine with 4 GPUs (NCCL)

Each row is a real `llmkit train` (`torchrun --standalone --nproc_per_node=2 -m llmkit train …` for the
two-rank rows) on this interpreter's `json` and `email` packages, fp32, the same global batch
(--batch-size × --grad-accum = --ranks: one micro-batch per rank); the one process gets two threads and each rank
one, so every row uses two cores. tokens/s = the mean of metrics.jsonl's `tokens_per_s` after the first
step; peak MB = ru_maxrss of the largest process (a rank, or torchrun's agent) run under a fresh parent.
FSDP keeps 1/N of every weight, gradient and AdamW moment per rank, so its rows should hold less;
on 2 CPU cores neither is faster than one process — the point of the machinery is correctness here and
speed on a machine with several devices. With `--device cuda` every row runs on the GPUs (one per rank,
NCCL; peak MB is then the host's, not the GPUs'). The script exits non-zero if the rows' losses differ by
more than fp32 reduction order allows: it is the check to run where GPUs are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from llmkit.runtime import cpu_capability, cpu_flags

RELEVANT_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
# ru_maxrss of every process this wrapper waited for: the largest of the command's processes
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


LOSS_RTOL = 1e-4  # fp32: the ranks' gradients summed in another order, ~1e-7 a step; TF32 or NCCL trees stay far below


def run_row(name: str, ranks: int, fsdp: bool, args, corpus: Path, out: Path) -> dict:
    cores = os.cpu_count() or 2
    threads = max(1, min(2, cores) // ranks) if args.device == "cpu" else 1
    train = ["train", "--data", str(corpus), "--preset", "llama-demo", "--depth", str(args.depth),
             "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--grad-accum", str(args.ranks),
             "--seq-len", "256", "--dtype", "fp32", "--threads", str(threads), "--device", args.device,
             "--eval-interval", str(args.steps),
             "--eval-batches", "1", "--log-interval", "1", "--vocab-size", "2048", "--out", str(out / name)]
    launcher = ([sys.executable, "-m", "llmkit"] if ranks == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                 "-m", "llmkit"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-c", PEAK, *launcher, *train, *(["--fsdp"] if fsdp else [])],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
    peak_kb = int(done.stdout.split("PEAK_KB")[-1].split()[0])
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1]
    params = json.loads((sorted((out / name / "checkpoints").iterdir())[-1] / "config.json").read_text())["model"]
    return {"name": name, "tokens_per_s": statistics.mean(rates), "peak_mb": peak_kb / 1024,
            "loss": [r["train_loss"] for r in rows if "train_loss" in r][-1], "model": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=8, help="llmkit's size dial (default 8: width 512, 8 layers)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: every row on the GPUs, one per rank (NCCL) (default: cpu, gloo)")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the DDP and FSDP rows (default 2)")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        sys.exit(f"--device cuda --ranks {args.ranks} needs {args.ranks} GPUs; this machine has "
                 f"{torch.cuda.device_count()}")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for package in ("json", "email"):
            for source in sorted((stdlib / package).glob("*.py")):
                (corpus / f"{package}_{source.name}").write_bytes(source.read_bytes())
        rows = [run_row("one process", 1, False, args, corpus, Path(tmp)),
                run_row(f"{args.ranks} ranks, DDP", args.ranks, False, args, corpus, Path(tmp)),
                run_row(f"{args.ranks} ranks, FSDP", args.ranks, True, args, corpus, Path(tmp))]
    flags = ",".join(sorted(cpu_flags() & RELEVANT_FLAGS))
    print(f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch capability "
          f"{cpu_capability()}, flags {flags}; torch {torch.__version__}; depth {args.depth}, {args.steps} steps, "
          f"global batch {args.batch_size} × {args.ranks} × 256 tokens, fp32, device {args.device}"
          + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else ", two cores per row") + "\n")
    print("| run | tokens/s | vs one process | peak MB (largest process) | last loss |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['tokens_per_s']:,.0f} | {row['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}× "
              f"| {row['peak_mb']:,.0f} | {row['loss']:.4f} |")
    worst = max(abs(row["loss"] - rows[0]["loss"]) / abs(rows[0]["loss"]) for row in rows)
    print(f"\nlast losses agree to {worst:.1e} relative (allowed {LOSS_RTOL:g})")
    if worst > LOSS_RTOL:
        sys.exit(1)


if __name__ == "__main__":
    main()
