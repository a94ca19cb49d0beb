"""Weight-only quantised linear layers for decoding: 4-bit (and, for LM heads, 8-bit) weights.

Decoding one token multiplies every weight matrix by a single vector, so its speed is set by how
many bytes of weights stream from memory per token. Storing each weight in 4 bits (plus a scale and
a minimum per group of 32 weights of a row) moves 1/8 of the fp32 bytes.

`Int4Linear`, asymmetric round-to-nearest per group (the format GGUF calls Q4_1):
    w ≈ code · scale + minimum,   code ∈ {0..15},   scale = (max − min) / 15 over the group.
Quantising weights that were already Q4_1 (SmolLM2's GGUF) gives back their own codes, so on such a
model the only change from the dequantised fp32 weights is bf16 rounding (the scales; the
activations where they are bf16, below).

The layer stores w = (code − 8) · scale + offset with offset = minimum + 8 · scale, both in bf16,
because that is the form torch's CPU int4 matrix kernel (`_weight_int4pack_mm_for_cpu`) reads; one-row
products (decoding) use that kernel, and the dequantised weight is computed from the same bf16
numbers, so both paths multiply by the same weights. Many-row products (prefill, where
arithmetic rather than memory bounds the speed) dequantise the weight and use the ordinary matmul,
which is several times faster there, in the layer's `compute_dtype`: bf16 where the CPU has native
bf16 arithmetic, fp32 where bf16 is emulated (AVX2-only CPUs, where a bf16 matmul of 128 rows is
~5× slower than an fp32 one: SmolLM2's 512-token prefill ran at 37 tokens/s in bf16 against 191 in
fp32 on an AMD Zen 1; llmkit.runtime decides which, by a probe). The
kernel itself always takes bf16 activations: it accepts fp32 ones only with an fp32 scale table,
and that path is not vectorised (one row of 1536×576: 0.63 ms against 0.045 ms in bf16, on AVX2
as on AVX-512), so an fp32 layer rounds its input to bf16 for the kernel and returns fp32.
Inference only: these layers hold buffers, not parameters, and have no gradient.

`Int8Linear`, symmetric per group of 32 (GGUF's Q8_0, the format of SmolLM2's embedding/LM head):
    w ≈ code · scale,   code ∈ {−127..127},   scale = max|w| / 127 over the group.
torch has no CPU kernel for grouped 8-bit weights, so the product runs as two passes of the int4
kernel: code = 16 · high + low with high ∈ {−8..7} and low ∈ {0..15}, each a valid int4 code set, and
w·x = (16 · scale) · high·x + scale · low·x. Per token that reads two 4-bit packs and two scale tables
(35 MB for SmolLM2's head, against 56 MB in bf16), and Q8_0 weights come back exactly (only the scales
are rounded to bf16). The int8 codes are kept too, for dequantising (many-row products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GROUP = 32
# Up to this many rows the int4 kernel is faster; above it, dequantising once and using the ordinary
# matmul is (measured on 2 cores, 3072×576: kernel 2.1 ms at 64 rows; dequantise 4.5 ms + matmul 4.6 ms
# at 512 rows, where the kernel takes ~16 ms). The fp32 matmul on an AVX2-only CPU moves the crossover
# no lower (1536×576, 2 threads: kernel 1.5 ms at 128 rows; dequantise 2.1 ms + fp32 matmul 1.2 ms).
KERNEL_MAX_ROWS = 128


def quantize_int4(weight: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """(N, K) float → codes (N, K) uint8 in 0..15, scale and minimum (N, K/group) float32."""
    N, K = weight.shape
    assert K % group == 0, f"in_features {K} is not a multiple of the group size {group}"
    w = weight.detach().float().reshape(N, K // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    codes = ((w - lo[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    return codes.reshape(N, K), scale, lo


def dequantize_int4(codes: Tensor, scale: Tensor, minimum: Tensor, group: int = GROUP) -> Tensor:
    """The float32 weight (N, K) that (codes, scale, minimum) stand for."""
    N, K = codes.shape
    w = torch.addcmul(minimum[..., None], codes.reshape(N, K // group, group).float(), scale[..., None])
    return w.reshape(N, K)


def quantize_int8(weight: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor]:
    """(N, K) float → codes (N, K) int8 in −127..127 and scale (N, K/group) float32, w ≈ code · scale."""
    N, K = weight.shape
    assert K % group == 0, f"in_features {K} is not a multiple of the group size {group}"
    w = weight.detach().float().reshape(N, K // group, group)
    scale = w.abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: every code 0
    codes = (w / safe[..., None]).round().clamp(-127, 127).to(torch.int8)
    return codes.reshape(N, K), scale


# Looked up once: resolving torch.ops.aten.<name> costs about a microsecond, ~120 times a token.
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


def int4_kernel_available() -> bool:
    return _INT4_MM is not None


class _KernelLinear(nn.Module):
    """What the int4 and int8 layers share: the forward, which sums one or more passes of the int4
    kernel for products of few rows and multiplies by the dequantised weight otherwise."""

    in_features: int
    out_features: int
    group: int
    # The kernel's arguments (`_kernel_pass`) per pass: plain attributes, CPU only (and only for
    # out_features divisible by 16, which the kernel requires); empty: never the kernel.
    kernel_passes: list[tuple[Tensor, int, Tensor]]
    compute_dtype: torch.dtype  # of the many-row products (dequantised weight × activations)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight the layer multiplies by, in `dtype` (default: the compute dtype)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, self.in_features)
        # casts only when needed: decoding makes ~120 of these calls a token
        if self.kernel_passes and rows.is_cpu and rows.shape[0] <= KERNEL_MAX_ROWS:
            rows = rows if rows.dtype == torch.bfloat16 else rows.to(torch.bfloat16)
            y = _INT4_MM(rows, *self.kernel_passes[0])
            for kernel_args in self.kernel_passes[1:]:
                y = y + _INT4_MM(rows, *kernel_args)
        else:
            rows = rows if rows.dtype == self.compute_dtype else rows.to(self.compute_dtype)
            y = F.linear(rows, self.dequantize(self.compute_dtype))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _kernel_pass(codes: Tensor, scale: Tensor, offset: Tensor, group: int) -> tuple[Tensor, int, Tensor]:
    """The int4 kernel's arguments after the input: its packing of codes (N, K) in 0..15, the group
    size, and the (K/group, N, 2) table of bf16 scale and offset (w = (code − 8) · scale + offset)."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return packed, group, torch.stack([scale.t(), offset.t()], -1).to(torch.bfloat16).contiguous()


