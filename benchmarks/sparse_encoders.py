#!/usr/bin/env python
"""Memory and time of one encoder forward with transformers' Longformer and BigBird settings (issue 16, item 6).

    .venv/bin/python benchmarks/sparse_encoders.py               # 1k, 4k, 16k tokens (full at 16k: over a minute)
    .venv/bin/python benchmarks/sparse_encoders.py --lengths 1024 4096 --skip-full-above 4096

What `llmkit.load` builds from a LongformerModel / BigBirdModel directory (llmkit/io/hf_longformer.py,
hf_bigbird.py), untrained (memory and time do not depend on the weights): a post-norm encoder, 2 layers,
width 256, 4 heads, over a padded batch of 2 rows (the second padded from 3/4 of the length), with global
tokens marked 2 in the attention mask at different positions in each row — the case the parity tests
check. Longformer: transformers' attention_window 512 (256 each side) with global projections; BigBird:
blocks of 64, 3 random blocks, first and last block global. Full attention is the same encoder with
attention_pattern "full" (the padding mask only). Each row runs in its own process (a fresh peak);
peak MB = resident memory added by the forward (VmHWM reset; benchmarks/long_context.py's probe).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

PATTERNS = {
    "full attention": {},
    "longformer (transformers' settings)": dict(attention_pattern="longformer", attention_window=257,
                                                attention_global_projections=True),
    "bigbird (transformers' settings)": dict(attention_pattern="bigbird", attention_window=128,
                                             attention_block_size=64, attention_global_tokens=64,
                                             attention_global_last_block=True, attention_random_blocks=3,
                                             attention_dense_up_to=(5 + 2 * 3) * 64),
}


def one_forward(pattern: dict, length: int, threads: int) -> tuple[float, float]:
    """(peak MB, seconds) of one forward, in this process."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from long_context import peak_mb

    from llmkit.config import ModelConfig
    from llmkit.models.masked_lm import MaskedLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = ModelConfig(arch="encoder", vocab_size=512, max_seq_len=length, d_model=256, n_layers=2, n_heads=4,
                      norm_position="post", embed_norm=True, type_vocab_size=1, mlm_head=False, **pattern)
    model = MaskedLM(cfg).eval()
    ids = torch.randint(0, 512, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 3 * length // 4:] = 0
    if pattern:  # globals chosen by the mask, different by row
        mask[0, [0, length // 3, length // 2]] = 2
        mask[1, [0, 17]] = 2
    with torch.inference_mode():
        model.hidden_states(ids[:, :256], mask[:, :256])  # warm-up
        return peak_mb(lambda: model.hidden_states(ids, mask))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--skip-full-above", type=int, default=16384, help="longest full-attention run")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "pattern|length", run in a child
    args = parser.parse_args()
    if args.one:
        name, length = args.one.split("|")
        print(json.dumps(one_forward(PATTERNS[name], int(length), args.threads)))
        return
    import torch

    from llmkit.runtime import cpu_capability

    print(f"CPU: {platform.processor() or platform.machine()}, torch capability {cpu_capability()}, "
          f"{args.threads} thread(s); torch {torch.__version__}\n")
    print("| pattern | " + " | ".join(f"{n / 1024:g}k MB" for n in args.lengths) + " | "
          + " | ".join(f"{n / 1024:g}k s" for n in args.lengths) + " |")
    print("|---|" + "---:|" * (2 * len(args.lengths)))
    for name in PATTERNS:
        cells = {}
        for length in args.lengths:
            if not PATTERNS[name] and length > args.skip_full_above:
                continue
            child = [sys.executable, __file__, "--one", f"{name}|{length}", "--threads", str(args.threads)]
            run = subprocess.run(child, capture_output=True, text=True, check=True)
            cells[length] = json.loads(run.stdout.splitlines()[-1])
        mbs = [f"{cells[n][0]:,.0f}" if n in cells else "—" for n in args.lengths]
        secs = [f"{cells[n][1]:.2f}" if n in cells else "—" for n in args.lengths]
        print(f"| {name} | " + " | ".join(mbs) + " | " + " | ".join(secs) + " |")


if __name__ == "__main__":
    main()
