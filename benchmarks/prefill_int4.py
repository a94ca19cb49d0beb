#!/usr/bin/env python
"""Prefill of SmolLM2-135M-Instruct with int4 weights against fp32, by prompt length, both computing in
fp32 (the case issue 13's "int4 prefill never slower than fp32" is about on CPUs without native bf16).

Both models stay in one process and their prefills alternate, best of --repeats each, so a shared
machine's drift moves both alike (benchmarks/smollm2.py measures each row's prefill in its own turn,
which short prompts make noisy). int4 is the GGUF's own Q4_1 blocks kept at load (`--quantize auto`)
and prepared as generation prepares it: a prompt runs on llmkit's kernels up to the row count
prepare_for_decoding measured them faster than dequantise + fp32 matmul here (the first line says it;
llmkit/quant/kernels/crossover.py), a longer one dequantises each weight for that matmul.

    .venv/bin/python benchmarks/prefill_int4.py                        # 32, 64, 128, 256, 512 tokens
    .venv/bin/python benchmarks/prefill_int4.py --lengths 64,512 --repeats 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_decode import cpu_flags, cpu_name, table  # noqa: E402  (shared formatting)

import llmkit  # noqa: E402
from llmkit.commands.generation import default_chat_model  # noqa: E402
from llmkit.inference.kv_cache import KVCache  # noqa: E402
from llmkit.inference.optimize import prepare_for_decoding  # noqa: E402


def prefill_seconds(model, ids: torch.Tensor) -> float:
    cache = KVCache.empty(model.cfg, 1, ids.shape[1] + 1, dtype=torch.float32)
    with torch.inference_mode():
        started = time.perf_counter()
        model(ids, cache=cache, last_only=True)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="32,64,128,256,512", help="prompt lengths, comma-separated")
    p.add_argument("--repeats", type=int, default=8, help="prefills per model and length; the best counts (default 8)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = default_chat_model()
    fp32 = llmkit.load(path)
    int4 = llmkit.load(path, quantize="auto")
    prepare_for_decoding(fp32.model, dtype=torch.float32)
    report = prepare_for_decoding(int4.model, dtype=torch.float32)
    print(f"- CPU: {cpu_name()} ({cpu_flags()}; torch capability {torch.backends.cpu.get_cpu_capability()}), "
          f"{args.threads} threads; int4: {report.describe()}")
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.tensor([[(i * 7919) % 40000 + 100 for i in range(n)]])
        best = {"fp32": float("inf"), "int4": float("inf")}
        for _ in range(args.repeats):
            for name, lm in (("fp32", fp32), ("int4", int4)):
                best[name] = min(best[name], prefill_seconds(lm.model, ids))
        rows.append([str(n), f"{n / best['fp32']:,.0f}", f"{n / best['int4']:,.0f}",
                     f"{best['fp32'] / best['int4']:.2f}"])
    print(table(["prompt tokens", "fp32 tok/s", "int4 tok/s", "int4 ÷ fp32"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
