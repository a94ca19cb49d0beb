"""JSONL records for post-training: SFT conversations and preference pairs, read strictly.

Every problem in a file is a DatasetError naming `file:line` (1-based physical lines), because a
record that fails late — mid-training, as a KeyError — costs the whole run (RELIABILITY D1–D4).
Rules:
- A regular file, streamed line by line (a FIFO or device is refused; a line over 64 MiB is an error);
  memory holds one line besides the records kept. Nesting past safe_json.MAX_DEPTH, integers of
  more than 4,300 digits and lone surrogates (`"\\ud800"`) are errors naming the line (and field).
- UTF-8 only; a UTF-8 BOM is stripped, CRLF is accepted, a UTF-16/32 BOM or an invalid byte is an
  error (with the byte offset in the line), and so is a NUL byte.
- Whitespace-only lines are skipped. Every other line is one JSON object.
- SFT: `{"instruction", "input"?, "output", "system"?}` or `{"messages": [{"role", "content"}, ...]}`
  with roles system/user/assistant; at least one assistant message, none empty, and a message
  before the first one. Both forms become a list of messages.
- Preferences: non-empty strings `prompt`, `chosen`, `rejected`. Pairs with chosen == rejected
  teach nothing (their loss sits at ln 2) and are dropped and counted, never an error.
- Prompts (PPO): a non-empty string `prompt`.
- Unknown keys are counted (ReadStats.unknown_keys) for one warning by the caller.
- `skip_bad_lines=N` (`--skip-bad-lines N`, RELIABILITY D1) drops up to N bad lines — invalid
  JSON, a non-object, a non-UTF-8 line, a NUL byte, a schema error — and keeps each one's error
  (ReadStats.skipped) for the caller to print; the next bad line is the usual error. File-level
  problems (a missing file, UTF-16) are never skipped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from llmkit.errors import ConfigError, DatasetError
from llmkit.io.input_files import iter_lines
from llmkit.io.safe_json import parse_json

ROLES = ("system", "user", "assistant")
SFT_KEYS = {"instruction", "input", "output", "system", "messages"}
PREF_KEYS = {"prompt", "chosen", "rejected"}
PROMPT_KEYS = {"prompt"}
_UTF16_32_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                  (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


@dataclass
class ReadStats:
    """What reading a file saw: lines, blank lines, records kept, and what was dropped and why."""
    path: str
    lines: int = 0
    blank: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason → count
    unknown_keys: Counter = field(default_factory=Counter)  # key → records that had it
    skip_bad_lines: int = 0  # how many bad lines may be dropped instead of stopping the read
    skipped: list[str] = field(default_factory=list)  # the "file:line: what" error of each dropped line

    def drop_bad_line(self, error: DatasetError) -> None:
        """Drop the line `error` names while the skip budget lasts; past it, raise the error."""
        if len(self.skipped) >= self.skip_bad_lines:
            if self.skip_bad_lines:  # say why this one stopped the read when others were let through
                raise DatasetError(f"{error} (bad line {len(self.skipped) + 1}; --skip-bad-lines "
                                   f"{self.skip_bad_lines})") from error.__cause__
            raise error
        self.skipped.append(str(error))
        self.dropped["invalid"] += 1

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items() if n)
        return f"{self.kept} records from {self.lines} lines" + (f" (dropped: {drops})" if drops else "")


@dataclass(frozen=True)
class Conversation:
    """One SFT example: messages [{"role", "content"}], and the line it came from."""
    messages: list[dict[str, str]]
    where: str  # "file:line"


@dataclass(frozen=True)
class Prompt:
    text: str
    where: str  # "file:line"


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    where: str  # "file:line"


def _excerpt(text: str) -> str:
    text = text.strip()
    return repr(text[:80] + ("…" if len(text) > 80 else ""))


def iter_jsonl(path: str | Path, stats: ReadStats | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("file:line", object) for every non-blank line of a JSONL file; a bad line is an error,
    or is dropped when `stats` allows (ReadStats.skip_bad_lines).

    The file is streamed: memory holds one line of at most MAX_LINE_BYTES (64 MiB; a longer line is
    an error naming it, never skipped) besides what the caller keeps. It must be a regular file."""
    path = Path(path)
    for number, raw in iter_lines(path, error=DatasetError, what="data file"):
        if number == 1:
            for bom, name in _UTF16_32_BOMS:
                if raw.startswith(bom):
                    raise DatasetError(f"{path}: file is {name}; convert it to UTF-8")
            raw = raw.removeprefix(b"\xef\xbb\xbf")
        if stats is not None:
            stats.lines = number
        where = f"{path}:{number}"
        try:
            obj = _parse_line(raw, where)
        except DatasetError as exc:
            if stats is None:
                raise
            stats.drop_bad_line(exc)
            continue
        if obj is None:
            if stats is not None:
                stats.blank += 1
            continue
        yield where, obj


