"""GGUF files in: metadata → ModelConfig, tensors dequantised to fp32, tokenizer and chat template.

The container is parsed and checked by `gguf_reader`, the tokenizer rebuilt by `gguf_tokenizer`.
Here: llama.cpp's metadata keys (`{arch}.embedding_length`, …) become ModelConfig fields, its
tensor names (`blk.N.attn_q.weight`, …) llmkit's, all checked against each other before the weights
are allocated (RELIABILITY L5). llama.cpp's converter permutes the q/k rows of "llama" files for its
interleaved RoPE (`permute` in convert_hf_to_gguf.py); they are permuted back to the half-split
(`rotate_half`) layout here, the one place llmkit knows about it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, ModelFormatError
from llmkit.io.gguf_kept import keep_blocks
from llmkit.io.gguf_reader import Header, TensorInfo, is_gguf_file, read_header, read_tensor, read_tensor_into
from llmkit.io.gguf_tokenizer import tokenizer_from_gguf
from llmkit.io.hf_config import MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH
from llmkit.io.weights import check_finite, model_tensors
from llmkit.models.build import skip_init
from llmkit.models.causal_lm import CausalLM
from llmkit.tokenizer import Tokenizer

__all__ = ["GGUFModel", "is_gguf_file", "load_gguf", "read_header"]

SUPPORTED_TYPES = tuple(GGMLQuantizationType[n] for n in
                        ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"))
# Whether llama.cpp's converter permutes q/k rows, per architecture (qwen2 uses NeoX RoPE: it does not).
ARCHITECTURES = {"llama": True, "qwen2": False}
_MISSING = object()


@dataclass(frozen=True)
class GGUFModel:
    model: CausalLM  # eval mode, float32
    tokenizer: Tokenizer
    prefix_ids: list[int]  # [bos] when the file says add_bos_token
    eos_ids: list[int]  # EOS and, where the file names them, end-of-turn / end-of-message
    chat_template: str | None


# ---- metadata → ModelConfig ---------------------------------------------------------------------

def meta_value(metadata: dict[str, Any], key: str, kind: type, where: str, *, default: Any = _MISSING,
               lo: float | None = None, hi: float | None = None) -> Any:
    """`metadata[key]` checked for type and range (booleans are not numbers, integers are floats)."""
    value = metadata.get(key)
    if value is None:
        if default is _MISSING:
            raise ModelFormatError(f"{where}: missing metadata key {key!r}")
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {int: number and isinstance(value, int), float: number, bool: isinstance(value, bool)}.get(
        kind, isinstance(value, kind))
    if not ok:
        raise ModelFormatError(f"{where}: metadata key {key!r} must be {kind.__name__}, got {str(value)[:80]!r}")
    if kind is float and not math.isfinite(value):
        raise ModelFormatError(f"{where}: metadata key {key!r} must be finite, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f"[{lo}, {hi}]" if lo is not None and hi is not None
                  else f"≥ {lo}" if lo is not None else f"≤ {hi}")
        raise ModelFormatError(f"{where}: metadata key {key!r}={value!r} is out of range ({bounds})")
    return float(value) if kind is float else value


def config_from_gguf(header: Header, where: str) -> ModelConfig:
    """The ModelConfig a "llama" or "qwen2" file describes (RMSNorm, SwiGLU, RoPE; qwen2: q/k/v biases)."""
    meta = header.metadata
    arch = meta_value(meta, "general.architecture", str, where)
    if arch not in ARCHITECTURES:
        raise ModelFormatError(f"{where}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")

    def get(key: str, kind: type, **kw: Any) -> Any:
        return meta_value(meta, f"{arch}.{key}", kind, where, **kw)

    d = get("embedding_length", int, lo=1, hi=MAX_WIDTH)
    heads = get("attention.head_count", int, lo=1, hi=d)
    if f"{arch}.attention.key_length" not in meta and d % heads:
        raise ModelFormatError(f"{where}: {arch}.embedding_length={d} is not divisible by "
                               f"{arch}.attention.head_count={heads}")
    head_dim = get("attention.key_length", int, default=d // heads, lo=1, hi=MAX_WIDTH)
    if get("attention.value_length", int, default=head_dim) != head_dim:
        raise ModelFormatError(f"{where}: attention.value_length differs from key_length (not supported)")
    if get("rope.dimension_count", int, default=head_dim) != head_dim:
        raise ModelFormatError(f"{where}: {arch}.rope.dimension_count={meta[f'{arch}.rope.dimension_count']} "
                               f"≠ head dim {head_dim} (partial rotary embeddings are not supported)")
    if "rope_freqs.weight" in header.tensors:
        raise ModelFormatError(f"{where}: tensor rope_freqs.weight (llama3-style RoPE frequency factors) "
                               "is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not 1 <= len(tokens) <= MAX_WIDTH:
        raise ModelFormatError(f"{where}: metadata key 'tokenizer.ggml.tokens' must be a list of 1 to "
                               f"{MAX_WIDTH} tokens (it sets the vocabulary size)")
    kv_heads = get("attention.head_count_kv", int, default=heads, lo=1, hi=heads)
    if heads % kv_heads:
        raise ModelFormatError(f"{where}: {arch}.attention.head_count_kv={kv_heads} does not divide "
                               f"{arch}.attention.head_count={heads}")
    context = get("context_length", int, lo=1, hi=MAX_POSITIONS)
    fields = dict(vocab_size=len(tokens), max_seq_len=context, d_model=d,
                  n_layers=get("block_count", int, lo=1, hi=MAX_LAYERS), n_heads=heads, n_kv_heads=kv_heads,
                  head_dim=head_dim, d_ff=get("feed_forward_length", int, lo=1, hi=MAX_WIDTH),
                  mlp="swiglu", norm="rmsnorm", norm_position="pre",
                  norm_eps=get("attention.layer_norm_rms_epsilon", float, lo=1e-30, hi=1.0),
                  position="rope", rope_theta=get("rope.freq_base", float, default=10000.0, lo=1e-30),
                  bias=False, qkv_bias=arch == "qwen2", tie_embeddings="output.weight" not in header.tensors,
                  dropout=0.0, **_rope_scaling(get, context, where))
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def _rope_scaling(get: Any, context: int, where: str) -> dict[str, Any]:
    """llama.cpp's rope.scaling.* keys as ModelConfig fields (none, linear, yarn)."""
    kind = get("rope.scaling.type", str, default="none")
    if kind == "none":
        return {}
    if kind not in ("linear", "yarn"):
        raise ModelFormatError(f"{where}: unsupported rope.scaling.type {kind!r} (supported: none, linear, yarn)")
    out: dict[str, Any] = dict(rope_scaling=kind, rope_factor=get("rope.scaling.factor", float, lo=1.0))
    if kind == "yarn":
        if get("rope.scaling.attn_factor", float, default=1.0) != 1.0:
            raise ModelFormatError(f"{where}: rope.scaling.attn_factor other than 1 is not supported")
        out.update(rope_original_max_seq_len=get("rope.scaling.original_context_length", int, default=context,
                                                 lo=1, hi=MAX_POSITIONS),
                   rope_beta_fast=get("rope.scaling.yarn_beta_fast", float, default=32.0, lo=1e-30),
                   rope_beta_slow=get("rope.scaling.yarn_beta_slow", float, default=1.0, lo=1e-30))
    return out


