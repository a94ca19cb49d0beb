"""Every fenced code block in README.md and docs/*.md, run verbatim.

```python blocks run in a subprocess with .venv/bin/python; ```sh blocks run as one bash script
with `set -e` (so every command in them, each `llmkit ...` line included, must exit 0) and the
venv's bin/ first on PATH (so `llmkit` is the venv's entry point); ```text blocks are output and
never run. An HTML comment on the line before the fence changes that:

    <!-- snippet: skip (REASON) -->      never run: make demo, an interactive chat, minutes of CPU, CUDA
    <!-- snippet: pending (REASON) -->   uses a flag that has not landed yet: pytest.skip(REASON)
    <!-- snippet: template -->           a synopsis: shown, not run; its placeholders are CAPITALS

Each snippet runs in a fresh temporary directory holding `.venv` (a link to the project's venv),
`corpus/` (~60 KB of text) and `runs/demo` (a llama-tiny model trained 5 steps) and
`runs/seq2seq-demo` (a t5v11-tiny trained 5 steps), both trained once per session. Snippets run
two at a time (most of each one's time is importing torch).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import make_corpus

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
BIN = VENV / "bin" if (VENV / "bin" / "llmkit").exists() else Path(sys.executable).parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KINDS = ("run", "skip", "pending", "template")
LANGS = ("python", "sh", "text")
TIMEOUT_S = 120

FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*snippet:\s*(\w+)\s*(?:\((.*)\))?\s*-->$")
# a placeholder is a word in capitals (PATH, DIR, N, FILE.jsonl's FILE); lower-case ones are not allowed
CAPITALS = re.compile(r"\b[A-Z][A-Z0-9_]*\b")
LOWERCASE_PLACEHOLDERS = re.compile(r"path/to|<[a-z][^>]*>|(?<![A-Z\],])(\.\.\.|…)")


@dataclass(frozen=True)
class Snippet:
    page: str  # relative to the repo
    line: int  # of the opening fence
    lang: str
    kind: str
    reason: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def parse(path: Path) -> tuple[list[Snippet], list[str]]:
    """The fenced blocks of one page, and problems with its markers."""
    page = str(path.relative_to(REPO))
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets, problems, marker, i = [], [], None, 0
    while i < len(lines):
        stripped = lines[i].strip()
        m = MARKER.match(stripped)
        if m:
            if marker:
                problems.append(f"{page}:{marker[0]}: marker not followed by a code block")
            marker = (i + 1, m.group(1), (m.group(2) or "").strip())
        elif (f := FENCE.match(lines[i])):
            indent, lang, start = len(f.group(1)), f.group(2), i + 1
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][indent:] if not lines[i][:indent].strip() else lines[i].lstrip())
                i += 1
            kind, reason = (marker[1], marker[2]) if marker else ("run", "")
            snippets.append(Snippet(page, start, lang, kind, reason, "\n".join(body) + "\n"))
            marker = None
        elif stripped and marker:
            problems.append(f"{page}:{marker[0]}: marker not directly before a code block")
            marker = None
        i += 1
    return snippets, problems


SNIPPETS: list[Snippet] = []
MARKER_PROBLEMS: list[str] = []
for _page in PAGES:
    _found, _problems = parse(_page)
    SNIPPETS += _found
    MARKER_PROBLEMS += _problems
RUNNABLE = [s for s in SNIPPETS if s.kind == "run" and s.lang in ("python", "sh")]


def test_markers_are_valid():
    problems = list(MARKER_PROBLEMS)
    for s in SNIPPETS:
        if s.lang not in LANGS:
            problems.append(f"{s.id}: fence language {s.lang!r} (use one of {LANGS})")
        if s.kind not in KINDS:
            problems.append(f"{s.id}: unknown marker {s.kind!r} (use one of {KINDS[1:]})")
        if s.kind in ("skip", "pending") and not s.reason:
            problems.append(f"{s.id}: '{s.kind}' needs a reason: <!-- snippet: {s.kind} (why) -->")
        if s.kind == "template":
            if not CAPITALS.search(s.code):
                problems.append(f"{s.id}: template without a placeholder in CAPITALS (then run it)")
            if (bad := LOWERCASE_PLACEHOLDERS.search(s.code)):
                problems.append(f"{s.id}: template placeholder {bad.group(0)!r} is not in CAPITALS")
    assert not problems, "\n".join(problems)


def test_pages_have_runnable_snippets():
    assert len(RUNNABLE) >= 10, [s.id for s in RUNNABLE]


def snippet_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LLMKIT_FAULT_AT"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", MPLBACKEND="Agg",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def llmkit(cwd: Path, *args: str) -> None:
    proc = subprocess.run([str(BIN / "llmkit"), *args], cwd=cwd, env=snippet_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"llmkit {' '.join(args)}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """What snippets find in their working directory: a corpus and two tiny trained runs."""
    root = tmp_path_factory.mktemp("snippets_base")
    make_corpus(root / "corpus")
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(llmkit, root, "train", "--preset", "llama-tiny", "--data", "corpus",
                            "--out", "runs/demo", "--steps", "5", "--vocab-size", "512", "--batch-size", "4",
                            "--seq-len", "32", "--eval-interval", "5", "--eval-batches", "2",
                            "--warmup-steps", "2", "--dtype", "fp32", "--threads", "1"),
                pool.submit(llmkit, root, "seq2seq-demo", "--out", "runs/seq2seq-demo", "--train-examples",
                            "200", "--test-examples", "4", "--steps", "5", "--batch-size", "8",
                            "--dtype", "fp32", "--threads", "1")]
        for job in jobs:
            job.result()
    return root


def run_snippet(s: Snippet, base: Path, cwd: Path) -> subprocess.CompletedProcess:
    shutil.copytree(base, cwd, symlinks=True)
    (cwd / ".venv").symlink_to(VENV if VENV.exists() else BIN.parent, target_is_directory=True)
    if s.lang == "python":
        (cwd / "snippet.py").write_text(s.code, encoding="utf-8")
        argv = [str(BIN / "python"), "snippet.py"]
    else:
        (cwd / "snippet.sh").write_text("set -euo pipefail\n" + s.code, encoding="utf-8")
        argv = ["bash", "snippet.sh"]
    try:
        return subprocess.run(argv, cwd=cwd, env=snippet_env(), capture_output=True, text=True,
                              encoding="utf-8", errors="replace", timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(argv, -1, "", f"timed out after {TIMEOUT_S} s: {exc}")


@pytest.fixture(scope="session")
def results(request, prepared, tmp_path_factory) -> dict[str, Future]:
    """Starts every selected runnable snippet, two at a time; each test waits for its own."""
    wanted = {item.callspec.params["snippet"].id for item in request.session.items
              if hasattr(item, "callspec") and "snippet" in item.callspec.params}
    pool = ThreadPoolExecutor(2)
    futures = {s.id: pool.submit(run_snippet, s, prepared, tmp_path_factory.mktemp("snippet") / "cwd")
               for s in RUNNABLE if s.id in wanted}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.lang in ("python", "sh")], ids=lambda s: s.id)
def test_snippet_runs(snippet: Snippet, request):
    if snippet.kind == "pending":
        pytest.skip(f"pending: {snippet.reason}")
    if snippet.kind == "skip":
        pytest.skip(f"not run: {snippet.reason}")
    if snippet.kind == "template":
        pytest.skip("template: placeholders, checked by test_markers_are_valid")
    proc = request.getfixturevalue("results")[snippet.id].result()
    assert proc.returncode == 0, (f"{snippet.id} exited {proc.returncode}\n--- snippet\n{snippet.code}"
                                  f"--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}")
