#!/usr/bin/env python
"""Memory and time of one forward for each attention pattern, at 1k–16k tokens (issue 16, item 6).

    .venv/bin/python benchmarks/sparse_attention.py                  # 1k, 2k, 4k, 8k, 16k tokens (~2 min)
    .venv/bin/python benchmarks/sparse_attention.py --lengths 1024 4096

The same untrained model (LLaMA-style, 2 layers, width 256, 4 heads, RoPE; memory and time do not depend
on the weights) with attention_pattern full, sliding_window (window 256), longformer (window 256 + 16
global tokens) and bigbird (window 256 in blocks of 64, 64 global tokens, 2 random blocks per query
block), each in inference mode over one sequence of random ids. Every sparse pattern runs the blocked
kernel (llmkit/layers/sparse.py: each chunk of queries against only the keys it can reach); the
"dense mask" rows are Longformer and BigBird as they ran before it — the same rule as one (T, T) mask —
up to 4k tokens. Peak MB = resident memory added by the forward (VmHWM reset per measurement;
benchmarks/long_context.py's probe); seconds = one forward after one warm-up at 1k.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_context import peak_mb  # noqa: E402  (the benchmark folder is not a package)

from llmkit.config import ModelConfig  # noqa: E402
from llmkit.layers import sparse  # noqa: E402
from llmkit.models.causal_lm import CausalLM  # noqa: E402
from llmkit.runtime import cpu_capability, cpu_flags  # noqa: E402

PATTERNS = {
    "full": dict(attention_pattern="full"),
    "sliding window": dict(attention_pattern="sliding_window", attention_window=256),
    "longformer": dict(attention_pattern="longformer", attention_window=256, attention_global_tokens=16),
    "bigbird": dict(attention_pattern="bigbird", attention_window=256, attention_block_size=64,
                    attention_global_tokens=64, attention_random_blocks=2),
}
RELEVANT_FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
DENSE_UP_TO = 4096  # past this the dense rows' T² float scores take GBs: the point is made by then


def model_for(overrides: dict, max_len: int) -> CausalLM:
    cfg = ModelConfig(vocab_size=512, max_seq_len=max_len, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4,
                      position="rope", norm="rmsnorm", mlp="swiglu", **overrides)
    return CausalLM(cfg).eval()


def dense_forward(model: CausalLM, ids: torch.Tensor) -> None:
    """The pattern as one dense mask: pattern_attention_args as it was before the blocked kernel."""
    original = sparse.pattern_attention_args

    def dense(cfg, *, causal, offset, T, key_start, key_mask, slopes, device):
        # a key mask of all ones takes the dense branch, which builds the (B, 1, T, Tk) mask from the rule
        ones = torch.ones(1, offset + T, dtype=torch.long, device=device)
        return original(cfg, causal=causal, offset=offset, T=T, key_start=key_start, key_mask=ones,
                        slopes=slopes, device=device)

    import llmkit.models.transformer as transformer
    transformer.pattern_attention_args = dense
    try:
        model(ids)
    finally:
        transformer.pattern_attention_args = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name, overrides in PATTERNS.items():
            model = model_for(overrides, max(args.lengths))
            model(torch.randint(0, 512, (1, min(args.lengths))))  # warm-up
            for length in args.lengths:
                ids = torch.randint(0, 512, (1, length))
                mb, seconds = peak_mb(lambda: model(ids))
                rows.append((name, "blocked" if name != "full" else "SDPA", length, mb, seconds))
                if name in ("longformer", "bigbird") and length <= DENSE_UP_TO:
                    mb, seconds = peak_mb(lambda: dense_forward(model, ids))
                    rows.append((name, "dense mask", length, mb, seconds))
    print(f"CPU: {platform.processor() or platform.machine()}, torch capability {cpu_capability()}, "
          f"flags {','.join(sorted(cpu_flags() & RELEVANT_FLAGS)) or 'none of ' + ','.join(sorted(RELEVANT_FLAGS))}, "
          f"{args.threads} threads; torch {torch.__version__}")
    print("\n| pattern | kernel | " + " | ".join(f"{n // 1024}k MB" for n in args.lengths) + " | "
          + " | ".join(f"{n // 1024}k s" for n in args.lengths) + " |")
    print("|---|---|" + "---:|" * (2 * len(args.lengths)))
    for name in PATTERNS:
        for kernel in ("SDPA", "blocked", "dense mask"):
            got = {length: (mb, s) for n, k, length, mb, s in rows if n == name and k == kernel}
            if not got:
                continue
            mbs = [f"{got[n][0]:,.0f}" if n in got else "—" for n in args.lengths]
            secs = [f"{got[n][1]:.2f}" if n in got else "—" for n in args.lengths]
            print(f"| {name} | {kernel} | " + " | ".join(mbs) + " | " + " | ".join(secs) + " |")


if __name__ == "__main__":
    main()
