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
KEPT_BITS = {QT.Q8_0: 8, QT.Q4_0: 4, QT.Q4_1: 4, QT.Q4_K: 4}
Q4_K_BYTES = 144  # per 256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of pairs


def block_codes(raw: np.ndarray, qtype: QT) -> tuple[Tensor, Tensor, Tensor] | None:
    """`raw` (rows, blocks·bytes per block) uint8 → codes (rows, blocks·32) and float32 scale and
    offset (rows, blocks) in the form of llmkit's quantised layers, or None for other types:

        int8 (Q8_0):  w = code · scale                      code = q ∈ −127..127
        int4:         w = (code − 8) · scale + offset       Q4_0: code = q, offset = 0
                                                            Q4_1: code = q, offset = m + 8·d
        Q4_K, per 32 weights j of a 256-weight block: w = d·sc_j · q − dmin·m_j
                                                            code = q, scale = d·sc_j,
                                                            offset = 8·scale − dmin·m_j

    The codes are the file's own; the scales and offsets are its fp16 numbers (the layers store them
    in bf16, as they store any other model's)."""
    if qtype not in KEPT_BITS:
        return None
    if qtype == QT.Q4_K:
        return _q4_k_codes(raw)
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


def _q4_k_codes(raw: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Q4_K (ggml-common.h block_q4_K): eight groups of 32 under one fp16 d and dmin, each group's scale
    and min a 6-bit integer; byte j of each 32-byte chunk c holds weight j of group 2c in its low nibble
    and weight j of group 2c + 1 in its high nibble."""
    rows = raw.shape[0]
    blocks = torch.from_numpy(np.array(raw)).reshape(rows, -1, Q4_K_BYTES).to(torch.int32)
    d = blocks[..., 0:2].to(torch.uint8).contiguous().view(torch.float16).float()  # (rows, blocks, 1)
    dmin = blocks[..., 2:4].to(torch.uint8).contiguous().view(torch.float16).float()
    packed = blocks[..., 4:16]  # bytes 0-3: low 6 bits scales 0-3; 4-7: mins 0-3; 8-11: 4 + 4 bits of 4-7
    lo, mid, hi = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=-1)  # (rows, blocks, 8)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1)
    qs = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)  # (rows, blocks, chunk, 1, byte)
    codes = torch.cat([qs & 15, qs >> 4], dim=-2).reshape(rows, -1).to(torch.uint8)  # group 2c, then 2c + 1
    scale = (d * sc).reshape(rows, -1)
    offset = (8 * d * sc - dmin * mn).reshape(rows, -1)
    return codes, scale, offset
