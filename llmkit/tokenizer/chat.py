"""Chat templates: a model's own Jinja template turns a list of messages into the prompt text.

Templates come from model files (tokenizer_config.json, GGUF metadata), so they are untrusted
code. They run in Jinja's immutable sandbox (no attribute tricks reach Python internals) with
bounded work: `range` draws from one budget per render, string and list repetition and `**` are
size-checked, and the output is capped. Any violation is a one-line ChatTemplateError.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import signal
import threading
from types import CodeType
from typing import Any, Iterator, Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from llmkit.errors import LlmkitError

MAX_OUTPUT_CHARS = 1_000_000
MAX_LOOP_ITEMS = 1_000_000  # all range() items in one render, nested loops included
MAX_REPEAT_ITEMS = 1_000_000
# CPU-time cap (main thread): loops over strings or lists are not range-counted. CPU time, not wall
# clock, so a loaded machine cannot fail a template that a quiet one renders in a millisecond.
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
    intercepted_binops = frozenset(["*", "**"])

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, autoescape=False)
        self.budget = MAX_LOOP_ITEMS
        self.globals["range"] = self._range
        self.globals["raise_exception"] = _raise_exception  # used by many HF templates

    def _range(self, *args: int) -> range:
        items = range(*args)
        self.budget -= len(items)
        if self.budget < 0:
            raise ChatTemplateError(f"chat template loops over more than {MAX_LOOP_ITEMS:,} items")
        return items

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise ChatTemplateError(f"chat template computes a power with exponent {right}")
            return operator.pow(left, right)
        size = _repeat_size(left, right)
        if size > MAX_REPEAT_ITEMS:
            raise ChatTemplateError(f"chat template repeats a value to {size:,} items")
        return operator.mul(left, right)


def _repeat_size(left: Any, right: Any) -> int:
    for seq, count in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            return len(seq) * max(count, 0)
    return 0


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the messages: {message}")


def validate_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not messages:
        raise ChatTemplateError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatTemplateError(f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, "
                                    f"'content': str}}, got {str(m)[:80]!r}")


def render_chat(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "") -> str:
    """Render `messages` with `template` in the bounded sandbox."""
    validate_messages(messages)
    env = _BoundedEnvironment()
    try:
        with _deadline(MAX_SECONDS):
            return _render(env, template, messages, add_generation_prompt, bos_token, eos_token)
    except ChatTemplateError:
        raise
    except SecurityError as exc:
        raise ChatTemplateError(f"chat template tried an unsafe operation ({_one_line(exc)})") from None
    except (TemplateError, TypeError, ValueError, OverflowError, RecursionError, AttributeError,
            IndexError, KeyError) as exc:
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {_one_line(exc)}") from None


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> CodeType:
    """The template's Python code, compiled once per template text (compiling is ~80% of a render's
    time). Every render binds it to a fresh environment, so each render has its own loop budget."""
    return _BoundedEnvironment().compile(template)


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
    """Abort the render after `seconds` of this process's CPU time (ITIMER_VIRTUAL). Signals reach only
    the main thread; elsewhere the range/repeat/output budgets are the bound."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "ITIMER_VIRTUAL"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise ChatTemplateError(f"chat template took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGVTALRM, expire)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)



def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
