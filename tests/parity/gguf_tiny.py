"""Tiny GGUF files written in-test with gguf-py's GGUFWriter (no download), as llama.cpp's converter
would write them: q/k rows of "llama" files permuted for interleaved RoPE, a GPT-2-style vocabulary.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V
from gguf import GGUFWriter
from gguf.quants import quantize

from llmkit.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = ["the model reads tokens and predicts the next one", "def hello():\n    return 'world'\n",
         "hello there, general kenobi", "while the optimizer lowers the loss, the weights move"]
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)  # gguf-py cannot quantise these: random blocks with sane scales
CHAT_TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"


@functools.lru_cache(maxsize=1)
def toy_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges, token types) of a small byte-level BPE: llmkit's 7 specials (control), the 256
    byte symbols and some merges."""
    tok = Tokenizer.train(TEXTS * 8, vocab_size=300, min_frequency=1)
    model = json.loads(tok.backend.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert [model["vocab"][t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges, [3 if t in SPECIAL_TOKENS.values() else 1 for t in tokens]


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `permute`: half-split rows → interleaved pairs, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_weights(*, vocab: int, d: int, layers: int, heads: int, kv_heads: int, ff: int, tied: bool,
                   qkv_bias: bool, seed: int = 0, std: float = 0.08) -> dict[str, np.ndarray]:
    """Hugging Face layout (out, in) float32 weights under GGUF names, before any permutation."""
    rng = np.random.default_rng(seed)
    D = d // heads

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    out = {"token_embd.weight": w(vocab, d), "output_norm.weight": 1 + w(d)}
    if not tied:
        out["output.weight"] = w(vocab, d)
    for i in range(layers):
        out.update({f"blk.{i}.attn_norm.weight": 1 + w(d), f"blk.{i}.ffn_norm.weight": 1 + w(d),
                    f"blk.{i}.attn_q.weight": w(heads * D, d), f"blk.{i}.attn_k.weight": w(kv_heads * D, d),
                    f"blk.{i}.attn_v.weight": w(kv_heads * D, d), f"blk.{i}.attn_output.weight": w(d, heads * D),
                    f"blk.{i}.ffn_gate.weight": w(ff, d), f"blk.{i}.ffn_up.weight": w(ff, d),
                    f"blk.{i}.ffn_down.weight": w(d, ff)})
        if qkv_bias:
            out.update({f"blk.{i}.attn_q.bias": w(heads * D), f"blk.{i}.attn_k.bias": w(kv_heads * D),
                        f"blk.{i}.attn_v.bias": w(kv_heads * D)})
    return out


def encode_tensor(arr: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or float array) GGUFWriter stores for `arr` in `qtype`."""
    if qtype == Q.F32:
        return arr
    if qtype == Q.F16:
        return arr.astype(np.float16)
    if qtype not in K_QUANTS:
        return quantize(arr, qtype)
    blocks = rng.integers(0, 256, size=(arr.size // 256, {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[qtype]),
                          dtype=np.uint8)
    scale = np.array([0.01], dtype=np.float16).view(np.uint8)
    fp16_fields = (slice(208, 210),) if qtype == Q.Q6_K else (slice(0, 2), slice(2, 4))  # d (and dmin)
    for field in fp16_fields:
        blocks[:, field] = scale
    return blocks.reshape(*arr.shape[:-1], -1)


def write_gguf(path: Path, *, arch: str = "llama", vocab_size: int | None = None, d: int = 64, layers: int = 1,
               heads: int = 4, kv_heads: int = 2, ff: int = 128, context: int = 128, tied: bool = True,
               qtype: Q = Q.F32, alignment: int | None = None, pre: str = "default",
               meta: dict[str, Any] | None = None, tensors: dict[str, np.ndarray | None] | None = None,
               tensor_types: dict[str, Q] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny model; 2-D weights in `qtype` (or `tensor_types[name]`), norms and biases in F32. `meta`
    overrides metadata (None deletes a key; (value, GGUFValueType[, item type]) forces a type), `tensors`
    adds, replaces or (None) drops tensors (a uint8 array: that type's blocks, written as they are).
    Returns the weights written, in Hugging Face layout before permutation."""
    tokens, merges, types = toy_vocab()
    vocab_size = vocab_size or len(tokens)
    weights = random_weights(vocab=vocab_size, d=d, layers=layers, heads=heads, kv_heads=kv_heads, ff=ff,
                             tied=tied, qkv_bias=arch == "qwen2", seed=seed)
    a = arch
    kv: dict[str, Any] = {
        "general.architecture": arch, "general.name": "tiny",
        f"{a}.context_length": context, f"{a}.embedding_length": d, f"{a}.block_count": layers,
        f"{a}.feed_forward_length": ff, f"{a}.attention.head_count": heads, f"{a}.attention.head_count_kv": kv_heads,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-5, f"{a}.rope.freq_base": 10000.0,
        f"{a}.rope.dimension_count": d // heads,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index(SPECIAL_TOKENS["bos"]),
        "tokenizer.ggml.eos_token_id": tokens.index(SPECIAL_TOKENS["eos"]),
        "tokenizer.ggml.padding_token_id": tokens.index(SPECIAL_TOKENS["pad"]),
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    kv.update(meta or {})
    writer = GGUFWriter(str(path), arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)  # also pads the data to it
    del writer.kv_data[0]["general.architecture"]  # added by the constructor; re-added below, in order
    for key, value in kv.items():
        if value is None:
            continue
        value, vtype, sub = (*value, None)[:3] if isinstance(value, tuple) else (value, None, None)
        if vtype is None:
            vtype = {str: V.STRING, bool: V.BOOL, int: V.UINT32, float: V.FLOAT32, list: V.ARRAY}[type(value)]
        if vtype == V.ARRAY and sub is None:
            sub = V.STRING if value and isinstance(value[0], str) else V.INT32
        writer.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed + 1)
    stored = dict(weights)
    stored.update(tensors or {})
    for name, arr in stored.items():
        if arr is None:
            continue
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")) and name in weights:
            arr = permute(arr, heads if "attn_q" in name else kv_heads)
        t = (tensor_types or {}).get(name, qtype) if arr.ndim == 2 else Q.F32
        data = arr if arr.dtype == np.uint8 else encode_tensor(arr, t, rng)
        writer.add_tensor(name, data, raw_dtype=t if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights
