#!/usr/bin/env python
"""Training throughput and decode speed: llmkit side by side with Hugging Face transformers.

One run prints three tables (see benchmarks/README.md for every column):
  1. machine peaks  - measured fp32 / bf16 matmul GFLOP/s, the denominators of MFU;
  2. training       - one AdamW step of a GPT-2 shape (vocab 8192, 6 layers, 6 heads, width 384,
                      context 256, batch 8), fp32 and bf16 autocast, llmkit vs GPT2LMHeadModel;
  3. decode         - greedy batch-1 decode after prompts of 64/256/1024 tokens, with and
                      without the KV cache, llmkit vs transformers' generate().

Both libraries run the same weights (llmkit's init copied into the transformers model), the same
random batch and the same optimizer settings, so the only difference is the code. Benchmarks
print; they never assert.

    .venv/bin/python benchmarks/train_decode.py            # full run (a few minutes on 2 cores)
    .venv/bin/python benchmarks/train_decode.py --quick    # smoke run (well under a minute)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from llmkit.config import ModelConfig, preset
from llmkit.inference.generate import generate
from llmkit.inference.kv_cache import KVCache
from llmkit.inference.sampling import SamplingParams
from llmkit.models.causal_lm import CausalLM
from llmkit.training.config import TrainConfig
from llmkit.training.objectives import next_token_loss
from llmkit.training.optim import build_optimizer, parameter_groups

try:  # transformers is optional: without it the reference rows are skipped with a note
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    HF_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install
    transformers = None
    HF_ERROR = f"{type(exc).__name__}: {exc}"

VOCAB, LAYERS, HEADS, WIDTH, CONTEXT, BATCH = 8192, 6, 6, 384, 256, 8
LR, WEIGHT_DECAY, BETAS, GRAD_CLIP = 3e-4, 0.1, (0.9, 0.95), 1.0
DECODE_CONTEXT = 2048


# -- options -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per row (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 3; --quick 1)")
    p.add_argument("--new-tokens", type=int, default=None,
                   help="new tokens per decode with the KV cache (default 64; --quick 16)")
    p.add_argument("--nocache-new-tokens", type=int, default=None,
                   help="new tokens per decode without the cache (default 16; --quick 8)")
    p.add_argument("--prompt-lens", type=str, default=None,
                   help="comma-separated prompt lengths (default 64,256,1024; --quick 64,256)")
    p.add_argument("--repeats", type=int, default=None,
                   help="decode: best of R runs for prefill and cached generate (default 2; --quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer steps, shorter prompts")
    p.add_argument("--skip-hf", action="store_true", help="llmkit only (no transformers rows)")
    p.add_argument("--skip-train", action="store_true", help="skip the training table")
    p.add_argument("--skip-decode", action="store_true", help="skip the decode table")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    q = args.quick
    args.steps = args.steps if args.steps is not None else (3 if q else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (16 if q else 64)
    args.nocache_new_tokens = (args.nocache_new_tokens if args.nocache_new_tokens is not None
                               else (8 if q else 16))
    args.repeats = args.repeats if args.repeats is not None else (1 if q else 2)
    lens = args.prompt_lens or ("64,256" if q else "64,256,1024")
    args.prompt_lens = [int(s) for s in lens.split(",") if s.strip()]
    for name in ("steps", "new_tokens", "nocache_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.warmup < 0:
        p.error("--warmup must be ≥ 0")
    too_long = [n for n in args.prompt_lens
                if n < 1 or n + max(args.new_tokens, args.nocache_new_tokens) > DECODE_CONTEXT]
    if too_long:
        p.error(f"prompt lengths {too_long} do not fit the decode context of {DECODE_CONTEXT} tokens")
    return args


# -- printing ------------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list[str]], *, right: set[int] | None = None) -> str:
    """A markdown table with padded columns: readable as plain text, renders as markdown."""
    right = right if right is not None else set(range(1, len(headers)))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                          for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for row in f:
                if row.startswith("model name"):
                    return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for row in f:
                if row.startswith("flags"):
                    have = set(row.split(":", 1)[1].split())
                    return ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have) or "-"
    except OSError:
        pass
    return "?"


# -- 1. machine peaks ----------------------------------------------------------------------------

def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 8, budget_s: float = 10.0) -> float:
    """Best GFLOP/s of (n×n)@(n×n) in `dtype` (2n³ FLOPs each), after one untimed warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)
    best, start = float("inf"), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return 2 * n**3 / best / 1e9


# -- model construction --------------------------------------------------------------------------

def llmkit_config(max_seq_len: int) -> ModelConfig:
    return preset("gpt2-mini", vocab_size=VOCAB, n_layers=LAYERS, n_heads=HEADS, d_model=WIDTH,
                  max_seq_len=max_seq_len)


