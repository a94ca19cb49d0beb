"""Device and precision: the one place that chooses them, by what the machine reports and measures.

Every command that runs a model takes `--device auto|cpu|cuda|cuda:N|mps`, `--dtype
auto|fp32|bf16|fp16` and `--threads N` and turns them into a `Runtime` here. `auto` picks the
device (CUDA, then MPS, then the CPU) and the fastest precision that is safe there:

- CUDA: bf16 where the GPU has it, else fp32 (fp16 needs loss scaling to train; ask for it to decode).
- MPS: fp32 (bf16 support differs between macOS versions).
- CPU: bf16 only when the CPU has native bf16 arithmetic (AVX-512 BF16, AMX, Arm BF16) **and** a
  short probe on the shapes about to run measures it faster than fp32. Where bf16 is emulated
  (AVX2-only CPUs) a bf16 training step is ~20× slower than fp32, so a rule written on one machine
  is wrong on the next; the probe decides on this one.

Training keeps fp32 weights and wraps forward passes in `Runtime.autocast()` (the only autocast in
llmkit); generation stores the weights in the chosen dtype (`weights_dtype`). Nothing else in the
package names a device or a precision: code asks the model where it lives (`model_device`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from llmkit.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def dtype_name(dtype: torch.dtype) -> str:
    """The flag's name of a torch dtype (fp32, bf16, fp16), else torch's own (float64, …)."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))

DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
# A (rows, in_features, out_features) matrix product: what the probe times.
Shape = tuple[int, int, int]
# (shapes, weights_in_dtype) -> (fp32 seconds, bf16 seconds)
Probe = Callable[[Sequence[Shape], bool], tuple[float, float]]


# ---- what the CPU is ------------------------------------------------------------------------------

def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, Arm
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_capability() -> str:
    """torch's name for the vector instructions its CPU kernels use here (AVX2, AVX512, …)."""
    return torch.backends.cpu.get_cpu_capability()


def native_bf16(flags: Iterable[str] | None = None) -> bool:
    """True when the CPU does bf16 arithmetic in hardware; elsewhere torch emulates it, slowly."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    if flags & {"avx512_bf16", "amx_bf16", "bf16"}:  # x86 AVX-512 BF16, Intel AMX, Arm FEAT_BF16
        return True
    # Apple silicon from M2 on has BF16 (macOS has no /proc/cpuinfo to say so).
    return not flags and platform.system() == "Darwin" and platform.machine() == "arm64" and _mac_bf16()


def _mac_bf16() -> bool:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                             timeout=2).stdout
        return out.strip() == "1"
    except (OSError, subprocess.SubprocessError):
        return False


# ---- device and threads ---------------------------------------------------------------------------

def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` → CUDA, then MPS, then CPU; an explicit device that is not there is one clear error."""
    spec = str(spec)
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec}: not a device; choose {DEVICE_HELP}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}, "
                              f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU found'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps" and not _mps_available():
        raise ConfigError(f"--device {spec}: MPS (Apple GPU) is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {spec}: unsupported device type; choose {DEVICE_HELP}")
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def set_threads(threads: int | None) -> int:
    """Use `threads` CPU threads for torch (None: torch's default, one per core); returns the count."""
    if threads is not None:
        if threads <= 0:
            raise ConfigError(f"--threads must be > 0, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# ---- the precision probe --------------------------------------------------------------------------

PROBE_ROWS = 2048  # enough rows that casting the weights (autocast) costs what it does in a real step


def linear_shapes(model: nn.Module, rows: int) -> list[Shape]:
    """The distinct (rows, in, out) products of the model's linear layers: the probe's shapes. Quantised
    layers count: their many-row products (prefill) multiply by the dequantised weight in the chosen dtype."""
    from llmkit.layers.quantized import is_quantized  # deferred: it loads the native kernels' module

    shapes = {(min(rows, PROBE_ROWS), m.in_features, m.out_features) for m in model.modules()
              if (isinstance(m, nn.Linear) and m.weight.device.type != "meta") or is_quantized(m)}
    return sorted(shapes, key=lambda s: s[1] * s[2], reverse=True)[:4]  # the largest carry the time


def measure(shapes: Sequence[Shape], weights_in_dtype: bool, *, budget_s: float = 0.3,
            max_rounds: int = 8) -> tuple[float, float]:
    """Seconds for one pass over `shapes` on the CPU in fp32 and in bf16: fp32 weights under
    autocast (training), or weights stored in bf16 (decoding). The two are timed in alternation,
    so a busy spell of a shared machine hits both alike, and each keeps its best round."""
    gen = torch.Generator().manual_seed(0)
    pairs = {"fp32": [], "bf16": []}
    for rows, k, n in shapes:
        x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen) / k ** 0.5
        pairs["fp32"].append((x, w))
        pairs["bf16"].append((x.bfloat16(), w.bfloat16()) if weights_in_dtype else (x, w))

    def one_pass(dtype: str) -> float:
        context = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" and not weights_in_dtype
                   else contextlib.nullcontext())
        start = time.perf_counter()
        with torch.no_grad(), context:
            for x, w in pairs[dtype]:
                torch.nn.functional.linear(x, w)
        return time.perf_counter() - start

    one_pass("fp32"), one_pass("bf16")  # warm-up: kernel selection, first-touch of the buffers
    best = {"fp32": float("inf"), "bf16": float("inf")}
    started = time.perf_counter()
    for round_ in range(max_rounds):
        for dtype in best:
            best[dtype] = min(best[dtype], one_pass(dtype))
        if round_ >= 1 and time.perf_counter() - started > budget_s:
            break
    return best["fp32"], best["bf16"]


