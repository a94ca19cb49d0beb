"""The `llmkit` command line: thin argparse subcommands over the library, one module each in
llmkit/commands/ (found by listing the package; each registers its parsers and sets `handler=` on them).

Each handler parses flags into a dataclass and calls one library function. Errors in user input
(LlmkitError) print one line, `error: ...`, and exit with status 2; argparse does the same for bad
flags; a bug prints one line and exits 1. Progress bars and all printing live in the commands, never in
the library.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from llmkit.commands.flag_ranges import check_flag_ranges, check_no_dropped_values
from llmkit.errors import LlmkitError


FIRST = ("pretraining", "generation", "model_files")  # --help lists train, demo, generate, chat, … first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmkit", description="Train, run and inspect language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in command_modules():
        module.register(sub)
    return parser


def command_modules() -> list:
    """Every subcommand lives in llmkit/commands/: each module there with a `register(sub)` adds its
    parsers and sets `handler=` on them (argparse's set_defaults), the one way a command is dispatched.
    Found by listing the package, so a new command is one new file; those modules import their heavy
    dependencies inside their handlers, keeping `--help` fast."""
    import pkgutil

    import llmkit.commands

    names = sorted(info.name for info in pkgutil.iter_modules(llmkit.commands.__path__))
    names.sort(key=lambda name: FIRST.index(name) if name in FIRST else len(FIRST))  # stable: then by name
    modules = [importlib.import_module(f"llmkit.commands.{name}") for name in names]
    return [module for module in modules if hasattr(module, "register")]


DEBUG_ENV = "LLMKIT_DEBUG"  # set to 1: an internal error prints its traceback too


def printable(message: str) -> str:
    """One line of text that stderr can always encode (a lone surrogate in a name would not)."""
    line = " ".join(str(message).split())
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run one command line; its exit status (0, 1: a bug, 2: bad input, 130: Ctrl-C, 141: closed pipe)."""
    code = run_command(argv)
    from llmkit.training.distributed import launched_by_torchrun

    if launched_by_torchrun():
        # A rank leaves without the interpreter's finalization. By now its work is written and closed and
        # it has left the process group, but gloo's worker threads can still hold work objects whose
        # tensors, freed during finalization, take the GIL of an interpreter being torn down: the rank
        # aborts ("terminate called without an active exception", SIGABRT) and torchrun reports a finished
        # run as failed. Seen on loaded 2-core machines after DDP, FSDP and PPO runs (pytorch/pytorch#179291
        # describes the mechanism).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def run_command(argv: list[str] | None) -> int:
    command = "llmkit"
    try:
        check_no_dropped_values(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        command = " ".join(["llmkit", args.command, *([args.tokenizer_command] if args.command == "tokenizer" else [])])
        check_flag_ranges(args)  # every number finite and in range, before any command runs
        from llmkit.training.distributed import command_session

        with command_session(args.command):  # under torchrun: one rank of a distributed run
            args.handler(args)
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
