"""A GGUF file's 4-, 5-, 6- and 8-bit blocks kept as they are: its linear layers become llmkit's int4/int8
layers holding the file's own codes (Q6_K's repacked into int8), and no full-precision copy of them is made.

Dequantising on load and quantising again for decoding gives back the same codes for the 4- and
8-bit formats (one scale, and an offset, per group of 32 weights of a row), but holds every weight in
float32 on the way: 540 MB for SmolLM2-135M, whose Q4_1 layers then take 60 MB. Here the blocks go
straight into the layers, already fused the way `prepare_for_decoding` fuses (q/k/v into `qkv_proj`,
gate/up into `gate_up_proj`: rows of the three concatenated, which leaves each row's groups as they
were). Which layer each type becomes (llmkit/io/gguf_quants.py, KEPT_FORMATS):

    Q4_0, Q4_1, Q4_K  → int4, groups of 32       (llmkit's kernels; scales and offsets in bf16)
    Q8_0, Q5_0        → int8, groups of 32       (llmkit's kernels; scales in bf16)
    Q6_K              → int8, groups of 32       (repacked: llmkit's kernels; scales in bf16)

The bf16 scales round the file's fp16 d (and Q4_K's d·sc, d·m): each weight within 2⁻⁸ of itself.
Q6_K's 6-bit codes q − 32 ∈ −32..31 have a scale d·sc per 16 weights, which no kernel's group of 32
holds as it is: each group of 32 gets new int8 codes under one bf16 scale (gguf_quants.q6_k_as_int8_g32),
every weight within half that scale of the file's (about an eighth of the coarser half's Q6_K step at
most; rarely exact, 0.14 % of a Q4_K_M SmolLM2's groups). The alternative, the file's codes with exact float32
scales per 16 and a dequantisation at every product, was exact but decoded a Q4_K_M SmolLM2 at half
the speed (docs/quantization.md). Q5_1 and Q5_K have an offset (a min) per group that llmkit's
symmetric int8 layers cannot hold: they load in full precision.

A fused set whose members share bits is kept as one layer; members of mixed bits (Q4_K q/k beside a
Q6_K v, as in Q4_K_M files) are each kept alone, unfused. A member of another type is loaded in full
precision, and `prepare_for_decoding(quantize="int4")` quantises it.

The embedding table is looked up, not multiplied, so it is dequantised as before. The LM head is kept
where a kernel serves it (`int8_kernel_usable`); the head of a tied model is the table's matrix, kept
only as 8-bit codes (Q8_0, Q5_0, Q6_K: the 8-bit head `prepare_for_decoding` would make).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import Tensor, nn

from llmkit.io.gguf_quants import KEPT_FORMATS, block_codes
from llmkit.io.gguf_reader import TensorInfo, read_raw_blocks, read_tensor
from llmkit.io.weights import check_finite
from llmkit.layers.quantized import QuantizedWeight, int8_kernel_usable, quantized_layer

# (owner module in a block, the fused layer's name, the GGUF-ordered layers it is made of)
FUSED_SETS = (("attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
              ("attn", "o_proj", ("o_proj",)),
              ("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
              ("mlp", "down_proj", ("down_proj",)))


@dataclass(frozen=True)
class KeptBlocks:
    """`model.quantization` of a GGUF model whose blocks were kept: what `prepare_for_decoding` reports
    and `convert --to hf` refuses (a quantised model)."""
    types: tuple[str, ...]  # the kept GGUF types, e.g. ("Q4_1", "Q8_0")

    def describe(self) -> str:
        return f"GGUF {'/'.join(self.types)}"


def keep_blocks(model: nn.Module, plan: dict[str, TensorInfo], data: np.ndarray, *, unpermute, where: str) -> set[str]:
    """Replace `model`'s linear layers whose blocks can be kept by int4/int8 layers built from them;
    returns the parameter names of `plan` now filled. `unpermute(name, tensor)` undoes llama.cpp's q/k
    row order (rows of codes, scales and offsets alike)."""
    filled: set[str] = set()
    types: set[str] = set()

    def weight(name: str) -> QuantizedWeight:
        types.add(QT(plan[name].qtype).name)
        return _kept_weight(data, plan[name], where, lambda t: unpermute(name, t))

    def bias(name: str) -> Tensor | None:
        return unpermute(name, read_tensor(data, plan[name])) if name in plan else None

    for i, block in enumerate(model.stack.blocks):
        for owner_name, fused, members in FUSED_SETS:
            prefix = f"stack.blocks.{i}.{owner_name}"
            owner = getattr(block, owner_name)
            names = [f"{prefix}.{m}.weight" for m in members]
            formats = [KEPT_FORMATS.get(QT(plan[n].qtype)) for n in names]
            if None not in formats and len({bits for bits, _ in formats}) == 1:  # one layer for the set
                parts = [weight(n) for n in names]
                biases = [bias(f"{prefix}.{m}.bias") for m in members]
                q = _concatenated(parts, None if biases[0] is None else torch.cat(biases))
                for m in members:
                    delattr(owner, m)
                setattr(owner, fused, quantized_layer(q))
                filled.update(names + [f"{prefix}.{m}.bias" for m in members if biases[0] is not None])
                continue
            for m, name, fmt in zip(members, names, formats):  # mixed: each member that can be kept, alone
                if fmt is None:
                    continue
                q = weight(name)
                q.bias = bias(f"{prefix}.{m}.bias")
                setattr(owner, m, quantized_layer(q))
                filled.update([name] + ([f"{prefix}.{m}.bias"] if q.bias is not None else []))
    # The head is the largest matrix, multiplied at every token: kept only where a kernel serves it (through
    # dequantise + matmul, SmolLM2's 49,152 × 576 took 124 ms a token against 2.8 ms in int8 on llmkit's
    # kernel, 1 thread, AMD EPYC AVX512); else it is dequantised and `prepare_for_decoding` decides.
    head = "embeddings.embed.weight" if model.cfg.tie_embeddings else "lm_head.weight"
    fmt = KEPT_FORMATS.get(QT(plan[head].qtype))
    if fmt is not None and int8_kernel_usable(model.lm_head) and (not model.cfg.tie_embeddings or fmt[0] == 8):
        # (a tied head's table is still looked up, in float32, by the embedding: worth a copy of codes
        # only as the 8-bit head `prepare_for_decoding` would make of it anyway)
        model.lm_head = quantized_layer(weight(head))
        if not model.cfg.tie_embeddings:
            filled.add(head)
    model.quantization = KeptBlocks(tuple(sorted(types)))
    return filled


def _kept_weight(data: np.ndarray, info: TensorInfo, where: str, unpermute) -> QuantizedWeight:
    codes, scale, offset = block_codes(read_raw_blocks(data, info), QT(info.qtype))
    check_finite(info.name, scale, where)  # one NaN scale would make every logit NaN
    check_finite(info.name, offset, where)
    return QuantizedWeight(unpermute(codes), unpermute(scale), unpermute(offset))


def _concatenated(parts: list[QuantizedWeight], bias: Tensor | None) -> QuantizedWeight:
    """The rows of `parts` (of one bits, every kept type in groups of 32) as one weight."""
    return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                           torch.cat([p.offset for p in parts]), bias=bias)
