"""Weight-only quantised linear layers: int4 per group (asymmetric or symmetric) and int8 (symmetric,
per group or per output channel), round-to-nearest or with codes chosen by a calibrated method.

Decoding one token multiplies every weight matrix by a single vector, so its speed is set by how
many bytes of weights stream from memory per token; 4-bit weights move 1/8 of the fp32 bytes.

Formats (`WeightFormat`; one scale, and for asymmetric int4 one offset, per `group` weights of a row):
    int4 asymmetric (GGUF's Q4_1): w ≈ code · scale + minimum,  code ∈ {0..15}, scale = (max − min) / 15
    int4 symmetric:                w ≈ (code − 8) · scale,       code ∈ {0..15}, scale = max|w| / 7.5
    int8 symmetric (GGUF's Q8_0):  w ≈ code · scale,             code ∈ {−127..127}, scale = max|w| / 127
Round-to-nearest puts every weight within half a step (scale / 2) of its code's value, before the
scale and offset are stored in bf16 (the tests bound that rounding too). Quantising weights that were
already Q4_1 or Q8_0 (SmolLM2's GGUF) gives back their own codes.

An int4 layer stores w = (code − 8) · scale + offset (offset = minimum + 8 · scale; 0 if symmetric),
both in bf16. Products run llmkit's own kernel where it was built (llmkit/quant/kernels: the layer's
own codes and bf16 numbers, fp32 activations and sums, so it differs from the dequantised fp32 matmul
only in summation order; int8 too, in one pass): decoding, a batch, and a prompt of up to as many rows
as `prepare_for_decoding` measured it faster than the alternative below on this machine (at least
NATIVE_MAX_ROWS; on the Zen 5 measured, every prompt length in fp32 and up to 32 rows in bf16). Without it
they run torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), which reads this same form; the
dequantised weight is computed from the same bf16 numbers, so every path multiplies by the same weights. The kernel takes groups of 32, 64, 128 or
256: a larger group (a whole row, say) is given to it as its scale repeated over kernel-sized groups,
which is exact. Many-row products past that (prefill, where arithmetic rather than memory bounds the
speed) dequantise the weight and use the ordinary matmul, in the layer's `compute_dtype`: bf16 where the CPU has native bf16 arithmetic, fp32 where bf16 is emulated (AVX2-only
CPUs, where a bf16 matmul of 128 rows is ~5× slower than an fp32 one: SmolLM2's 512-token prefill ran
at 37 tokens/s in bf16 against 191 in fp32 on an AMD Zen 1; llmkit.runtime decides which, by a probe;
None: the activations' dtype, which the runtime chose by the same rule). The kernel itself always takes
bf16 activations: it accepts fp32 ones only with an fp32 scale table, and that path is not vectorised
(one row of 1536×576: 0.63 ms against 0.045 ms in bf16, on AVX2 as on AVX-512), so an fp32 layer
rounds its input to bf16 for the kernel and returns fp32.

torch has no CPU kernel for 8-bit weights, so without llmkit's an int8 product runs as two passes of torch's int4 kernel:
code = 16 · high + low with high ∈ {−8..7} and low ∈ {0..15}, each a valid int4 code set, and
w·x = (16 · scale) · high·x + scale · low·x (35 MB a token for SmolLM2's head, against 56 MB in bf16).
Where the kernel cannot run (not the CPU, out_features not a multiple of 16, a group it cannot be given)
every product dequantises the weight first.

AWQ (llmkit.quant.awq) quantises W·diag(s) and divides the layer's input by s at run time
(`act_scale`), an elementwise division before the product. Inference only: these layers hold buffers,
not parameters, and have no gradient.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.quant import kernels

GROUP = 32
KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes torch's int4 kernel accepts
NATIVE_BLOCK = 32  # llmkit's kernel takes groups of whole blocks of 32 columns
# Up to this many rows the int4 kernel is faster; above it, dequantising once and using the ordinary
# matmul is (measured on 2 cores, 3072×576: kernel 2.1 ms at 64 rows; dequantise 4.5 ms + matmul 4.6 ms
# at 512 rows, where the kernel takes ~16 ms). The fp32 matmul on an AVX2-only CPU moves the crossover
# no lower (1536×576, 2 threads: kernel 1.5 ms at 128 rows; dequantise 2.1 ms + fp32 matmul 1.2 ms).
KERNEL_MAX_ROWS = 128
# llmkit's own kernel (llmkit/quant/kernels) serves products of at least this many rows, by its vector ISA
# (2 AVX-512, 1 AVX2, 0 portable C++), and of more where `prepare_for_decoding` measured it faster than
# dequantising + the ordinary matmul on this machine (llmkit/quant/kernels/crossover.py: on the Zen 5
# measured, at every prompt length). These floors are the crossovers of the kernels of few rows, measured
# before the many-row kernel existed (SmolLM2's four block layers, 2 threads, Zen 5): AVX-512 2.32 ms at
# 64 rows against dequantise + fp32 matmul 2.61; AVX2 1.24 at 24 against 1.35; with bf16 products on AVX-512
# (native bf16: Zen 5's `--dtype auto`) 0.60 at 16 against dequantise + bf16 matmul 0.89.
NATIVE_MAX_ROWS = {2: 64, 1: 24, 0: 8}
NATIVE_MAX_ROWS_BF16 = 16
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # the activations llmkit's kernels take (fp16 dequantises)


@dataclass(frozen=True)
class WeightFormat:
    bits: int  # 4 or 8
    group: int  # weights of a row sharing one scale (in_features: one scale per output channel)
    symmetric: bool  # int8 is always symmetric


def group_params(w: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale and minimum (the value of code 0; float32, unrounded) of each group: `w` is (..., group)."""
    if bits == 8:
        scale = w.abs().amax(-1) / 127
        return scale, torch.zeros_like(scale)  # int8 codes are signed: no minimum
    if symmetric:
        scale = w.abs().amax(-1) / 7.5
        return scale, -8 * scale  # so the offset, minimum + 8 · scale, is exactly 0
    lo, hi = w.amin(-1), w.amax(-1)
    return (hi - lo) / 15, lo