# ---- tensors ------------------------------------------------------------------------------------

def tensor_names(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF tensor name → (llmkit parameter name, PyTorch shape) for the model `cfg` describes."""
    V, C, F = cfg.vocab_size, cfg.d_model, cfg.d_ff
    Q, KV = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    names = {"token_embd.weight": ("embeddings.embed.weight", (V, C)),
             "output_norm.weight": ("stack.final_norm.weight", (C,))}
    if not cfg.tie_embeddings:
        names["output.weight"] = ("lm_head.weight", (V, C))
    layer = {"attn_norm.weight": ("norm1.weight", (C,)), "ffn_norm.weight": ("norm2.weight", (C,)),
             "attn_q.weight": ("attn.q_proj.weight", (Q, C)), "attn_k.weight": ("attn.k_proj.weight", (KV, C)),
             "attn_v.weight": ("attn.v_proj.weight", (KV, C)), "attn_output.weight": ("attn.o_proj.weight", (C, Q)),
             "ffn_gate.weight": ("mlp.gate_proj.weight", (F, C)), "ffn_up.weight": ("mlp.up_proj.weight", (F, C)),
             "ffn_down.weight": ("mlp.down_proj.weight", (C, F))}
    if cfg.qkv_bias:
        layer.update({"attn_q.bias": ("attn.q_proj.bias", (Q,)), "attn_k.bias": ("attn.k_proj.bias", (KV,)),
                      "attn_v.bias": ("attn.v_proj.bias", (KV,))})
    for i in range(cfg.n_layers):
        names.update({f"blk.{i}.{g}": (f"stack.blocks.{i}.{ours}", shape) for g, (ours, shape) in layer.items()})
    return names


def plan_tensors(header: Header, cfg: ModelConfig, where: str) -> dict[str, TensorInfo]:
    """llmkit name → tensor info, after checking every name, shape and type against the config."""
    names = tensor_names(cfg)
    for name in header.tensors:
        if name not in names:
            raise ModelFormatError(f"{where}: unexpected tensor {name} (not part of the {cfg.n_layers}-layer model "
                                   "the metadata describes)")
    plan: dict[str, TensorInfo] = {}
    for gguf_name, (ours, expected) in names.items():
        info = header.tensors.get(gguf_name)
        if info is None:
            raise ModelFormatError(f"{where}: missing tensor {gguf_name}")
        shape = tuple(reversed(info.dims))
        if shape != expected:
            raise ModelFormatError(f"{where}: tensor {gguf_name} has shape {shape}, the metadata needs {expected}")
        if info.qtype not in SUPPORTED_TYPES:
            supported = ", ".join(t.name for t in SUPPORTED_TYPES)
            raise ModelFormatError(f"{where}: tensor {gguf_name} has type {GGMLQuantizationType(info.qtype).name}, "
                                   f"which llmkit cannot load (supported: {supported})")
        plan[ours] = info
    return plan


def unpermute_rope(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's q/k permutation. For its interleaved RoPE it stores each head's rows in the order
    0, D/2, 1, D/2+1, …; llmkit's rotate_half wants 0 … D/2-1, then D/2 … D-1."""
    D = w.shape[0] // n_heads
    w = w.reshape(n_heads, D // 2, 2, *w.shape[1:])  # (H, D/2, 2, C): the stored interleaved pairs
    return w.transpose(1, 2).reshape(n_heads * D, *w.shape[3:])  # (H, 2, D/2, C) → (H·D, C)


def load_gguf(path: str | Path, *, keep_quantized: bool = False) -> GGUFModel:
    """Load a GGUF file: an llmkit CausalLM in eval mode with float32 weights (quantised tensors are
    dequantised), its tokenizer, prefix and EOS ids, and its chat template. Header, config, tensor
    shapes and types, and tokenizer are all checked before the model's weights are allocated.
    `keep_quantized`: linear layers stored as Q4_0, Q4_1, Q4_K, Q5_0, Q6_K or Q8_0 become int4/int8 layers
    holding the file's own codes (llmkit/io/gguf_kept.py), for decoding only; the rest loads as before."""
    path = Path(path)
    where = str(path)
    header = read_header(path)
    cfg = config_from_gguf(header, where)
    plan = plan_tensors(header, cfg, where)
    tok = tokenizer_from_gguf(header.metadata, where)
    permuted = ARCHITECTURES[header.metadata["general.architecture"]]
    with skip_init():  # every tensor is copied in below (the assert checks the plan covers the model)
        model = CausalLM(cfg)
    state = model_tensors(model)  # shares storage with the parameters; a tied head is the embedding
    assert {n: tuple(t.shape) for n, t in state.items()} == {
        n: tuple(reversed(i.dims)) for n, i in plan.items()}, "tensor_names disagrees with CausalLM"

    def reordered(name: str) -> bool:  # rows llama.cpp permuted for its interleaved RoPE
        return permuted and name.endswith(("q_proj.weight", "k_proj.weight"))

    def unpermute(name: str, t: Tensor) -> Tensor:
        return unpermute_rope(t, cfg.n_heads if "q_proj" in name else cfg.n_kv_heads) if reordered(name) else t

    data = np.memmap(path, dtype=np.uint8, mode="r")
    with torch.no_grad():
        kept = keep_blocks(model, plan, data, unpermute=unpermute, where=where) if keep_quantized else set()
        for name, info in plan.items():
            if name in kept:  # its layer holds the file's codes; its float32 tensor was never written
                continue
            if not reordered(name):  # rows stay in place: dequantised straight into the parameter
                read_tensor_into(state[name], data, info)
                check_finite(info.name, state[name], where)  # a NaN scale or weight would load silently
                continue
            t = read_tensor(data, info)
            check_finite(info.name, t, where)
            state[name].copy_(unpermute(name, t))
    del data, state
    return GGUFModel(model.eval(), tok.tokenizer, tok.prefix_ids, tok.eos_ids, tok.chat_template)
