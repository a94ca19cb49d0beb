"""`llmkit` (or any Python code) as a real subprocess under bounds, for the tests that feed it hostile
input: an address-space limit (RLIMIT_AS) and a CPU-seconds limit (RLIMIT_CPU), both set inside the
child before llmkit is imported (a preexec_fn is unsafe once the parent has threads), and a wall-clock
timeout as a hang detector only (a process blocked on a FIFO uses no CPU; the machine's cores are
shared, so wall time says little about cost). The CPU seconds the child used are measured, which a
busy machine does not inflate.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SHIM = ("import resource, runpy, sys\n"
        "memory, cpu = int(sys.argv[1]), int(sys.argv[2])\n"
        "if memory: resource.setrlimit(resource.RLIMIT_AS, (memory, memory))\n"
        "if cpu: resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))\n"
        "code = sys.argv[3]\n"
        "sys.argv = ['llmkit', *sys.argv[4:]]\n"
        "runpy.run_module('llmkit', run_name='__main__') if not code else exec(compile(code, '<test>', 'exec'))\n")


@dataclass
class Outcome:
    rc: int | None  # None: the wall-clock limit ended it (a hang)
    stdout: str
    stderr: str
    cpu_s: float  # user + system seconds of the child
    argv: list[str]


def run_bounded(args: list, cwd: str | Path, *, memory: int | None = 1 << 30, cpu_s: int | None = 30,
                wall_s: float = 300, env: dict[str, str] | None = None, code: str | None = None) -> Outcome:
    """`llmkit ARGS` in `cwd` (or `code`, a Python program, with ARGS as its sys.argv[1:]) under the bounds."""
    argv = [str(a) for a in args]
    full_env = {**{k: v for k, v in os.environ.items() if k not in ("LLMKIT_FAULT_AT", "LLMKIT_DEBUG")},
                "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    command = [sys.executable, "-c", SHIM, str(memory or 0), str(cpu_s or 0), code or "", *argv]
    try:
        proc = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, timeout=wall_s)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it
        rc, stdout, stderr = None, exc.stdout or b"", exc.stderr or b""
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Outcome(rc, stdout.decode(errors="replace"), stderr.decode(errors="replace"),
                   (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), argv)


def llmkit_argv(*args) -> list[str]:
    """The venv's `llmkit` entry point (or `python -m llmkit.cli`) with ARGS."""
    script = Path(sys.executable).with_name("llmkit")
    return [*([str(script)] if script.exists() else [sys.executable, "-m", "llmkit.cli"]), *map(str, args)]


def run_all(commands: dict[str, list], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Start every command at once (each pays ~2 s importing torch), then collect them (no bounds:
    for commands given good input)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {name: subprocess.Popen(llmkit_argv(*argv), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, argv in commands.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results
