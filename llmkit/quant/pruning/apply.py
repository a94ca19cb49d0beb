"""Prune a decoder's transformer blocks in place (or, for heads and neurons, into a smaller model).

Every linear layer inside a block is pruned (attention q/k/v/o, MLP gate/up/down); the embedding and
the LM head keep all their weights, as in the Wanda and SparseGPT papers. The calibrated methods go
one block at a time (llmkit.quant.calibrate.CalibrationPass, the path GPTQ and AWQ take): a block's
layers see inputs computed by the blocks before it as already pruned, and layers that read the same
input (q/k/v; gate/up) share one statistic. A layer whose width 4 does not divide stays dense under
2:4 and is named in the report. Unstructured and 2:4 pruning set weights to zero and keep the
shapes; `keep_masks` and `hold_zeros` keep them zero through a recovery fine-tune.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from llmkit.errors import ConfigError
from llmkit.quant.apply import require_full_precision_decoder
from llmkit.quant.calibrate import CalibrationPass
from llmkit.quant.gptq import Hessian
from llmkit.quant.pruning.masks import InputNorms, global_masks, scores, unstructured_mask
from llmkit.quant.pruning.scheme import PruneScheme
from llmkit.quant.pruning.sparsegpt import sparsegpt_prune
from llmkit.quant.pruning.structured import (OUTPUT_LAYER, choose_units, dropped_columns, removal_count, shrink,
                                             unit_count, unit_scores)

EventFn = Callable[[str, dict[str, Any]], None]
# Layers reading the same input as a sibling share its statistic (measured once, on the first).
SHARED_INPUT = {"attn.k_proj": "attn.q_proj", "attn.v_proj": "attn.q_proj", "mlp.up_proj": "mlp.gate_proj"}


@dataclass
class PruneReport:
    layers: int = 0  # linear layers pruned
    kept: list[str] = field(default_factory=list)  # left dense (2:4 where 4 does not divide the width)
    weights_before: int = 0  # weights of the block linear layers, before
    weights_after: int = 0  # their non-zero weights after (unstructured, 2:4) or their count (structured)
    units: tuple[int, int] | None = None  # structured: (removed, of) per layer
    keep_units: list[Tensor] = field(default_factory=list)  # structured: per block, True for each unit kept

    @property
    def sparsity(self) -> float:
        return 1 - self.weights_after / max(self.weights_before, 1)

    def to_json(self) -> dict[str, Any]:
        out = {"measured_sparsity": round(self.sparsity, 6), "layers": self.layers,
               "weights_before": self.weights_before, "weights_after": self.weights_after}
        if self.units is not None:
            out["units_removed_per_layer"], out["units_per_layer"] = self.units
        return out


def block_linears(model: nn.Module) -> dict[str, list[str]]:
    """Block name → its linear layers' names, in order."""
    blocks: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and parts[:2] == ["stack", "blocks"]:
            blocks.setdefault(".".join(parts[:3]), []).append(name)
    return blocks


def check_prunable(model: nn.Module, scheme: PruneScheme) -> None:
    """Refuse, in one line, a model the scheme cannot prune (before any calibration work)."""
    require_full_precision_decoder(model, "llmkit prune", "the model is quantised; prune the full-precision "
                                                          "model it came from (then quantise)")
    cfg = model.cfg
    if cfg.share_layers:
        raise ConfigError("the model shares one block's weights across layers; llmkit prune prunes each layer's own")
    if scheme.structured:
        removal_count(cfg, scheme.pattern, scheme.sparsity)
        if any(getattr(b.attn, "qkv_proj", None) is not None or getattr(b.mlp, "gate_up_proj", None) is not None
               for b in model.stack.blocks):
            raise ConfigError("the model's projections are fused for decoding; prune the model as loaded")


def _weights(model: nn.Module) -> int:
    return sum(model.get_submodule(n).weight.numel() for names in block_linears(model).values() for n in names)


def _nonzero(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(model.get_submodule(n).weight))
               for names in block_linears(model).values() for n in names)


def prune_model(model: nn.Module, scheme: PruneScheme, *, calibration: Tensor | None = None,
                on_event: EventFn | None = None, shrink_model: bool = True) -> tuple[nn.Module, PruneReport]:
    """Prune `model` by `scheme` (the calibrated methods need `calibration` token ids (S, T)); returns the
    pruned model — `model` itself, or for heads and neurons a new smaller one (with `shrink_model` False:
    `model` with the removed units' output columns zeroed, which computes the same) — and a report."""
    check_prunable(model, scheme)
    if scheme.calibrated and calibration is None:
        raise ConfigError(f"{scheme.method} needs calibration data")
    model.eval()
    report = PruneReport(weights_before=_weights(model))
    blocks = block_linears(model)
    if scheme.scope == "global":
        _prune_global(model, blocks, scheme, report)
    else:
        passes = CalibrationPass(model, calibration) if scheme.calibrated else None
        keep_units: list[Tensor] = []
        for index, (block, names) in enumerate(blocks.items()):
            started = time.perf_counter()
            if scheme.structured:
                keep_units.append(_prune_units(model, block, scheme, passes))
            else:
                _prune_block(model, block, names, scheme, passes, report)
            if on_event is not None:
                on_event("unit", {"index": index + 1, "total": len(blocks), "name": block,
                                  "layers": 1 if scheme.structured else len(names),
                                  "seconds": time.perf_counter() - started})
        if scheme.structured:
            removed = int((~keep_units[0]).sum())
            report.units = (removed, unit_count(model.cfg, scheme.pattern))
            report.layers, report.keep_units = len(keep_units), keep_units
            smaller = shrink(model, keep_units, scheme.pattern)
            report.weights_after = _weights(smaller)
            return (smaller if shrink_model else model), report
    report.weights_after = _nonzero(model)
    return model, report


