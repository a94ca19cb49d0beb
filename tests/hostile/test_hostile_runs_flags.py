"""Hostile flags and config files for the training and generation commands (issue 18, class 10), and the
CLI's last line of defence.

Every case is a real `python -m llmkit` subprocess under a 3 GiB address-space limit (RLIMIT_AS; an
error path of a process that has imported torch peaks near 0.6 GiB, so a case that tried to allocate
what it was given would fail the bound, not pass it). Each must exit 2 with exactly one stderr line
`error: ...` naming the flag or field, no traceback, nothing written at --out, within 30 CPU seconds
(and 120 s of wall time, so a hang fails too); exit 1 would
mean the input reached the internal-error guard instead of being refused where it entered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bounded_llmkit import Outcome, run_bounded
from conftest import make_corpus

MEMORY_BOUND = 3 << 30  # bytes of address space per process
TIME_BOUND_S = 30.0
TINY = ("--preset", "gpt2-tiny", "--seq-len", "32", "--batch-size", "4", "--steps", "4", "--eval-interval", "2",
        "--eval-batches", "1", "--vocab-size", "300", "--threads", "1")


def run_llmkit(args, cwd: Path, *, env: dict | None = None, limit: int | None = MEMORY_BOUND,
               code: str | None = None) -> tuple[Outcome, float]:
    """`llmkit ARGS` (or the Python program CODE) in `cwd` under the address-space bound; the outcome
    and the CPU seconds it used (robust to a busy machine; a hang is caught by the wall-clock limit)."""
    result = run_bounded(list(args), cwd, memory=limit, cpu_s=None, wall_s=120, env=env, code=code)
    assert result.rc is not None, f"still running after 120 s: {result.argv}"
    return result, result.cpu_s


def assert_refused(result: Outcome, seconds: float, needle: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.rc == 2, f"exit {result.rc}: {result.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert seconds < TIME_BOUND_S, f"took {seconds:.1f} CPU seconds"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_flags")
    make_corpus(root / "corpus")
    return root


# (flags added to a tiny `llmkit train`, the text the one error line must contain)
BAD_TRAIN_FLAGS = {
    "threads_huge": (("--threads", "100000"), "--threads"),
    "threads_zero": (("--threads", "0"), "--threads"),
    "vocab_huge": (("--vocab-size", "2000000000"), "--vocab-size"),
    "seed_negative": (("--seed", "-1"), "--seed"),
    "seed_past_u32": (("--seed", str(2**40)), "--seed"),
    "max_minutes_nan": (("--max-minutes", "nan"), "--max-minutes"),
    "time_budget_inf": (("--time-budget", "inf"), "--time-budget"),
    "lr_nan": (("--lr", "nan"), "--lr"),
    "grad_clip_neg_inf": (("--grad-clip=-inf",), "--grad-clip"),
    "batch_huge": (("--batch-size", "1000000000"), "--batch-size"),
    "steps_past_int64": (("--steps", str(2**70)), "--steps"),
    "eval_batches_huge": (("--eval-batches", str(10**12)), "--eval-batches"),
}

# (the --config file's content, the text the one error line must contain)
BAD_CONFIGS = {
    "d_model_huge": ({"model": {"d_model": 1000000}}, "d_model"),
    "n_layers_huge": ({"model": {"n_layers": 100000}}, "n_layers"),
    "vocab_past_limit": ({"model": {"vocab_size": 10**8}}, "vocab_size"),
    "context_past_limit": ({"model": {"max_seq_len": 10**9}}, "max_seq_len"),
    "d_ff_huge": ({"model": {"d_ff": 10**9}}, "d_ff"),
    # fits every limit, not this machine: 25.8 G parameters × 16 bytes with AdamW
    "model_too_big_for_memory": ({"model": {"d_model": 32768, "n_heads": 4}}, "needs about"),
    "dropout_nan": ('{"model": {"dropout": NaN}}', "dropout"),
    "seed_in_file": ({"seed": 2**70}, "--seed"),
    "max_minutes_in_file": ('{"max_minutes": Infinity}', "--max-minutes"),
    "sample_bytes_as_inf": ('{"tokenizer_sample_bytes": 1e400}', "tokenizer_sample_bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_TRAIN_FLAGS))
def test_bad_train_flag_is_one_line_before_any_file(workdir: Path, case: str) -> None:
    flags, needle = BAD_TRAIN_FLAGS[case]
    out = workdir / f"out_{case}"
    result, seconds = run_llmkit(["train", "--data", "corpus", "--out", out, *TINY, *flags], workdir)
    assert_refused(result, seconds, needle)
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_file_is_one_line_before_any_file(workdir: Path, case: str) -> None:
    content, needle = BAD_CONFIGS[case]
    config = workdir / f"{case}.json"
    config.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    out = workdir / f"out_{case}"
    result, seconds = run_llmkit(["train", "--data", "corpus", "--out", out, *TINY, "--config", config], workdir)
    assert_refused(result, seconds, needle)
    assert not out.exists()


# Other commands' numeric flags: refused before the model (here a path that does not exist) is read.
BAD_OTHER_FLAGS = {
    "generate_tokens": (("generate", "--model", "nope", "--prompt", "x", "--max-new-tokens", "1000000000"),
                        "--max-new-tokens"),
    "generate_threads": (("generate", "--model", "nope", "--prompt", "x", "--threads", "100000"), "--threads"),
    "generate_beams": (("generate", "--model", "nope", "--prompt", "x", "--num-beams", "100000"), "--num-beams"),
    "chat_top_k": (("chat", "--model", "nope", "hi", "--top-k", str(10**12)), "--top-k"),
    "chat_min_p_nan": (("chat", "--model", "nope", "hi", "--min-p", "nan"), "--min-p"),
    "tokenizer_vocab": (("tokenizer", "train", "--data", "corpus", "--out", "tok_out", "--vocab-size",
                         "2000000000"), "--vocab-size"),
    "sft_lora_rank": (("sft", "--model", "nope", "--data", "nope.jsonl", "--out", "sft_out", "--lora-rank",
                       str(10**9)), "--lora-rank"),
    "ppo_rollout": (("ppo", "--policy", "nope", "--reward", "m:f", "--prompts", "p.jsonl", "--out", "ppo_out",
                     "--rollout-batch", str(10**9)), "--rollout-batch"),
}


@pytest.mark.parametrize("case", sorted(BAD_OTHER_FLAGS))
def test_bad_flag_of_other_commands_is_one_line(workdir: Path, case: str) -> None:
    args, needle = BAD_OTHER_FLAGS[case]
    result, seconds = run_llmkit(args, workdir)
    assert_refused(result, seconds, needle)
    assert not any((workdir / name).exists() for name in ("tok_out", "sft_out", "ppo_out"))


# -- the last line of defence ---------------------------------------------------------------------------

# A handler that fails as a bug would, in a real process: `presets` replaced by one that raises.
FAILING_HANDLER = """
import sys
import llmkit.cli as cli
import llmkit.commands.model_files as model_files
class PanicException(BaseException):  # what pyo3 raises for a Rust panic: not an Exception
    pass
def broken(args):
    raise {error}
model_files.cmd_presets = broken  # (register() looks the handler up when the parser is built)
sys.exit(cli.main(["presets"]))
"""


@pytest.mark.parametrize("error, name", [("ZeroDivisionError('division by zero')", "ZeroDivisionError"),
                                         ("PanicException('called `Result::unwrap()`\\non an Err')",
                                          "PanicException")])
def test_internal_error_is_one_line_asking_for_a_report(workdir: Path, error: str, name: str) -> None:
    code = FAILING_HANDLER.format(error=error)
    result, _ = run_llmkit((), workdir, code=code)
    lines = result.stderr.strip().splitlines()
    assert result.rc == 1, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: internal error in 'llmkit presets': {name}: ")
    assert "please report this" in lines[0] and "LLMKIT_DEBUG=1" in lines[0]
    debug, _ = run_llmkit((), workdir, code=code, env={"LLMKIT_DEBUG": "1"})
    assert debug.rc == 1 and "Traceback" in debug.stderr and debug.stderr.rstrip().endswith(
        lines[0].split(" — ")[-1])