def encode(w: Tensor, scale: Tensor, minimum: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Round-to-nearest codes (as floats) of `w` (..., g) for per-group `scale`, `minimum` (...)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]  # a constant group: one code
    if bits == 8:
        return (w / safe).round().clamp(-127, 127)
    if symmetric:
        return (w / safe).round().clamp(-8, 7) + 8
    return ((w - minimum[..., None]) / safe).round().clamp(0, 15)


def stored_params(scale: Tensor, minimum: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The bf16 scale and offset a layer keeps (w = (code − 8) · scale + offset for int4, code · scale for int8)."""
    offset = torch.zeros_like(scale) if bits == 8 else minimum + 8 * scale
    return scale.to(torch.bfloat16), offset.to(torch.bfloat16)


def decode(codes: Tensor, scale: Tensor, offset: Tensor, bits: int) -> Tensor:
    """float32 weights of codes (..., g) from the stored per-group scale and offset (...)."""
    scale, offset = scale.float()[..., None], offset.float()[..., None]
    # In place on the fresh float copy: a broadcasting addcmul took ~28× longer on (3072, 576) (4.7 ms
    # against 0.17 ms, 2 threads, AVX2 kernels), which made int4 prefill slower than fp32.
    w = codes.float().mul_(scale)
    return w if bits == 8 else w.add_(offset - 8 * scale)


def quantize_weight(weight: Tensor, fmt: WeightFormat) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: (N, K) float → codes (N, K) (uint8 for int4, int8 for int8) and the bf16
    scale and offset (N, K/group)."""
    N, K = weight.shape
    assert K % fmt.group == 0, f"in_features {K} is not a multiple of the group size {fmt.group}"
    w = weight.detach().float().reshape(N, K // fmt.group, fmt.group)
    scale, minimum = group_params(w, fmt.bits, fmt.symmetric)
    codes = encode(w, scale, minimum, fmt.bits, fmt.symmetric)
    scale, offset = stored_params(scale, minimum, fmt.bits)
    return codes.to(torch.int8 if fmt.bits == 8 else torch.uint8).reshape(N, K), scale, offset


def dequantize_weight(codes: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """The float32 (N, K) weight of codes and per-group scale and offset (N, K/group)."""
    N, K = codes.shape
    bits = 8 if codes.dtype == torch.int8 else 4
    return decode(codes.reshape(N, scale.shape[1], -1), scale, offset, bits).reshape(N, K)


def quantize_int4(weight: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric int4, unrounded parameters: codes (N, K) uint8 in 0..15, scale and minimum (N, K/group)."""
    N, K = weight.shape
    assert K % group == 0, f"in_features {K} is not a multiple of the group size {group}"
    w = weight.detach().float().reshape(N, K // group, group)
    scale, minimum = group_params(w, 4, False)
    return encode(w, scale, minimum, 4, False).to(torch.uint8).reshape(N, K), scale, minimum


def dequantize_int4(codes: Tensor, scale: Tensor, minimum: Tensor, group: int = GROUP) -> Tensor:
    """The float32 weight (N, K) that (codes, scale, minimum) stand for."""
    N, K = codes.shape
    w = torch.addcmul(minimum[..., None], codes.reshape(N, K // group, group).float(), scale[..., None])
    return w.reshape(N, K)


def quantize_int8(weight: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor]:
    """Symmetric int8, unrounded scale: codes (N, K) int8 in −127..127 and scale (N, K/group), w ≈ code · scale."""
    N, K = weight.shape
    assert K % group == 0, f"in_features {K} is not a multiple of the group size {group}"
    w = weight.detach().float().reshape(N, K // group, group)
    scale, _ = group_params(w, 8, True)
    return encode(w, scale, scale, 8, True).to(torch.int8).reshape(N, K), scale


_SCRATCH = threading.local()  # Int4Linear._weight_for_product's buffer, one per thread

# Looked up once: resolving torch.ops.aten.<name> costs about a microsecond, ~120 times a token.
_INT4_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


def int4_kernel_available() -> bool:
    return _INT4_MM is not None


def kernel_group(group: int) -> int | None:
    """The largest group the kernel takes that divides `group` (its scales repeated, exactly), or None."""
    return next((g for g in KERNEL_GROUPS if group % g == 0), None)


@dataclass
class QuantizedWeight:
    """What a quantised layer holds: codes (N, K), bf16 scale and offset (N, K/group), and optionally
    a bias and AWQ's per-input-channel divisor (K,)."""
    codes: Tensor
    scale: Tensor
    offset: Tensor
    bias: Tensor | None = None
    act_scale: Tensor | None = None

    @classmethod
    def of(cls, linear: nn.Linear, fmt: WeightFormat) -> "QuantizedWeight":
        codes, scale, offset = quantize_weight(linear.weight, fmt)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(codes, scale, offset, bias)

    @property
    def bits(self) -> int:
        return 8 if self.codes.dtype == torch.int8 else 4

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]


class _KernelLinear(nn.Module):
    """What the int4 and int8 layers share: the forward, which sums one or more passes of the int4
    kernel for products of few rows and multiplies by the dequantised weight otherwise."""

    in_features: int
    out_features: int
    group: int
    # The kernel's arguments (`_kernel_pass`) per pass: plain attributes, CPU only; empty: never the kernel.
    kernel_passes: list[tuple[Tensor, int, Tensor]]
    compute_dtype: torch.dtype | None  # of the many-row products; None: the activations' dtype
    # llmkit's kernels (llmkit/quant/kernels) where they were built and serve this layer, else None;
    # then `kernel_passes` (torch's kernel) or nothing (always dequantise).
    native: kernels.Kernels | None
    # the most rows it takes as measured on this machine (llmkit/quant/kernels/crossover.py, by
    # prepare_for_decoding); None: the floor NATIVE_MAX_ROWS
    kernel_max_rows: int | None = None

    def _hold(self, q: QuantizedWeight, compute_dtype: torch.dtype | None) -> None:
        self.out_features, self.in_features = q.codes.shape
        self.group, self.compute_dtype = q.group, compute_dtype
        self.register_buffer("bias", q.bias)
        self.register_buffer("act_scale", q.act_scale)
        on_cpu = q.codes.device.type == "cpu"
        self.native = kernels.native() if on_cpu and q.group % NATIVE_BLOCK == 0 else None
        self.kernel_passes = []

    def _native_weights(self) -> tuple:
        """The weight's codes, scale and offset as the native kernel takes them."""
        raise NotImplementedError

    def _prepare_native(self) -> None:
        """The native kernel's whole argument list, made once (decoding calls the layer ~120 times a
        token, and each attribute of a Module costs a lookup): its op, the tensors, and the bias it adds
        itself (fp32 only; another dtype's bias is added after, in that dtype)."""
        self._native_op, self._native_args, self._bias_after = None, (), None
        if self.native is None:
            return
        fused_bias = self.bias is not None and self.bias.dtype == torch.float32
        self._native_op = self.native.ops.linear.default
        self._native_args = (*self._native_weights(), self.group, self.bias if fused_bias else None,
                             self.act_scale, self.native.isa)
        self._bias_after = None if fused_bias else self.bias

    def _apply(self, fn, recurse: bool = True):
        """After .to()/.float() &c. the buffers are new tensors: the kernel's arguments follow them."""
        module = super()._apply(fn, recurse)
        self._prepare_native()
        return module

    def kernel_name(self) -> str:
        """Which kernel multiplies few rows (decoding): for the runtime line."""
        if self.native is not None:
            return f"{self.native.describe()} kernel"
        return "torch int4 kernel" if self.kernel_passes else "dequantise + matmul"

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The weight the layer multiplies by, in `dtype` (default: the compute dtype, else float32)."""
        raise NotImplementedError

    def _weight_for_product(self, dtype: torch.dtype) -> Tensor:
        """The dequantised weight for one many-row product (a prompt), valid until the next such call."""
        return self.dequantize(dtype)

    def native_max_rows(self) -> int:
        """The most rows a product runs on llmkit's kernel (0 without it); more dequantise."""
        if self.native is None:
            return 0
        floor = NATIVE_MAX_ROWS_BF16 if self.native.isa == 2 and self.compute_dtype == torch.bfloat16 \
            else NATIVE_MAX_ROWS[self.native.isa]
        return floor if self.kernel_max_rows is None else max(floor, self.kernel_max_rows)

    def forward(self, x: Tensor) -> Tensor:
        if self._native_op is not None and x.is_cpu and x.dtype in NATIVE_DTYPES:
            n = x.numel() // self.in_features
            if n == 1 or n <= self.native_max_rows():  # one call: reshape, AWQ, bias, dtype inside
                y = self._native_op(x, *self._native_args)
                return y if self._bias_after is None else y + self._bias_after
        rows = x.reshape(-1, self.in_features)
        if self.act_scale is not None:  # AWQ: the weight was multiplied by s, so the input is divided by it
            rows = rows / self.act_scale
        # casts only when needed: decoding makes ~120 of these calls a token
        if self.kernel_passes and rows.is_cpu and rows.shape[0] <= KERNEL_MAX_ROWS:
            rows = rows if rows.dtype == torch.bfloat16 else rows.to(torch.bfloat16)
            rows = rows.contiguous()  # the kernel refuses strided rows (a batch's last positions are a view)
            y = _INT4_MM(rows, *self.kernel_passes[0])
            for kernel_args in self.kernel_passes[1:]:
                y = y + _INT4_MM(rows, *kernel_args)
        else:
            dtype = self.compute_dtype or x.dtype
            rows = rows if rows.dtype == dtype else rows.to(dtype)
            y = F.linear(rows, self._weight_for_product(dtype))
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        bits = "int8" if isinstance(self, Int8Linear) else "int4"
        return (f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, {bits}, "
                f"compute_dtype={self.compute_dtype}, {self.kernel_name()}"
                + (", awq" if self.act_scale is not None else ""))


def _kernel_pass(codes: Tensor, scale: Tensor, offset: Tensor, group: int) -> tuple[Tensor, int, Tensor]:
    """The int4 kernel's arguments after the input: its packing of codes (N, K) in 0..15, the group
    size, and the (K/group, N, 2) table of bf16 scale and offset (w = (code − 8) · scale + offset)."""
    kg = kernel_group(group)
    assert kg is not None, f"group {group} is not a multiple of any group size the kernel takes"
    scale, offset = scale.repeat_interleave(group // kg, 1), offset.repeat_interleave(group // kg, 1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return packed, kg, torch.stack([scale.t(), offset.t()], -1).to(torch.bfloat16).contiguous()


def _kernel_serves(q: QuantizedWeight) -> bool:
    N = q.codes.shape[0]
    return int4_kernel_available() and q.codes.device.type == "cpu" and N % 16 == 0 and \
        kernel_group(q.group) is not None


def _source(source: nn.Linear | QuantizedWeight, fmt: WeightFormat,
            compute_dtype: torch.dtype | None) -> tuple[QuantizedWeight, torch.dtype | None]:
    """A Linear is quantised round-to-nearest and computes in its own dtype unless told."""
    if isinstance(source, QuantizedWeight):
        return source, compute_dtype
    return QuantizedWeight.of(source, fmt), compute_dtype or source.weight.dtype


class Int4Linear(_KernelLinear):
    """A Linear whose weight is kept as int4 codes; see the module docstring. Built from a Linear
    (round-to-nearest, `group`, `symmetric`) or from a QuantizedWeight a calibrated method chose."""

    def __init__(self, source: nn.Linear | QuantizedWeight, group: int = GROUP, *, symmetric: bool = False,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        q, compute_dtype = _source(source, WeightFormat(4, group, symmetric), compute_dtype)
        assert q.bits == 4
        self._hold(q, compute_dtype)
        codes = q.codes
        # Codes two per byte (low nibble: even column) for dequantising; the kernel wants its own packing.
        self.register_buffer("packed_codes", codes[:, 0::2] | (codes[:, 1::2] << 4))
        self.register_buffer("scale", q.scale.to(torch.bfloat16).contiguous())
        self.register_buffer("offset", q.offset.to(torch.bfloat16).contiguous())
        if self.native is None and _kernel_serves(q):  # torch's kernel wants a packing of its own
            self.kernel_passes = [_kernel_pass(codes, self.scale, self.offset, self.group)]
        self._prepare_native()

    def _native_weights(self) -> tuple:
        return self.packed_codes.contiguous(), self.scale.bfloat16().contiguous(), self.offset.bfloat16().contiguous()

    def codes(self) -> Tensor:
        low, high = self.packed_codes & 15, self.packed_codes >> 4
        return torch.stack([low, high], -1).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        if self.native is not None:  # one pass, bit-identical to dequantize_weight's
            w = self.native.ops.int4_dequantize(*self._native_args[:4], self.native.isa)
        else:
            w = dequantize_weight(self.codes(), self.scale, self.offset)  # ~2× the bf16 matmul's cost
        return w.to(dtype or self.compute_dtype or torch.float32)

    def _weight_for_product(self, dtype: torch.dtype) -> Tensor:
        if self.native is None or dtype not in (torch.float32, torch.bfloat16):
            return self.dequantize(dtype)
        # into one buffer per thread that every layer reuses: a fresh tensor of megabytes per product
        # costs more in page faults than the dequantisation (3072×576: 1.4 ms against 0.26 ms, 1 thread)
        n = self.out_features * self.in_features
        buffer = getattr(_SCRATCH, "buffer", None)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < n:
            buffer = _SCRATCH.buffer = torch.empty(n, dtype=dtype)
        self.native.ops.int4_dequantize_into(*self._native_args[:4], buffer, self.native.isa)
        return buffer[:n].view(self.out_features, self.in_features)


class Int8Linear(_KernelLinear):
    """A Linear whose weight is kept as symmetric int8 codes per group or per output channel, multiplied
    as two int4 kernel passes where the kernel serves it (else dequantised); see the module docstring."""

    def __init__(self, source: nn.Linear | QuantizedWeight, group: int = GROUP, *,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        q, compute_dtype = _source(source, WeightFormat(8, group, True), compute_dtype)
        assert q.bits == 8
        self._hold(q, compute_dtype)
        self.register_buffer("codes", q.codes.contiguous())
        self.register_buffer("scale", q.scale.to(torch.bfloat16).contiguous())
        self._prepare_native()
        if self.native is None and _kernel_serves(q):
            codes = q.codes.to(torch.int32)
            high = torch.div(codes, 16, rounding_mode="floor")  # −8..7
            low = codes - 16 * high  # 0..15
            scale = self.scale.float()
            self.kernel_passes = [_kernel_pass(high + 8, 16 * scale, torch.zeros_like(scale), self.group),  # 16·s·high
                                  _kernel_pass(low, scale, 8 * scale, self.group)]  # scale·low

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        w = dequantize_weight(self.codes, self.scale, torch.zeros_like(self.scale))
        return w.to(dtype or self.compute_dtype or torch.float32)

    def _native_weights(self) -> tuple:
        scale = self.scale.bfloat16().contiguous()
        return self.codes.contiguous(), scale, scale  # (the offset argument: unused for int8 codes)


def quantized_layer(q: QuantizedWeight, *, compute_dtype: torch.dtype | None = None) -> _KernelLinear:
    """The int4 or int8 layer holding `q`."""
    return (Int8Linear if q.bits == 8 else Int4Linear)(q, compute_dtype=compute_dtype)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _KernelLinear)


def int8_kernel_usable(linear: nn.Linear, group: int = GROUP) -> bool:
    """Whether an 8-bit `linear` would run a kernel (llmkit's, or torch's as two int4 passes)."""
    if linear.weight.device.type != "cpu" or linear.in_features % group:
        return False
    if group % NATIVE_BLOCK == 0 and kernels.native() is not None:
        return True
    return int4_kernel_available() and linear.out_features % 16 == 0
