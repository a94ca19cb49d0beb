"""Up to how many activation rows llmkit's kernels multiply a quantised layer on this machine, measured
rather than assumed.

From a few rows on, the kernels expand each band of weights once into an fp32 panel and multiply every
row by it (many_rows.inc). The other way to multiply many rows is to dequantise the whole weight and
call torch's matmul, and that matmul's speed is a property of the machine, not of llmkit: on the AMD
Zen 5 these kernels were written on, torch's fp32 matmul (MKL 2024.2) ran at ~210 GFLOP/s on two cores,
the same with AVX-512 allowed or not (so no AVX-512 path runs there), and the kernel beat it at every
prompt length (AVX-512 ~400 GFLOP/s at 512 rows); its bf16 matmul (AVX512-BF16) won from 64 rows.
MKL's paths on an Intel CPU, or a bf16 matmul on AMX tiles, may win elsewhere and sooner. So
`prepare_for_decoding` asks here, once per process and shape: both ways are timed on the model's
largest int4 layer (else int8), with its own weights, in the layers' compute dtype, at PROBE_ROWS rows,
alternating, best of ROUNDS each (~0.2 s for SmolLM2); the kernel keeps the products of up to the
largest probed count at which it was the faster of the two (no limit where it won at every count).
In fp32 both ways compute the same products up to summation order, so a choice that noise flips between
runs moves results by no more; in bf16 the matmul also rounds the dequantised weights to bf16, as every
bf16 prefill did before the kernel took any.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from llmkit.runtime import dtype_name

PROBE_ROWS = (16, 32, 64, 128, 256, 512, 1024)
ROUNDS = 3
NO_LIMIT = sys.maxsize

_measured: dict[tuple, tuple[int, str]] = {}  # per process: (layer type, isa, dtype, shape, threads) → answer


def kernel_max_rows(layer, dtype: torch.dtype) -> tuple[int, str]:
    """(the most rows the kernel should take, the measurement in words) for products shaped like `layer`
    (an int4 or int8 layer with llmkit's kernels) whose many-row alternative dequantises into `dtype`;
    NO_LIMIT: any number."""
    key = (type(layer).__name__, layer.native.isa, dtype, layer.out_features, layer.in_features,
           torch.get_num_threads())
    if key not in _measured:
        _measured[key] = _probe(layer, dtype)
    return _measured[key]


def _probe(layer, dtype: torch.dtype) -> tuple[int, str]:
    op, args = layer._native_op, layer._native_args
    name = dtype_name(dtype)
    gen = torch.Generator().manual_seed(0)
    won = 0
    for rows in PROBE_ROWS:
        x = torch.randn(rows, layer.in_features, generator=gen).to(dtype)
        # the layer's two ways (its bias left out: both would add it alike)
        kernel = lambda: op(x, *args[:4], None, None, args[-1])  # noqa: E731
        matmul = lambda: F.linear(x, layer._weight_for_product(dtype))  # noqa: E731
        best = [float("inf"), float("inf")]
        with torch.no_grad():
            kernel(), matmul()  # warm-up: first touch of the scratch buffers
            for _ in range(ROUNDS):
                for i, way in enumerate((kernel, matmul)):
                    started = time.perf_counter()
                    way()
                    best[i] = min(best[i], time.perf_counter() - started)
        if best[0] > best[1]:
            return won, (f"dequantise + {name} matmul faster from {rows} rows: {best[1] * 1e3:.2f} against "
                         f"{best[0] * 1e3:.2f} ms on {layer.out_features}×{layer.in_features}")
        won = rows
    return NO_LIMIT, f"faster than dequantise + {name} matmul at {PROBE_ROWS[0]} to {PROBE_ROWS[-1]:,} rows"
