"""`llmkit ppo` as a real subprocess: a tiny run whose output loads, and one-line errors for a bad
`module:function` reward and bad prompt files (with nothing left behind). The other bad-input
cases run in-process in tests/training/test_ppo.py."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

import llmkit
from ppo_helpers import make_tiny_model
from llmkit_command import llmkit_cmd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_FLAGS = ("--rollout-batch", "4", "--minibatch-size", "2", "--max-new-tokens", "4", "--threads", "1",
              "--plain-prompts", "--lr", "1e-3", "--eval-interval", "2")
REWARDS_PY = '''
def a_fraction(prompt, response):
    return sum(c == "a" for c in response) / max(len(response), 1)

def not_a_number(prompt, response):
    return "high"
'''
BAD_PROMPTS = {
    "syntax": ('{"prompt": "hello"}\n{"prompt": "abc",\n', "prompts.jsonl:2"),
    "not_utf8": (b'{"prompt": "hello"}\n{"prompt": "caf\xe9"}\n', "not UTF-8"),
}
BAD_REWARDS = {
    "no_module": ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
    "not_a_number": ("toy_rewards:not_a_number", "expected a finite number"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every command at once (each pays the torch import), then collect them."""
    root = tmp_path_factory.mktemp("ppo_cli")
    policy = make_tiny_model(root / "policy")
    (root / "toy_rewards.py").write_text(REWARDS_PY, encoding="utf-8")
    (root / "prompts.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "abc"}\n', encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LLMKIT_FAULT_AT", None)
    procs = {}

    def start(name: str, *args: str) -> None:
        procs[name] = subprocess.Popen([*llmkit_cmd(), "ppo", "--policy", str(policy), "--out", str(root / name),
                                        *args, *TINY_FLAGS], cwd=root, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)

    start("good", "--reward", "toy_rewards:a_fraction", "--prompts", "prompts.jsonl", "--steps", "3")
    for case, (content, _) in BAD_PROMPTS.items():
        path = root / case / "prompts.jsonl"
        path.parent.mkdir()
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        start(f"prompts_{case}", "--reward", "toy_rewards:a_fraction", "--prompts", str(path))
    (root / "skip.jsonl").write_text('{"prompt": "hello"}\n{"prompt": \n{"text": "abc"}\n{"prompt": "abc"}\n')
    start("skip", "--reward", "toy_rewards:a_fraction", "--prompts", "skip.jsonl", "--steps", "1",
          "--skip-bad-lines", "2")
    for case, (spec, _) in BAD_REWARDS.items():
        start(f"reward_{case}", "--reward", spec, "--prompts", "prompts.jsonl")
    procs["help"] = subprocess.Popen([*llmkit_cmd(), "ppo", "-h"], cwd=root, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
    results = {name: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}
    return root, results


def test_ppo_cli_trains_and_the_output_loads(runs):
    root, results = runs
    code, _, err = results["good"]
    assert code == 0, err
    rows = [json.loads(x) for x in (root / "good" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # stderr is a pipe, not a terminal: progress is plain lines (the last step always gets one)
    assert re.search(r"^step 3/3 \(100%\), score [0-9.]+, kl -?[0-9.]+, len [0-9.]+, elapsed ", err, re.M), err
    assert all(0.0 <= r["score"] <= 1.0 and "kl" in r and "clip_fraction" in r for r in rows)
    assert (root / "good" / "reward_kl.png").read_bytes().startswith(PNG_MAGIC)
    lm = llmkit.load(root / "good")
    assert lm.path.name == "step-00000003"
    assert isinstance(lm.generate("hello", max_new_tokens=3, seed=0), str)


def test_ppo_help_lists_the_ppo_and_training_knobs(runs):
    _, results = runs
    code, out, err = results["help"]
    assert code == 0, err
    for flag in ("--policy", "--reward", "--prompts", "--out", "--resume", "--steps", "--lr", "--seed",
                 "--rollout-batch", "--minibatch-size", "--ppo-epochs", "--kl-coef", "--kl-target", "--gamma",
                 "--lam", "--clip-range", "--value-clip-range", "--vf-coef", "--no-eos-penalty", "--skip-bad-lines"):
        assert flag in out, f"ppo -h does not list {flag}"
    # knobs PPO never reads are not flags of it (an argparse error, not silently ignored)
    for flag in ("--preset", "--batch-size", "--seq-len", "--val-fraction", "--eval-batches", "--time-budget"):
        assert not re.search(rf"^\s+{flag}\b", out, re.M), f"ppo -h lists {flag}, which PPO does not read"


def test_ppo_config_file_with_a_knob_ppo_does_not_read_is_refused(tmp_path):
    from llmkit.cli import build_parser
    from llmkit.commands.training_flags import training_config
    from llmkit.errors import ConfigError

    (tmp_path / "c.json").write_text('{"lr": 0.001, "batch_size": 4}')
    args = build_parser().parse_args(["ppo", "--policy", "p", "--reward", "m:f", "--prompts", "p.jsonl", "--out", "o",
                                      "--config", str(tmp_path / "c.json"), "--steps", "7"])
    with pytest.raises(ConfigError, match="batch_size: not a setting of `llmkit ppo`"):
        training_config(args)
    (tmp_path / "c.json").write_text('{"lr": 0.001}')
    cfg = training_config(args)  # PPO's defaults, then the file, then the flags given
    assert (cfg.lr, cfg.steps, cfg.warmup_steps, cfg.log_interval) == (0.001, 7, 0, 1)


def test_ppo_cli_skips_bad_prompt_lines_and_names_them(runs):
    root, results = runs
    code, _, err = results["skip"]
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("warning: skipped bad line ")]
    assert len(skipped) == 2 and "skip.jsonl:2:12: invalid JSON" in skipped[0], err
    assert "skip.jsonl:3: missing field 'prompt'" in skipped[1] and "ppo: 2 prompts" in err
    assert [json.loads(x)["step"] for x in (root / "skip" / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_ppo_cli_bad_prompts_file(runs, case):
    root, results = runs
    code, _, err = results[f"prompts_{case}"]
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and BAD_PROMPTS[case][1] in lines[0], err
    assert not (root / f"prompts_{case}").exists()


@pytest.mark.parametrize("case", sorted(BAD_REWARDS))
def test_ppo_cli_bad_reward(runs, case):
    root, results = runs
    code, _, err = results[f"reward_{case}"]
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and BAD_REWARDS[case][1] in last, err
    assert "Traceback" not in err
    assert not (root / f"reward_{case}").exists()
