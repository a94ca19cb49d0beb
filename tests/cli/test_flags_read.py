"""Every flag a training command registers is read by it (issue 15: "a flag a command does not use
is an argparse error, not silently ignored").

Each training command's handler runs in-process for one optimizer step on tiny real inputs (a shared
corpus, record files, and tiny models that the `train` runs themselves make). The argparse Namespace
it gets notes every attribute read from it (getattr, hasattr and vars() included), and every
TrainConfig / PPOConfig notes the fields read from it. A registered dest counts as read when:

- it is a knob flag (generated from a TrainConfig or PPOConfig field): the run read that field from
  a config object, and the handler took the flag's value (read it by name, or copied the flags
  wholesale with vars()).
  Reads that only check or copy a config (its __post_init__ and range checks, asdict/to_dict,
  dataclasses.replace, repr, ==) do not count, and neither does the Trainer sizing its precision
  probe from --seq-len (a command whose data ignores --seq-len would otherwise pass);
- any other dest: the handler read it from the Namespace.

Some flags matter only in some runs (--lora-alpha with --lora-rank, --decay-fraction with a WSD
schedule, --mlm-masking for an encoder, PPO's --kl-horizon with --kl-target): a command's runs below
are chosen so each is exercised, and a flag counts as read when any of its command's runs read it.
One cannot be exercised in a healthy run: the Trainer reads --skip-nonfinite-steps only when a
step's loss or gradient is non-finite, so it counts as read by a run whose steps go through
Trainer.train_step.
`llmkit rlhf-demo` runs a whole pipeline (minutes), so its handler runs with the pipeline replaced by
a stop: its three flags are read as the pipeline's arguments, before the pipeline starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import sysconfig
from pathlib import Path

import pytest

import llmkit.cli as cli
from llmkit.training.config import TrainConfig
from llmkit.training.ppo import PPOConfig
from post_training_helpers import addition_records, easy_preferences, write_jsonl

# One step past warm-up on a WSD schedule, so the learning-rate code reads every schedule knob.
ENCODER_STEP = ("--steps", "1", "--warmup-steps", "0", "--schedule", "wsd", "--batch-size", "2", "--dtype", "fp32",
                "--device", "cpu", "--threads", "1")  # (encoder fine-tunes score the whole held-out set)
ONE_STEP = (*ENCODER_STEP, "--eval-batches", "1")
PRETRAIN = ("--data", "corpus", "--seq-len", "32", "--vocab-size", "300", "--tokenizer-sample-bytes", "20000",
            "--eval-interval", "1", *ONE_STEP)
# command (as typed, space-separated for a sub-subcommand) → its runs, in the order they run: a later
# run may use what an earlier one wrote (dec, enc and s2s are the three pretrained bases).
RUNS: dict[str, list[tuple[str, ...]]] = {
    "train": [("--out", "dec", "--preset", "llama-tiny", *PRETRAIN),
              ("--out", "enc", "--arch", "bert", "--preset", "bert-tiny", "--mlm-masking", "word", *PRETRAIN),
              ("--out", "s2s", "--arch", "t5", "--preset", "t5v11-tiny", *PRETRAIN)],
    "demo": [("--out", "demo", "--depth", "1", "--time-budget", "1", "--seq-len", "32", "--vocab-size", "300",
              "--tokenizer-sample-bytes", "20000", *ONE_STEP)],
    "tokenizer train": [("--data", "corpus", "--vocab-size", "300", "--out", "tok")],
    "sft": [("--model", "dec", "--data", "sft.jsonl", "--out", "sft", "--lora-rank", "2", "--seq-len", "64",
             *ONE_STEP)],
    "reward": [("--model", "dec", "--data", "prefs.jsonl", "--out", "rm", "--lora-rank", "2", *ONE_STEP)],
    "dpo": [("--model", "dec", "--data", "prefs.jsonl", "--out", "dpo", "--lora-rank", "2", *ONE_STEP)],
    "ppo": [("--policy", "dec", "--reward", "flag_rewards:length", "--prompts", "prompts.jsonl", "--out", "ppo",
             "--rollout-batch", "2", "--minibatch-size", "2", "--max-new-tokens", "3", "--kl-target", "1",
             *ONE_STEP)],
    "rlhf-demo": [("--out", "rlhf", "--seed", "1", "--threads", "1")],
    "finetune-classifier": [("--model", "enc", "--data", "cls.jsonl", "--out", "cls", "--max-len", "16",
                             *ENCODER_STEP)],
    "finetune-tokens": [("--model", "enc", "--data", "ner.jsonl", "--out", "ner", "--max-len", "32",
                         *ENCODER_STEP)],
    "finetune-qa": [("--model", "enc", "--data", "squad.json", "--out", "qa", "--max-len", "64", "--doc-stride", "16",
                     *ENCODER_STEP)],
    "finetune-seq2seq": [("--model", "s2s", "--data", "s2s.jsonl", "--out", "s2s_ft", *ONE_STEP)],
    "seq2seq-demo": [("--out", "s2s_demo", "--preset", "t5v11-tiny", "--train-examples", "16", "--test-examples", "2",
                      "--vocab-size", "300", *ONE_STEP)],
    "extend": [("--model", "dec", "--factor", "2", "--method", "linear", "--out", "ext", "--finetune-steps", "1",
                "--data", "corpus", "--exclude", "none", "--seq-len", "64", "--batch-size", "2", "--lr", "1e-4",
                "--warmup-steps", "0", "--eval-batches", "1", "--dtype", "fp32", "--device", "cpu", "--threads", "1",
                "--seed", "1")],
    "prune": [("--model", "dec", "--method", "magnitude", "--sparsity", "0.5", "--out", "pruned", "--finetune-steps",
               "1", "--data", "corpus", "--batch-size", "2", "--seq-len", "32", "--threads", "1", "--seed", "1")],
}
XFAIL: dict[str, str] = {}  # command → why it is known to fail (strict: the fix makes the test say so)
KNOB_CLASSES = (TrainConfig, PPOConfig)
KNOB_HELP = {f.name: f.metadata.get("help", "") for cls in KNOB_CLASSES for f in dataclasses.fields(cls)}
KNOB_FIELDS = set(KNOB_HELP)


def bulk_readers() -> set:
    """Code that reads every field of a config object without using it for the run."""
    from llmkit.config import check_field_types
    from llmkit.training.config import check_ranges

    codes = {check_field_types.__code__, check_ranges.__code__, dataclasses._asdict_inner.__code__,
             dataclasses.replace.__code__}
    for cls in KNOB_CLASSES:
        codes |= {getattr(cls, name).__code__ for name in ("__post_init__", "__repr__", "__eq__", "to_dict")
                  if hasattr(getattr(cls, name, None), "__code__")}
    return codes


class Reads:
    """What one command's runs read: Namespace attributes by name, and config fields."""

    def __init__(self) -> None:
        self.namespace: set[str] = set()
        self.knobs: set[str] = set()


