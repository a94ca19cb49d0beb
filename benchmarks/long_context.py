"""Long context on the same data (issue 6): which position scheme or body holds perplexity past the
training length, and what each costs in decode speed and memory.

    .venv/bin/python benchmarks/long_context.py --quick     # 150 steps per model: ~1 h on 2 busy CPU cores
    .venv/bin/python benchmarks/long_context.py             # 4x the training steps, twice the eval text
    .venv/bin/python benchmarks/long_context.py --quick --only ALiBi   # rows whose name contains ALiBi

Trained models are kept in --out, so a rerun only evaluates (1.5 min for every row, --quick); a run
with --only adds its rows to the table of the last run with the same settings.

Every model has the same body (LLaMA-style: RMSNorm, SwiGLU, tied embeddings) and size, differing
only in its position scheme or attention pattern (RWKV/Mamba bodies have the same width and the
depth that brings their parameter count closest to the Transformer's), and is trained with the one Trainer at context 256 on the
embedded corpus (this Python's standard library; tokenized once, cached in --out). RoPE + linear PI
and RoPE + YaRN are the trained RoPE model extended ×16 (training/extend.py, as `llmkit extend`)
and fine-tuned for a few steps at --finetune-seq-len. Then, on the same held-out tokens:
- ppl@L: perplexity over windows of L tokens (256 … 4096);
- decode tok/s @4096: 1 / the median greedy step with the model's own cache after a prefill to 4096 − n;
- peak MB @4096: peak resident memory added by one 4096-token forward (VmHWM, reset per measurement;
  large allocations are forced to mmap so freed memory is returned and not silently reused).
A second measurement runs the sliding-window model's dense reference attention (n×n mask and scores)
against its blocked kernel, and full causal attention, at growing lengths: peak MB and time.
Outputs in --out: results.json, table.md, ppl_vs_length.png, memory_vs_length.png.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmkit.config import ModelConfig  # noqa: E402
from llmkit.inference.generate import new_cache  # noqa: E402
from llmkit.io.checkpoint import atomic_write_bytes, atomic_write_text  # noqa: E402
from llmkit.io.weights import load_model_tensors, model_tensors  # noqa: E402
from llmkit.layers.attention import Attention, set_attention_impl  # noqa: E402
from llmkit.models.build import build_model, tie_weights  # noqa: E402
from llmkit.training.config import TrainConfig  # noqa: E402
from llmkit.training.extend import extended_config  # noqa: E402
from llmkit.training.loop import Trainer  # noqa: E402
from llmkit.training.objectives import next_token_loss  # noqa: E402
from llmkit.training.pretrain import prepare_corpus  # noqa: E402
from llmkit.data.batches import TokenBatches  # noqa: E402

LENGTHS = (256, 512, 1024, 2048, 4096)
TRAIN_LEN = 256
EXCLUDE = ("site-packages", "__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3")


@dataclass
class Settings:
    steps: int
    batch_size: int
    d_model: int
    n_layers: int
    n_heads: int
    vocab: int
    window: int
    finetune_steps: int
    finetune_seq_len: int
    eval_windows: int  # held-out text = eval_windows × 4096 tokens, the same tokens at every length
    decode_tokens: int
    lr: float = 3e-3


QUICK = Settings(steps=150, batch_size=8, d_model=128, n_layers=4, n_heads=4, vocab=2048, window=64,
                 finetune_steps=20, finetune_seq_len=1024, eval_windows=2, decode_tokens=32)
FULL = Settings(steps=600, batch_size=8, d_model=128, n_layers=4, n_heads=4, vocab=2048, window=64,
                finetune_steps=60, finetune_seq_len=1024, eval_windows=4, decode_tokens=64)


def variants(s: Settings) -> dict[str, dict]:
    """Trained models: name → ModelConfig overrides of the shared base."""
    return {
        "learned": dict(position="learned"),
        "sinusoidal": dict(position="sinusoidal"),
        "RoPE": dict(position="rope"),
        "ALiBi": dict(position="alibi"),
        f"sliding window (RoPE, W={s.window})": dict(position="rope", attention_pattern="sliding_window",
                                                     attention_window=s.window),
        "RWKV": dict(position="none", body="rwkv"),
        "Mamba": dict(position="none", body="mamba"),
    }


EXTENSIONS = {  # name → (method, fine-tuned?) applied to the trained RoPE model
    "RoPE + linear PI (fine-tuned)": ("linear", True),
    "RoPE + YaRN (fine-tuned)": ("yarn", True),
    "RoPE + YaRN (no fine-tune)": ("yarn", False),
    "RoPE + dynamic NTK (no fine-tune)": ("ntk", False),
}


def matched_depth(base: ModelConfig, cfg: ModelConfig) -> ModelConfig:
    """A recurrent body at the depth whose parameter count is closest to the Transformer's: an RWKV or
    Mamba block holds fewer weights than an attention + SwiGLU block, so equal depth is not equal size."""
    if cfg.body == "transformer":
        return cfg
    target = base.num_params()
    depths = range(1, 4 * base.n_layers + 1)
    return cfg.replace(n_layers=min(depths, key=lambda n: abs(cfg.replace(n_layers=n).num_params() - target)))


def base_config(s: Settings, vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, max_seq_len=TRAIN_LEN, d_model=s.d_model, n_layers=s.n_layers,
                       n_heads=s.n_heads, mlp="swiglu", norm="rmsnorm", bias=False, tie_embeddings=True,
                       norm_eps=1e-6, position="rope")


# ------------------------------------------------------------------------------------ measuring

_libc = ctypes.CDLL("libc.so.6")
_libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: big tensors get their own mapping, returned on free
_libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_mb(fn) -> tuple[float, float]:
    """(peak resident MB added while fn runs, seconds): VmHWM after resetting it to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS:")
    start = time.perf_counter()
    fn()
    return _status_mb("VmHWM:") - base, time.perf_counter() - start


