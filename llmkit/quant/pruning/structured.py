"""Structured pruning: whole attention heads or MLP neurons removed, so the matrices really shrink
(fewer heads in the config, a narrower d_ff) and the model runs and saves smaller.

A head's or neuron's output enters the residual stream only through its columns of o_proj or
down_proj, so removing it computes exactly what the full model computes with those columns zeroed
(`zero_units`); `shrink` then slices the rows of q/k/v (gate/up) and the columns of o_proj (down_proj)
and builds the smaller model from a config with the new sizes. The same number of units goes from
every layer, as the config has one n_heads and one d_ff; within a layer the lowest-scoring go.

Scores: the unit's summed |w| over its o_proj / down_proj columns, each column weighted by the norm
of its input over the calibration set for wanda and sparsegpt (Wanda's |w|·‖x‖ summed over the unit),
plain for magnitude. SparseGPT also feeds the removed columns' loss into the columns it keeps.

Grouped-query attention: a key/value head serves n_heads / n_kv_heads query heads (query head h reads
key/value head h // group), so heads go a group at a time — the key/value head with its query heads —
keeping the grouping valid; a --sparsity that removes no group, or every group, is refused.
ALiBi's slopes depend on n_heads, so removing heads would change the others': refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError
from llmkit.io.weights import load_model_tensors, model_tensors
from llmkit.models.build import build_model, skip_init, tie_weights

OUTPUT_LAYER = {"heads": "attn.o_proj", "neurons": "mlp.down_proj"}  # where a unit's output enters the stream


def unit_count(cfg: ModelConfig, pattern: str) -> int:
    """Prunable units per layer: key/value groups (heads with their queries), or MLP neurons."""
    return cfg.n_kv_heads if pattern == "heads" else cfg.d_ff


def removal_count(cfg: ModelConfig, pattern: str, sparsity: float) -> int:
    """Units removed from each layer, or a one-line ConfigError where none or all would go."""
    if pattern == "heads" and cfg.position == "alibi":
        raise ConfigError("--pattern heads: this model uses ALiBi, whose per-head slopes follow from n_heads, so "
                          "removing heads would change the others; prune --pattern neurons instead")
    units = unit_count(cfg, pattern)
    remove = round(sparsity * units)
    if 0 < remove < units:
        return remove
    group = cfg.n_heads // cfg.n_kv_heads
    what = (f"{units} MLP neurons" if pattern == "neurons" else f"{units} attention heads" if group == 1 else
            f"{units} key/value groups (a key/value head with its {group} query heads; grouped-query attention is "
            "pruned a group at a time)")
    raise ConfigError(f"--sparsity {sparsity:g} of {what} per layer removes {remove}; give a --sparsity that "
                      f"removes at least 1 and fewer than {units} (--sparsity {1 / units:.3g} removes 1)")


def _columns_per_unit(cfg: ModelConfig, pattern: str) -> int:
    return cfg.n_heads // cfg.n_kv_heads * cfg.head_dim if pattern == "heads" else 1


def unit_scores(output_weight: Tensor, input_norms: Tensor | None, cfg: ModelConfig, pattern: str) -> Tensor:
    """Each unit's importance: Σ |w|(·‖x‖) over its columns of the output layer."""
    s = output_weight.detach().float().abs()
    if input_norms is not None:
        s = s * input_norms[None, :]
    return s.sum(0).view(unit_count(cfg, pattern), _columns_per_unit(cfg, pattern)).sum(1)


def choose_units(scores: Tensor, remove: int) -> Tensor:
    """Keep-mask over units: the `remove` lowest-scoring removed."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[scores.topk(remove, largest=False).indices] = False
    return keep


def dropped_columns(keep_units: Tensor, cfg: ModelConfig, pattern: str) -> Tensor:
    """Which input columns of the output layer belong to removed units (True: removed)."""
    return (~keep_units).repeat_interleave(_columns_per_unit(cfg, pattern))


def zero_units(model: nn.Module, keep: list[Tensor], pattern: str) -> None:
    """The full-size model with each removed unit's output columns zeroed (in place): what the shrunk
    model computes."""
    blocks = model.stack.blocks
    for block, keep_units in zip(blocks, keep):
        out = block.get_submodule(OUTPUT_LAYER[pattern])
        with torch.no_grad():
            out.weight[:, dropped_columns(keep_units, model.cfg, pattern)] = 0


def shrunk_config(cfg: ModelConfig, pattern: str, kept_units: int) -> ModelConfig:
    if pattern == "neurons":
        return cfg.replace(d_ff=kept_units)
    group = cfg.n_heads // cfg.n_kv_heads
    return cfg.replace(n_heads=kept_units * group, n_kv_heads=kept_units, head_dim=cfg.head_dim)


def shrink(model: nn.Module, keep: list[Tensor], pattern: str) -> nn.Module:
    """A new, smaller model holding `model`'s weights less the removed units (the same count in every layer)."""
    cfg = model.cfg
    kept = {int(k.sum()) for k in keep}
    assert len(kept) == 1 and len(keep) == cfg.n_layers, "the same number of units kept in every layer"
    tensors = {k: v.detach().clone() for k, v in model_tensors(model).items()}
    group, D = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    for i, keep_units in enumerate(keep):
        prefix = f"stack.blocks.{i}."
        if pattern == "heads":
            kv_rows = keep_units.repeat_interleave(D)  # key/value head k: rows k·D … (k+1)·D − 1
            q_rows = keep_units.repeat_interleave(group * D)  # its query heads k·group … (k+1)·group − 1
            rows = {"attn.q_proj": q_rows, "attn.k_proj": kv_rows, "attn.v_proj": kv_rows}
            columns = {"attn.o_proj": q_rows}
        else:
            rows = {"mlp.gate_proj": keep_units, "mlp.up_proj": keep_units}
            columns = {"mlp.down_proj": keep_units}
        for name, index in rows.items():
            for leaf in ("weight", "bias"):
                key = f"{prefix}{name}.{leaf}"
                if key in tensors:
                    tensors[key] = tensors[key][index].contiguous()
        for name, index in columns.items():
            key = f"{prefix}{name}.weight"
            tensors[key] = tensors[key][:, index].contiguous()
    with skip_init():  # every tensor is loaded just below, strictly
        smaller = build_model(shrunk_config(cfg, pattern, kept.pop()))
    load_model_tensors(smaller, tensors, where="the pruned model")
    tie_weights(smaller)
    return smaller.to(next(model.parameters()).dtype).eval()