# `auto` takes bf16 only for a clear gain, so that timing noise on a shared machine cannot flip the
# choice between runs; and never for a training step whose products take under TOO_SMALL_S in fp32
# (tiny models: casting costs more than it saves, and their runs should be exactly repeatable).
MIN_GAIN = 1.15
TOO_SMALL_S = 5e-3


@dataclass(frozen=True)
class Choice:
    dtype: str
    reason: str
    warning: str | None = None  # an explicit choice that the probe measured slower


def choose_dtype(spec: str, device: torch.device, shapes: Sequence[Shape], *, training: bool,
                 native: bool | None = None, probe: Probe | None = None) -> Choice:
    """The precision for `spec` (auto|fp32|bf16|fp16) on `device`, with the reason in words."""
    if spec not in DTYPE_CHOICES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {spec!r}")
    if training and spec == "fp16":
        raise ConfigError("--dtype fp16: training in fp16 needs loss scaling, which llmkit does not do; "
                          "use bf16 or fp32")
    if device.type != "cpu":
        if spec != "auto":
            return Choice(spec, "as asked")
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return Choice("bf16", "the GPU has bf16")
        return Choice("fp32", f"{device.type}: fp32 is the safe precision here")
    native = native_bf16() if native is None else native
    probe = probe or measure
    if spec == "fp32":
        return Choice("fp32", "as asked")
    if spec == "auto" and not native:
        return Choice("fp32", "no native bf16")
    if spec == "fp16" or not shapes:
        return Choice(spec, "as asked") if spec != "auto" else Choice("fp32", "nothing to measure")
    t32, t16 = probe(shapes, not training)
    if training and spec == "auto" and t32 < TOO_SMALL_S:
        return Choice("fp32", f"the model is too small for bf16 to pay (fp32 products take {t32 * 1e3:.1f} ms)")
    ratio = t32 / max(t16, 1e-12)  # > 1: bf16 faster
    measured = f"probe {ratio:.1f}× faster than fp32" if ratio >= 1 else f"probe {1 / ratio:.1f}× slower than fp32"
    if spec == "auto":
        if ratio >= MIN_GAIN:
            return Choice("bf16", f"native bf16, {measured}")
        return Choice("fp32", f"native bf16, but {measured.replace('probe', 'the probe measured it')}")
    emulated = "" if native else " (no native bf16 on this CPU)"
    warning = (f"warning: --dtype bf16 runs here, but the probe measured it {1 / ratio:.1f}× slower than fp32"
               f"{emulated}; --dtype auto would pick fp32") if ratio < 1 else None
    return Choice("bf16", "as asked" + (f", {measured}" if ratio >= 1 else emulated), warning)


# ---- the runtime ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Runtime:
    """Where and in what precision a model runs. `dtype` is the compute precision: training keeps
    fp32 weights and autocasts to it; decoding stores the weights in it."""

    device: torch.device
    dtype: str
    threads: int
    reason: str
    warning: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def autocast(self):
        """The one autocast context for forward passes (a no-op in fp32)."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.torch_dtype)

    def describe(self) -> str:
        """One line: what was chosen and why, e.g. `device cpu (AVX2, 2 threads), fp32: no native bf16`."""
        if self.device.type == "cpu":
            where = f"cpu ({cpu_capability()}, {self.threads} thread{'s' if self.threads != 1 else ''})"
        elif self.device.type == "cuda":
            where = f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        else:
            where = str(self.device)
        return f"device {where}, {self.dtype}: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": self.dtype, "threads": self.threads, "reason": self.reason,
                "cpu_capability": cpu_capability()}


def make_runtime(device: str = "auto", dtype: str = "auto", threads: int | None = None, *,
                 model: nn.Module | None = None, rows: int = 1, training: bool,
                 shapes: Sequence[Shape] | None = None, native: bool | None = None,
                 probe: Probe | None = None) -> Runtime:
    """Resolve the flags into a Runtime; the precision probe runs on `model`'s linear shapes (or
    `shapes`) with `rows` rows — a micro-batch's tokens when training, one token when decoding."""
    resolved = resolve_device(device)
    count = set_threads(threads) if resolved.type == "cpu" else torch.get_num_threads()
    if shapes is None:
        shapes = linear_shapes(model, rows) if model is not None else []
    choice = choose_dtype(dtype, resolved, shapes, training=training, native=native, probe=probe)
    return Runtime(resolved, choice.dtype, count, choice.reason, choice.warning)


def decoding_shapes(model: nn.Module) -> list[Shape]:
    """Decoding runs one-row products (each new token) and many-row ones (the prompt): probe both."""
    one = linear_shapes(model, 1)
    return one + [(64, k, n) for _, k, n in one]


# ---- moving data to the model ---------------------------------------------------------------------

def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (float32 for a model without any)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def to_device(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor in it (nested in tuples, lists, dicts, dataclasses) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(to_device(x, device) for x in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(x, device) for x in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch

