"""A GGUF file's 4-, 5-, 6- and 8-bit blocks kept as they are: its linear layers become llmkit's int4/int8
layers holding the file's own codes, and no full-precision copy of them is ever made.

Dequantising on load and quantising again for decoding gives back the same codes for the 4- and
8-bit formats (one scale, and an offset, per group of 32 weights of a row), but holds every weight in
float32 on the way: 540 MB for SmolLM2-135M, whose Q4_1 layers then take 60 MB. Here the blocks go
straight into the layers, already fused the way `prepare_for_decoding` fuses (q/k/v into `qkv_proj`,
gate/up into `gate_up_proj`: rows of the three concatenated, which leaves each row's groups as they
were). Which layer each type becomes (llmkit/io/gguf_quants.py, KEPT_FORMATS):

    Q4_0, Q4_1, Q4_K  → int4, groups of 32       (llmkit's kernels; scales and offsets in bf16)
    Q8_0, Q5_0        → int8, groups of 32       (llmkit's kernels; scales in bf16)
    Q6_K              → int8, groups of 16       (no kernel takes 16: dequantise + matmul, scales in fp32)

Q6_K's 6-bit codes are q − 32 ∈ −32..31 and its scale per 16 weights d·sc (fp16 times int8), which
no group of 32 can hold, so no repack into a kernel's layout is exact. Its layers run llmkit's
pure-PyTorch path (the weight dequantised for each product), with the scales kept in float32, where
d·sc is exact: the weights are the file's to the bit. (In bf16 the scale would round by up to 2⁻⁸
of itself, an eighth of a quantisation step on the largest codes.) Q5_1 and Q5_K have an offset
(a min) per group that llmkit's symmetric int8 layers cannot hold: they load in full precision.
The bf16 scales of the other types round the file's fp16 d (and Q4_K's d·sc, d·m) the same way.

A fused set whose members share bits is kept as one layer (at the finer group: a group-32 scale
repeated over two groups of 16 is the same weight); members of mixed bits (Q4_K q/k beside a Q6_K v,
as in Q4_K_M files) are each kept alone, unfused. A member of another type is loaded in full
precision, and `prepare_for_decoding(quantize="int4")` quantises it.

The embedding table is looked up, not multiplied, so it is dequantised as before. The LM head is kept
where a kernel serves its format (not Q6_K: see `keep_blocks`); the head of a tied model is the
table's matrix, kept only as the file's Q8_0 or Q5_0 codes (the 8-bit head `prepare_for_decoding`
would make).
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
from llmkit.layers.quantized import NATIVE_BLOCK, QuantizedWeight, int8_kernel_usable, quantized_layer

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
                setattr(owner, fused, _layer(q))
                filled.update(names + [f"{prefix}.{m}.bias" for m in members if biases[0] is not None])
                continue
            for m, name, fmt in zip(members, names, formats):  # mixed: each member that can be kept, alone
                if fmt is None:
                    continue
                q = weight(name)
                q.bias = bias(f"{prefix}.{m}.bias")
                setattr(owner, m, _layer(q))
                filled.update([name] + ([f"{prefix}.{m}.bias"] if q.bias is not None else []))
    # The head is the largest matrix, multiplied at every token: kept only where a kernel serves its
    # format (groups of 32). A Q6_K head through dequantise + matmul took 124 ms a token for SmolLM2's
    # 49,152 × 576 (1 thread, AMD EPYC AVX512) against 2.8 ms in int8 groups of 32 on llmkit's kernel,
    # so it is dequantised and `prepare_for_decoding` gives it its 8-bit head, as before.
    head = "embeddings.embed.weight" if model.cfg.tie_embeddings else "lm_head.weight"
    fmt = KEPT_FORMATS.get(QT(plan[head].qtype))
    if fmt is not None and fmt[1] % NATIVE_BLOCK == 0 and int8_kernel_usable(model.lm_head) and (
            not model.cfg.tie_embeddings or fmt[0] == 8):
        # (a tied head's table is still looked up, in float32, by the embedding: worth a copy of codes
        # only as the 8-bit head `prepare_for_decoding` would make of it anyway)
        model.lm_head = _layer(weight(head))
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
    """The rows of `parts` (of one bits) as one weight, at their finest group."""
    group = min(p.group for p in parts)

    def regrouped(t: Tensor, p: QuantizedWeight) -> Tensor:  # each scale repeated over the finer groups
        return t.repeat_interleave(p.group // group, dim=1)

    return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([regrouped(p.scale, p) for p in parts]),
                           torch.cat([regrouped(p.offset, p) for p in parts]), bias=bias)


def _layer(q: QuantizedWeight) -> nn.Module:
    """The int4/int8 layer of `q`. Where no kernel serves it (Q6_K's groups of 16) every product
    dequantises, in float32 or the compute dtype, so the scale can stay the file's exact float32
    d·sc instead of its bf16 rounding: the layer then multiplies by exactly the file's weights."""
    layer = quantized_layer(q)
    if layer.native is None and not layer.kernel_passes:
        layer.scale = q.scale.float().contiguous()  # the same buffer, in the dtype the product reads
        if q.bits == 4:
            layer.offset = q.offset.float().contiguous()
    return layer