def eval_config(cfg: ModelConfig) -> ModelConfig:
    """The same model allowed to run at 4096 (learned positions cannot: they stay at 256)."""
    if cfg.position == "learned":
        return cfg
    return cfg.replace(max_seq_len=max(cfg.max_seq_len, max(LENGTHS)))


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, length: int, n_tokens: int) -> float:
    total, count = 0.0, 0
    for start in range(0, n_tokens, length):
        x, y = tokens[start:start + length][None], tokens[start + 1:start + length + 1][None]
        total += float(F.cross_entropy(model(x)[0].float(), y[0], reduction="sum"))
        count += y.numel()
    return math.exp(total / count)


@torch.inference_mode()
def decode_speed(model, tokens: torch.Tensor, length: int, n_new: int) -> float:
    cache = new_cache(model, 1, length, dtype=torch.float32, device="cpu")
    logits = model(tokens[None, :length - n_new], cache=cache)[:, -1]
    token = logits.argmax(-1, keepdim=True)
    seconds = []
    for _ in range(n_new - 1):
        start = time.perf_counter()
        token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        seconds.append(time.perf_counter() - start)
    return 1.0 / sorted(seconds)[len(seconds) // 2]  # the median step: steadier on a shared machine


def has_body(model, cfg: ModelConfig) -> bool:
    """False when llmkit does not implement cfg.body yet (it would silently build a transformer)."""
    return cfg.body == "transformer" or not any(isinstance(m, Attention) for m in model.modules())


# ------------------------------------------------------------------------------------ training

def train(cfg: ModelConfig, corpus, s: Settings, out: Path, *, steps: int, seq_len: int, batch_size: int,
          lr: float, init: dict | None = None, log=print):
    """Train (or, when out/ holds the finished run, load) a model with the one training loop."""
    torch.manual_seed(0)
    model = build_model(cfg)
    if not has_body(model, cfg):
        return None
    if init is not None:
        load_model_tensors(model, init, where="initial weights")
        tie_weights(model)
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=min(20, steps // 5),
                       eval_interval=steps, log_interval=10, dtype="bf16", seed=0, weight_decay=0.1 if init is None else 0.0)
    batches = TokenBatches(corpus.train, seq_len, batch_size, 0)
    trainer = Trainer(model, tcfg, loss_fn=next_token_loss, get_batch=batches.batch, out_dir=out,
                      fingerprint={"model": cfg.non_default_fields(), "data": corpus.fingerprint, "seq_len": seq_len})
    trainer.resume()
    if trainer.state.step < steps:
        started = time.perf_counter()
        trainer.run()
        log(f"  trained {steps} steps in {time.perf_counter() - started:.0f} s")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    log(f"  final train loss {rows[-1].get('train_loss', float('nan')):.3f}")
    return model.eval()


# ------------------------------------------------------------------------------------ reporting

def fmt(value, digits=1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table(results: dict) -> str:
    head = "| model | ppl@256 | @512 | @1024 | @2048 | @4096 | decode tok/s @4096 | peak MB @4096 |\n" \
           "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    rows = []
    for name, r in results.items():
        ppl = [fmt(r["ppl"].get(str(L))) for L in LENGTHS]
        rows.append(f"| {name} ({r['params'] / 1e6:.2f}M) | " + " | ".join(ppl) +
                    f" | {fmt(r['decode_tok_s'])} | {fmt(r['peak_mb'])} |")
    return head + "\n".join(rows) + "\n"


def plot_ppl(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, r in results.items():
        points = [(L, r["ppl"][str(L)]) for L in LENGTHS if r["ppl"].get(str(L)) is not None]
        ax.plot(*zip(*points), "o-", label=name, linewidth=1.4, markersize=4)
    ax.axvline(TRAIN_LEN, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(LENGTHS, [str(L) for L in LENGTHS])
    ax.set_xlabel("evaluation length (tokens); trained at 256")
    ax.set_ylabel("perplexity (held-out stdlib files)")
    ax.set_title("Perplexity vs length, same data and size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_memory(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for name, points in curve.items():
        xs = [p["length"] for p in points]
        mem.plot(xs, [p["peak_mb"] for p in points], "o-", label=name)
        sec.plot(xs, [p["seconds"] for p in points], "o-", label=name)
    for ax, label in ((mem, "peak MB added by one forward"), (sec, "seconds per forward")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Sliding-window attention: dense reference vs blocked kernel (and full causal SDPA)")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------ the run

def memory_curve(model, tokens: torch.Tensor, rope_model, lengths) -> dict:
    """Peak MB and seconds of one forward, sliding-window model dense vs blocked, and full attention."""
    curve: dict[str, list] = {"sliding window, dense reference": [], "sliding window, blocked kernel": [],
                              "full causal attention (SDPA)": []}
    with torch.inference_mode():
        for length in lengths:
            x = tokens[None, :length]
            runs = (("sliding window, blocked kernel", model, "sdpa"), ("full causal attention (SDPA)", rope_model, "sdpa"),
                    ("sliding window, dense reference", model, "reference"))
            for name, m, impl in runs:
                if impl == "reference" and length > max(LENGTHS):
                    continue  # n² scores past 4096 would take GBs: the point is made by then
                set_attention_impl(m, impl)
                mb, seconds = peak_mb(lambda: m(x))
                curve[name].append({"length": length, "peak_mb": round(mb, 1), "seconds": round(seconds, 3)})
    set_attention_impl(model, "sdpa")
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer training steps and less evaluation text")
    parser.add_argument("--out", default="runs/long_context", help="output directory (default: runs/long_context)")
    parser.add_argument("--data", default=sysconfig.get_paths()["stdlib"], help="corpus (default: the stdlib)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only rows whose name contains NAME")
    parser.add_argument("--steps", type=int, help="training steps per model (default: 150 quick, 600 full)")
    parser.add_argument("--finetune-steps", type=int, help="PI/YaRN fine-tune steps (default: 20 quick, 60 full)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: 1; on a busy machine more threads wait on each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    s = Settings(**{**vars(s), **{k: getattr(args, k) for k in ("steps", "finetune_steps") if getattr(args, k)}})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    log(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; settings {s}")

    corpus = prepare_corpus([args.data], out, TrainConfig(vocab_size=s.vocab, tokenizer_sample_bytes=3_000_000),
                            seq_len=max(LENGTHS), exclude=EXCLUDE)
    n_eval = s.eval_windows * max(LENGTHS)
    val = torch.from_numpy(corpus.val[:n_eval + 1].astype("int64"))
    log(f"corpus: {corpus.train.size:,} train tokens, {corpus.val.size:,} held out (using {n_eval:,}), "
        f"vocab {corpus.tokenizer.vocab_size} [{time.perf_counter() - began:.0f} s]")
    base = base_config(s, corpus.tokenizer.vocab_size)

    def wanted(name: str) -> bool:
        return not args.only or any(part.lower() in name.lower() for part in args.only)

    models: dict[str, torch.nn.Module] = {}
    for name, overrides in variants(s).items():
        if not wanted(name) and not (name == "RoPE" and any(wanted(e) for e in EXTENSIONS)):
            continue
        cfg = matched_depth(base, base.replace(**overrides))
        log(f"training {name}" + (f" ({cfg.n_layers} layers, {cfg.num_params() / 1e6:.2f} M parameters)"
                                  if cfg.n_layers != base.n_layers else ""))
        run_dir = out / "models" / (slug(name) + (f"_{cfg.n_layers}l" if cfg.n_layers != base.n_layers else ""))
        model = train(cfg, corpus, s, run_dir, steps=s.steps,
                      seq_len=TRAIN_LEN, batch_size=s.batch_size, lr=s.lr, log=log)
        if model is None:
            log(f"  skipped: body={overrides.get('body')!r} is not implemented in llmkit yet")
            continue
        models[name] = model
    if "RoPE" in models:
        rope_weights = model_tensors(models["RoPE"])
        for name, (method, finetune) in EXTENSIONS.items():
            if not wanted(name):
                continue
            cfg = extended_config(models["RoPE"].cfg, max(LENGTHS) / TRAIN_LEN, method)
            if finetune:
                log(f"fine-tuning {name}: {s.finetune_steps} steps at {s.finetune_seq_len} tokens")
                models[name] = train(cfg, corpus, s, out / "models" / slug(name), steps=s.finetune_steps,
                                     seq_len=s.finetune_seq_len, batch_size=2, lr=3e-4, init=rope_weights, log=log)
            else:
                model = build_model(cfg)
                load_model_tensors(model, rope_weights, where="RoPE")
                models[name] = tie_weights(model).eval()

    results = {}
    for name, model in models.items():
        if not wanted(name):
            continue
        started = time.perf_counter()
        cfg = eval_config(model.cfg)
        if cfg != model.cfg:
            longer = build_model(cfg)
            load_model_tensors(longer, model_tensors(model), where=name)
            model = tie_weights(longer).eval()
        reach = [L for L in LENGTHS if L <= cfg.max_seq_len]
        ppl = {str(L): round(perplexity(model, val, L, n_eval), 2) for L in reach}
        decode = mb = None
        if max(LENGTHS) in reach:
            decode = decode_speed(model, val, max(LENGTHS), s.decode_tokens)
            with torch.inference_mode():
                mb, _ = peak_mb(lambda: model(val[None, :max(LENGTHS)]))
        results[name] = dict(params=sum(p.numel() for p in model.parameters()), ppl=ppl, decode_tok_s=decode,
                             peak_mb=mb, config=model.cfg.non_default_fields())
        log(f"evaluated {name}: {ppl} decode {fmt(decode)} tok/s, peak {fmt(mb)} MB "
            f"[{time.perf_counter() - started:.0f} s]")

    curve = {}
    window_name = next((n for n in models if n.startswith("sliding window")), None)
    if window_name and "RoPE" in models:
        long_rope = build_model(eval_config(models["RoPE"].cfg).replace(max_seq_len=4 * max(LENGTHS)))
        load_model_tensors(long_rope, model_tensors(models["RoPE"]), where="RoPE")
        long_window = build_model(eval_config(models[window_name].cfg).replace(max_seq_len=4 * max(LENGTHS)))
        load_model_tensors(long_window, model_tensors(models[window_name]), where=window_name)
        curve_tokens = torch.cat([val] * 4)
        lengths = (512, 1024, 2048, 4096, 8192) if args.quick else (512, 1024, 2048, 4096, 8192, 16384)
        curve = memory_curve(tie_weights(long_window).eval(), curve_tokens, tie_weights(long_rope).eval(), lengths)
        plot_memory(curve, out / "memory_vs_length.png")
        for name, points in curve.items():
            log(f"{name}: " + ", ".join(f"{p['length']}: {p['peak_mb']:.0f} MB {p['seconds']:.2f} s" for p in points))

    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    if args.only and previous.get("settings") == vars(s):  # a partial rerun adds its rows to the last table
        results = {**previous["results"], **results}
        curve = curve or previous.get("memory_curve", {})
    text = table(results)
    elapsed = time.perf_counter() - began
    footer = (f"\n{'quick' if args.quick else 'full'} run, {elapsed / 60:.1f} min; load average at the end "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    atomic_write_text(out / "table.md", text + footer)
    atomic_write_text(out / "results.json", json.dumps({"settings": vars(s), "results": results,
                                                        "memory_curve": curve, "seconds": elapsed}, indent=1))
    if results:
        plot_ppl(results, out / "ppl_vs_length.png")
    log("\n" + text + footer)
    log(f"wrote {out}/table.md, results.json, ppl_vs_length.png, memory_vs_length.png")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


if __name__ == "__main__":
    main()
