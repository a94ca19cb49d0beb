"""The regular expressions a tokenizer.json brings are checked before the tokenizer is used.

Split pre-tokenizers and Replace normalizers/decoders carry patterns that the `tokenizers` library
runs in Oniguruma, a backtracking engine. A pattern with a repeated group inside a repeat, such as
`(a+)+b`, backtracks exponentially; Oniguruma stops at its retry limit and the library then panics:
pyo3's PanicException, a BaseException that `except Exception` misses, after a Rust backtrace on
stderr (tokenizers PR #2060; RELIABILITY.md L6). So at load every pattern is (1) scanned for nested
repeats, which no real tokenizer uses (GPT-2, LLaMA-3, Qwen2, DeepSeek and o200k patterns have none),
and (2) the whole pipeline encodes a few backtracking probes, such as "a" * 30 + "b", which must not fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Iterator

from llmkit.errors import ModelFormatError

PROBES = ("a" * 30 + "b", " " * 30 + "!", "1" * 30 + "x", "ab " * 20 + "\n", "é" * 30 + "\r\n", "'s" * 20 + "?")


def is_rust_panic(exc: BaseException) -> bool:
    """pyo3's PanicException: the Rust side of an extension panicked (its class is not importable)."""
    return type(exc).__name__ == "PanicException"


def patterns_in(data: Any) -> list[str]:
    """Every {"Regex": pattern} in a parsed tokenizer.json."""
    found, stack = [], [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("Regex"), str):
                found.append(item["Regex"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def nested_repeat(pattern: str) -> str | None:
    """The first group that can repeat and holds a repeat inside, e.g. `(a+)+` or `(\\w+\\s?)*`; None if
    there is none. A repeat is `*`, `+`, `{n,}` or `{n,m}` with m > 1 (`?` and `{1}` are not)."""
    stack: list[tuple[int, bool]] = []  # per open group: where it starts, whether it holds a repeat
    last: tuple[int, bool] | None = None  # the group that just closed, which a quantifier would repeat
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i, last = i + 2, None
            continue
        if c == "[":  # a character class: skip it (nested classes included), nothing repeats inside
            i, last = _class_end(pattern, i), None
            continue
        repeat, width = _quantifier(pattern, i)
        if width:
            if repeat and last is not None and last[1]:
                return pattern[last[0]:i + width]
            if repeat and stack:
                stack[-1] = (stack[-1][0], True)
            i, last = i + width, None
            continue
        if c == "(":
            stack.append((i, False))
        elif c == ")" and stack:
            last = stack.pop()
            if last[1] and stack:
                stack[-1] = (stack[-1][0], True)
            i += 1
            continue
        i, last = i + 1, None
    return None


def _class_end(pattern: str, i: int) -> int:
    depth, i = 0, i
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] == "[":
            depth += 1
        elif pattern[i] == "]" and i > 0:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def _quantifier(pattern: str, i: int) -> tuple[bool, int]:
    """(whether it allows more than one repetition, its length) for a quantifier at i, else (False, 0)."""
    c = pattern[i]
    if c in "*+?":
        lazy = 1 if i + 1 < len(pattern) and pattern[i + 1] in "?+" else 0
        return c != "?", 1 + lazy
    if c == "{":
        end = pattern.find("}", i)
        body = pattern[i + 1:end] if end > 0 else ""
        parts = body.split(",")
        if end > 0 and len(parts) <= 2 and all(p.strip().isdigit() or (k == 1 and not p.strip())
                                                for k, p in enumerate(parts)):
            upper = parts[-1].strip()
            return (len(parts) == 2 and (not upper or int(upper) > 1)) or (len(parts) == 1 and int(parts[0]) > 1), \
                end + 1 - i
    return False, 0


def check_tokenizer_regexes(text: str, backend: Any, where: str) -> None:
    """Refuse a tokenizer whose patterns nest repeats, or whose pipeline fails on a probe."""
    if '"Regex"' not in text:
        return
    for pattern in patterns_in(json.loads(text)):
        nested = nested_repeat(pattern)
        if nested is not None:
            raise ModelFormatError(f"{where}: the regex {pattern[:80]!r} repeats a group that itself repeats "
                                   f"({nested[:40]!r}): it can backtrack for ever, so it is refused")
    for probe in PROBES:
        try:
            with _quiet_stderr():  # the panic prints a Rust backtrace; the error below says it in one line
                backend.encode(probe, add_special_tokens=False)
        except BaseException as exc:
            if not is_rust_panic(exc):
                raise
            raise ModelFormatError(f"{where}: the tokenizer fails on the probe {probe[:12]!r}... "
                                   f"({' '.join(str(exc).split())[:120]}): its regex backtracks too much") from None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    sys.stderr.flush()
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
