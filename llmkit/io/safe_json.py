"""JSON from untrusted text: every failure is one line naming the file (and line), never a traceback.

Python's `json` turns hostile input into errors that are not JSON errors: `[` × 100,000 raises
RecursionError, an integer of more than 4,300 digits a ValueError about `sys.set_int_max_str_digits`,
and a `"\\ud800"` escape yields a lone surrogate that fails later, far away, when the text is encoded.
`parse_json` bounds nesting (MAX_DEPTH, by a scan of the brackets outside strings, before `json`
runs), rejects lone surrogates with the field that holds one, and turns every other failure into the
caller's error class. `read_json` reads a regular file of at most MAX_WHOLE_FILE_BYTES first
(llmkit.io.input_files). Bounds and threat model: docs/security.md.
"""

from __future__ import annotations

import json
import re
import sys
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable

from llmkit.errors import DatasetError, LlmkitError
from llmkit.io.input_files import MAX_WHOLE_FILE_BYTES, read_regular_bytes

MAX_DEPTH = 128  # nested arrays/objects; real configs and records stay under 10

# A JSON string, written so that the regex engine never backtracks (the "unrolled loop" form).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only text with one can decode to a lone surrogate


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays/objects in `text`, counting only brackets outside strings.
    Exact for valid JSON; for broken JSON it may count too deep, which is an error either way."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(1 if c in "[{" else -1 for c in brackets), default=0)


def _excerpt(text: str, pos: int) -> str:
    """The line of `text` around position `pos`, stripped, at most 80 characters."""
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    line = text[start:end if end >= 0 else len(text)].strip()
    return repr(line[:80] + ("…" if len(line) > 80 else ""))


def _step(key: int | str) -> str:
    """One step of a field path: [3], .name, or ['odd key'] (repr escapes newlines and surrogates,
    so a hostile key cannot break the one-line message; long keys are cut)."""
    if isinstance(key, int):
        return f"[{key}]"
    return f".{key}" if key.isidentifier() and len(key) <= 40 else f"[{key[:40]!r}]"


def _surrogate_path(value: Any, path: str = "") -> str | None:
    """The field path ('messages[0].content', or '' for the top level) of the first string or key
    holding a lone surrogate, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = (path + _step(key)).removeprefix(".")
        if isinstance(key, str) and _surrogate_path(key) is not None:
            return inner
        found = _surrogate_path(item, inner)
        if found is not None:
            return found
    return None


def parse_json(text: str | bytes, *, where: str, error: type[LlmkitError] = DatasetError, one_line: bool = False,
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse untrusted JSON text; any failure is `error` starting with `where`.

    `one_line`: the text is one line of a JSONL file that `where` already names ("file:12"), so a
    syntax error adds only the column; otherwise it adds line:column. Bytes must be UTF-8. A
    ValueError raised by `object_pairs_hook` (a duplicate key, say) becomes `error` with its text."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where}: not UTF-8 text (invalid byte 0x{text[exc.start]:02x} at offset "
                        f"{exc.start})") from None
    # Nesting cannot exceed the number of opening brackets, which C counts fast: scan only beyond that.
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting_depth(text) > MAX_DEPTH:
        raise error(f"{where}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        at = f"{exc.colno}" if one_line else f"{exc.lineno}:{exc.colno}"
        raise error(f"{where}:{at}: invalid JSON ({exc.msg}): {_excerpt(text, exc.pos)}") from exc
    except RecursionError:  # a caller already deep in its own stack; the scan above bounds the rest
        raise error(f"{where}: JSON nested too deeply to read") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise error(f"{where}: a JSON integer has more than {sys.get_int_max_str_digits()} digits") from None
        raise error(f"{where}: invalid JSON ({' '.join(str(exc).split())})") from None
    if _SURROGATE_ESCAPE.search(text):
        field = _surrogate_path(value)
        if field is not None:
            raise error(f"{where}: field {field or '(top level)'} holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                        "which is not text")
    return value


def read_json(path: str | Path, *, what: str = "JSON file", error: type[LlmkitError] = DatasetError,
              limit: int = MAX_WHOLE_FILE_BYTES,
              object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse a JSON file that must be a regular file of at most `limit` bytes (UTF-8, an optional
    BOM); `what` names it in errors ("config file", "shard index"), `error` is the class raised."""
    data = read_regular_bytes(path, error=error, what=what, limit=limit)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return parse_json(data, where=str(path), error=error, object_pairs_hook=object_pairs_hook)
