"""Training on several processes with PyTorch's own distributed engine: `torchrun --nproc_per_node=N -m
llmkit train …` runs N ranks, each a process with a replica of the model (DistributedDataParallel).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_from_env` joins the
process group (gloo on CPU, NCCL on CUDA) with a collective timeout, so a rank that hangs makes the
others fail within COLLECTIVE_TIMEOUT_S (or LLMKIT_COLLECTIVE_TIMEOUT_S) with one `error:` line
instead of waiting forever. A rank that dies is torchrun's to handle: it stops the others with SIGTERM
(as it does when it is sent SIGTERM itself), and each says so in one `error:` line (or, where it found
the lost rank first in a collective, that line). Ctrl-C reaches the ranks as one SIGINT each from
torchrun: each stops as one process does but without a save, rank 0 alone saying so (interrupted_once).
Either way the newest complete checkpoint is left as it was, for --resume.
Everything else here is the few collectives the one Trainer needs — means of metrics, rank 0's
decisions broadcast so every rank runs the same schedule, per-rank RNG states gathered into one
checkpoint — each a no-op in a single process.

How the work is split (llmkit/training/loop.py): a step's `grad_accum` micro-batches are dealt out
across the ranks (rank r takes micro-batches r, r + N, …), so the global batch, the data order, the
schedule and the logged losses do not depend on N; DDP averages the gradients. PPO (llmkit/training/
ppo.py) also splits each rollout: rank r samples and scores its block of the rollout's rows (each row
with the seed it has in one process), and `gather_rows` gives every rank the whole batch. Rank 0
alone writes checkpoints, metrics and plots, and holds the run directory's lock.

With --fsdp (every command on the one Trainer but PPO) the model is sharded instead of replicated
(FSDP2: llmkit/training/sharding.py); checkpoints gather the shards into the
usual whole tensors (llmkit/training/trainer_checkpoint.py), never torch.distributed.checkpoint's
pickled metadata. Every rank then runs the same forward passes — training and evaluation alike — as
each one gathers weights from all; PPO's per-rank sampling could not, so it takes no --fsdp.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
import torch.distributed as dist

from llmkit.errors import ConfigError, LlmkitError
from llmkit.training import sharding

if TYPE_CHECKING:
    from llmkit.runtime import Runtime

COLLECTIVE_TIMEOUT_S = 120  # a collective that waits longer (a rank hung or gone) fails on every rank
TIMEOUT_ENV = "LLMKIT_COLLECTIVE_TIMEOUT_S"  # seconds, instead of COLLECTIVE_TIMEOUT_S (tests use a few)
# the commands that run under torchrun (every training command on the one Trainer: the pretraining, the
# fine-tunes, PPO, and extend's fine-tune); the others refuse in one line
COMMANDS = ("train", "sft", "reward", "dpo", "ppo", "finetune-classifier", "finetune-tokens", "finetune-qa",
            "finetune-seq2seq", "extend")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def init_from_env(command: str) -> World:
    """Join the process group torchrun describes in the environment (a no-op without torchrun)."""
    if not launched_by_torchrun():
        return World()
    if command not in COMMANDS:
        raise ConfigError(f"llmkit {command} does not run under torchrun yet; distributed training supports "
                          f"{', '.join('llmkit ' + name for name in COMMANDS)}")
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=collective_timeout_s()))
    return world()


class CollectiveTimeout(LlmkitError):
    """A collective waited longer than the timeout for the other ranks: one line, not a traceback."""


class RankLost(LlmkitError):
    """Another rank is gone (it died, or torchrun stopped this one because it did): one line."""


RESUME_HINT = "the newest complete checkpoint is kept: run the command again with --resume to continue"


def peer_lost(exc: BaseException) -> bool:
    """A collective failed because the rank at the other end is gone (gloo: its socket was closed)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        sign in text for sign in ("connection closed by peer", "connection reset by peer", "broken pipe"))