def _parse_line(raw: bytes, where: str) -> dict[str, Any] | None:
    """One physical line as a JSON object; None for a whitespace-only line. Bounded by safe_json:
    nesting depth, huge integers and lone surrogates (which would fail later, in tokenization)."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DatasetError(f"{where}: NUL byte at offset {nul} (binary data, not JSONL)")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset "
                           f"{exc.start})") from None
    if not line.strip():
        return None
    obj = parse_json(line, where=where, error=DatasetError, one_line=True)
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}: {_excerpt(line)}")
    return obj


def _string(obj: dict, key: str, where: str, *, required: bool = True, nonempty: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if key not in obj:
        raise DatasetError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise DatasetError(f"{where}: field {key!r} is empty")
    return value


def _messages(obj: dict, where: str) -> list[dict[str, str]]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DatasetError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DatasetError(f"{where}: messages[{i}] has role {role!r}; expected one of {', '.join(ROLES)}")
        content = _string(m, "content", f"{where}: messages[{i}]")
        if role == "assistant" and not content.strip():
            raise DatasetError(f"{where}: messages[{i}] is an empty assistant response")
        out.append({"role": role, "content": content})
    roles = [m["role"] for m in out]
    if "assistant" not in roles:
        raise DatasetError(f"{where}: no assistant message (nothing to learn from)")
    if roles[0] == "assistant":
        raise DatasetError(f"{where}: messages[0] is an assistant message; a conversation starts with "
                           "a system or user message")
    return out


def conversation_from(obj: dict, where: str) -> list[dict[str, str]]:
    """The messages of one SFT record in either form (see the module docstring)."""
    if "messages" in obj:
        return _messages(obj, where)
    if "instruction" not in obj and "output" not in obj:
        raise DatasetError(f"{where}: missing field 'messages' (chat form) or 'instruction'/'output'")
    instruction = _string(obj, "instruction", where, nonempty=True)
    extra = _string(obj, "input", where, required=False)
    output = _string(obj, "output", where)
    if not output.strip():
        raise DatasetError(f"{where}: field 'output' is an empty response")
    system = _string(obj, "system", where, required=False)
    user = instruction + (f"\n\n{extra}" if extra and extra.strip() else "")
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _require_some(items: list, stats: ReadStats) -> None:
    if not items:
        raise DatasetError(f"0 usable examples in {stats.path} ({stats.lines} lines read"
                           + "".join(f"; dropped: {n} {why}" for why, n in stats.dropped.items() if n) + ")")


def _read(path: str | Path, skip_bad_lines: int, parse: Callable[[str, dict, ReadStats], Any | None],
          keys: set[str]) -> tuple[list, ReadStats]:
    """parse(where, object, stats) for every line of a JSONL file: a record, or None for a line that
    `parse` dropped and counted; a line that fails (DatasetError) is skipped while the budget lasts."""
    if skip_bad_lines < 0:
        raise ConfigError(f"--skip-bad-lines must be ≥ 0, got {skip_bad_lines}")
    stats = ReadStats(str(path), skip_bad_lines=skip_bad_lines)
    out = []
    for where, obj in iter_jsonl(path, stats):
        try:
            record = parse(where, obj, stats)
        except DatasetError as exc:
            stats.drop_bad_line(exc)
            continue
        stats.unknown_keys.update(set(obj) - keys)
        if record is not None:
            out.append(record)
    stats.kept = len(out)
    _require_some(out, stats)
    return out, stats


def read_sft_records(path: str | Path, *, skip_bad_lines: int = 0) -> tuple[list[Conversation], ReadStats]:
    """Every SFT record of a JSONL file, validated before anything is built."""
    return _read(path, skip_bad_lines, lambda where, obj, _: Conversation(conversation_from(obj, where), where),
                 SFT_KEYS)


def _pair(where: str, obj: dict, stats: ReadStats) -> PreferencePair | None:
    prompt, chosen, rejected = (_string(obj, key, where, nonempty=True) for key in ("prompt", "chosen", "rejected"))
    if chosen.strip() == rejected.strip():
        stats.dropped["chosen == rejected"] += 1
        return None
    return PreferencePair(prompt, chosen, rejected, where)


def read_preference_pairs(path: str | Path, *, skip_bad_lines: int = 0) -> tuple[list[PreferencePair], ReadStats]:
    """Every preference pair of a JSONL file; degenerate pairs (chosen == rejected) are dropped."""
    return _read(path, skip_bad_lines, _pair, PREF_KEYS)


def read_prompts(path: str | Path, *, skip_bad_lines: int = 0) -> tuple[list[Prompt], ReadStats]:
    """Every `{"prompt": "..."}` line of a JSONL file (PPO's prompts)."""
    return _read(path, skip_bad_lines,
                 lambda where, obj, _: Prompt(_string(obj, "prompt", where, nonempty=True), where), PROMPT_KEYS)
