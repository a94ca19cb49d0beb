"""The budgets of one chat-template render, and the size estimates that are checked against them.

A template is untrusted code, and Python's string and container operations run in C, where neither a
signal nor a clock can stop them: `'x'.center(2000000000)` allocates gigabytes before anything can
look. So every operation a template can use to build a value is estimated *before* it runs (from its
arguments: a width, a repeat count, a format spec), and the value it returns is charged after:

- one string or bytes value: at most MAX_VALUE_CHARS characters;
- all strings built in one render, summed: at most MAX_BUILT_CHARS (≈ 64 MB at 4 bytes a character);
- all items made in one render (range() items, container items, items of filter iterators): MAX_ITEMS;
- one value's weight (its characters and items, a shared element counted each time it occurs, so
  that `[s] * n` cannot make `in`, `==` or `sort` scan far more than memory holds): MAX_WEIGHT;
- integers: MAX_INT_BITS bits; nesting: MAX_DEPTH levels; and a wall-clock deadline checked at every
  operation and loop iteration.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any, Iterable

from jinja2.utils import Namespace

MAX_VALUE_CHARS = 1_000_000
MAX_BUILT_CHARS = 16_000_000
MAX_ITEMS = 1_000_000
MAX_WEIGHT = MAX_BUILT_CHARS
MAX_INT_BITS = 16_384
MAX_DEPTH = 100
_TICK_EVERY = 64  # loop iterations between clock reads
# A float's text (repr, %f of 1e308, an exponent) is at most this many characters beyond its width.
_NUMBER_CHARS = 330
_CONTAINERS = (list, tuple, dict, set, frozenset, type({}.keys()), type({}.values()), type({}.items()))


class BudgetExceeded(Exception):
    """A render went over a budget. Deliberately not a ValueError: code that a template drives
    (Jinja's `int` filter, for one) swallows ValueErrors, and a budget must not be swallowed."""


def _int_arg(value: Any) -> int:
    """An argument Python will use as a size; anything else makes the call itself raise TypeError."""
    return value if isinstance(value, int) else 0


def _digits(spec: str) -> int:
    """The largest number written in a format spec (a width or a precision)."""
    return max((int(d) if len(d) <= 9 else 10**9 for d in re.findall(r"\d+", spec)), default=0)


def weight(value: Any, *, per_char: int = 1, per_item: int = 1, per_level: int = 0, limit: int = MAX_WEIGHT) -> int:
    """Characters and items reachable from `value`, repeats counted, stopping once past `limit`.
    With per_char/per_item/per_level it bounds a text form instead: repr (10 characters for one
    escaped character), JSON (12: a surrogate pair), each item indented per nesting level."""
    total, stack = 0, [(value, 0)]
    while stack and total <= limit:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BudgetExceeded(f"chat template nests values deeper than {MAX_DEPTH} levels")
        total += per_item + depth * per_level
        if isinstance(item, (str, bytes)):
            total += per_char * len(item) + 2
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, float):
            total += 24
        elif isinstance(item, dict):
            stack.extend((x, depth + 1) for pair in item.items() for x in pair)
        elif isinstance(item, _CONTAINERS):
            stack.extend((x, depth + 1) for x in item)
        elif isinstance(item, Namespace):
            stack.append((item._Namespace__attrs, depth + 1))  # noqa: SLF001 - its repr prints them
        else:  # Undefined, loop, macro, cycler, range...: a short repr
            total += 64
    return total


def text_size(value: Any) -> int:
    """At most how many characters `str(value)` has."""
    if isinstance(value, str):
        return len(value)
    return weight(value, per_char=10, per_item=4, limit=MAX_BUILT_CHARS)