@contextlib.contextmanager
def stopped_by_sigterm(rank: int) -> Iterator[None]:
    """In the block, SIGTERM (torchrun stopping the ranks left when one has failed, or passing on its own
    SIGTERM) raises RankLost, so the rank leaves through the usual error path with one line instead of dying silently;
    the first SIGTERM only (the way out is not cut short by a second). After the block SIGTERM is
    ignored: the rank is leaving anyway, and its line must get out."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise RankLost(f"rank {rank}: stopped by SIGTERM (torchrun stops every rank when one has failed, or "
                       f"when it is itself stopped); {RESUME_HINT}")

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def interrupted_once(heard: list[bool]) -> Iterator[None]:
    """Ctrl-C under torchrun: the terminal's SIGINT reaches torchrun, which passes it on to each rank (each
    in its own session) once. In the block the first SIGINT is the KeyboardInterrupt of one process
    (`heard` records it); later ones, and any after the block, are ignored, so that a second cannot cut
    the way out (leaving the process group, the `interrupted` line) short into a traceback."""
    def interrupt(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        heard.append(True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def timed_out(exc: BaseException) -> bool:
    """A collective's timeout as the backends raise it: gloo's "Timed out waiting …ms for recv", from an
    explicit collective (DistBackendError) or from DDP's gradient all-reduce in backward (RuntimeError)."""
    return "timed out" in str(exc).lower() and isinstance(exc, RuntimeError)


def collective_timeout_s() -> float:
    """How long a collective waits for the other ranks: LLMKIT_COLLECTIVE_TIMEOUT_S, else 120 s."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return COLLECTIVE_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not (seconds > 0 and seconds < float("inf")):
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: must be a number of seconds > 0")
    return seconds


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def checked_before_written() -> None:
    """Called after a command's checks of its --out (which every rank makes) and before rank 0 writes
    there: otherwise a rank checking late could find rank 0's first files and refuse the directory."""
    barrier()


@contextlib.contextmanager
def main_rank_first() -> Iterator[None]:
    """Rank 0 runs the block before the others (it prepares shared files: a tokenizer, token caches;
    the others then find them ready and only read)."""
    if not world().main:
        barrier()
    yield
    if world().main:
        barrier()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def mean(values: list[float]) -> list[float]:
    """Each value averaged over the ranks (a NaN on any rank makes the mean NaN on every rank)."""
    w = world()
    if w.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return (t / w.size).tolist()


def from_main(values: list[float]) -> list[float]:
    """Rank 0's values on every rank: decisions each rank could make differently (a plan timed on each
    rank's own clock, whether time is up) are made once."""
    if world().size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.broadcast(t, src=0)
    return t.tolist()


def gather_flags(flag: bool) -> list[bool]:
    """Every rank's flag, in rank order."""
    w = world()
    if w.size == 1:
        return [flag]
    t = torch.zeros(w.size, dtype=torch.float64, device=_device())
    t[w.rank] = float(flag)
    dist.all_reduce(t)
    return [bool(x) for x in t.tolist()]


def gather_rows(rows: list[list[float]]) -> list[list[float]]:
    """Every rank's rows of numbers (any count, any lengths), concatenated in rank order, on every rank:
    what each rank computed for its share of a batch. Plain tensors of agreed sizes, nothing pickled;
    float64 holds token ids and scores exactly."""
    if world().size == 1:
        return rows
    device = _device()
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device)
    flat = torch.tensor([x for r in rows for x in r], dtype=torch.float64, device=device)
    out = []
    for rank_lengths, rank_flat in zip(_gather_1d(lengths), _gather_1d(flat)):
        offset = 0
        for n in rank_lengths.tolist():
            out.append(rank_flat[offset:offset + n].tolist())
            offset += n
    return out


def _gather_1d(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's 1-D tensor (lengths may differ), in rank order: sizes first, then the tensors padded
    to the longest (a collective's tensors have one shape)."""
    size = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world().size)]
    dist.all_gather(sizes, size)
    longest = max(1, *(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[:t.numel()] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:int(n)].cpu() for part, n in zip(parts, sizes)]


