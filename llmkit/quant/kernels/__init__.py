"""llmkit's own CPU kernels for 4-bit and 8-bit weights (lowbit.cpp; decode_block.cpp: one decoder block
as one call; lowbit.h: what they share), built once and then reused.

torch's int4 kernel (`_weight_int4pack_mm_for_cpu`) takes bf16 activations only, wants its own copy of
the codes, and a decoding step pays two dtype casts around each of its ~120 calls a token. lowbit.cpp
multiplies fp32 (or bf16) activations by the layers' own packed codes, expanding the weights in
registers, accumulating in fp32 (so a product differs from the dequantised fp32 matmul only in the
order of its sums), with AVX-512 and AVX2 paths chosen at run time; see its header.

The first process that needs it compiles it with torch.utils.cpp_extension (the C++ compiler and
ninja; about half a minute, said on stderr) into a cache directory keyed by the source, torch and
Python versions: `$LLMKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/llmkit`, else `~/.cache/llmkit`. Every
later process only loads the library. Where it cannot be built (no compiler, no ninja, not x86 or
Linux) or `LLMKIT_NATIVE_KERNELS=0` is set, `native()` is None and the layers use torch's kernels and
plain PyTorch, as before; `unavailable_reason()` says why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "lowbit.cpp", HERE / "decode_block.cpp"]  # compiled and linked into one library
HEADERS = [HERE / "lowbit.h", HERE / "wide.inc", HERE / "one_row.inc", HERE / "many_rows.inc",
           HERE / "attend_vec.inc"]  # included by the sources
NAME = "llmkit_lowbit"
SWITCH = "LLMKIT_NATIVE_KERNELS"  # "0": never build or load them (pure PyTorch)
# -ffp-contract=off: no fused multiply-add where the source writes a product and a sum, so the
# dequantisation is bit-identical to the Python reference's.
# -fopenmp: torch's at::parallel_for is OpenMP, and in code compiled without the flag it runs the whole
# loop on the calling thread (it did here until this flag: two threads decoded no faster than one). The
# library then shares the libgomp.so.1 torch loaded (the same soname): one pool, torch.set_num_threads's.
CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
LDFLAGS = ("-fopenmp",)  # tuples: cpp_extension.load appends to the lists it is given
ISA_NAMES = {2: "AVX-512", 1: "AVX2", 0: "portable C++"}


@dataclass(frozen=True)
class Kernels:
    ops: object  # torch.ops.llmkit_lowbit
    isa: int  # 2: AVX-512, 1: AVX2, 0: portable C++

    def describe(self) -> str:
        return f"llmkit {ISA_NAMES[self.isa]}"

    def __deepcopy__(self, memo: dict) -> "Kernels":  # one per process: a copied layer shares it
        return self


_loaded: Kernels | None = None
_reason: str | None = None  # why there are none, once tried


def native() -> Kernels | None:
    """The kernels, built or loaded on the first call in this process; None where they cannot be."""
    global _loaded, _reason
    if os.environ.get(SWITCH, "1") == "0":  # read each time: a test (or a user) can switch them off
        return None
    if _loaded is None and _reason is None:
        try:
            _loaded = _load()
        except Exception as exc:  # a failed build must never stop a model from running: fall back
            _reason = _one_line(exc)
            print(f"llmkit: no native int4/int8 kernels ({_reason}); using torch's", file=sys.stderr, flush=True)
    return _loaded


def unavailable_reason() -> str | None:
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    native()
    return _reason


def wanted_isa() -> int:
    """The widest vectors torch's own kernels use here (ATEN_CPU_CAPABILITY lowers it): the same rule."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    return 2 if "AVX512" in capability or "AMX" in capability else 1 if "AVX2" in capability else 0


def cache_dir() -> Path:
    root = os.environ.get("LLMKIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmkit"
    return Path(root) / "kernels"


def library_path() -> Path:
    """Where the built library lives: one file per set of sources (headers included), torch, Python and
    build flags."""
    text = b"".join(path.name.encode() + path.read_bytes() for path in SOURCES + HEADERS)
    build = "|".join([torch.__version__, sys.version, platform.machine(), *CFLAGS, *LDFLAGS])
    key = hashlib.sha256(text + build.encode()).hexdigest()[:16]
    return cache_dir() / f"{NAME}-{key}.so"


def _load() -> Kernels:
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform != "linux":
        raise RuntimeError(f"built for x86-64 Linux only (this is {sys.platform} {platform.machine()})")
    path = library_path()
    if path.exists():
        torch.ops.load_library(str(path))
    else:
        _build(path)  # which loads it too
    ops = getattr(torch.ops, NAME)
    return Kernels(ops, int(ops.supported_isa(wanted_isa())))


def _build(path: Path) -> None:
    """Compile (and load) in a private directory, then move the library into place in one rename, so
    that a process starting meanwhile never loads half a file (concurrent builders each rename a whole one)."""
    from torch.utils import cpp_extension

    path.parent.mkdir(parents=True, exist_ok=True)
    ninja_dir = Path(sys.executable).parent  # pip's ninja, when the environment has one and PATH does not
    if shutil.which("ninja") is None and (ninja_dir / "ninja").exists():
        os.environ["PATH"] = f"{ninja_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    started = time.perf_counter()
    print(f"llmkit: building the int4/int8 CPU kernels once into {path.parent} …", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=path.parent) as build:
        built = cpp_extension.load(name=NAME, sources=[str(source) for source in SOURCES],
                                   extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                                   build_directory=build, is_python_module=False, verbose=False)
        os.replace(built if isinstance(built, str) else Path(build) / f"{NAME}.so", path)
    print(f"llmkit: kernels built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def _one_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return f"{type(exc).__name__}: {(errors or lines or ['no message'])[0][:200]}"
