"""The storage under a continuous batch: one slot per running request, rows that join and leave
between decode steps.

Every piece of decoding state (KV cache buffers, padding mask, token ids, recurrent state, cross-
attention keys) is a named tensor with a batch dimension of `max_rows` slots; rows 0..n-1 are in use,
so a forward step reads cheap views of the first n rows. Tensors with a time dimension share one
timeline: every row's newest position sits at index `pos - 1` and the next token of every row is
written at `pos` (rows are right-aligned, as in a left-padded batch), while row r's own tokens start
at `start[r]`; the padding mask hides the rest, and positions are counted from each row's start, so
a row computes what it would alone.

- join: the new rows' tensors (prefilled on their own) are copied in at the end, right-aligned at
  `pos` (if a prompt is longer than the timeline so far, everything moves right to make room);
- leave: the last rows move into the freed slots (one row's copy each), so rows 0..n-1 stay dense;
- room: when the timeline is full, it is rebuilt compacted (everything moves left by the smallest row
  start: no row needs what is before it) with headroom of about its used length, so each such copy is
  paid for by at least as many decode steps and its cost per token stays constant.
"""

from __future__ import annotations

import torch
from torch import Tensor

ALIGN = 16  # timeline lengths are multiples of this (fewer distinct shapes; a little headroom)


