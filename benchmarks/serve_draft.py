#!/usr/bin/env python
"""What `--draft` buys: greedy chat answers of SmolLM2-135M-Instruct (or --model) with and without a draft
model, through the same code `llmkit chat --draft` runs (load_for_generation, load_draft, lm.chat).

    .venv/bin/python benchmarks/serve_draft.py                       # fp32 model, its int4 copy as the draft
    .venv/bin/python benchmarks/serve_draft.py --draft OTHER.gguf --draft-quantize none --ks 2,4

For each prompt and each setting (no draft, then each K of --ks) the answer is generated --repeats times
and the fastest run counts (a shared machine only ever slows a run down); the table gives tokens per
second summed over the prompts, the speed-up over no draft, the share of guesses the model kept, and
whether every answer was identical to the one without a draft (it must be).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import PROMPTS, cpu_line  # noqa: E402  (benchmarks/serve.py)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--draft", help="the draft (default: the model itself, loaded with --draft-quantize)")
    p.add_argument("--dtype", default="fp32", help="the model's --dtype (default: fp32)")
    p.add_argument("--quantize", default="none", help="the model's --quantize (default: none)")
    p.add_argument("--draft-quantize", default="int4", help="the draft's weights (default: int4)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ks", default="3,5", help="draft tokens per round to try (default: 3,5)")
    p.add_argument("--prompts", type=int, default=3, help="how many of benchmarks/serve.py's prompts (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from llmkit.commands.generation import default_chat_model
    from llmkit.commands.draft import load_draft
    from llmkit.commands.speed import load_for_generation

    model = args.model or str(default_chat_model())
    flags = argparse.Namespace(device="auto", dtype=args.dtype, threads=args.threads, quantize=args.quantize,
                               kv_cache="full", draft=args.draft or model, draft_tokens=4,
                               draft_quantize=args.draft_quantize)
    lm = load_for_generation(model, flags)
    draft = load_draft(flags, lm)

    from llmkit.inference.sampling import SamplingParams
    from llmkit.inference.session import run_alone

    def answer(messages, k):
        ids = lm.chat_ids(messages)
        started = time.perf_counter()
        events = list(run_alone(lm.model, lm.tokenizer, ids, max_new_tokens=args.max_new_tokens,
                                eos_ids=lm.eos_ids, pad_id=lm.tokenizer.pad_id or 0,
                                draft=draft if k else None, draft_tokens=k or 4,
                                params=SamplingParams(temperature=0.0)))
        return [e.token_id for e in events[:-1]], time.perf_counter() - started

    # from the second prompt on: the first ("capital of France") is answered in a handful of tokens
    questions = [[{"role": "user", "content": q}] for q in PROMPTS[1:1 + args.prompts]]
    for k in (0, 4):  # one-time costs (kernels, allocator) of both paths before anything is timed
        answer(questions[0], k)

    print("# speculative decoding (--draft)\n")
    print(f"- CPU: {cpu_line()}; torch threads {torch.get_num_threads()}")
    print(f"- model {Path(model).name} --dtype {args.dtype} --quantize {args.quantize}; draft "
          f"{Path(args.draft or model).name} --draft-quantize {args.draft_quantize}; {len(questions)} chat prompts, "
          f"up to {args.max_new_tokens} greedy tokens each, fastest of {args.repeats}\n")
    print("| draft tokens K | tokens | seconds | tok/s | speed-up | guesses kept | same answers |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    reference, base = None, None
    for k in [0] + [int(x) for x in args.ks.split(",")]:
        outputs, seconds = [], 0.0
        for messages in questions:
            runs = [answer(messages, k) for _ in range(args.repeats)]
            outputs.append(runs[0][0])
            seconds += min(t for _, t in runs)
        tokens = sum(len(o) for o in outputs)
        rate = tokens / seconds
        base = base or rate
        reference = reference or outputs
        kept = "n/a"
        if k:  # the share kept, counted on one more answer per prompt by an engine's draft statistics
            from llmkit.inference.engine import Engine

            with Engine(lm.model, lm.tokenizer, max_batch=1, eos_ids=lm.eos_ids, pad_id=lm.tokenizer.pad_id or 0,
                        draft=draft, draft_tokens=k) as engine:
                for messages in questions:
                    list(engine.submit(lm.chat_ids(messages), max_new_tokens=args.max_new_tokens,
                                       params=SamplingParams(temperature=0.0)))
                stats = engine.stats()
            kept = f"{stats['draft_accepted'] / max(stats['draft_proposed'], 1):.0%}"
        print(f"| {k or 'no draft'} | {tokens} | {seconds:.2f} | {rate:.1f} | {rate / base:.2f}x | {kept} | "
              f"{'yes' if outputs == reference else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