def gather_rng_states() -> list[torch.Tensor]:
    """Every rank's CPU generator state (byte tensors of one length), in rank order."""
    state = torch.get_rng_state()
    if world().size == 1:
        return [state]
    device = _device()  # NCCL gathers CUDA tensors only
    states = [torch.empty_like(state, device=device) for _ in range(world().size)]
    dist.all_gather(states, state.to(device))
    return [s.cpu() for s in states]


def fsdp_needs_ranks(command: str) -> ConfigError:
    return ConfigError(f"--fsdp shards the model over the ranks torchrun starts: run it as "
                       f"`torchrun --nproc_per_node=N -m llmkit {command} … --fsdp`")


def check_split(grad_accum: int, *, fsdp: bool = False, command: str = "train") -> None:
    """A step's micro-batches must deal out evenly over the ranks, and --fsdp needs ranks (checked before
    any work is done)."""
    size = world().size
    if fsdp and size == 1:
        raise fsdp_needs_ranks(command)
    if grad_accum % size:
        raise ConfigError(f"--grad-accum {grad_accum} cannot be dealt out over {size} ranks: use a multiple of "
                          f"{size} (each rank runs grad_accum / ranks micro-batches of every step, so the global "
                          f"batch stays batch_size × grad_accum)")


def wrap(objective: torch.nn.Module, *, fsdp: bool = False, runtime: "Runtime | None" = None) -> torch.nn.Module:
    """The Trainer's objective (the model and its loss as one module) ready for several ranks: under
    DistributedDataParallel, or with the model sharded by FSDP2 (`fsdp`, in `runtime`'s precision:
    see sharding.mixed_precision); itself in one process.

    DDP's static_graph: an objective may leave some weights out of every step (a pooler, a head it does
    not use); DDP learns which from the first step, then knows when every gradient it will get has
    arrived, without a search of the graph at each step."""
    if fsdp:
        if world().size == 1:
            raise fsdp_needs_ranks("train")
        sharding.shard(objective.model, sharding.mixed_precision(runtime) if runtime is not None else None)
        return objective
    if world().size == 1:
        return objective
    from torch.nn.parallel import DistributedDataParallel

    device = next(objective.parameters()).device
    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                   static_graph=True)


@contextlib.contextmanager
def command_session(command: str) -> Iterator[World]:
    """Around a CLI command: join torchrun's process group (a no-op without torchrun), silence every
    rank but 0 (an error still reaches the terminal: it is printed after this block ends), and leave
    the group at the end."""
    if not launched_by_torchrun():
        yield World()
        return
    import sys

    w = init_from_env(command)
    saved: list[int] = []
    interrupted: list[bool] = []
    try:
        with stopped_by_sigterm(w.rank), interrupted_once(interrupted):
            if not w.main:  # at the descriptors, so that torch's own C++ warnings are silenced too
                sys.stdout.flush(), sys.stderr.flush()
                saved = [os.dup(1), os.dup(2)]
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1), os.dup2(devnull, 2)
                os.close(devnull)
            yield w
            # Leave together: a rank that tears its process group down while another still writes its last
            # checkpoint, plot or summary could abort in gloo's teardown ("terminate called without an active
            # exception", seen with FSDP2 under load). Only on success: after an error the others may be gone.
            barrier()
    except RuntimeError as exc:
        if interrupted:  # Ctrl-C reached every rank: a collective cut short by another's exit is part of it
            raise KeyboardInterrupt from None
        if peer_lost(exc):
            raise RankLost(f"rank {w.rank}: another rank left the run in the middle of a collective (it died or "
                           f"was stopped); {RESUME_HINT}") from None
        if not timed_out(exc):
            raise
        raise CollectiveTimeout(f"rank {w.rank}: waited {collective_timeout_s():g} s for the other ranks in a "
                                f"collective, which timed out (a rank hung, stopped or too slow; {TIMEOUT_ENV} "
                                f"sets the wait, default {COLLECTIVE_TIMEOUT_S} s)") from None
    finally:
        if saved:
            sys.stdout.flush(), sys.stderr.flush()
            if not interrupted:  # (interrupted: rank 0 says so for the run; the others stay silent)
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        shutdown()
