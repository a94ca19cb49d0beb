"""Chat templates: a model's own Jinja template turns a list of messages into the prompt text.

Templates come from model files (tokenizer_config.json, chat_template.jinja, GGUF metadata), so they
are untrusted code. They run in Jinja's immutable sandbox (no attribute tricks reach Python
internals), and everything a template can do to build a value goes through a budget (chat_budget.py)
that is checked before the value is built: every filter, every method call, every operator, `~`,
list and dict literals, `range`, each loop iteration and each piece of output. The rendered text is
capped at MAX_OUTPUT_CHARS, the whole render at MAX_SECONDS of wall-clock time (and, in the main
thread, of CPU time too). Any violation is a one-line ChatTemplateError.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import types
from types import CodeType
from typing import Any, Callable, Iterator, Sequence

from jinja2 import nodes, pass_context
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter, SecurityError
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

from llmkit.errors import LlmkitError
from llmkit.tokenizer.chat_budget import (FILTER_SIZES, MATERIALIZED, MAX_INT_BITS, MAX_ITEMS, MAX_VALUE_CHARS,
                                          MAX_WEIGHT, Budget, BudgetExceeded, join_size, method_size, printf_size,
                                          text_size, weight, _digits)

MAX_OUTPUT_CHARS = 1_000_000
MAX_TEMPLATE_CHARS = 200_000  # real templates are under 20,000 (tool-calling ones included)
MAX_SECONDS = 2.0
ROLES = ("system", "user", "assistant")

# For llmkit-trained models, which have no template of their own: the tokenizer's role tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(LlmkitError):
    """A chat template is invalid, unsafe, too expensive, or the messages do not fit it."""


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])

    def __init__(self, seconds: float = MAX_SECONDS) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        self.budget = Budget(seconds)
        self.globals["range"] = self._range
        self.globals["lipsum"] = self._lipsum
        self.globals["raise_exception"] = _raise_exception  # used by many HF templates
        self.filters = {name: _bounded_filter(self.budget, name, f) for name, f in self.filters.items()}
        self.filters.update(_hooks(self.budget))

    def _range(self, *args: int) -> range:
        items = range(*args)
        self.budget.spend_items(len(items), "range")
        return items

    def _lipsum(self, n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - Jinja's names
        self.budget.reserve(max(n, 0) * (max * 16 + 16) if isinstance(n, int) and isinstance(max, int) else 0, "lipsum")
        return self.budget.account(generate_lorem_ipsum(n, html, min, max), "lipsum")

    # Filters written in Python (sort, groupby, map, selectattr...) reach items through these two: the
    # clock is read there too, so a long filter stops at the deadline in any thread.
    def getitem(self, obj: Any, argument: Any) -> Any:
        self.budget.tick()
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.budget.tick()
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        self.budget.reserve(_binop_size(self.budget, op, left, right), f"operator {op}")
        return self.budget.account(self.binop_table[op](left, right), f"operator {op}")

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Every call a template makes: a method's result is estimated before it runs, charged after."""
        owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "a call")
        if name == "join" and isinstance(owner, (str, bytes)) and args:
            args = (self.budget.materialize(args[0], "join"), *args[1:])
            self.budget.reserve(join_size(list(args[0]), owner), "join()")
        else:
            self.budget.reserve(method_size(obj, args, kwargs), f"{name}()")
        return self.budget.account(super().call(context, obj, *args, **kwargs), f"{name}()")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """str.format and format_map through a formatter that sizes every field before formatting it."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or \
                value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
            return None
        text, is_map = value.__self__, value.__name__ == "format_map"
        formatter = (_BoundedEscapeFormatter(self, escape=text.escape) if isinstance(text, Markup)
                     else _BoundedFormatter(self))

        def bounded_format(*args: Any, **kwargs: Any) -> str:
            if is_map and (kwargs or len(args) != 1):
                raise TypeError("format_map() takes exactly one argument")
            args, kwargs = ((), args[0]) if is_map else (args, kwargs)
            return type(text)(formatter.vformat(text, args, kwargs))

        return functools.update_wrapper(bounded_format, value)


def _hooks(budget: Budget) -> dict[str, Callable]:
    """What _Metered routes a template's loops, output, `~` and literals through. They are filters whose
    names hold a space, so no template can name them; and pass_context, so that Jinja never folds them
    into constants at compile time: they must run, and charge, every time."""

    @pass_context
    def emit(context: Any, value: Any) -> str:
        if not isinstance(value, str):
            budget.reserve(text_size(value), "output")
        return budget.account(str(value), "output")

    @pass_context
    def concat(context: Any, *parts: Any) -> str:
        budget.reserve(sum(text_size(p) for p in parts), "~")
        return budget.account("".join(map(str, parts)), "~")

    @pass_context
    def iterate(context: Any, iterable: Any) -> Any:
        return budget.ticking(iterable)

    @pass_context
    def literal(context: Any, value: Any) -> Any:
        return budget.account(value, "a literal")

    return {f"llmkit {f.__name__}": f for f in (emit, concat, iterate, literal)}


def _binop_size(budget: Budget, op: str, left: Any, right: Any) -> int:
    """The characters `left op right` will build; integer sizes and item counts are checked here."""
    if op in ("*", "**") and all(isinstance(x, int) for x in (left, right)):
        bits = left.bit_length() + right.bit_length() if op == "*" else max(left.bit_length(), 1) * max(right, 0)
        if bits > MAX_INT_BITS:
            raise BudgetExceeded(f"chat template computes an integer of about {bits:,} bits with {op} "
                                 f"(limit {MAX_INT_BITS:,})")
        return 0
    if op == "*":
        seq, count = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, (list, tuple)) and isinstance(count, int):
            _check_items(len(seq) * max(count, 0), weight(seq) * max(count, 0), op)
        return len(seq) * max(count, 0) if isinstance(seq, (str, bytes)) and isinstance(count, int) else 0
    if op == "+" and isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
        _check_items(len(left) + len(right), weight(left) + weight(right), op)
    if op == "+" and isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
        return len(left) + len(right)
    if op == "%" and isinstance(left, (str, bytes)):
        return printf_size(left if isinstance(left, str) else left.decode("latin-1"), right)
    return 0


def _check_items(items: int, heft: int, op: str) -> None:
    if items > MAX_ITEMS or heft > MAX_WEIGHT:
        raise BudgetExceeded(f"chat template builds a list of {items:,} items weighing {heft:,} with {op}")


def _bounded_filter(budget: Budget, name: str, func: Callable) -> Callable:
    """`func` (a Jinja filter) with its result's size checked before it runs and charged after."""
    size = FILTER_SIZES.get(name)
    lead = 1 if hasattr(func, "jinja_pass_arg") else 0  # the context/environment Jinja passes first

    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget.tick()
        if name in MATERIALIZED and len(args) > lead:
            args = (*args[:lead], budget.materialize(args[lead], name), *args[lead + 1:])
        if size is not None and len(args) > lead:
            budget.reserve(size(*args[lead:], **kwargs), f"filter {name!r}")
        return budget.account(func(*args, **kwargs), f"filter {name!r}")

    if lead:
        bounded.jinja_pass_arg = func.jinja_pass_arg
    return bounded


