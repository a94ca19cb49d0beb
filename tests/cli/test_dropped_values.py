"""A flag given `--` as its value (`--top=--`): CPython's argparse drops it and leaves the flag an empty
list, which no command expects; the command line refuses it in one line (exit 2) before parsing."""

import pytest

from llmkit.cli import main as cli_main


@pytest.mark.parametrize("argv", [["explain", "attention", "--text", "hi", "--top=--"],
                                  ["generate", "--model", "m", "--prompt=--"]])
def test_a_dropped_value_is_one_line_and_exit_2(argv, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'--' cannot be a value" in err[0], err
    assert argv[-1].split("=")[0] in err[0]


def test_after_a_bare_double_dash_the_words_are_not_flags(capsys):
    """`--` ends the options; what follows is positional text, never checked as a flag."""
    assert cli_main(["chat", "--model", "no_such_run", "--", "--x=--"]) == 2  # refused for the model, not '--'
    assert "'--' cannot be a value" not in capsys.readouterr().err
