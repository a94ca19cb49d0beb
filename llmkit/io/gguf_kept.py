"""A GGUF file's 4- and 8-bit blocks kept as they are: its linear layers become llmkit's int4/int8
layers holding the file's own codes, and no full-precision copy of them is ever made.

Dequantising on load and quantising again for decoding gives back the same codes (the formats are
the same: one scale, and an offset, per group of 32 weights of a row), but holds every weight in
float32 on the way: 540 MB for SmolLM2-135M, whose Q4_1 layers then take 60 MB. Here the blocks go
straight into the layers, already fused the way `prepare_for_decoding` fuses (q/k/v into `qkv_proj`,
gate/up into `gate_up_proj`: rows of the three concatenated, which leaves each row's groups as they
were). A fused set whose members are not all of a kept type (Q4_0, Q4_1, Q4_K, Q8_0), or mix 4 and 8 bits,
is loaded in full precision as before, and `prepare_for_decoding(quantize="int4")` quantises it.

The embedding table is looked up, not multiplied, so it is dequantised as before; the LM head of a
tied model is the same matrix, kept as the file's Q8_0 codes (the 8-bit head `prepare_for_decoding`
would make) where torch's int4 kernel can serve it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import Tensor, nn

from llmkit.io.gguf_quants import KEPT_BITS, block_codes
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
    for i, block in enumerate(model.stack.blocks):
        for owner_name, fused, members in FUSED_SETS:
            prefix = f"stack.blocks.{i}.{owner_name}"
            names = [f"{prefix}.{m}.weight" for m in members]
            bits = {KEPT_BITS.get(QT(plan[n].qtype)) for n in names}
            if None in bits or len(bits) != 1:
                continue
            parts = [_kept_weight(data, plan[n], where, lambda t, n=n: unpermute(n, t)) for n in names]
            biases = [f"{prefix}.{m}.bias" for m in members if f"{prefix}.{m}.bias" in plan]
            bias = torch.cat([unpermute(b, read_tensor(data, plan[b])) for b in biases]) if biases else None
            q = QuantizedWeight(*(torch.cat(ts) for ts in zip(*parts)), bias=bias)
            owner = getattr(block, owner_name)
            for m in members:
                delattr(owner, m)
            setattr(owner, fused, quantized_layer(q))
            filled.update(names + biases)
            types.update(QT(plan[n].qtype).name for n in names)
    head = "embeddings.embed.weight" if model.cfg.tie_embeddings else "lm_head.weight"
    info = plan[head]
    if QT(info.qtype) == QT.Q8_0 and int8_kernel_usable(model.lm_head):
        model.lm_head = quantized_layer(QuantizedWeight(*_kept_weight(data, info, where, lambda t: t)))
        types.add("Q8_0")
        if not model.cfg.tie_embeddings:  # a tied head's table is still looked up: the embedding keeps it
            filled.add(head)
    model.quantization = KeptBlocks(tuple(sorted(types)))
    return filled


def _kept_weight(data: np.ndarray, info: TensorInfo, where: str, unpermute) -> tuple[Tensor, Tensor, Tensor]:
    codes, scale, offset = block_codes(read_raw_blocks(data, info), QT(info.qtype))
    check_finite(info.name, scale, where)  # one NaN scale would make every logit NaN
    check_finite(info.name, offset, where)
    return unpermute(codes), unpermute(scale), unpermute(offset)
