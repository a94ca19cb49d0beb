"""The cache view: what decoding keeps per layer — keys and values of every past token (the KV cache
trades memory for recomputation), for the model's own layout: GQA/MQA share K/V heads, a sliding
window keeps a ring buffer of the window, int8 codes with a scale per head and position, an
encoder-decoder adds cross-attention K/V of the source; RWKV and Mamba keep a fixed-size state.
Each is set against a full multi-head cache (every query head with its own K/V, no window).

The bytes are computed from the configuration, by the same rules the cache classes
(llmkit/inference/kv_cache.py, state_cache.py, seq2seq_cache.py) allocate by; tests compare them
with the bytes of real cache tensors after a forward.
"""

from __future__ import annotations

import math

from llmkit.errors import ConfigError
from llmkit.explain.page import ViewResult
from llmkit.explain.subject import Subject

SCALE_BYTES = 4  # an int8 cache's float32 scale per head and position


def layer_bytes(cfg, *, positions: int, source: int, element: int, int8: bool) -> list[dict]:
    """Per layer: bytes held after `positions` decoded tokens (and a `source`-token encoder input)."""
    if cfg.body != "transformer":
        from llmkit.layers.recurrent import mamba_state_shapes, rwkv_state_shapes

        shapes = rwkv_state_shapes(cfg) if cfg.body == "rwkv" else mamba_state_shapes(cfg)
        state = sum(math.prod(shape) for shape, _ in shapes.values()) * 4  # float32 whatever the model's dtype
        return [{"self": state, "cross": 0, "per_token": 0, "held": positions} for _ in range(cfg.n_layers)]
    held = positions
    ring = cfg.attention_pattern == "sliding_window" and cfg.attention_window < positions
    if ring:
        held, int8 = cfg.attention_window, False  # RingKVCache: full precision, the window only
    per_position = cfg.n_kv_heads * (cfg.head_dim + SCALE_BYTES if int8 else cfg.head_dim * element)
    cross = 2 * cfg.n_kv_heads * cfg.head_dim * element * source if cfg.arch == "encoder-decoder" else 0
    n_layers = cfg.decoder_layers if cfg.arch == "encoder-decoder" else cfg.n_layers
    return [{"self": 2 * per_position * held, "cross": cross, "per_token": 0 if ring else 2 * per_position,
             "held": held} for _ in range(n_layers)]


def full_mha_bytes(cfg, *, positions: int, element: int) -> int:
    """A full multi-head cache of the same depth: every head its own K and V, every position kept."""
    if cfg.body != "transformer":
        return 2 * cfg.n_layers * cfg.d_model * element * positions
    n_layers = cfg.decoder_layers if cfg.arch == "encoder-decoder" else cfg.n_layers
    return 2 * n_layers * cfg.n_heads * cfg.head_dim * element * positions


def cache_view(subject: Subject, *, context: int | None = None) -> ViewResult:
    cfg, model = subject.cfg, subject.model
    if cfg.arch == "encoder":
        raise ConfigError(f"cache: {subject.name} is an encoder: it reads the whole text in one pass and "
                          "generates nothing, so it keeps no cache between steps")
    element = next(model.parameters()).element_size()
    int8 = getattr(model, "kv_cache", "full") == "int8"
    context = context or cfg.max_seq_len
    source = len(subject.ids) if cfg.arch == "encoder-decoder" else 0
    layers = layer_bytes(cfg, positions=context, source=source, element=element, int8=int8)
    total = sum(l["self"] + l["cross"] for l in layers)
    full = full_mha_bytes(cfg, positions=context, element=element)
    layout = describe(cfg, int8)
    lines = [f"{subject.name}: {layout}",
             f"at {context} tokens: {total:,} bytes ({total / 2**20:.2f} MiB) in {len(layers)} layers; "
             f"a full multi-head cache would hold {full:,} bytes ({full / max(total, 1):.1f}×)"]
    if layers[0]["per_token"]:
        lines.append(f"per token: {sum(l['per_token'] for l in layers):,} bytes "
                     f"({layers[0]['per_token']:,} per layer)")
    curve_x = sorted({max(1, round(context * f / 16)) for f in range(17)})
    curve = [sum(l["self"] + l["cross"] for l in layer_bytes(cfg, positions=n, source=source, element=element,
                                                             int8=int8)) for n in curve_x]
    curve_full = [full_mha_bytes(cfg, positions=n, element=element) for n in curve_x]
    data = {"model": subject.name, "layout": layout, "context": context, "source_tokens": source,
            "element_bytes": element, "int8": int8, "layers": layers, "total_bytes": total,
            "full_mha_bytes": full, "curve": {"tokens": curve_x, "bytes": curve, "full_mha_bytes": curve_full}}

    def draw(plt):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
        left.plot(curve_x, [b / 2**20 for b in curve_full], "--", color="#8C8C8C", label="full multi-head cache")
        left.plot(curve_x, [b / 2**20 for b in curve], color="#4C72B0", linewidth=2, label=layout.split(":")[0])
        left.set_xlabel("tokens in the context")
        left.set_ylabel("MiB")
        left.legend(fontsize=8)
        left.set_title("cache memory against context length", fontsize=9)
        right.bar(range(len(layers)), [l["self"] / 2**20 for l in layers], color="#4C72B0", label="self-attention / state")
        if any(l["cross"] for l in layers):
            right.bar(range(len(layers)), [l["cross"] / 2**20 for l in layers], bottom=[l["self"] / 2**20 for l in layers],
                      color="#DD8452", label="cross-attention (source)")
        right.set_xlabel("layer")
        right.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        right.set_ylabel(f"MiB at {context} tokens")
        right.legend(fontsize=8)
        right.set_title("by layer", fontsize=9)
        fig.suptitle(f"{subject.name}: {layout}", fontsize=9)
        return fig

    rows = [[i, l["held"], l["per_token"], l["self"], l["cross"]] for i, l in enumerate(layers)]
    return ViewResult("cache", f"KV cache: {subject.name}",
                      "The KV cache keeps every past token's keys and values, so each new token computes only "
                      "its own (没有 KV Cache：每次生成都要重新计算所有位置): memory for recomputation.", data, draw,
                      tables=[{"title": f"bytes by layer at {context} tokens", "columns":
                               ["layer", "positions held", "bytes per new token", "self / state bytes", "cross bytes"],
                               "rows": rows}], lines=lines)


def describe(cfg, int8: bool) -> str:
    if cfg.body != "transformer":
        return f"{cfg.body.upper()}: a fixed-size float32 state per layer, whatever the length"
    heads = ("MHA" if cfg.n_kv_heads == cfg.n_heads else "MQA" if cfg.n_kv_heads == 1 else "GQA")
    parts = [f"{heads}: {cfg.n_kv_heads} K/V heads for {cfg.n_heads} query heads, head_dim {cfg.head_dim}"]
    if cfg.attention_pattern == "sliding_window":
        parts.append(f"sliding window of {cfg.attention_window} (ring buffer)")
    if int8:
        parts.append("int8 codes + a float32 scale per head and position")
    if cfg.arch == "encoder-decoder":
        parts.append("plus cross-attention K/V of the source")
    return ", ".join(parts)