def recording_namespace(reads: Reads) -> argparse.Namespace:
    class Recorded(argparse.Namespace):
        def __getattribute__(self, name: str):
            reads.namespace.add(name)  # "__dict__" when vars() copies every flag
            return super().__getattribute__(name)

    return Recorded()


def install_knob_recorders(mp: pytest.MonkeyPatch, current: list[Reads]) -> None:
    from llmkit.training.loop import Trainer

    skipped = bulk_readers()
    probe_sizing = Trainer.__init__.__code__  # reads --seq-len only to size the precision probe

    def getattribute(self, name: str):
        if name in KNOB_FIELDS and current:
            caller = sys._getframe(1).f_code
            if caller not in skipped and not (caller is probe_sizing and name == "seq_len"):
                current[-1].knobs.add(name)
        return object.__getattribute__(self, name)

    for cls in KNOB_CLASSES:
        mp.setattr(cls, "__getattribute__", getattribute)
    train_step = Trainer.train_step

    def recorded_train_step(self):
        if current:
            current[-1].knobs.add("skip_nonfinite_steps")  # (read there when a step is non-finite)
        return train_step(self)

    mp.setattr(Trainer, "train_step", recorded_train_step)


def command_parser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def registered_dests(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """dest → whether it is a knob flag: one generated from a TrainConfig / PPOConfig field (its help is
    the field's), whose value reaches the run through a config object. A flag of the same name that a
    command defines itself (`tokenizer train --vocab-size`, `prune --lr`) is an ordinary one."""
    return {a.dest: a.dest in KNOB_HELP and (a.help or "").startswith(KNOB_HELP[a.dest]) for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))}


