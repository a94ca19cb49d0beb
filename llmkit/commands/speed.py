"""Device, precision and speed flags of the commands that run a trained model (generate, chat,
embed, score), and the load that applies them.

    --device auto|cpu|cuda|cuda:N|mps   --dtype auto|fp32|bf16|fp16   --threads N   [--quantize auto|none|int4]

`auto` is llmkit.runtime's choice (bf16 on a CPU only where it has native bf16 and a probe measures it
faster). Each load prints one line to stderr saying what was chosen and why, e.g.
`device cpu (AVX2, 2 threads), fp32: no native bf16, int4 weights (8-bit head)`, and a second,
`warning: ...`, when an explicit --dtype bf16 was measured slower than fp32 (it still runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmkit.runtime import DEVICE_HELP, DTYPE_CHOICES

QUANTIZE_CHOICES = ("auto", "none", "int4")


def add_speed_flags(p: argparse.ArgumentParser, *, quantize: bool = True) -> None:
    """--device, --dtype, --threads and (with quantize) --quantize."""
    p.add_argument("--device", default="auto", metavar="DEVICE", help=f"{DEVICE_HELP} (default: auto)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weights and activations: auto (bf16 where this machine runs it faster, measured; else "
                        "fp32), fp32 (exact), bf16 (half the bytes per token; logits drift by a few tenths) or "
                        "fp16 (default: auto)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's, one per core)")
    if quantize:
        p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto",
                       help="auto: a GGUF file's quantised layers keep their own blocks (Q4_0, Q4_1, Q4_K, Q5_0, "
                            "Q8_0 as they are, Q6_K repacked into int8 groups): the file's weights, no "
                            "full-precision copy, the fastest decoding; any other model runs as stored. int4: "
                            "also every full-precision layer to 4 bits and the LM head to 8 (groups of 32, bf16 "
                            "scales, round-to-nearest). none: every layer in full precision (default: auto)")
        p.add_argument("--kv-cache", choices=("full", "int8"), default="full",
                       help="int8: keep past keys and values as int8 with a scale per head and position, a "
                            "quarter of fp32's memory, for long prompts (default: full, the model's dtype)")


def announce(runtime, extra: str = "") -> None:
    """The runtime line (and its warning, if any) on stderr."""
    print(runtime.describe() + (f", {extra}" if extra else ""), file=sys.stderr)
    if runtime.warning:
        print(runtime.warning, file=sys.stderr)


def load_with_flags(path: str | Path, args: argparse.Namespace):
    """llmkit.load on the device and in the precision the flags ask for; threads set first."""
    import llmkit
    from llmkit.runtime import resolve_device, set_threads

    resolve_device(args.device)  # an absent device is the one error line, before anything is read
    set_threads(args.threads)
    return llmkit.load(path, device=args.device, dtype=args.dtype, quantize=getattr(args, "quantize", None))


def place(model, args: argparse.Namespace, *, rows: int):
    """Move an already loaded `model` where the flags ask, its weights in the precision they ask for
    (auto: probed on `rows`-row products); returns the Runtime. For models llmkit.load does not build
    whole (a reward model around a loaded one)."""
    from llmkit.runtime import make_runtime

    runtime = make_runtime(args.device, args.dtype, args.threads, model=model, rows=rows, training=False)
    model.to(device=runtime.device, dtype=runtime.torch_dtype)
    return runtime


def load_for_generation(path: str | Path, args: argparse.Namespace):
    """load_with_flags, then the inference-only speed-ups (fused projections, optional int4 weights
    computing in the runtime's precision), then the runtime line on stderr."""
    from llmkit.inference.optimize import prepare_for_decoding

    lm = load_with_flags(path, args)
    # (auto: the file's own quantised layers, kept by the load, are all there is to do)
    report = prepare_for_decoding(lm.model, quantize="int4" if getattr(args, "quantize", None) == "int4" else None,
                                  dtype=lm.runtime.torch_dtype)
    lm.model.kv_cache = getattr(args, "kv_cache", "full")  # read by CausalLM.new_cache
    extra = ", ".join(x for x in (report.describe(), "int8 KV cache" if lm.model.kv_cache == "int8" else "") if x)
    announce(lm.runtime, extra)
    return lm


def check_text_flags(args: argparse.Namespace) -> None:
    """The prompt, question, --system and --stop texts are Unicode: bytes of invalid UTF-8 in an argument
    reach Python as lone surrogates (surrogateescape), which no tokenizer encodes. Checked before loading."""
    from llmkit.errors import GenerationError
    from llmkit.tokenizer.bpe import lone_surrogate

    texts = [(getattr(args, name, None), flag) for name, flag in
             (("prompt", "--prompt"), ("question", "the question"), ("system", "--system"))]
    texts += [(stop, "--stop") for stop in getattr(args, "stop", None) or ()]
    for text, flag in texts:
        problem = lone_surrogate(text, flag) if isinstance(text, str) else None
        if problem:
            raise GenerationError(problem)

