"""Will it fit? Estimate what a model or table needs before allocating it, and compare.

A hostile or mistyped size (`--vocab-size 2000000000`, `{"model": {"d_model": 1000000}}`) used to
reach the allocator, which aborts the process or raises a traceback after minutes. Callers estimate
the bytes first (`ModelConfig.num_params` × bytes per parameter) and `require_memory` refuses, in one
line with both figures, what this machine cannot hold: on a CPU the least of MemAvailable, the
cgroup's limit and RLIMIT_AS headroom; on a CUDA device its free memory.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmkit.errors import ConfigError

if TYPE_CHECKING:
    from llmkit.config import ModelConfig

# Training holds, per fp32 parameter: the weight, its gradient and AdamW's two moments.
TRAIN_BYTES_PER_PARAM = 16
LOAD_BYTES_PER_PARAM = 4  # an fp32 weight
# The BPE trainer reserves its vocabulary and merge tables up front: `--vocab-size 2000000000` asked
# for 141 GB before it aborted, about 70 bytes per entry.
BPE_BYTES_PER_VOCAB_ENTRY = 72


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """cgroup v2: memory.max minus memory.current (None when unlimited or not in a cgroup)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def _address_space_headroom() -> int | None:
    """RLIMIT_AS minus this process's current virtual size (a limit tests and shells set)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return soft
    return soft - pages * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(bytes this process can still allocate on `device`, a few words saying where that figure
    comes from)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    figures = [(v, where) for v, where in ((_meminfo_available(), "available (MemAvailable)"),
                                           (_cgroup_headroom(), "left under the cgroup limit"),
                                           (_address_space_headroom(), "left under RLIMIT_AS"))
               if v is not None]
    if not figures:
        figures = [(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of physical memory")]
    return min(figures)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def require_memory(what: str, need: int, *, device: torch.device | str = "cpu") -> None:
    """Raise a one-line ConfigError when `need` bytes for `what` cannot fit on `device`."""
    have, where = available_memory(device)
    if need > have:
        raise ConfigError(f"{what} needs about {gib(need)}, more than the {gib(max(have, 0))} {where}")


def require_model_memory(cfg: "ModelConfig", *, bytes_per_param: int, device: torch.device | str = "cpu",
                         what: str = "the model") -> None:
    """Refuse (one line, both figures) a model whose parameters at `bytes_per_param` (TRAIN_ or
    LOAD_BYTES_PER_PARAM) and fixed position table cannot fit on `device`; call it before building."""
    table = cfg.max_seq_len * cfg.embedding_dim * 4 * 2 if cfg.position == "sinusoidal" else 0
    require_memory(f"{what} ({cfg.num_params() / 1e6:,.1f}M parameters)", cfg.num_params() * bytes_per_param + table,
                   device=device)