def _statistics(model: nn.Module, block: str, names: list[str], scheme: PruneScheme,
                passes: CalibrationPass | None) -> dict[str, Any]:
    """Per layer name: the input statistic its method reads (shared among layers reading one input)."""
    if passes is None:
        return {}
    measured, stats = {}, {}
    for name in names:
        relative = name[len(block) + 1:]
        source = f"{block}.{SHARED_INPUT[relative]}" if SHARED_INPUT.get(relative) and \
            f"{block}.{SHARED_INPUT[relative]}" in names else name
        if source not in measured:
            K = model.get_submodule(source).in_features
            measured[source] = Hessian(K) if scheme.method == "sparsegpt" else InputNorms(K)
        stats[name] = measured[source]
    passes.collect(block, measured)
    return stats


def _prune_block(model: nn.Module, block: str, names: list[str], scheme: PruneScheme,
                 passes: CalibrationPass | None, report: PruneReport) -> None:
    stats = _statistics(model, block, names, scheme, passes)
    for name in names:
        linear = model.get_submodule(name)
        if scheme.pattern == "2:4" and linear.in_features % 4:
            report.kept.append(name)
            continue
        if scheme.method == "sparsegpt":
            pruned = sparsegpt_prune(linear.weight, stats[name].value(), pattern=scheme.pattern,
                                     sparsity=scheme.sparsity)
        else:
            norms = stats[name].value() if scheme.method == "wanda" else None
            keep = unstructured_mask(scores(linear.weight, norms), scheme.pattern, scheme.sparsity, scheme.scope)
            pruned = linear.weight.detach() * keep
        with torch.no_grad():
            linear.weight.copy_(pruned)
        report.layers += 1


def _prune_global(model: nn.Module, blocks: dict[str, list[str]], scheme: PruneScheme, report: PruneReport) -> None:
    names = [n for ns in blocks.values() for n in ns]
    masks = global_masks({n: scores(model.get_submodule(n).weight, None) for n in names}, scheme.sparsity)
    with torch.no_grad():
        for name in names:
            model.get_submodule(name).weight.mul_(masks[name])
    report.layers = len(names)


def _prune_units(model: nn.Module, block: str, scheme: PruneScheme, passes: CalibrationPass | None) -> Tensor:
    """Choose one block's heads or neurons to remove, zero (and for sparsegpt, compensate) their output
    columns; returns the keep-mask over units."""
    out_name = f"{block}.{OUTPUT_LAYER[scheme.pattern]}"
    out = model.get_submodule(out_name)
    stats = _statistics(model, block, [out_name], scheme, passes)
    stat = stats.get(out_name)
    norms = None if stat is None else stat.value() if isinstance(stat, InputNorms) else stat.sum.diagonal().sqrt().float()
    cfg = model.cfg
    keep = choose_units(unit_scores(out.weight, norms, cfg, scheme.pattern),
                        removal_count(cfg, scheme.pattern, scheme.sparsity))
    drop = dropped_columns(keep, cfg, scheme.pattern)
    if scheme.method == "sparsegpt":
        pruned = sparsegpt_prune(out.weight, stat.value(), pattern="columns", drop_columns=drop)
    else:
        pruned = out.weight.detach().clone()
        pruned[:, drop] = 0
    with torch.no_grad():
        out.weight.copy_(pruned)
    return keep


def keep_masks(model: nn.Module) -> dict[str, Tensor]:
    """Per block linear weight (parameter name): True where the weight is non-zero, i.e. kept."""
    return {f"{n}.weight": model.get_submodule(n).weight.detach() != 0
            for names in block_linears(model).values() for n in names}


def hold_zeros(model: nn.Module, masks: dict[str, Tensor]) -> list[Any]:
    """Zero the gradient of every removed weight, so training leaves it at zero: with AdamW (the only
    optimizer recovery uses) a weight whose gradient was always 0 has zero moments and never moves, and
    weight decay scales 0 to 0. Returns the hook handles (call .remove() to let go)."""
    params = dict(model.named_parameters())
    return [params[name].register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype)) for name, mask in masks.items()]
