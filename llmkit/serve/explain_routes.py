"""/explain: the `llmkit explain` views as pages for the served model.

    GET /explain               an index: a form (text, view) and the views; with ?view=V it redirects
                               to /explain/V with the other parameters
    GET /explain/VIEW?text=…   the view's self-contained HTML page, the one `llmkit explain VIEW` writes
                               (&format=json: its JSON document, VIEW.json)

VIEW is tokens, attention, knockout, sampling, logit-lens, cache or positions (compare needs a second
model). The other query parameters are the view's CLI flags by their names (top_k for --top-k; head,
edge and stop may repeat), read by the CLI's own parser and checks (llmkit/commands/explain.py), so
the server and the command take the same values and refuse the same ones. Flags that choose the model
or the files (model, out, dtype, …) are the server's business; every_head runs minutes on a large
model and is left to the CLI.

The recording views switch attention layers to the reference kernel and hang probes and hooks on
modules, so they never run on the engine's model. They run on a copy of its module tree, made on the
first /explain request, that shares the served weights: nothing in llmkit/explain writes a weight
(recording changes module attributes and hooks only, and knockouts change attention weights, which are
activations), so the copy costs the module objects, not a second set of weights (docs/explain.md has
the measurement). One view runs at a time, off the event loop, under a lock that also guards the
copy; a request that finds one running gets 429. The text is bounded in characters before it is
tokenized and in tokens after, because an attention page holds layers × heads × tokens² weights.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import html
import re
import threading
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response

from llmkit.serve.errors import APIError

SERVED_VIEWS = ("tokens", "attention", "knockout", "sampling", "logit-lens", "cache", "positions")
MAX_TEXT_CHARS = 1000
MAX_TOKENS = 64  # SmolLM2's attention page holds 30 × 9 maps of tokens² weights: 3.5 MB at 35 tokens (measured)
MAX_NEW_TOKENS = 64  # the sampling view: one full forward per generated token
MAX_REPEATS = 16  # head, edge and stop, each
NOT_SERVED = {"model", "out", "device", "dtype", "threads", "quantize", "kv_cache", "every_head", "tuned",
              "tuned_steps", "tuned_data"}
INDEX_STYLE = "body{font-family:system-ui,sans-serif;margin:1.5em;max-width:900px}input[name=text]{width:30em}" \
              "td{padding:2px 10px}"


class _Refused(Exception):
    pass


class _QueryParser(argparse.ArgumentParser):
    """The CLI's parser, raising instead of printing and exiting."""

    def error(self, message: str):
        raise _Refused(message)

    def exit(self, status: int = 0, message: str | None = None):
        raise _Refused(message or "refused")


def view_parsers() -> dict[str, argparse.ArgumentParser]:
    """The `llmkit explain VIEW` parser of each served view, built by the command's own register()."""
    from llmkit.commands.explain import register

    commands = _QueryParser(prog="llmkit", add_help=False).add_subparsers(dest="command")
    register(commands)
    explain = commands.choices["explain"]
    views = next(a for a in explain._actions if isinstance(a, argparse._SubParsersAction))
    return {view: views.choices[view] for view in SERVED_VIEWS}


