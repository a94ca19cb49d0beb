"""The decoding state of a linear-time body (RWKV, Mamba): what a KV cache is for attention, but of a
fixed size — each layer folds the whole past into a few vectors per row, so memory stays the same
however long the sequence grows.

Like KVCache it is an explicit object passed to the model (not hidden module state), with `pos`,
the number of positions consumed, which the model advances after its layer loop. Layers get views
of their slice (`layer(i)`) and update them in place. Kept in float32 whatever the model's dtype:
the state sums the whole history, and rounding it to bf16 at every token would drift.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StateCache:
    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], float]], n_layers: int, batch: int, *,
                 device: torch.device | str = "cpu") -> None:
        """`shapes` maps a state name to its per-row shape and initial value (e.g. a running maximum
        starts very negative); each becomes one (n_layers, batch, *shape) float32 tensor."""
        self.tensors = {name: torch.full((n_layers, batch, *shape), fill, dtype=torch.float32, device=device)
                        for name, (shape, fill) in shapes.items()}
        self.pos = 0

    def layer(self, index: int) -> dict[str, Tensor]:
        """Layer `index`'s state: views the layer writes into."""
        return {name: tensor[index] for name, tensor in self.tensors.items()}

    def advance(self, n: int) -> None:
        self.pos += n

    def buffers(self) -> dict[str, Tensor]:
        """Each state tensor, (n_layers, B, ·): batch on dim 1, no time dimension."""
        return dict(self.tensors)

    def over(self, buffers: dict[str, Tensor], pos: int = 0) -> "StateCache":
        """A state reading and writing `buffers` (views into a larger store); allocates nothing."""
        view = object.__new__(StateCache)
        view.tensors, view.pos = dict(buffers), pos
        return view

    def memory_bytes(self) -> int:
        """Bytes held; the same after 1 token or 100,000."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
