"""Dequantisation of GGUF's simple block formats (Q8_0, Q4_0, Q4_1; Q5_0 and Q6_K through their codes)
in vectorised torch, and the codes llmkit's int4/int8 layers keep (`block_codes`; Q6_K repacked into
groups of 32, `q6_k_as_int8_g32`).

The `gguf` package dequantises in numpy, group of rows by group of rows; for SmolLM2-135M's 210
Q4_1 tensors that was 2.8 s of a 7.7 s load. These formats are one scale (and offset) per block of
32 weights, so the whole tensor dequantises in a few tensor ops. Layouts (ggml-common.h):

    Q8_0: fp16 d, 32 × int8 q                 → x = d·q
    Q4_0: fp16 d, 16 bytes of 4-bit pairs      → x = d·(q − 8)
    Q4_1: fp16 d, fp16 m, 16 bytes of pairs    → x = d·q + m

In a 4-bit block, byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
Q5_0 and Q6_K are dequantised from `block_codes`: the same float32 products (exact, see there).
Other types (Q4_K, Q5_K, Q5_1, …) return None and fall back to the `gguf` package.
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
    if qtype in (QT.Q5_0, QT.Q6_K):
        flat = raw.reshape(-1, raw.shape[-1])
        codes, scale, _ = (_q5_0_codes if qtype == QT.Q5_0 else q6_k_codes)(flat)
        out = codes.reshape(flat.shape[0], scale.shape[1], -1).float() * scale[..., None]
        return out.reshape(*raw.shape[:-1], -1)
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


# The block types whose codes llmkit's int4/int8 layers hold as they are (llmkit/layers/quantized.py),
# and the layer each becomes: (bits, weights of a row per scale). Q5_1 and Q5_K are not here: their
# 5-bit codes need 8-bit storage, and llmkit's int8 layers are symmetric (no offset to hold their mins).
# Q6_K is repacked into groups of 32 (`q6_k_as_int8_g32`), not held as it is.
KEPT_FORMATS = {QT.Q8_0: (8, 32), QT.Q5_0: (8, 32), QT.Q6_K: (8, 32),
                QT.Q4_0: (4, 32), QT.Q4_1: (4, 32), QT.Q4_K: (4, 32)}
Q4_K_BYTES = 144  # per 256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of pairs
Q5_0_BYTES = 22  # per 32 weights: fp16 d, 4 bytes of fifth bits, 16 bytes of 4-bit pairs
Q6_K_BYTES = 210  # per 256 weights: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, fp16 d


def block_codes(raw: np.ndarray, qtype: QT) -> tuple[Tensor, Tensor, Tensor] | None:
    """`raw` (rows, blocks·bytes per block) uint8 → codes (rows, blocks·block size) and float32 scale
    and offset (rows, row length / group) in the form of llmkit's quantised layers, or None for other
    types:

        int8 (Q8_0):  w = code · scale                      code = q ∈ −127..127
        int8 (Q5_0):  w = d·(q − 16)                        code = q − 16, scale = d, group 32
        int8 (Q6_K), per 16 weights j of a 256-weight block: w = d·sc_j·(q − 32), repacked into
                      groups of 32 (`q6_k_as_int8_g32`):    code ∈ −127..127, scale a bf16 number
        int4:         w = (code − 8) · scale + offset       Q4_0: code = q, offset = 0
                                                            Q4_1: code = q, offset = m + 8·d
        Q4_K, per 32 weights j of a 256-weight block: w = d·sc_j · q − dmin·m_j
                                                            code = q, scale = d·sc_j,
                                                            offset = 8·scale − dmin·m_j

    Except Q6_K's, the codes are the file's own and the scales its numbers, exactly: an fp16 d times a
    6-bit or 8-bit integer has at most 18 significant bits, which float32 holds; a layer that stores
    them in bf16 rounds them (see llmkit/io/gguf_kept.py). Q6_K's scales are bf16 numbers already, and
    its weights within half a scale of the file's (`q6_k_as_int8_g32`)."""
    if qtype not in KEPT_FORMATS:
        return None
    if qtype == QT.Q4_K:
        return _q4_k_codes(raw)
    if qtype == QT.Q6_K:
        return q6_k_as_int8_g32(raw)
    if qtype == QT.Q5_0:
        return _q5_0_codes(raw)
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


