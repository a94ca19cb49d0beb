"""A whole decoder block as one native call, for decoding one token of each row of a batch.

Decoding a token through SmolLM2's 30 blocks makes ~1,000 small torch calls (norms, projections, RoPE,
the cache, attention, the MLP), each a few microseconds of Python and dispatch: more time than the
4-bit weights take to stream. `decode_block` (lowbit.cpp) computes a pre-norm LLaMA-style block
(RMSNorm, q/k/v → RoPE → cache → attention over the cache → output projection, RMSNorm, SwiGLU MLP)
in fp32 with the quantised layers' own kernels, in one call (a bf16 model's stream, norms and cache
stay bf16 at its edges). A batch (the serving engine's rows, llmkit/inference/rows.py: every row writes
its new position at the same cache index, a padding mask hides what precedes a row's own start) runs
as one call too, its rows sharing each expansion of the weights. `BlockStep` decides per call whether
that applies (one new position per row, fp32 or bf16, a plain KV cache, at most a boolean key mask,
no bias, nothing observing the attention); otherwise the Block runs its ordinary layers, which stay
the reference (the tests compare the two). `install` gives each eligible Block of a prepared model its step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.inference.kv_cache import KVCache
from llmkit.layers.attention import Attention
from llmkit.layers.feedforward import GatedMLP
from llmkit.layers.norm import RMSNorm
from llmkit.quant.kernels import Kernels

ATTENTION_ARGS = frozenset({"rope", "bias", "mask", "causal", "cache", "layer"})  # what Stack passes a full-attention block


class BlockStep:
    """Called by Block.forward as `step(x, attn_args)`: the block's output, or None to run the layers."""

    def __init__(self, block: nn.Module, native: Kernels) -> None:
        self.block, self.native = block, native
        # Held here as plain attributes: each nn.Module attribute lookup costs ~0.5 µs, and this runs
        # once per block and token. (A conversion such as .to() keeps these Parameter objects; the
        # layers' kernel arguments it rebuilds are checked on each call, `_arguments`.)
        self.attn, mlp = block.attn, block.mlp
        self.norms = [block.norm1.weight, block.norm2.weight]
        self.projections = (self.attn.qkv_proj, self.attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        self.heads = [self.attn.n_heads, self.attn.n_kv_heads, self.attn.head_dim]
        self.scale = 1.0 / math.sqrt(self.attn.head_dim) if self.attn.scale is None else float(self.attn.scale)
        self.eps = [float(block.norm1.eps), float(block.norm2.eps)]
        self.op = native.ops.decode_block.default
        self._sources: tuple = ()  # the layers' _native_args the lists below were made from
        self._weights: tuple[list, list, list, list] | None = None

    def _arguments(self) -> tuple[list, list, list, list] | None:
        """The four projections' codes/scale/offset, groups, biases and AWQ divisors, as the op takes them,
        or None where a layer no longer fits the step (after a .to(bf16), a bias the kernel does not add);
        remade only when a layer's kernel arguments changed (a .to() or .float() rebuilds them)."""
        q, o, gate_up, down = self.projections
        sources = (q._native_args, o._native_args, gate_up._native_args, down._native_args)
        known = self._sources
        if not known or not (sources[0] is known[0] and sources[1] is known[1] and sources[2] is known[2]
                             and sources[3] is known[3]):
            self._sources, self._weights = sources, None
            if all(layer._native_op is not None and layer._bias_after is None
                   and (layer.act_scale is None or layer.act_scale.dtype == torch.float32)
                   for layer in self.projections):
                weights = [t for args in sources for t in args[:3]]  # codes, scale, offset, group, bias, AWQ, …
                self._weights = (weights, [a[3] for a in sources], [a[4] for a in sources], [a[5] for a in sources])
        return self._weights

    def __call__(self, x: Tensor, args: dict) -> Tensor | None:
        cache, rope, mask = args.get("cache"), args.get("rope"), args.get("mask")
        norm1, norm2 = self.norms
        dtype = x.dtype
        if (type(cache) is not KVCache or rope is None or x.dim() != 3 or x.shape[1] != 1
                or dtype not in (torch.float32, torch.bfloat16) or not x.is_cpu or args.get("bias") is not None
                or not ATTENTION_ARGS.issuperset(args) or torch.is_grad_enabled()
                or self.attn.probe is not None or self.attn.impl != "sdpa"
                or norm1.dtype != dtype or norm2.dtype != dtype or cache.k.dtype != dtype):
            return None
        keys, values = cache.layer_views()
        index, rows = args["layer"], x.shape[0]
        if keys[index].shape[0] != rows or (rows > 1 and rows > self.projections[0].native_max_rows()):
            return None  # (a batch larger than that: the layers dequantise, faster there)
        visible = None
        if mask is not None:  # a padded batch: (B, 1, 1, keys) booleans, each row's own real positions
            if mask.dtype != torch.bool or mask.shape != (rows, 1, 1, cache.pos + 1):
                return None
            visible = mask.reshape(rows, cache.pos + 1).contiguous()
        arguments = self._arguments()
        if arguments is None:
            return None
        weights, groups, biases, divisors = arguments
        cos, sin = rope  # (B, 1, 1, D), or broadcast over rows
        return self.op(x.contiguous(), weights, groups, biases, divisors, self.norms, self.eps,
                       cos.reshape(-1), sin.reshape(-1), keys[index], values[index], cache.pos, visible,
                       self.heads, self.scale, self.native.isa)


def eligible(block: nn.Module) -> bool:
    """A pre-norm block of RMSNorms, rotary self-attention with fused q/k/v (no QK-norm, no DeBERTa terms)
    and a SwiGLU MLP, every projection on the native kernel without a non-fp32 bias (AWQ's divisor is
    applied in the step, as the layer applies it)."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if not (getattr(block, "pre_norm", False) and getattr(block, "cross_attn", None) is None
            and isinstance(attn, Attention) and isinstance(mlp, GatedMLP) and mlp.act is F.silu
            and attn.q_norm is None and attn.disentangled is None):
        return False
    if not (isinstance(block.norm1, RMSNorm) and isinstance(block.norm2, RMSNorm)):
        return False
    for layer in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        if getattr(layer, "_native_op", None) is None or layer._bias_after is not None:
            return False
    return True


def install(model: nn.Module, native: Kernels | None) -> int:
    """Give every eligible Block of `model` a BlockStep; how many got one."""
    if native is None or getattr(model, "cfg", None) is None or model.cfg.position != "rope":
        return 0
    count = 0
    for module in model.modules():
        if hasattr(module, "decode_step"):
            module.decode_step = BlockStep(module, native) if eligible(module) else None
            count += module.decode_step is not None
    return count