def printf_size(fmt: str, args: Any) -> int:
    """At most how many characters `fmt % args` has: each conversion's width or precision (a `*`
    takes the largest integer argument) plus a number's text, plus every argument's text."""
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    total = len(fmt) + sum(text_size(v) for v in values)
    for spec in re.findall(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?", fmt):
        total += max(star if part == "*" else _digits(part) for part in spec) + _NUMBER_CHARS
    return total


def replace_size(text: Any, old: Any, new: Any, count: Any = -1) -> int:
    kinds = {isinstance(x, str) for x in (text, old, new)}
    if not all(isinstance(x, (str, bytes)) for x in (text, old, new)) or len(kinds) > 1:
        return text_size(text) + text_size(new) * (text_size(text) + 1)
    found = len(text) + 1 if not old else text.count(old)
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    return len(text) + found * max(0, len(new) - len(old))


def join_size(items: list, separator: Any) -> int:
    return sum(text_size(x) for x in items) + text_size(separator) * max(len(items) - 1, 0)


def method_size(method: Any, args: tuple, kwargs: dict) -> int:
    """At most how many characters (or bytes) a call of a str/bytes/int method returns; 0 for every
    method whose result is no longer than a few times its input (those are charged after the call)."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")

    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    if isinstance(owner, int) and name == "to_bytes":
        return _int_arg(arg(0, "length", 1))
    if not isinstance(owner, (str, bytes)):
        return 0
    if name in ("center", "ljust", "rjust", "zfill"):
        return max(len(owner), _int_arg(arg(0, "width", 0)))
    if name == "expandtabs":
        tab = "\t" if isinstance(owner, str) else b"\t"
        return len(owner) + owner.count(tab) * max(_int_arg(arg(0, "tabsize", 8)), 0)
    if name == "replace":
        return replace_size(owner, arg(0, "old"), arg(1, "new"), arg(2, "count", -1))
    if name == "translate":  # each character may map to a string
        table = arg(0, "table")
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1) if isinstance(table, dict) else 1
        return len(owner) * max(longest, 1)
    return 0


def _cased(value: Any, *args: Any, **kwargs: Any) -> int:
    return 3 * text_size(value)  # a case change turns one character into at most three ("ΐ".upper())


def _urlize(value: Any, trim_url_limit: Any = None, nofollow: Any = False, target: Any = None, rel: Any = None,
            extra_schemes: Any = None) -> int:
    """Escaped text (6 per character), and per link (one per 3 characters at most) its tag and the URL again."""
    n = text_size(value)
    return 12 * n + (n // 3 + 1) * (64 + text_size(target or "") + text_size(rel or ""))


def _tojson(value: Any, indent: Any = None) -> int:
    width = len(indent) if isinstance(indent, str) else max(_int_arg(indent), 0)
    return weight(value, per_char=12, per_item=8, per_level=width, limit=MAX_BUILT_CHARS)


def _indent(value: Any, width: Any = 4, first: Any = False, blank: Any = False) -> int:
    n = text_size(value)
    lines = value.count("\n") + 2 if isinstance(value, str) else n + 2
    return n + lines * (len(width) if isinstance(width, str) else max(_int_arg(width), 0))


def _wordwrap(value: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None,
              break_on_hyphens: Any = True) -> int:
    n = text_size(value)
    return n + (n + 1) * text_size(wrapstring if wrapstring is not None else "\n")


def _format(value: Any, *args: Any, **kwargs: Any) -> int:
    if not isinstance(value, str):  # the filter formats str(value), whose characters may hold % specs
        size = text_size(value)
        if size > MAX_VALUE_CHARS:
            return size
        value = str(value)
    return printf_size(value, kwargs or args)


def _items(n: Any) -> int:
    if _int_arg(n) > MAX_ITEMS:
        raise BudgetExceeded(f"chat template asks for {n:,} items (limit {MAX_ITEMS:,})")
    return 0


def _sum(value: Any, attribute: Any = None, start: Any = 0) -> int:
    """Summing lists copies the running total at every step: refuse sums whose copying is too long."""
    if isinstance(start, (list, tuple)) and isinstance(value, (list, tuple)):
        total = weight(value)
        if len(value) * total > MAX_WEIGHT:
            raise BudgetExceeded(f"chat template sums {len(value):,} sequences of {total:,} items in all")
    return 0


def _repr_squared(value: Any, *args: Any, **kwargs: Any) -> int:
    """pprint indents each line up to the width of what precedes it: at most the repr's length squared."""
    n = text_size(value)
    return n * n


# Jinja's filters that can return more text than they are given, with the bound of what they return
# (the filter's own parameters; the value first). Every other filter is charged for what it returns.
FILTER_SIZES = {
    "capitalize": _cased, "lower": _cased, "upper": _cased, "title": _cased, "trim": _cased, "string": _cased,
    "striptags": _cased, "wordcount": _cased,
    "truncate": lambda value, length=255, killwords=False, end="...", leeway=None: text_size(value) + text_size(end),
    "escape": lambda value: 6 * text_size(value), "e": lambda value: 6 * text_size(value),
    "forceescape": lambda value: 6 * text_size(value), "urlencode": lambda value: 12 * text_size(value),
    "xmlattr": lambda value, autospace=True: 6 * text_size(value),
    "center": lambda value, width=80: max(text_size(value), _int_arg(width)),
    "indent": _indent, "wordwrap": _wordwrap, "urlize": _urlize, "tojson": _tojson, "pprint": _repr_squared,
    "format": _format,
    "replace": lambda value, old, new, count=None: replace_size(value, old, new, -1 if count is None else count),
    "join": lambda value, d="", attribute=None: join_size(list(value), d),
    "safe": lambda value: text_size(value), "sum": _sum,
    "batch": lambda value, linecount, fill_with=None: _items(linecount if fill_with is not None else 0),
}
# Filters whose value may be a one-shot iterator that the size above has to look through first.
MATERIALIZED = frozenset(["join", "sum"])


class Budget:
    """What one render may still spend; every check raises BudgetExceeded, and stays exceeded."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.chars = MAX_BUILT_CHARS
        self.items = MAX_ITEMS

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise BudgetExceeded(f"chat template took longer than {self.seconds:g} s")

    def reserve(self, chars: int, what: str) -> None:
        """Before building a value of up to `chars` characters."""
        self.tick()
        if chars > MAX_VALUE_CHARS:
            raise BudgetExceeded(f"chat template builds a value of {chars:,} characters with {what} "
                                 f"(limit {MAX_VALUE_CHARS:,})")
        if chars > self.chars:
            raise BudgetExceeded(f"chat template builds more than {MAX_BUILT_CHARS:,} characters in all")

    def spend_items(self, n: int, what: str) -> None:
        self.items -= n
        if self.items < 0:
            raise BudgetExceeded(f"chat template makes more than {MAX_ITEMS:,} items ({what})")

    def account(self, value: Any, what: str) -> Any:
        """Charge a value just built; an iterator comes back wrapped, charged per item it yields."""
        if isinstance(value, (str, bytes)):
            self.reserve(len(value), what)
            self.chars -= len(value)
        elif isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise BudgetExceeded(f"chat template computes an integer of {value.bit_length():,} bits "
                                     f"with {what} (limit {MAX_INT_BITS:,})")
        elif isinstance(value, _CONTAINERS):
            self.spend_items(len(value), what)
            self.check_weight(value, what)
        elif isinstance(value, Iterator):
            return self.counted(value, what)
        return value

    def check_weight(self, value: Any, what: str) -> None:
        if weight(value) > MAX_WEIGHT:
            raise BudgetExceeded(f"chat template builds a value heavier than {MAX_WEIGHT:,} characters and "
                                 f"items with {what}")

    def counted(self, iterator: Iterator, what: str) -> Iterator:
        for item in iterator:
            self.spend_items(1, what)
            self.tick()
            yield item

    def materialize(self, iterable: Any, what: str) -> Any:
        """A one-shot iterator as a list (charged), so that it can be measured before it is used."""
        if isinstance(iterable, Iterator):
            return self.account(list(iterable), what)
        return iterable

    def ticking(self, iterable: Any) -> Iterable:
        return _Ticking(iterable, self)


class _Ticking:
    """A for-loop's iterable that reads the clock as the loop runs; it keeps `len` for `loop.length`."""

    def __init__(self, iterable: Any, budget: Budget) -> None:
        self.iterable, self.budget = iterable, budget

    def __len__(self) -> int:
        return len(self.iterable)  # TypeError for an iterator: Jinja's LoopContext then counts it itself

    def __iter__(self) -> Iterator:
        for i, item in enumerate(self.iterable):
            if i % _TICK_EVERY == 0:
                self.budget.tick()
            yield item