def _kernel_usable(linear: nn.Linear) -> bool:
    return int4_kernel_available() and linear.weight.device.type == "cpu" and linear.out_features % 16 == 0


def _compute_dtype(linear: nn.Linear, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None else linear.weight.dtype


class Int4Linear(_KernelLinear):
    """A Linear whose weight is kept as int4 codes; see the module docstring. `compute_dtype` is the
    precision of its many-row products (default: the replaced layer's dtype)."""

    def __init__(self, linear: nn.Linear, group: int = GROUP, *, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        self.compute_dtype = _compute_dtype(linear, compute_dtype)
        codes, scale, minimum = quantize_int4(linear.weight, group)
        # Codes two per byte (low nibble: even column) for dequantising; the kernel wants its own packing.
        self.register_buffer("packed_codes", codes[:, 0::2] | (codes[:, 1::2] << 4))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("offset", (minimum + 8 * scale).to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.kernel_passes = [_kernel_pass(codes, self.scale, self.offset, group)] if _kernel_usable(linear) else []

    def codes(self) -> Tensor:
        low, high = self.packed_codes & 15, self.packed_codes >> 4
        return torch.stack([low, high], -1).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        scale, offset = self.scale.float(), self.offset.float()
        w = dequantize_int4(self.codes(), scale, offset - 8 * scale, self.group)  # ~2× the bf16 matmul's cost
        return w.to(dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int4, "
                f"compute_dtype={self.compute_dtype}")


class Int8Linear(_KernelLinear):
    """A Linear whose weight is kept as symmetric int8 codes per group (Q8_0), multiplied as two int4
    kernel passes; see the module docstring. Only built where the kernel runs (`int8_kernel_usable`):
    without it, dequantising 8-bit weights at every step would be slower than the layer it replaces."""

    def __init__(self, linear: nn.Linear, group: int = GROUP, *, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        assert int8_kernel_usable(linear), "Int8Linear needs the CPU int4 kernel and out_features % 16 == 0"
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        self.compute_dtype = _compute_dtype(linear, compute_dtype)
        codes, scale = quantize_int8(linear.weight, group)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        codes = codes.to(torch.int32)
        high = torch.div(codes, 16, rounding_mode="floor")  # −8..7
        low = codes - 16 * high  # 0..15
        scale = self.scale.float()
        self.kernel_passes = [_kernel_pass(high + 8, 16 * scale, torch.zeros_like(scale), group),  # 16·scale·high
                              _kernel_pass(low, scale, 8 * scale, group)]  # scale·low

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        N, K = self.codes.shape
        w = self.codes.reshape(N, K // self.group, self.group).float() * self.scale.float()[..., None]
        return w.reshape(N, K).to(dtype or self.compute_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, int8, "
                f"compute_dtype={self.compute_dtype}")


def int8_kernel_usable(linear: nn.Linear, group: int = GROUP) -> bool:
    return _kernel_usable(linear) and linear.in_features % group == 0
