"""Recording attention maps and knocking parts of them out, on the model's own attention code.

`recording(model)` switches every Attention layer to the "reference" kernel (the textbook softmax)
and gives it a `Probe` (the layer's `probe` attribute, which only that kernel consults): the probe
keeps a copy of the weights and may change them first. Leaving the block restores "sdpa" and
removes the probes, so a model that is not being explained runs no extra code at all.

Knockouts, after Geva et al. 2023 ("Dissecting Recall of Factual Associations", arXiv 2304.14767):
- an edge (query i → key j) is removed by giving it weight 0 and renormalising the row, which is
  exactly a score of -inf before the softmax; a row that loses no weight is left bit for bit as it was;
- a head is removed by zeroing its weights, so its output is 0 (zero ablation).

A layer is named by its site: "decoder.self", "encoder.self" or "decoder.cross", and its index.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from llmkit.layers.attention import Attention


@dataclass
class Knockout:
    """What to remove at one site: heads as (layer, head), edges as (layer, head, query, key) where
    layer or head None means every one. Query and key are token positions of the full sequence.
    `rows`, for a batch of copies of one input: the heads removed in each row (many knockouts in
    one forward)."""
    site: str = "decoder.self"
    heads: set[tuple[int, int]] = field(default_factory=set)
    edges: list[tuple[int | None, int | None, int, int]] = field(default_factory=list)
    rows: list[set[tuple[int, int]]] | None = None


@dataclass
class Recording:
    """Weights as used, per (site, layer): (H, Tq, Tk) of batch row 0, float32."""
    maps: dict[tuple[str, int], Tensor] = field(default_factory=dict)

    def layers(self, site: str) -> list[Tensor]:
        found = sorted((layer, w) for (s, layer), w in self.maps.items() if s == site)
        return [w for _, w in found]

    def sites(self) -> list[str]:
        return sorted({s for s, _ in self.maps}, key=("encoder.self", "decoder.self", "decoder.cross").index)


class Probe:
    """Attention.probe for one layer module; a shared module (ALBERT) is one probe called once per layer."""

    def __init__(self, recording: Recording, site: str, first_layer: int, knockout: Knockout | None) -> None:
        self.recording, self.site, self.first_layer, self.knockout = recording, site, first_layer, knockout
        self.calls = 0

    def __call__(self, weights: Tensor) -> Tensor:  # (B, H, Tq, Tk)
        layer = self.first_layer + self.calls
        self.calls += 1
        if self.knockout is not None and self.knockout.site == self.site:
            weights = knock_out(weights, layer, self.knockout)
        self.recording.maps[(self.site, layer)] = weights[0].detach().float().clone()
        return weights


def knock_out(weights: Tensor, layer: int, knockout: Knockout) -> Tensor:
    B, H, Tq, Tk = weights.shape
    first_query = Tk - Tq  # queries are the newest positions (cached decoding)
    keep = torch.ones(H, Tq, Tk, dtype=weights.dtype, device=weights.device)
    for edge_layer, head, query, key in knockout.edges:
        if edge_layer in (None, layer) and 0 <= query - first_query < Tq and 0 <= key < Tk:
            keep[slice(None) if head is None else head, query - first_query, key] = 0
    if not bool((keep == 1).all()):
        kept = weights * keep
        remaining = kept.sum(-1, keepdim=True)
        changed = remaining < weights.sum(-1, keepdim=True)  # rows that lost weight, and only those
        weights = torch.where(changed, kept / remaining.clamp_min(torch.finfo(weights.dtype).tiny), weights)
    heads = [h for (l, h) in knockout.heads if l == layer]
    if heads:
        weights = weights.clone()
        weights[:, heads] = 0
    for row, removed in enumerate(knockout.rows or []):
        heads = [h for (l, h) in removed if l == layer]
        if heads:
            weights = weights.clone()
            weights[row, heads] = 0
    return weights


def attention_sites(model: nn.Module) -> list[tuple[str, int, Attention]]:
    """(site, first layer index, module) of every Attention layer, by the module's place in the model."""
    decoder_only = getattr(model.cfg, "arch", "decoder") == "decoder"
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, Attention):
            continue
        match = re.search(r"(\w+)\.blocks\.(\d+)\.(attn|cross_attn)$", name)
        if match is None:  # an attention layer outside a Stack (none today): not recorded
            continue
        stack, index, kind = match.groups()
        if stack == "stack":  # CausalLM and MaskedLM call theirs "stack"
            stack = "decoder" if decoder_only else "encoder"
        found.append((f"{stack}.{'cross' if kind == 'cross_attn' else 'self'}", int(index), module))
    return found


@contextmanager
def recording(model: nn.Module, knockout: Knockout | None = None) -> Iterator[Recording]:
    """Within the block, each forward of `model` records its attention weights into the Recording
    (one forward per block: layer indices count the calls of shared layers)."""
    record = Recording()
    saved = []
    for site, index, module in attention_sites(model):
        saved.append((module, module.impl, module.probe))
        module.impl, module.probe = "reference", Probe(record, site, index, knockout)
    try:
        yield record
    finally:
        for module, impl, probe in saved:
            module.impl, module.probe = impl, probe