def query_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The flags a query may give, by their query name (the flag's dest)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_SERVED | {"help"}}


def parse_query(view: str, parser: argparse.ArgumentParser, items: list[tuple[str, str]]) -> argparse.Namespace:
    """The query's parameters as the CLI's flags of `view`, checked as the CLI checks them."""
    from llmkit.commands.explain import check_view_flags
    from llmkit.commands.flag_ranges import DROPPED, dropped_value_message
    from llmkit.errors import LlmkitError

    flags = query_flags(parser)
    given: dict[str, list[str]] = {}
    for name, value in items:
        if name == "format":
            continue
        if name not in flags:
            if name in NOT_SERVED:
                raise APIError(400, f"{name[:60]} is not offered by the server (the model, its precision and the "
                                    "output are the server's; every_head and the tuned lens run minutes: use "
                                    "`llmkit explain`)", param=name[:60], code="unsupported_parameter")
            raise APIError(400, f"{view} takes no parameter {name[:60]!r}; it takes format, "
                                + ", ".join(flags), param=name[:60], code="unknown_parameter")
        if value == DROPPED:
            raise APIError(400, dropped_value_message(name), param=name, code="invalid_value")
        given.setdefault(name, []).append(value)
    argv = []
    for name, values in given.items():
        action = flags[name]
        limit = MAX_REPEATS if isinstance(action, argparse._AppendAction) else 1
        if len(values) > limit:
            raise APIError(400, f"{name} is given {len(values)} times; at most {limit}", param=name,
                           code="invalid_value")
        argv += [f"{action.option_strings[0]}={value}" for value in values]  # '=': a value may start with '-'
    try:
        args = parser.parse_args(argv)
        check_view_flags(view, args)
    except (_Refused, LlmkitError) as exc:
        raise _refusal(exc, flags) from None
    if getattr(args, "max_new_tokens", None) is not None and not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise APIError(400, f"max_new_tokens must be in [1, {MAX_NEW_TOKENS}] here, got {args.max_new_tokens}",
                       param="max_new_tokens", code="invalid_value")
    text = args.text
    if not text or not text.strip():
        raise APIError(400, "text is empty: give a sentence to explain", param="text", code="invalid_value")
    for name in ("text", "target"):
        value = getattr(args, name, None)
        if value is not None and len(value) > MAX_TEXT_CHARS:
            raise APIError(400, f"{name} holds {len(value)} characters; at most {MAX_TEXT_CHARS} here", param=name,
                           code="invalid_value")
    return args


def _query_words(message: str, flags: dict[str, argparse.Action]) -> tuple[str, str | None]:
    """A CLI message in the query's words ('--top-k' → 'top_k'), and the parameter it names first."""
    patterns = {name: re.compile(re.escape(a.option_strings[0]) + r"(?![\w-])") for name, a in flags.items()}
    named = sorted((m.start(), name) for name, pattern in patterns.items() if (m := pattern.search(message)))
    for name, pattern in patterns.items():
        message = pattern.sub(name, message)
    message = message.removeprefix("argument ")
    if not named:  # a sampling check names the field itself: "temperature must be …"
        word = message.split(" ", 1)[0].rstrip(":")
        return message, word if word in flags else None
    return message, named[0][1]


def _refusal(exc: Exception, flags: dict[str, argparse.Action]) -> APIError:
    message, param = _query_words(str(exc), flags)
    return APIError(400, message, param=param, code="invalid_value")


class Explainer:
    """The served model's explain copy (made on first use) and the lock that lets one view run at a time."""

    def __init__(self, lm: Any, model_id: str) -> None:
        self.lm, self.model_id = lm, model_id
        self.lock = threading.Lock()
        self.copy: Any = None

    def model_copy(self) -> Any:
        """A LanguageModel whose modules are copies of the served ones, sharing their weights (call
        with the lock held)."""
        if self.copy is None:
            model = self.lm.model
            shared = {id(t): t for t in (*model.parameters(), *model.buffers())}  # deepcopy's memo: kept as is
            self.copy = dataclasses.replace(self.lm, model=copy.deepcopy(model, shared))
        return self.copy

    def render(self, view: str, args: argparse.Namespace, as_json: bool, flags: dict) -> tuple[bytes, str]:
        """(body, media type) of the view; in a worker thread. `flags`: the view's, to word errors."""
        from llmkit.commands.explain import view_options
        from llmkit.errors import LlmkitError
        from llmkit.explain import run_view
        from llmkit.explain.page import json_document, render_html, render_png
        from llmkit.explain.subject import Subject

        if not self.lock.acquire(blocking=False):
            raise APIError(429, "an explain view is being computed; they run one at a time: retry in a moment",
                           code="rate_limit_exceeded", headers={"retry-after": "1"})
        try:
            lm = self.model_copy()
            try:
                subject = Subject.create(lm, args.text, target=args.target, label=self.model_id)
                longest = max(len(subject.ids), len(subject.target_ids or ()))
                if longest > MAX_TOKENS:
                    raise APIError(400, f"the text is {longest} tokens; at most {MAX_TOKENS} here (an attention "
                                        "page grows with the square of it): use `llmkit explain` for longer ones",
                                   param="text", code="invalid_value")
                result = run_view(view, subject, **view_options(view, args))
            except LlmkitError as exc:  # a view that does not apply to this model, a word not in the text
                raise _refusal(exc, flags) from None
            if as_json:
                return json_document(result), "application/json"
            return render_html(result, render_png(result)).encode("utf-8"), "text/html; charset=utf-8"
        finally:
            self.lock.release()


def add_explain_routes(app: FastAPI, lm: Any, *, model_id: str) -> dict[str, argparse.ArgumentParser]:
    """Add the /explain routes for the served `lm` to `app`; returns each view's parser (openapi.py
    describes the query parameters from them). One route per view, at fixed paths (which
    /metrics labels). They go on the app itself, not through include_router: FastAPI 0.165 keeps an
    included router as one nested entry, which the guard's list of routes would not see."""
    from llmkit.explain.page import CSP, csp_hash

    index_csp = f"default-src 'none'; style-src {csp_hash(INDEX_STYLE)}; form-action 'self'"
    explainer = Explainer(lm, model_id)
    parsers = view_parsers()
    index = index_page(model_id, parsers)

    async def explain_index(request: Request) -> Response:
        items = list(request.query_params.multi_items())
        view = request.query_params.get("view")
        if view is None and not items:
            return Response(index, media_type="text/html; charset=utf-8",
                            headers={"content-security-policy": index_csp, "cache-control": "no-cache"})
        if view not in SERVED_VIEWS:
            raise APIError(400, f"view must be one of {', '.join(SERVED_VIEWS)}, got {str(view)[:40]!r}",
                           param="view", code="invalid_value")
        rest = urlencode([(k, v) for k, v in items if k != "view"])
        return RedirectResponse(f"/explain/{view}" + (f"?{rest}" if rest else ""), status_code=303)

    app.add_api_route("/explain", explain_index, methods=["GET"], include_in_schema=False, name="explain")

    def view_route(view: str) -> None:
        async def explain_view(request: Request) -> Response:
            fmt = request.query_params.getlist("format")
            if fmt not in ([], ["html"], ["json"]):
                raise APIError(400, f"format must be html or json, got {', '.join(fmt)[:40]!r}", param="format",
                               code="invalid_value")
            args = parse_query(view, parsers[view], list(request.query_params.multi_items()))
            body, media = await asyncio.to_thread(explainer.render, view, args, fmt == ["json"],
                                                  query_flags(parsers[view]))
            headers = {"cache-control": "no-store"}
            if media.startswith("text/html"):
                headers["content-security-policy"] = CSP  # the page's own policy (the guard keeps it)
            return Response(body, media_type=media, headers=headers)

        app.add_api_route(f"/explain/{view}", explain_view, methods=["GET"], include_in_schema=False,
                          name=f"explain-{view}")

    for name in SERVED_VIEWS:
        view_route(name)
    return parsers


def index_page(model_id: str, parsers: dict[str, argparse.ArgumentParser]) -> bytes:
    """The form and a table of the views with the query parameters each takes; no script."""
    from llmkit.commands.explain import VIEW_SUMMARIES

    options = "".join(f'<option value="{v}"{" selected" if v == "attention" else ""}>{v}</option>'
                      for v in SERVED_VIEWS)
    rows = "".join(f'<tr><td><a href="/explain/{v}">{v}</a></td><td>{html.escape(VIEW_SUMMARIES[v])}</td>'
                   f'<td>{html.escape(", ".join(query_flags(parsers[v])))}</td></tr>' for v in SERVED_VIEWS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>llmkit explain: {html.escape(model_id)}</title>
<style>{INDEX_STYLE}</style></head>
<body><h1>See inside {html.escape(model_id)}</h1>
<form method="get" action="/explain"><label>text <input name="text" value="猫坐在垫子上" maxlength="{MAX_TEXT_CHARS}"></label>
<label>view <select name="view">{options}</select></label> <button type="submit">show</button></form>
<p>Each view is the page <code>llmkit explain VIEW</code> writes; add <code>&amp;format=json</code> for its data.
Texts up to {MAX_TOKENS} tokens.</p>
<table><tr><th>view</th><th>what it shows</th><th>query parameters</th></tr>{rows}</table>
</body></html>
""".encode("utf-8")