def write_inputs(root: Path) -> None:
    from llmkit.data import ner_synthetic, qa_synthetic

    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "the model reads tokens and predicts the next one while the loss falls step by step".split()
    for name in ("a.txt", "b.txt", "c.txt"):
        (corpus / name).write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)) + "\n")
    write_jsonl(root / "sft.jsonl", addition_records(8))
    write_jsonl(root / "prefs.jsonl", easy_preferences(8))
    write_jsonl(root / "cls.jsonl", [{"text": f"{rng.choice(words)} {label} {rng.choice(words)}", "label": label}
                                     for label in ("cat", "dog") * 4])
    write_jsonl(root / "ner.jsonl", ner_synthetic.generate(8, seed=0))
    (root / "squad.json").write_text(json.dumps(qa_synthetic.generate(4, seed=0, people_per=(1, 1))))
    write_jsonl(root / "s2s.jsonl", [{"source": f"{a} plus one", "target": f"{a + 1}"} for a in range(8)])
    write_jsonl(root / "prompts.jsonl", [{"prompt": "the model"}, {"prompt": "reads"}])
    (root / "flag_rewards.py").write_text("def length(prompt, response):\n    return len(response) / 10\n")


class PipelineStopped(Exception):
    pass


def stop_pipeline(*args, **kwargs):
    raise PipelineStopped


def given_flags_it_has(parser: argparse.ArgumentParser, argv: tuple[str, ...]) -> list[str]:
    """`argv` less the `--flag value` pairs the command does not register (ppo's flags are being cut down
    beside this test: the run then goes on with the rest)."""
    known = {s for a in parser._actions for s in a.option_strings}
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if flag in known or not flag.startswith("--"):
            out += argv[i:i + 1 + takes_value]
        i += 1 + takes_value
    return out


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    """Run every command's runs in one process; command → (registered dests, Reads, error or None)."""
    root = tmp_path_factory.mktemp("flags_read")
    write_inputs(root)
    stdlib = sysconfig.get_paths
    current: list[Reads] = []
    results: dict[str, tuple[dict[str, bool], Reads, str | None]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.syspath_prepend(str(root))  # (restores sys.path: `ppo` puts the working directory on it)
        mp.setattr(sysconfig, "get_paths", lambda *a, **k: {**stdlib(*a, **k), "stdlib": str(root / "corpus")})
        mp.setattr("llmkit.training.rlhf_demo.run_pipeline", stop_pipeline)
        install_knob_recorders(mp, current)
        parser = cli.build_parser()
        for command, runs in RUNS.items():
            path = command.split()
            own = command_parser(parser, path)
            record, error = Reads(), None
            for argv in runs:
                argv = given_flags_it_has(own, argv) if command == "ppo" else list(argv)
                current.append(record)
                try:
                    namespace = parser.parse_args([*path, *argv], namespace=recording_namespace(record))
                    handler = namespace.handler
                    record.namespace.clear()  # what argparse itself read while parsing
                    handler(namespace)
                except PipelineStopped:
                    pass
                except (Exception, SystemExit) as exc:  # reported by this command's test, not the others'
                    error = f"`llmkit {command} {' '.join(argv)}` failed: {type(exc).__name__}: {exc}"
                    break
                finally:
                    current.pop()
            results[command] = registered_dests(own), record, error
    return results


def unread(dests: dict[str, bool], record: Reads) -> list[str]:
    def read(dest: str, knob: bool) -> bool:
        if knob:
            return dest in record.knobs and (dest in record.namespace or "__dict__" in record.namespace)
        return dest in record.namespace

    return sorted("--" + dest.replace("_", "-") for dest, knob in dests.items() if not read(dest, knob))


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.xfail(reason=XFAIL[c], strict=True))
                                     if c in XFAIL else c for c in RUNS])
def test_every_registered_flag_is_read(reads, command):
    dests, record, error = reads[command]
    assert error is None, error
    missing = unread(dests, record)
    assert not missing, f"`llmkit {command}` registers flag(s) it never reads: {', '.join(missing)}"


def test_every_training_command_is_checked():
    """A command that trains (it has --steps, --lr or --finetune-steps) is one of RUNS."""
    parser = cli.build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    training = {name for name, p in top.choices.items()
                if set(registered_dests(p)) & {"steps", "lr", "finetune_steps"}}
    assert training <= set(RUNS), f"training commands without a flag check: {sorted(training - set(RUNS))}"