def _q5_0_codes(raw: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Q5_0 (ggml-common.h block_q5_0): weight i's low 4 bits as in Q4_0 (byte i of the 16 for i < 16,
    its high nibble for 16 + i), its fifth bit bit i of the little-endian 32-bit qh."""
    rows = raw.shape[0]
    blocks = torch.from_numpy(np.array(raw)).reshape(rows, -1, Q5_0_BYTES)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)  # (rows, blocks)
    qh = blocks[..., 2:6].to(torch.int32)  # byte b holds the fifth bits of weights 8b … 8b + 7
    fifth = (qh[..., :, None] >> torch.arange(8, dtype=torch.int32)) & 1  # (rows, blocks, 4, 8)
    payload = blocks[..., 6:]
    low = torch.cat([payload & 0x0F, payload >> 4], dim=-1).to(torch.int32)  # (rows, blocks, 32)
    codes = (low | (fifth.reshape(rows, -1, 32) << 4)) - 16
    return codes.to(torch.int8).reshape(rows, -1), d.reshape(rows, -1), torch.zeros_like(d.reshape(rows, -1))


def q6_k_codes(raw: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """The file's own Q6_K codes q − 32 ∈ −32..31 (int8, rows × K), float32 scales d·sc per 16 weights
    (exact: an fp16 times an int8, ≤ 18 significant bits, and times a code ≤ 24, so the float32 weight
    is the file's) and a zero offset."""
    codes, sc, d = _q6_k_parts(raw)
    rows = codes.shape[0]
    scale = (d * sc.float()).reshape(rows, -1)
    return codes.reshape(rows, -1), scale, torch.zeros_like(scale)


def q6_k_as_int8_g32(raw: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Q6_K blocks (rows, blocks · 210 bytes) → int8 codes (rows, K) and float32 scales (rows, K/32), each
    a bf16 number, and a zero offset: the form llmkit's int8 kernel and whole-block decode step take.

    A group of 32 weights is two of Q6_K's sub-blocks of 16, w = q·d·sc_a and q·d·sc_b (q ∈ −32..31),
    which one bf16 scale holds exactly only where both d·sc are multiples of a bf16 number with codes in
    range: 0.14 % of the groups of a Q4_K_M SmolLM2 (its two halves share sc in 3.6 %, but d·sc has up to
    18 significant bits and bf16 8), too rare for a case of its own. So each group takes the tightest
    scale, s = max|w|/127 rounded *up* to a bf16 number (no code overflows), and code = round(w/s):
    every weight is within s/2 of the file's (and fp32's rounding of w/s, 2⁻²⁴ relative), with
    s ≤ (1 + 2⁻⁷)·max|w|/127 ≤ (1 + 2⁻⁷)·32·max(|d·sc_a|, |d·sc_b|)/127, about an eighth of the
    coarser half's own Q6_K step at most."""
    codes, sc, d = _q6_k_parts(raw)  # (rows, blocks, 256), (rows, blocks, 16), (rows, blocks, 1)
    rows = codes.shape[0]
    w = (codes.reshape(rows, -1, 16).float() * (d * sc.float()).reshape(rows, -1, 1)).reshape(rows, -1, 32)
    scale = _bf16_ceil(w.abs().amax(-1) / 127)  # (rows, groups)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]  # an all-zero group: codes 0
    codes = (w / safe).round().clamp(-127, 127).to(torch.int8)
    return codes.reshape(rows, -1), scale, torch.zeros_like(scale)


def _bf16_ceil(x: Tensor) -> Tensor:
    """The smallest bf16 number ≥ x (x ≥ 0 and finite), as float32: x's high 16 bits, rounded up."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def _q6_k_parts(raw: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Q6_K (ggml-common.h block_q6_K) → codes q − 32 (rows, blocks, 256) int8, the 16 int8 scales sc
    (rows, blocks, 16) and fp16 d as float32 (rows, blocks, 1).

    Two halves of 128 weights, each with 64 bytes of low nibbles
    and 32 of 2-bit high parts; weight 32k + l (k = 0…3, l = 0…31) of a half takes the low nibble
    (k < 2) or high nibble (k ≥ 2) of low byte l + 32·(k mod 2), and bits 2k, 2k + 1 of high byte l.
    Its 16 scales run in order over the 16 groups of 16 weights."""
    rows = raw.shape[0]
    blocks = torch.from_numpy(np.array(raw)).reshape(rows, -1, Q6_K_BYTES)
    low = blocks[..., 0:128].reshape(rows, -1, 2, 64)  # (rows, blocks, half, byte)
    low = torch.cat([low & 15, low >> 4], dim=-1)  # weights 0–63 of a half from the low nibbles, 64–127 high
    high = blocks[..., 128:192].reshape(rows, -1, 2, 32)
    high = torch.cat([(high >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)  # (rows, blocks, half, 128)
    codes = (low | (high << 4)).to(torch.int8) - 32  # 0…63 → −32…31
    sc = blocks[..., 192:208].contiguous().view(torch.int8)  # (rows, blocks, 16)
    d = blocks[..., 208:210].contiguous().view(torch.float16).float()  # (rows, blocks, 1)
    return codes.reshape(rows, -1, 256), sc, d


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
