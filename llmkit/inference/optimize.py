"""Make a loaded model generate faster: fused projections and, optionally, 4-bit weights.

Decoding a token multiplies each weight matrix by one vector; on a CPU its speed is set by how fast
the weights stream from memory and by the fixed cost of each matrix-vector call (thread start-up,
dispatch). `prepare_for_decoding` attacks both:

- fusion (exact): each self-attention's q/k/v projections become one `qkv_proj`, each gated MLP's
  gate/up projections one `gate_up_proj` — 4 matrix-vector calls per layer instead of 7, with the
  same numbers in the same order, so logits are unchanged;
- `quantize="int4"` (approximate): every Linear inside the layers becomes an `Int4Linear`
  (llmkit/layers/quantized.py), 4-bit weights with a bf16 scale and offset per group of 32. The LM
  head, which sets the logits directly, gets 8 bits instead (`Int8Linear`, GGUF's Q8_0: a bf16
  scale per group of 32, so about the precision of bf16 weights at 5/8 of the bytes — the head is the
  largest matrix of a small model: 28 of SmolLM2-135M's 135 M weights); embeddings keep their dtype.
  Where torch's int4 kernel cannot serve the head (not a CPU model, vocabulary not a multiple of
  16), the head keeps its dtype too. `dtype` is the quantised layers' compute precision for many-row
  products (prefill): bf16 where the CPU runs bf16 faster, fp32 where bf16 is emulated — the choice
  `llmkit.runtime` makes (`lm.runtime.torch_dtype`); by default the model's own dtype. One-row
  products always run torch's int4 kernel on bf16 activations (its fp32 path is ~14× slower).

A model that `llmkit quantize` saved (llmkit/quant/) comes back with its layers already quantised;
here they only get `dtype` as their compute precision, and `quantize="int4"` touches the linear
layers it left in full precision.

The result is for generation only: the separate projections are gone (no LoRA, no export, no
training); load the model again for those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmkit.errors import GenerationError
from llmkit.layers.attention import Attention
from llmkit.layers.feedforward import GatedMLP
from llmkit.layers.linear import Linear
from llmkit.layers.quantized import (GROUP, NATIVE_DTYPES, Int4Linear, Int8Linear, int8_kernel_usable,
                                     is_quantized)
from llmkit.quant import kernels
from llmkit.quant.kernels import block as block_steps
from llmkit.quant.kernels import crossover
from llmkit.runtime import DTYPES, model_dtype

QUANTIZE_CHOICES = ("none", "int4")


@dataclass
class DecodingReport:
    fused_attention: int = 0  # self-attention layers whose q/k/v became one projection
    fused_mlp: int = 0  # gated MLPs whose gate/up became one projection
    int4_linears: int = 0  # Linear layers now holding 4-bit weights
    int8_linears: int = 0  # heads now holding 8-bit weights
    # Linear layers left in their dtype: heads the kernel cannot serve, in_features not a multiple of 32
    kept_linears: int = 0
    compute_dtype: torch.dtype | None = None  # of the quantised layers' many-row products (None: no quantisation)
    saved_scheme: str = ""  # a model `llmkit quantize` wrote: its scheme, e.g. "int4 gptq g128 asymmetric"
    # what multiplies the quantised layers' weights while decoding, e.g. "llmkit AVX-512 kernel",
    # "torch int4 kernel" or "dequantise + matmul" (several joined by " / " where layers differ)
    kernel: str = ""
    block_steps: int = 0  # blocks that decode a token in one native call (llmkit/quant/kernels/block.py)

    def describe(self) -> str:
        """`int4 weights (8-bit head; llmkit AVX2 kernel)`, or "" without quantisation: for the CLI's runtime line."""
        kernel = f"; {self.kernel}" if self.kernel else ""
        if self.saved_scheme:
            return f"{self.saved_scheme} weights (saved quantised{kernel})"
        if not self.int4_linears:
            return ""
        head = "8-bit head" if self.int8_linears else "head unquantised"
        return f"int4 weights ({head}{kernel})"


