"""Quantise a decoder's linear layers in place: round-to-nearest, GPTQ or AWQ (llmkit/quant/).

The model's q/k/v and gate/up projections are fused first (llmkit.inference.optimize), so layers that
read the same input share one set of calibration statistics and one quantised matrix. Every linear
layer whose in_features the group size divides is quantised, the LM head included (a tied head gets
its own codes; the embedding keeps its weight); the others stay in full precision and are named in
the report. The calibrated methods go one transformer block at a time, as GPTQ does: each block's
layers see inputs computed by the blocks before it as already quantised, each block's inputs kept
for the next (llmkit.quant.calibrate.CalibrationPass). The head comes last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from llmkit.errors import ConfigError
from llmkit.inference.optimize import prepare_for_decoding
from llmkit.layers.quantized import (Int4Linear, Int8Linear, QuantizedWeight, WeightFormat, is_quantized,
                                     quantized_layer)
from llmkit.quant.awq import InputSample, awq_quantize
from llmkit.quant.calibrate import CalibrationPass
from llmkit.quant.gptq import Hessian, gptq_quantize
from llmkit.quant.scheme import QuantScheme

EventFn = Callable[[str, dict[str, Any]], None]


@dataclass
class QuantReport:
    quantized: int = 0
    kept: list[str] = field(default_factory=list)  # linear layers left in full precision, by name


def check_quantizable(model: nn.Module) -> None:
    require_full_precision_decoder(model, "llmkit quantize", "the model is already quantised; quantise the "
                                                             "full-precision model it came from")


def require_full_precision_decoder(model: nn.Module, command: str, if_quantized: str) -> None:
    """What quantize and prune both take: a decoder-only transformer whose layers are not quantised."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.arch != "decoder" or cfg.body != "transformer":
        what = "this model" if cfg is None else f"a {cfg.arch} {cfg.body} model"
        raise ConfigError(f"{command} takes decoder-only transformers; {what} is not one")
    if any(is_quantized(m) for m in model.modules()):
        raise ConfigError(if_quantized)


def quantize_model(model: nn.Module, scheme: QuantScheme, *, calibration: Tensor | None = None,
                   on_event: EventFn | None = None) -> QuantReport:
    """Quantise `model` in place by `scheme`; the calibrated methods need `calibration` token ids (S, T)."""
    check_quantizable(model)
    if scheme.method != "rtn" and calibration is None:
        raise ConfigError(f"{scheme.method} needs calibration data")
    model.eval()
    prepare_for_decoding(model)
    report = QuantReport()
    targets: dict[str, list[str]] = {}  # block (or head) → its linear layers, in order
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module.in_features % scheme.group_for(module.in_features):
                report.kept.append(name)
            else:
                parts = name.split(".")
                targets.setdefault(".".join(parts[:3]) if parts[:2] == ["stack", "blocks"] else name, []).append(name)
    passes = CalibrationPass(model, calibration) if scheme.method != "rtn" else None
    for index, (unit, names) in enumerate(targets.items()):
        started = time.perf_counter()
        stats = _measure(model, unit, names, scheme, passes) if passes is not None else {}
        for name in names:
            _replace(model, name, scheme, stats.get(name))
        report.quantized += len(names)
        if on_event is not None:
            on_event("unit", {"index": index + 1, "total": len(targets), "name": unit, "layers": len(names),
                              "seconds": time.perf_counter() - started})
    model.quantization = scheme
    return report


def _replace(model: nn.Module, name: str, scheme: QuantScheme, stats: Any) -> None:
    linear = model.get_submodule(name)
    group = scheme.group_for(linear.in_features)
    fmt = WeightFormat(scheme.bits, group, scheme.symmetric)
    if scheme.method == "rtn":
        layer = Int8Linear(linear, group) if scheme.bits == 8 else Int4Linear(linear, group, symmetric=scheme.symmetric)
        layer.compute_dtype = None  # the activations' dtype: the runtime's choice
    else:
        q = gptq_quantize(linear.weight, stats.value(), fmt) if scheme.method == "gptq" else \
            awq_quantize(linear.weight, stats, fmt)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        layer = quantized_layer(QuantizedWeight(q.codes, q.scale, q.offset, bias, q.act_scale))
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def _measure(model: nn.Module, unit: str, names: list[str], scheme: QuantScheme, passes: CalibrationPass) -> dict:
    """Run the calibration set through `unit`, collecting its layers' input statistics."""
    stats = {}
    for name in names:
        linear = model.get_submodule(name)
        stats[name] = Hessian(linear.in_features) if scheme.method == "gptq" else InputSample(linear.in_features)
    passes.collect(unit, stats)
    return stats