class RowStore:
    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.n = 0  # rows in use
        self.pos = 0  # the time index every row writes its next position at
        self.capacity = 0  # length of the timeline
        self.start: list[int] = []  # per row in use: the time index of its first real position
        self.tensors: dict[str, Tensor] = {}
        self.dims: dict[str, tuple[int, int | None]] = {}  # name → (batch dim, time dim or None)
        self.version = 0  # bumped whenever rows or buffers move: views made before are stale

    @property
    def padded(self) -> bool:
        """Whether some row starts after index 0 (then the model needs the padding mask)."""
        return any(self.start)

    def view(self, name: str) -> Tensor:
        """The rows in use of tensor `name`."""
        return self.tensors[name].narrow(self.dims[name][0], 0, self.n)

    def timeline(self, name: str) -> Tensor:
        """The rows in use of time tensor `name`, up to and including the next position (`pos`)."""
        batch_dim, time_dim = self.dims[name]
        return self.tensors[name].narrow(batch_dim, 0, self.n).narrow(time_dim, 0, self.pos + 1)

    def join(self, parts: dict[str, tuple[Tensor, int, int | None]], lengths: list[int], width: int,
             reserve: int) -> None:
        """Append len(lengths) rows. `parts[name]` = (tensor holding just these rows, batch dim, time dim);
        time tensors are `width` long with each row's `lengths[i]` real positions at the end. `reserve`:
        how many more positions the rows may still need (sizes a new timeline)."""
        k = len(lengths)
        assert self.n + k <= self.max_rows, f"{self.n} + {k} rows > {self.max_rows}"
        timed = any(t is not None for _, _, t in parts.values())
        if timed and self.n == 0:
            self.pos = width  # a fresh timeline: nothing to keep
            if self.capacity < width + 1:
                self._rebuild(_aligned(width + max(reserve, 1)), shift=0, keep=False)
        elif timed and self.pos < width:  # a longer prompt than the timeline so far: move everyone right
            self._rebuild(max(self.capacity, _aligned(width + max(reserve, 1))), shift=self.pos - width)
        for name, (part, batch_dim, time_dim) in parts.items():
            if name not in self.tensors:
                shape = list(part.shape)
                shape[batch_dim] = self.max_rows
                if time_dim is not None:
                    shape[time_dim] = self.capacity
                self.tensors[name] = part.new_zeros(shape)
                self.dims[name] = (batch_dim, time_dim)
            main = self._widened(name, part)
            rows = main.narrow(batch_dim, self.n, k)
            if time_dim is not None:
                rows.zero_()  # the mask of a slot's previous occupant must not show through
                rows = rows.narrow(time_dim, self.pos - width, width)
            rows.copy_(_padded_to(part, rows.shape))
        self.start += [self.pos - length for length in lengths]
        self.n += k
        self.version += 1

    def drop(self, rows: set[int]) -> list[int]:
        """Free `rows`; the last rows in use move into the freed slots. Returns, for each row now in use,
        the row it was before."""
        kept = self.n - len(rows)
        order = list(range(kept))
        movers = [r for r in range(kept, self.n) if r not in rows]
        for hole, mover in zip(sorted(r for r in rows if r < kept), movers):
            for name, tensor in self.tensors.items():
                batch_dim, time_dim = self.dims[name]
                src, dst = tensor.narrow(batch_dim, mover, 1), tensor.narrow(batch_dim, hole, 1)
                if time_dim is not None:
                    src, dst = src.narrow(time_dim, 0, self.pos), dst.narrow(time_dim, 0, self.pos)
                dst.copy_(src)
            order[hole] = mover
        self.start = [self.start[r] for r in order]
        self.n = kept
        if kept == 0:
            self.pos = 0
        self.version += 1
        return order

    def reorder(self, index: list[int]) -> None:
        """Row i becomes what row index[i] was (beam search keeps, drops and duplicates hypotheses)."""
        assert len(index) <= self.max_rows, f"{len(index)} rows > {self.max_rows}"
        for name, tensor in self.tensors.items():
            batch_dim, time_dim = self.dims[name]
            rows = torch.tensor(index, dtype=torch.long, device=tensor.device)
            src, dst = tensor.narrow(batch_dim, 0, self.n), tensor.narrow(batch_dim, 0, len(index))
            if time_dim is not None:
                src, dst = src.narrow(time_dim, 0, self.pos), dst.narrow(time_dim, 0, self.pos)
            dst.copy_(src.index_select(batch_dim, rows))
        self.start = [self.start[i] for i in index]
        self.n = len(index)
        self.version += 1

    def make_room(self, positions: int, reserve: int) -> None:
        """Make sure `positions` more positions fit after `pos` (compacting or growing the timeline)."""
        if self.pos + positions <= self.capacity:
            return
        shift = min(self.start) if self.n else self.pos
        used = self.pos - shift
        # headroom: what the rows may still need, but at most max(used, 64) — then the next rebuild is
        # at least that many steps away, which keeps the copying per token constant
        self._rebuild(_aligned(used + max(positions, min(max(used, 64), reserve))), shift=shift)

    def _rebuild(self, capacity: int, *, shift: int, keep: bool = True) -> None:
        """A new timeline of `capacity` positions holding the old one moved left by `shift` (right if < 0)."""
        for name, tensor in self.tensors.items():
            batch_dim, time_dim = self.dims[name]
            if time_dim is None:
                continue
            shape = list(tensor.shape)
            shape[time_dim] = capacity
            new = tensor.new_zeros(shape)
            if keep:
                first = max(shift, 0)
                length = self.pos - first
                new.narrow(time_dim, first - shift, length).copy_(tensor.narrow(time_dim, first, length))
            self.tensors[name] = new
        self.capacity = capacity
        self.pos -= shift
        self.start = [s - shift for s in self.start]
        self.version += 1

    def _widened(self, name: str, part: Tensor) -> Tensor:
        """Tensor `name`, grown with zeros along any non-batch, non-time dimension where `part` is
        larger (a longer source's cross-attention keys, say: zeros are masked out)."""
        main = self.tensors[name]
        batch_dim, time_dim = self.dims[name]
        shape = [max(m, p) if d not in (batch_dim, time_dim) else m
                 for d, (m, p) in enumerate(zip(main.shape, part.shape))]
        if list(main.shape) != shape:
            grown = main.new_zeros(shape)
            grown[tuple(slice(0, m) for m in main.shape)] = main
            self.tensors[name] = main = grown
            self.version += 1
        return main


def _padded_to(part: Tensor, shape: torch.Size) -> Tensor:
    """`part` with zeros appended along every dimension where `shape` is larger."""
    if part.shape == shape:
        return part
    out = part.new_zeros(shape)
    out[tuple(slice(0, p) for p in part.shape)] = part
    return out


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
