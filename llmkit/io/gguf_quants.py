"""Dequantisation of GGUF's simple block formats (Q8_0, Q4_0, Q4_1) in vectorised torch.

The `gguf` package dequantises in numpy, group of rows by group of rows; for SmolLM2-135M's 210
Q4_1 tensors that was 2.8 s of a 7.7 s load. These formats are one scale (and offset) per block of
32 weights, so the whole tensor dequantises in a few tensor ops. Layouts (ggml-common.h):

    Q8_0: fp16 d, 32 × int8 q                 → x = d·q
    Q4_0: fp16 d, 16 bytes of 4-bit pairs      → x = d·(q − 8)
    Q4_1: fp16 d, fp16 m, 16 bytes of pairs    → x = d·q + m

In a 4-bit block, byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
Other types (the K-quants, …) return None and fall back to the `gguf` package.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import Tensor

# type → (bytes per block, bytes of fp16 header: d, or d and m)
_SIMPLE = {QT.Q8_0: (34, 2), QT.Q4_0: (18, 2), QT.Q4_1: (20, 4)}


def dequantize_simple(raw: np.ndarray, qtype: QT) -> Tensor | None:
    """`raw` (..., blocks·bytes per block) uint8 → float32 (..., blocks·32), or None for other types."""
    if qtype not in _SIMPLE:
        return None
    type_size, header = _SIMPLE[qtype]
    blocks = torch.from_numpy(np.array(raw)).reshape(-1, type_size)  # a copy: the file is mapped read-only
    scale = blocks[:, 0:2].contiguous().view(torch.float16).float()  # (N, 1)
    payload = blocks[:, header:]
    if qtype == QT.Q8_0:
        out = payload.contiguous().view(torch.int8).float() * scale
    else:
        q = torch.cat([payload & 0x0F, payload >> 4], dim=1).float()  # (N, 32): weights 0–15, then 16–31
        if qtype == QT.Q4_0:
            out = (q - 8.0) * scale
        else:
            out = torch.addcmul(blocks[:, 2:4].contiguous().view(torch.float16).float(), q, scale)
    return out.reshape(*raw.shape[:-1], -1)


# The block types whose codes llmkit's int4/int8 layers hold as they are (one scale, and an offset,
# per group of 32 weights of a row: llmkit/layers/quantized.py), and their bits.
KEPT_BITS = {QT.Q8_0: 8, QT.Q4_0: 4, QT.Q4_1: 4}


def block_codes(raw: np.ndarray, qtype: QT) -> tuple[Tensor, Tensor, Tensor] | None:
    """`raw` (rows, blocks·bytes per block) uint8 → codes (rows, blocks·32) and float32 scale and
    offset (rows, blocks) in the form of llmkit's quantised layers, or None for other types:

        int8 (Q8_0):  w = code · scale                      code = q ∈ −127..127
        int4:         w = (code − 8) · scale + offset       Q4_0: code = q, offset = 0
                                                            Q4_1: code = q, offset = m + 8·d

    The codes are the file's own; the scales and offsets are its fp16 numbers (the layers store them
    in bf16, as they store any other model's)."""
    if qtype not in KEPT_BITS:
        return None
    type_size, header = _SIMPLE[qtype]
    rows = raw.shape[0]
    blocks = torch.from_numpy(np.array(raw)).reshape(rows, -1, type_size)  # (rows, blocks, bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)  # (rows, blocks)
    payload = blocks[..., header:]
    if qtype == QT.Q8_0:
        return payload.contiguous().view(torch.int8).reshape(rows, -1), d, torch.zeros_like(d)
    codes = torch.cat([payload & 0x0F, payload >> 4], dim=-1).reshape(rows, -1)  # per block: 0–15, then 16–31
    if qtype == QT.Q4_0:
        return codes, d, torch.zeros_like(d)
    m = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    return codes, d, m + 8 * d