def hf_model(cfg: ModelConfig) -> tuple["GPT2LMHeadModel", str]:
    """GPT2LMHeadModel of the same shape; asks for SDPA attention, falls back to the default."""
    kwargs = dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                  n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    try:
        model = GPT2LMHeadModel(GPT2Config(**kwargs, attn_implementation="sdpa"))
    except Exception:  # an install without SDPA support for GPT-2: its default
        model = GPT2LMHeadModel(GPT2Config(**kwargs))
    impl = getattr(model.config, "_attn_implementation", None) or "default"
    return model, impl


@torch.no_grad()
def copy_llmkit_into_hf(src: CausalLM, dst: "GPT2LMHeadModel") -> None:
    """Load llmkit's GPT-2 weights into GPT2LMHeadModel (Conv1D stores weights transposed; the
    fused c_attn holds q, k, v side by side), so both libraries run identical numbers."""
    t = dst.transformer
    t.wte.weight.copy_(src.embeddings.embed.weight)
    t.wpe.weight.copy_(src.embeddings.pos_embed.weight)
    for blk, h in zip(src.stack.blocks, t.h):
        a = blk.attn
        h.ln_1.weight.copy_(blk.norm1.weight)
        h.ln_1.bias.copy_(blk.norm1.bias)
        h.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0).T)
        h.attn.c_attn.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0))
        h.attn.c_proj.weight.copy_(a.o_proj.weight.T)
        h.attn.c_proj.bias.copy_(a.o_proj.bias)
        h.ln_2.weight.copy_(blk.norm2.weight)
        h.ln_2.bias.copy_(blk.norm2.bias)
        h.mlp.c_fc.weight.copy_(blk.mlp.up_proj.weight.T)
        h.mlp.c_fc.bias.copy_(blk.mlp.up_proj.bias)
        h.mlp.c_proj.weight.copy_(blk.mlp.down_proj.weight.T)
        h.mlp.c_proj.bias.copy_(blk.mlp.down_proj.bias)
    t.ln_f.weight.copy_(src.stack.final_norm.weight)
    t.ln_f.bias.copy_(src.stack.final_norm.bias)
    assert dst.lm_head.weight.data_ptr() == t.wte.weight.data_ptr(), "transformers model is not tied"


# -- 2. training ---------------------------------------------------------------------------------

def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Model FLOPs per trained token (forward + backward):
    6·N_nonembedding + 6·d·V (the LM-head matmul) + 12·n_layers·d·T (attention scores and mixing)."""
    return (6 * cfg.num_params(embeddings=False) + 6 * cfg.d_model * cfg.vocab_size
            + 12 * cfg.n_layers * cfg.d_model * seq_len)


@dataclass
class TrainResult:
    name: str
    precision: str
    ms_per_step: float
    tokens_per_s: float
    loss: float


class Contestant:
    """One model + optimizer whose optimizer steps are timed (forward + cross-entropy + backward +
    clip + step + zero_grad)."""

    def __init__(self, name: str, precision: str, model: torch.nn.Module,
                 loss_fn: Callable[[torch.nn.Module, tuple], torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        self.name, self.precision, self.model, self.loss_fn, self.optimizer = name, precision, model, loss_fn, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.times: list[float] = []
        self.loss = float("nan")
        model.train()

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], record: bool) -> None:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss_t = self.loss_fn(self.model, batch)
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - t0)
        self.loss = float(loss_t.detach())

    def result(self, tokens: int) -> TrainResult:
        ms = statistics.median(self.times) * 1e3
        return TrainResult(self.name, self.precision, ms, tokens / (ms / 1e3), self.loss)


def time_interleaved(contestants: list[Contestant], batch: tuple[torch.Tensor, torch.Tensor], *,
                     warmup: int, steps: int) -> list[TrainResult]:
    """Steps alternate between contestants, so a slow spell of a shared machine hits all alike."""
    for i in range(warmup + steps):
        for c in contestants:
            c.step(batch, record=i >= warmup)
    return [c.result(batch[1].numel()) for c in contestants]


def llmkit_loss(model, batch):
    return next_token_loss(model, batch)[0]


def hf_loss(model, batch):
    x, y = batch  # the same loss as llmkit's next_token_loss, on transformers' logits
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.reshape(-1))


def run_training(args, peaks: dict[str, float], use_hf: bool) -> tuple[str, list[str]]:
    cfg = llmkit_config(CONTEXT)
    notes: list[str] = []
    g = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, VOCAB, (BATCH, CONTEXT + 1), generator=g)
    batch = (data[:, :-1].contiguous(), data[:, 1:].contiguous())  # the same batch for every row
    torch.manual_seed(args.seed)
    init = {k: v.clone() for k, v in CausalLM(cfg).state_dict().items()}
    tcfg = TrainConfig(preset="gpt2-mini", lr=LR, weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1],
                       grad_clip=GRAD_CLIP, batch_size=BATCH)

    results: list[TrainResult] = []
    impl = None
    for precision in ("fp32", "bf16"):
        model = CausalLM(cfg)
        model.load_state_dict(init)
        # AdamW(fused=True), decay only on ≥2-D non-embedding weights
        contestants = [Contestant("llmkit", precision, model, llmkit_loss, build_optimizer(model, tcfg))]
        if use_hf:
            src = CausalLM(cfg)
            src.load_state_dict(init)
            hf, impl = hf_model(cfg)
            copy_llmkit_into_hf(src, hf)
            del src
            opt = torch.optim.AdamW(parameter_groups(hf, WEIGHT_DECAY), lr=LR, betas=BETAS, fused=True)
            contestants.append(Contestant("transformers", precision, hf, hf_loss, opt))
        results += time_interleaved(contestants, batch, warmup=args.warmup, steps=args.steps)
        del contestants

    flops_tok = train_flops_per_token(cfg, CONTEXT)
    ref = {r.precision: r.tokens_per_s for r in results if r.name == "transformers"}
    rows = []
    for r in results:
        mfu = flops_tok * r.tokens_per_s / (peaks[r.precision] * 1e9) * 100
        ratio = r.tokens_per_s / ref[r.precision] if r.precision in ref else None
        label = f"{r.name} {'fp32' if r.precision == 'fp32' else 'bf16-autocast'}"
        rows.append([label, fmt(r.tokens_per_s, ",.0f"), fmt(r.ms_per_step, ",.1f"), fmt(mfu, ".1f"),
                     fmt(ratio, ".2f"), fmt(r.loss, ".4f")])
    text = table(["row", "tokens/s", "ms/step", "MFU %", "vs HF", "loss"], rows)
    notes.append(f"model FLOPs/token = {flops_tok / 1e6:.1f} M "
                 f"(6·N_nonemb, N_nonemb = {cfg.num_params(embeddings=False) / 1e6:.2f} M; + 6·d·V; "
                 f"+ 12·L·d·T); {BATCH}×{CONTEXT} = {BATCH * CONTEXT} tokens/step; "
                 f"median of {args.steps} steps after {args.warmup} warm-up, "
                 f"steps interleaved between the libraries")
    if use_hf:
        notes.append(f"transformers attention implementation: {impl}; training forward with use_cache=False")
    notes.append("loss = after the last step (same init, same batch: fp32 rows should agree closely)")
    return text, notes


# -- 3. decode -----------------------------------------------------------------------------------

def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


@torch.inference_mode()
def llmkit_prefill(model: CausalLM, prompt: list[int]) -> None:
    cache = KVCache.empty(model.cfg, 1, len(prompt) + 1)
    model(torch.tensor([prompt]), cache=cache)


def llmkit_generate(model: CausalLM, prompt: list[int], new: int, use_cache: bool) -> list[int]:
    with torch.inference_mode():
        return generate(model, [prompt], max_new_tokens=new, params=SamplingParams(temperature=0.0),
                        use_cache=use_cache)[0]


@torch.inference_mode()
def hf_prefill(model, prompt: list[int]) -> None:
    model(input_ids=torch.tensor([prompt]), use_cache=True)


@torch.inference_mode()
def hf_generate(model, prompt: list[int], new: int, use_cache: bool) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=use_cache,
                         max_new_tokens=new, min_new_tokens=new, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def agree(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run_decode(args, use_hf: bool) -> tuple[str, list[str]]:
    cfg = llmkit_config(DECODE_CONTEXT)
    torch.manual_seed(args.seed + 1)
    model = CausalLM(cfg).eval()
    hf, impl = None, None
    if use_hf:
        hf, impl = hf_model(cfg)
        copy_llmkit_into_hf(model, hf)
        hf.eval()
        hf.generation_config.pad_token_id = 0
        hf.generation_config.eos_token_id = None

    g = torch.Generator().manual_seed(args.seed + 2)
    prompts = {n: torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in args.prompt_lens}
    warm = prompts[min(prompts)][:8]
    llmkit_generate(model, warm, 4, True)  # first-call overheads (allocator, oneDNN kernels)
    llmkit_generate(model, warm, 2, False)
    if hf is not None:
        hf_generate(hf, warm, 4, True)
        hf_generate(hf, warm, 2, False)

    new, new_nc = args.new_tokens, args.nocache_new_tokens
    impls = [("llmkit", model, llmkit_prefill, llmkit_generate)]
    if hf is not None:
        impls.append(("transformers", hf, hf_prefill, hf_generate))
    rows = []
    for n, prompt in prompts.items():
        measured = {}
        for name, m, prefill, gen in impls:
            t_prefill, _ = best_time(lambda: prefill(m, prompt), max(2, args.repeats))
            t_cache, toks = best_time(lambda: gen(m, prompt, new, True), args.repeats)
            t_nocache, toks_nc = best_time(lambda: gen(m, prompt, new_nc, False), 1)
            measured[name] = dict(prefill=t_prefill, cache=t_cache, nocache=t_nocache, toks=toks, toks_nc=toks_nc)
        ref = measured.get("transformers")
        for name, r in measured.items():
            cache_tps = new / r["cache"]
            decode_ms = max(r["cache"] - r["prefill"], 0.0) / new * 1e3
            nocache_tps = new_nc / r["nocache"]
            vs_hf = cache_tps / (new / ref["cache"]) if ref is not None else None
            same = f"{agree(r['toks'], ref['toks'])}/{new}" if ref is not None and name != "transformers" else "-"
            self_same = f"{agree(r['toks'], r['toks_nc'])}/{min(new, new_nc)}"
            rows.append([str(n), name, fmt(r["prefill"] * 1e3, ",.1f"), fmt(cache_tps, ",.1f"),
                         fmt(decode_ms, ",.2f"), fmt(nocache_tps, ",.1f"), fmt(cache_tps / nocache_tps, ".1f"),
                         fmt(vs_hf, ".2f"), self_same, same])
    text = table(["prompt", "impl", "prefill ms", "cache tok/s", "decode ms/tok", "no-cache tok/s",
                  "cache speedup", "vs HF", "cache=no-cache", "=HF tokens"], rows, right=set(range(2, 10)) | {0})
    notes = [f"greedy, batch 1, fp32, torch.inference_mode(); with cache: {new} new tokens, best of "
             f"{args.repeats}; without cache: {new_nc} new tokens, one run (each step re-runs the whole "
             f"sequence, so fewer keep the run short); prefill: best of {max(2, args.repeats)}",
             "tok/s = new tokens / wall time of the whole generate call (prefill included); "
             "decode ms/tok = (that time − prefill ms) / new tokens",
             f"model: gpt2-mini shape with context {DECODE_CONTEXT}"
             + ("; transformers runs the same weights" if hf is not None else "")]
    if hf is not None:
        notes.append(f"transformers: generate(do_sample=False, use_cache=True/False, max_new_tokens=min_new_tokens="
                     f"N), attention implementation: {impl}")
    return text, notes


# -- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    use_hf = not args.skip_hf and transformers is not None
    start = time.perf_counter()

    print("# llmkit train/decode benchmark\n")
    print(f"- torch {torch.__version__}, python {platform.python_version()}, "
          f"transformers {transformers.__version__ if transformers is not None else 'not installed'}")
    print(f"- CPU: {cpu_name()} ({os.cpu_count()} logical cores; flags {cpu_flags()}; "
          f"torch capability {torch.backends.cpu.get_cpu_capability()})")
    print(f"- torch threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
          f"{' (--threads)' if args.threads is not None else ' (torch default)'}")
    try:
        print(f"- load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (others running = noisy numbers)")
    except OSError:
        pass
    if args.skip_hf:
        print("- transformers rows skipped (--skip-hf)")
    elif transformers is None:
        print(f"- transformers rows skipped: transformers is not importable ({HF_ERROR})")
    print()
    sys.stdout.flush()

    n = 2048
    peaks = {"fp32": matmul_peak(torch.float32, n), "bf16": matmul_peak(torch.bfloat16, n)}
    print(f"## 1. Machine peaks (best of up to 8 {n}×{n} @ {n}×{n} matmuls)\n")
    print(table(["precision", "GFLOP/s"], [[k, fmt(v, ",.1f")] for k, v in peaks.items()]))
    print()
    sys.stdout.flush()

    if not args.skip_train:
        text, notes = run_training(args, peaks, use_hf)
        print(f"## 2. Training throughput (vocab {VOCAB}, {LAYERS} layers, {HEADS} heads, width {WIDTH}, "
              f"context {CONTEXT}, batch {BATCH}, AdamW lr {LR:g} wd {WEIGHT_DECAY:g} fused, clip {GRAD_CLIP:g})\n")
        print(text)
        print()
        for note in notes:
            print(f"- {note}")
        print()
        sys.stdout.flush()

    if not args.skip_decode:
        text, notes = run_decode(args, use_hf)
        print(f"## 3. Decode (prompt lengths {', '.join(map(str, args.prompt_lens))})\n")
        print(text)
        print()
        for note in notes:
            print(f"- {note}")
        print()

    try:
        load = f" (load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())})"
    except OSError:
        load = ""
    print(f"total wall time: {time.perf_counter() - start:.1f} s{load}")


if __name__ == "__main__":
    main()