class _BoundedFormatter(SandboxedFormatter):
    growth = 1  # characters out per character of a field

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = self._env.budget
        budget.reserve(self.growth * (max(_digits(format_spec), text_size(value)) + 330), "format()")
        return budget.account(super().format_field(value, format_spec), "format()")

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion in ("r", "a"):
            self._env.budget.reserve(weight(value, per_char=10, per_item=4), "format() !r")
        return super().convert_field(value, conversion)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    growth = 6  # HTML escaping: & becomes &amp;


class _Metered(NodeTransformer):
    """Rewrites a parsed template so that what the sandbox has no hook for goes through _hooks:
    a for-loop's iterable (the clock runs per iteration), each piece of output (text repeated by a
    loop or captured by {% set %} and macros is charged), `~`, and list, tuple and dict literals."""

    @staticmethod
    def _call(name: str, args: list, lineno: int) -> nodes.Filter:
        return nodes.Filter(args[0], f"llmkit {name}", args[1:], [], None, None, lineno=lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self._call("iterate", [node.iter], node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [self._call("emit", [child], child.lineno) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return self._call("concat", node.nodes, node.lineno)

    def visit_List(self, node: nodes.Expr) -> nodes.Call:
        self.generic_visit(node)
        return self._call("literal", [node], node.lineno)

    visit_Dict = visit_List

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Expr:
        return self.visit_List(node) if node.ctx == "load" else self.generic_visit(node)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the messages: {_one_line(message)}")


def validate_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, "
                                    f"'content': str}}, got {str(m)[:80]!r}")
    try:
        size = weight(list(messages), limit=MAX_OUTPUT_CHARS)
    except BudgetExceeded as exc:
        raise ChatTemplateError(f"messages: {exc}") from None
    if size > MAX_OUTPUT_CHARS:
        raise ChatTemplateError(f"messages hold more than {MAX_OUTPUT_CHARS:,} characters, more than a prompt can")


def render_chat(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "") -> str:
    """Render `messages` with `template` in the bounded sandbox."""
    validate_messages(messages)
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"a chat template must be a string of at most {MAX_TEMPLATE_CHARS:,} characters")
    if any(not isinstance(t, str) or len(t) > MAX_VALUE_CHARS for t in (bos_token, eos_token)):
        raise ChatTemplateError("bos_token and eos_token must be strings of a usual size")
    env = _BoundedEnvironment(MAX_SECONDS)
    try:
        with _deadline(MAX_SECONDS):
            return _render(env, template, messages, add_generation_prompt, bos_token, eos_token)
    except ChatTemplateError:
        raise
    except BudgetExceeded as exc:
        raise ChatTemplateError(_one_line(exc)) from None
    except SecurityError as exc:
        raise ChatTemplateError(f"chat template tried an unsafe operation ({_one_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - anything the template's own code raises is the template's failure
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {_one_line(exc)}") from None


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> CodeType:
    """The template's Python code, metered and compiled once per template text (compiling is ~80% of a
    render's time). Every render binds it to a fresh environment, so each render has its own budget."""
    env = _BoundedEnvironment()
    return env.compile(_Metered().visit(env.parse(template)))


def _render(env: _BoundedEnvironment, template: str, messages: Sequence[dict[str, Any]],
            add_generation_prompt: bool, bos_token: str, eos_token: str) -> str:
    compiled = env.template_class.from_code(env, _compiled(template), env.make_globals(None))
    pieces, size = [], 0
    for piece in compiled.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   bos_token=bos_token, eos_token=eos_token):
        size += len(piece)
        if size > MAX_OUTPUT_CHARS:
            raise ChatTemplateError(f"chat template output exceeds {MAX_OUTPUT_CHARS:,} characters")
        pieces.append(piece)
    return "".join(pieces)


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Also stop the render after `seconds` of this process's CPU time (ITIMER_VIRTUAL), which can
    interrupt a long filter written in Python between two of the budget's clock checks. Signals reach
    only the main thread; elsewhere the budget's clock is the bound. The timer repeats, in case the
    code it interrupts swallows the first exception."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "ITIMER_VIRTUAL"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise BudgetExceeded(f"chat template took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGVTALRM, expire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def _one_line(exc: Any) -> str:
    return " ".join(str(exc).split())[:200]