def prepare_for_decoding(model: nn.Module, *, quantize: str | None = None,
                         dtype: torch.dtype | str | None = None) -> DecodingReport:
    """Fuse projections (and with quantize="int4" quantise the layers' weights) in place; `dtype`
    (fp32|bf16|fp16 or a torch dtype; default: the model's) is the quantised layers' precision for
    many-row products."""
    quantize = None if quantize in (None, "none") else quantize
    if quantize not in (None, "int4"):
        raise GenerationError(f"unknown quantisation {quantize!r}; choose one of: {', '.join(QUANTIZE_CHOICES)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise GenerationError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    report = DecodingReport()
    for module in list(model.modules()):
        # Blocks name their self-attention `attn` (a decoder's cross-attention, `cross_attn`, reads
        # keys and values from another sequence, so its projections have different inputs).
        attn = getattr(module, "attn", None)
        if isinstance(attn, Attention) and attn.qkv_proj is None and _plain(attn, ("q_proj", "k_proj", "v_proj")):
            attn.qkv_proj = _fuse(attn, ("q_proj", "k_proj", "v_proj"))
            report.fused_attention += 1
        if isinstance(module, GatedMLP) and module.gate_up_proj is None and _plain(module, ("gate_proj", "up_proj")):
            module.gate_up_proj = _fuse(module, ("gate_proj", "up_proj"))
            report.fused_mlp += 1
    saved = [m for m in model.modules() if is_quantized(m)]
    if saved:  # quantised when saved: they compute in the runtime's precision
        report.compute_dtype = dtype or model_dtype(model)
        scheme = getattr(model, "quantization", None)
        report.saved_scheme = scheme.describe() if scheme is not None else "int4/int8"
        for module in saved:
            module.compute_dtype = report.compute_dtype
    if quantize == "int4":
        report.compute_dtype = dtype or model_dtype(model)
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if "head" in f"{name}.{child_name}":
                    if int8_kernel_usable(child):  # the head of a tied model: the embedding keeps the weight
                        setattr(module, child_name, Int8Linear(child, compute_dtype=report.compute_dtype))
                        report.int8_linears += 1
                    else:
                        report.kept_linears += 1
                elif child.in_features % GROUP:
                    report.kept_linears += 1
                else:
                    setattr(module, child_name, Int4Linear(child, compute_dtype=report.compute_dtype))
                    report.int4_linears += 1
    names = dict.fromkeys(m.kernel_name() for m in model.modules() if is_quantized(m))  # in order, once each
    if names:  # (never builds the kernels for a model that has no quantised layer)
        report.block_steps = block_steps.install(model, kernels.native())
    report.kernel = " / ".join(names) + (", one call per block" if report.block_steps else "")
    rows = _measure_kernel_rows(model)
    if rows:
        report.kernel += f", {rows}"
    model.decoding_report = report  # a plain attribute: what was done, for printing and for tests
    return report


def _measure_kernel_rows(model: nn.Module) -> str:
    """Up to how many rows (a prompt's tokens, a batch's sequences) llmkit's kernels multiply the quantised
    layers, as measured on the largest int4 layer, else the largest int8 one, other than the output head
    (llmkit/quant/kernels/crossover.py), and applied to all of them (int4 and int8 panels multiply alike);
    "" where the kernels do not serve them. Said in words. (The head is left out of the probe: prompts
    multiply it by their last row only, and its 1,024-row products would take most of a second.)"""
    served = [m for m in model.modules() if is_quantized(m) and m.native is not None and m.native.isa >= 1]
    head = getattr(model, "lm_head", None)
    candidates = [m for m in served if isinstance(m, Int4Linear) and m is not head] or \
                 [m for m in served if m is not head]
    if not candidates:
        return ""
    largest = max(candidates, key=lambda m: m.out_features * m.in_features)
    dtype = largest.compute_dtype or torch.float32
    if dtype not in NATIVE_DTYPES:  # (fp16: the kernels take fp32 or bf16 activations)
        return ""
    rows, measured = crossover.kernel_max_rows(largest, dtype)
    for module in served:
        module.kernel_max_rows = rows
    if rows == crossover.NO_LIMIT:
        return f"prompts too ({measured})"
    return f"prompts over {largest.native_max_rows()} tokens dequantised ({measured})"


def _plain(owner: nn.Module, names: tuple[str, ...]) -> bool:
    """All of `names` are ordinary Linear layers on one device and dtype (not LoRA-wrapped, say)."""
    layers = [getattr(owner, n, None) for n in names]
    if not all(type(layer) in (Linear, nn.Linear) for layer in layers):
        return False
    return len({(layer.weight.device, layer.weight.dtype) for layer in layers}) == 1


def _fuse(owner: nn.Module, names: tuple[str, ...]) -> Linear:
    """One Linear whose output is the concatenation of `names`' outputs; the originals are removed."""
    layers = [getattr(owner, n) for n in names]
    weight = layers[0].weight
    out_features = sum(layer.out_features for layer in layers)
    has_bias = any(layer.bias is not None for layer in layers)
    fused = Linear(layers[0].in_features, out_features, bias=has_bias, device="meta", dtype=weight.dtype)
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([layer.weight for layer in layers]), requires_grad=False)
        if has_bias:
            fused.bias = nn.Parameter(torch.cat([
                layer.bias if layer.bias is not None else weight.new_zeros(layer.out_features) for layer in layers]),
                requires_grad=False)
    for n in names:
        delattr(owner, n)
    return fused
