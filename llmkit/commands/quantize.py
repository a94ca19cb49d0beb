"""`llmkit quantize`: write a model with int8 or int4 weights (round-to-nearest, GPTQ or AWQ) as a
directory that `llmkit.load` and every `--model` command run quantised (registered by llmkit.cli).

Flags are checked before anything is loaded; the output is written under a temporary name beside
--out and renamed at the end, so a refused or failed run leaves no directory behind.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def cmd_quantize(args: argparse.Namespace) -> None:
    """Quantise --model by --method/--bits/--group-size into --out."""
    import torch

    import llmkit
    from llmkit.commands.progress import Progress
    from llmkit.errors import ConfigError
    from llmkit.quant.apply import check_quantizable, quantize_model
    from llmkit.io.output_dir import check_output_dir
    from llmkit.quant.saved import save_quantized
    from llmkit.quant.scheme import QuantScheme
    from llmkit.runtime import set_threads

    scheme = QuantScheme.create(args.method, args.bits, args.group_size, args.symmetric)
    out = check_output_dir(args.out, empty=True)
    if args.calibration_samples < 1:
        raise ConfigError(f"--calibration-samples must be ≥ 1, got {args.calibration_samples}")
    if scheme.method == "rtn" and args.calibration is not None:
        raise ConfigError("--calibration is read by --method gptq and awq; round-to-nearest needs none")
    if args.calibration is not None and not Path(args.calibration).exists():
        raise ConfigError(f"--calibration {args.calibration}: no such file or directory")
    set_threads(args.threads)
    progress = Progress()
    started = time.perf_counter()
    lm = llmkit.load(args.model, dtype="fp32")  # on the CPU: codes are chosen from full-precision weights
    check_quantizable(lm.model)
    refuse_heads(lm)
    calibration = calibration_from_flags(lm, args, progress) if scheme.method != "rtn" else None

    def on_event(kind: str, info: dict) -> None:
        if scheme.method != "rtn":
            progress.say(f"{scheme.method}: {info['name']} ({info['layers']} linear) done, {info['index']}/"
                         f"{info['total']}, {info['seconds']:.1f} s")

    with torch.no_grad():
        report = quantize_model(lm.model, scheme, calibration=calibration, on_event=on_event)
    save_quantized(lm, out)
    names = ", ".join(report.kept[:3]) + (f" and {len(report.kept) - 3} more" if len(report.kept) > 3 else "")
    kept = (f"; {len(report.kept)} kept in full precision (in_features not a multiple of the group): {names}"
            if report.kept else "")
    size = (out / "model.safetensors").stat().st_size / 1e6
    print(f"wrote {out}: {scheme.describe()}, {report.quantized} linear layers quantised{kept}; "
          f"model.safetensors {size:.1f} MB [{time.perf_counter() - started:.0f} s]", file=sys.stderr)


def refuse_heads(lm, command: str = "llmkit quantize") -> None:
    """A reward model's head is not a language model's: `llmkit score` rebuilds it in full precision,
    so a quantised (or pruned) copy of it could not be scored; refused rather than silently dropped."""
    from llmkit.errors import ConfigError
    from llmkit.io.checkpoint import read_json

    config = lm.path / "config.json"
    meta = read_json(config) if lm.path.is_dir() and config.exists() else None
    if isinstance(meta, dict) and meta.get("heads"):
        raise ConfigError(f"{lm.path}: a model with extra heads ({', '.join(map(str, meta['heads']))}); "
                          f"{command} writes language models only")


def calibration_from_flags(lm, args: argparse.Namespace, progress):
    """The calibration token rows of --calibration (text) or, without it, sampled from the model itself
    (--calibration-samples of them, seeded by --seed); what `quantize` and `prune` both read."""
    from llmkit.quant.calibrate import model_calibration, sample_length, text_calibration

    length = sample_length(lm.config.max_seq_len)
    if args.calibration is not None:
        calibration = text_calibration(lm, args.calibration, samples=args.calibration_samples, length=length)
        source = f"{args.calibration}"
    else:
        progress.say(f"calibration: sampling {args.calibration_samples} sequences of {length} tokens "
                     "from the model (no --calibration given) …")
        calibration = model_calibration(lm, samples=args.calibration_samples, length=length, seed=args.seed)
        source = "the model's own samples"
    progress.say(f"calibration: {calibration.shape[0]} × {calibration.shape[1]} tokens from {source}")
    return calibration


def register(sub: argparse._SubParsersAction) -> None:
    """Add `quantize` to the `llmkit` parser."""
    from llmkit.quant.calibrate import DEFAULT_SAMPLES
    from llmkit.quant.scheme import METHODS

    p = sub.add_parser("quantize", help="write a model with int8/int4 weights (round-to-nearest, GPTQ or AWQ)",
                       description="Quantise every linear layer and the LM head of a decoder; the output "
                                   "directory loads with llmkit.load and runs with any --model command.")
    p.add_argument("--model", required=True, metavar="SRC", help="a model directory or .gguf file")
    p.add_argument("--method", choices=METHODS, default="rtn",
                   help="rtn (round-to-nearest), gptq (second-order, error feedback) or awq (activation-aware "
                        "scaling) (default: rtn)")
    p.add_argument("--bits", type=int, choices=(8, 4), default=4, help="8 or 4 (default: 4)")
    p.add_argument("--group-size", type=int, default=None, metavar="G",
                   help="weights of a row sharing a scale (default: 128 for int4, one per output channel for int8)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="int4 codes centred on 0, no offset (int8 always is)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false",
                     help="int4 codes spanning each group's min..max (default for int4)")
    p.add_argument("--calibration", metavar="PATH",
                   help="text files or a directory for gptq/awq (default: samples the model writes itself)")
    p.add_argument("--calibration-samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"calibration sequences of up to 256 tokens (default: {DEFAULT_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="for the model's own calibration samples (default: 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: one per core)")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory (must not hold files)")
    p.set_defaults(handler=cmd_quantize)
