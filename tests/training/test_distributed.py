"""`torchrun --nproc_per_node=2 -m llmkit train …` (and the fine-tunes, PPO) on this machine's CPU (gloo):
the same losses as one process, rank 0 alone writes, exact resume, a checkpoint one process loads, and
clear refusals.

Real torchrun subprocesses (`--standalone`: a free loopback port each), a tiny LLaMA and the test corpus.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llmkit
from conftest import make_corpus
from llmkit.cli import main as cli_main
from llmkit.io.checkpoint import load_tensors

TRAIN = ["train", "--preset", "llama-tiny", "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32",
         "--eval-interval", "3", "--eval-batches", "2", "--log-interval", "1", "--vocab-size", "300", "--threads", "1"]
# Two ranks against one process differ only in the order the gradient all-reduce adds the two ranks'
# fp32 partial gradients: ~1e-7 relative per step, far inside this bound after 6 steps (measured
# equal to 7 decimals on Zen 5; the bound leaves two orders of magnitude for other kernels).
RTOL = 1e-5


def llmkit_argv(*args: str, ranks: int = 1) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "llmkit", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "llmkit", *args]


def run(*args: str, ranks: int = 1, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(llmkit_argv(*args, ranks=ranks), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def losses(out: Path) -> list[tuple[int, str, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "train" if "train_loss" in r else "val", r.get("train_loss", r.get("val_loss"))) for r in rows]


# --grad-accum 4 over 2 ranks: each rank accumulates 2 micro-batches per step, and DDP averages after
# each backward (tests that accumulation stays right under it); FINETUNE below deals out 1 each.
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    make_corpus(root / "corpus")
    one = run(*TRAIN, "--data", "corpus", "--steps", "6", "--grad-accum", "4", "--out", "one", cwd=root)
    two = run(*TRAIN, "--data", "corpus", "--steps", "6", "--grad-accum", "4", "--out", "two", ranks=2, cwd=root)
    sharded = run(*TRAIN, "--data", "corpus", "--steps", "6", "--grad-accum", "4", "--out", "fsdp", "--fsdp",
                  ranks=2, cwd=root)
    for result in (one, two, sharded):
        assert result.returncode == 0, result.stderr
    return root, one, two


def test_two_ranks_train_the_same_losses_as_one_process(runs):
    root, _, _ = runs
    single, double = losses(root / "one"), losses(root / "two")
    assert [(s, kind) for s, kind, _ in double] == [(s, kind) for s, kind, _ in single]  # one row each, rank 0's
    assert [v for *_, v in double] == pytest.approx([v for *_, v in single], rel=RTOL)
    assert len({v for *_, v in single}) > 3  # the losses do move: the comparison is not of constants


def test_fsdp_trains_the_same_losses_and_writes_the_usual_checkpoint(runs):
    """FSDP2: each rank holds half of every weight and moment; the losses are one process's (to fp32
    reduction order) and the checkpoint holds whole tensors, equal to DDP's."""
    root, _, _ = runs
    assert [v for *_, v in losses(root / "fsdp")] == pytest.approx([v for *_, v in losses(root / "one")], rel=RTOL)
    newest = root / "fsdp" / "checkpoints" / "step-00000006"
    assert json.loads((newest / "train_state.json").read_text())["sharded"] is True
    ddp = load_tensors(root / "two" / "checkpoints" / "step-00000006" / "model.safetensors")
    fsdp = load_tensors(newest / "model.safetensors")
    assert set(fsdp) == set(ddp)
    for name in ddp:
        torch_close(fsdp[name], ddp[name])
    moments = load_tensors(newest / "optimizer.safetensors")
    ddp_moments = load_tensors(root / "two" / "checkpoints" / "step-00000006" / "optimizer.safetensors")
    assert moments.keys() == ddp_moments.keys()
    assert all(moments[k].shape == ddp_moments[k].shape for k in moments)  # whole, not one rank's half


def test_fsdp_resume_is_exact_and_takes_a_ddp_checkpoint(runs):
    root, _, _ = runs
    for source, name in (("fsdp", "cut-fsdp"), ("two", "ddp-to-fsdp")):
        cut = root / name
        shutil.copytree(root / source, cut)
        shutil.rmtree(cut / "checkpoints" / "step-00000006")
        result = run(*TRAIN, "--data", "corpus", "--steps", "6", "--grad-accum", "4", "--out", name, "--resume",
                     "--fsdp", ranks=2, cwd=root)
        assert result.returncode == 0, result.stderr
        expected = losses(root / source)
        if source == "fsdp":
            assert losses(cut) == expected  # bit for bit
        else:
            assert [v for *_, v in losses(cut)] == pytest.approx([v for *_, v in expected], rel=RTOL)


def test_fsdp_without_torchrun_is_one_line(runs):
    root, _, _ = runs
    result = run(*TRAIN, "--data", "corpus", "--steps", "2", "--out", "lonely", "--fsdp", cwd=root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --fsdp shards the model over the ranks torchrun starts: run it as "
        "`torchrun --nproc_per_node=N -m llmkit train … --fsdp`"]
    assert not (root / "lonely").exists()


def test_rank_zero_alone_writes_and_prints(runs):
    root, _, two = runs
    assert two.stderr.count("saved to two") == 1  # rank 1 is silent
    assert "find_unused_parameters" not in two.stderr and "Traceback" not in two.stderr
    newest = sorted((root / "two" / "checkpoints").iterdir())[-1]
    rng = load_tensors(newest / "rng.safetensors")
    assert set(rng) == {"torch_cpu", "torch_cpu_rank1"}  # every rank's generator, for an exact resume
    state = json.loads((newest / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 6


def test_a_checkpoint_of_two_ranks_loads_in_one_process(runs):
    root, _, _ = runs
    lm = llmkit.load(root / "two")
    assert isinstance(lm.generate("def ", max_new_tokens=4, seed=0), str)
    one = llmkit.load(root / "one")
    for name, tensor in one.model.state_dict().items():  # the same weights, to fp32 reduction order
        torch_close(lm.model.state_dict()[name], tensor)


def torch_close(a, b) -> None:
    import torch

    torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-6)


def test_resume_under_two_ranks_is_exact(runs):
    """Cut the run back to its step-3 checkpoint (as a crash after that save leaves it), resume with
    two ranks: steps 4–6 repeat the uninterrupted run's losses bit for bit."""
    root, _, _ = runs
    cut = root / "cut"
    shutil.copytree(root / "two", cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    result = run(*TRAIN, "--data", "corpus", "--steps", "6", "--grad-accum", "4", "--out", "cut", "--resume",
                 ranks=2, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stderr and "step 3" in result.stderr
    assert losses(cut) == losses(root / "two")


def test_resume_with_another_number_of_ranks_continues_the_same_schedule(runs):
    root, _, _ = runs
    cut = root / "cut-to-one"
    shutil.copytree(root / "two", cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    result = run(*TRAIN, "--data", "corpus", "--steps", "6", "--grad-accum", "4", "--out", "cut-to-one",
                 "--resume", cwd=root)
    assert result.returncode == 0, result.stderr
    assert [v for *_, v in losses(cut)] == pytest.approx([v for *_, v in losses(root / "one")], rel=RTOL)


def test_a_step_that_cannot_be_dealt_out_is_refused_in_one_line(runs):
    root, _, _ = runs
    result = run(*TRAIN, "--data", "corpus", "--steps", "2", "--grad-accum", "3", "--out", "odd", ranks=2, cwd=root)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    # each rank says it in one line (torchrun's launcher then adds its own summary of the failed ranks)
    assert errors and "--grad-accum 3 cannot be dealt out over 2 ranks" in errors[0], result.stderr
    assert len(set(errors)) == 1 and not (root / "odd").exists()  # refused before any work


def test_a_command_without_distributed_support_says_so(runs):
    root, _, _ = runs
    result = run("rlhf-demo", "--out", "demo", ranks=2, cwd=root)
    assert result.returncode != 0
    assert "error: llmkit rlhf-demo does not run under torchrun yet" in result.stderr, result.stderr
    assert not (root / "demo").exists()


def test_killing_one_rank_stops_the_other_with_an_error(runs):
    root, _, _ = runs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(llmkit_argv(*TRAIN, "--data", "corpus", "--steps", "100000", "--grad-accum", "4",
                                        "--eval-interval", "1000", "--out", "killed", ranks=2),
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        metrics = root / "killed" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.2)
        rank1 = next(pid for pid in worker_pids(proc.pid) if environ(pid).get("RANK") == "1")
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(timeout=90)
        assert time.monotonic() - killed_at < 90
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def worker_pids(parent: int) -> list[int]:
    """The descendants of `parent` (torchrun's agent starts the workers as its children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [parent]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


FINETUNE = ["--steps", "4", "--batch-size", "2", "--grad-accum", "2", "--dtype", "fp32", "--eval-interval", "2",
            "--log-interval", "1", "--threads", "1", "--lr", "1e-3"]


# (DDP for each, FSDP2 for SFT: the fine-tunes' sharded path is the one Trainer's, as train's is; DPO
# with LoRA adapters, whose random initialisation every rank must draw as one process does)
@pytest.mark.parametrize("command,modes,extra", [("sft", ("ddp", "fsdp"), ()), ("reward", ("ddp",), ()),
                                                 ("dpo", ("ddp",), ("--lora-rank", "2"))])
def test_fine_tunes_under_two_ranks_train_the_same_losses(runs, command, modes, extra):
    """SFT, the reward model (a scalar head on the pairs), and DPO (whose loss also runs the frozen
    reference model), through the same Trainer: two ranks with per-rank batch b (--batch-size 2 and
    --grad-accum 2 deal one micro-batch of 2 to each) train one process's losses, replicated (DDP) or
    sharded (--fsdp), and the sharded run's result loads in one process with DDP's weights."""
    root, _, _ = runs
    data = root / f"{command}.jsonl"
    with data.open("w") as f:
        for i in range(12):
            record = ({"instruction": f"count to {i}", "output": " ".join(map(str, range(i + 1)))} if command == "sft"
                      else {"prompt": f"say {i}", "chosen": f"{i} is {i}", "rejected": f"no {i + 1}"})
            f.write(json.dumps(record) + "\n")
    single = run(command, "--model", "one", "--data", data.name, "--out", f"{command}-one", *FINETUNE, *extra,
                 cwd=root)
    assert single.returncode == 0, single.stderr
    one = losses(root / f"{command}-one")
    assert len(one) >= 4 and len({v for *_, v in one}) > 2  # the losses move
    for mode in modes:
        out = f"{command}-{mode}"
        double = run(command, "--model", "one", "--data", data.name, "--out", out, *FINETUNE, *extra,
                     *(["--fsdp"] if mode == "fsdp" else []), ranks=2, cwd=root)
        assert double.returncode == 0, double.stderr
        two = losses(root / out)
        assert [row[:2] for row in two] == [row[:2] for row in one], mode
        assert [v for *_, v in two] == pytest.approx([v for *_, v in one], rel=RTOL), mode
    if "fsdp" in modes:
        newest = root / f"{command}-fsdp" / "checkpoints" / "step-00000004"
        assert json.loads((newest / "train_state.json").read_text())["sharded"] is True
        sharded, replicated = llmkit.load(root / f"{command}-fsdp"), llmkit.load(root / f"{command}-ddp")
        for name, tensor in replicated.model.state_dict().items():  # whole tensors, in llmkit's usual format
            torch_close(sharded.model.state_dict()[name], tensor)


PPO = dict(steps=3, rollout_batch=8, minibatch_size=4, grad_accum=2, max_new_tokens=6, lr=3e-3)
# with 2 micro-batches, DDP's mean (g0 + g1) / 2 and one process's g0 / 2 + g1 / 2 are the same floats
# (halving is exact), so the runs agree bit for bit (measured on AVX-512); the bound below is this file's
# fp32 summation-order one, for reductions that group differently elsewhere
HELDOUT_PROMPTS = ("return ", "for i in ", "while ", "print(")
REWARD = "ppo_ranks_reward:e_fraction"  # a module name no other test uses (sys.modules caches it)
REWARD_PY = """
def e_fraction(prompt, response):
    return sum(c == "e" for c in response) / max(len(response), 1)
"""


def test_ppo_under_two_ranks_is_the_one_process_run(runs, monkeypatch):
    """PPO on the one Trainer under torchrun: each rank samples and scores its half of every rollout,
    each minibatch's two micro-batches are dealt out; rank 0 alone writes, and the result is the one
    process's run with the same settings."""
    import torch

    from llmkit.inference.generate import generate
    from llmkit.inference.sampling import SamplingParams
    from llmkit.training.config import TrainConfig
    from llmkit.training.ppo import PPO_TRAIN_DEFAULTS, PPOConfig, train_ppo
    from llmkit.training.rewards import load_reward

    root, _, _ = runs
    (root / "ppo_ranks_reward.py").write_text(REWARD_PY)
    monkeypatch.syspath_prepend(str(root))  # (the command line finds it in its working directory)
    prompts = ("def ", "the model", "import ", "class ")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in PPO.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.Popen(llmkit_argv("ppo", "--policy", "one", "--out", "ppo-two", "--reward", REWARD,
                                       "--prompts", "prompts.jsonl", "--plain-prompts", "--dtype", "fp32",
                                       "--threads", "1", "--seed", "0", *flags, ranks=2),
                           cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # meanwhile the one-process run, in this process: the same settings as the command line's
    ppo_keys = {f.name for f in dataclasses.fields(PPOConfig)}
    cfg = TrainConfig(**{**PPO_TRAIN_DEFAULTS, **{k: v for k, v in PPO.items() if k not in ppo_keys},
                         "dtype": "fp32", "threads": 1, "seed": 0})
    train_ppo(root / "one", REWARD, root / "prompts.jsonl", root / "ppo-one", cfg,
              PPOConfig(**{k: v for k, v in PPO.items() if k in ppo_keys}), chat=False)
    _, err = two.communicate(timeout=240)
    assert two.returncode == 0, err

    rows = {name: [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ppo-one", "ppo-two")}
    assert [r["step"] for r in rows["ppo-two"]] == [r["step"] for r in rows["ppo-one"]] == [1, 2, 3]
    # each rank's half of a rollout is the one process's rows: same weights, same per-row seeds, and a
    # row's tokens do not depend on the rows batched with it
    for key in ("score", "response_length", "kl"):
        assert [r[key] for r in rows["ppo-two"]] == [r[key] for r in rows["ppo-one"]], key
    assert rows["ppo-two"][-1]["kl"] != 0.0  # PPO moved the policy away from its reference

    assert err.count("saved to ppo-two") == 1 and "Traceback" not in err  # rank 1 is silent
    newest = root / "ppo-two" / "checkpoints" / "step-00000003"
    state = json.loads((newest / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 3
    assert set(load_tensors(newest / "rng.safetensors")) == {"torch_cpu", "torch_cpu_rank1"}
    assert (newest / "value_head.safetensors").exists() and (root / "ppo-two" / "reward_kl.png").exists()

    e_fraction = load_reward(REWARD)  # (prompts, responses) -> scores, as PPO calls it
    single, double = llmkit.load(root / "ppo-one"), llmkit.load(root / "ppo-two")  # loads in one process
    for name, tensor in single.model.state_dict().items():
        torch_close(double.model.state_dict()[name], tensor)

    def heldout_score(lm) -> float:
        """Mean reward of responses sampled (seeded) from prompts that PPO never saw."""
        outs = generate(lm.model, [lm.tokenizer.encode(p) for p in HELDOUT_PROMPTS * 4], max_new_tokens=6,
                        params=SamplingParams(temperature=1.0), seed=7, pad_id=lm.tokenizer.pad_id or 0)
        return sum(e_fraction([""] * len(outs), [lm.tokenizer.decode(o) for o in outs])) / len(outs)

    with torch.no_grad():
        # margin: one of the 16 responses changing entirely (measured: equal)
        assert abs(heldout_score(double) - heldout_score(single)) <= 1 / 16


def tiny_base(directory: Path, preset_name: str, texts: list[str]) -> Path:
    """A randomly initialised llmkit model (the preset's, at the texts' own small vocabulary) saved as a
    checkpoint directory that `llmkit.load` reads: the base a fine-tune starts from."""
    import torch
    from safetensors.torch import save_file

    from llmkit.config import preset
    from llmkit.io.weights import model_tensors
    from llmkit.models.build import build_model
    from llmkit.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    model = build_model(preset(preset_name, vocab_size=tokenizer.vocab_size))
    directory.mkdir()
    tokenizer.save(directory)
    save_file({k: v.contiguous() for k, v in model_tensors(model).items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"format": "llmkit", "model": model.cfg.to_dict()}))
    return directory


TASK_BASES = {"finetune-classifier": "bert-tiny", "finetune-seq2seq": "t5v11-tiny"}


@pytest.mark.parametrize("command", sorted(TASK_BASES))
def test_encoder_and_seq2seq_fine_tunes_under_two_ranks_train_the_same_losses(tmp_path, monkeypatch, capsys,
                                                                             command):
    """The fine-tunes outside finetune.py through the same Trainer: --batch-size 2 --grad-accum 2 gives
    each of two ranks one micro-batch of 2 per step (one process runs both); every rank evaluates the
    same weights on the same held-out split, rank 0 alone writes, and the result loads in one process."""
    words = "red green blue cat dog sun moon tree".split()
    if command == "finetune-classifier":
        records = [{"text": f"{words[i % 8]} {words[(3 * i) % 8]} {label}", "label": label}
                   for i, label in enumerate(["yes", "no"] * 8)]
        texts = [r["text"] for r in records]
    else:
        records = [{"source": f"{words[i % 8]} {words[(3 * i) % 8]}",
                    "target": f"{words[(3 * i) % 8]} {words[i % 8]}"} for i in range(16)]
        texts = [r["source"] for r in records]
    tiny_base(tmp_path / "base", TASK_BASES[command], texts)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = [command, "--model", "base", "--data", "data.jsonl", "--val-fraction", "0.25", "--warmup-steps", "1",
            *FINETUNE]
    torchrun = subprocess.Popen(llmkit_argv(*args, "--out", "ranks-2", ranks=2), cwd=tmp_path,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    # meanwhile the one-process run, in this process (the same command line, without a torch import)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli_main([*args, "--out", "ranks-1"]) == 0
    results = {1: capsys.readouterr(), 2: torchrun.communicate(timeout=240)}
    assert torchrun.returncode == 0, results[2][1]

    one, two = losses(tmp_path / "ranks-1"), losses(tmp_path / "ranks-2")
    assert [row[:2] for row in two] == [row[:2] for row in one] and len(one) >= 6  # rank 0's rows, once each
    # measured equal bit for bit (AVX512, and AVX2): DDP halves the sum of two gradients where one process
    # adds two halves, both exact; RTOL is this file's fp32 reduction-order bound
    assert [v for *_, v in two] == pytest.approx([v for *_, v in one], rel=RTOL)
    assert len({v for _, kind, v in one if kind == "train"}) > 2  # the losses move

    out, err = results[2]
    assert err.count("saved to ranks-2") == 1 and "Traceback" not in err  # rank 1 is silent
    if command == "finetune-classifier":  # its JSON summary (the final held-out scores), printed once
        assert len(out.splitlines()) == 1
        assert json.loads(out)["val_loss"] == pytest.approx(json.loads(results[1][0])["val_loss"], rel=RTOL)
    newest = tmp_path / "ranks-2" / "checkpoints" / "step-00000004"
    assert json.loads((newest / "train_state.json").read_text())["world_size"] == 2
    assert set(load_tensors(newest / "rng.safetensors")) == {"torch_cpu", "torch_cpu_rank1"}
    single, double = llmkit.load(tmp_path / "ranks-1"), llmkit.load(tmp_path / "ranks-2")
    for name, tensor in single.model.state_dict().items():
        torch_close(double.model.state_dict()[name], tensor)
    if command == "finetune-classifier":  # sharded too: its loss calls model.classify, not forward
        sharded = run(*args, "--out", "fsdp", "--fsdp", ranks=2, cwd=tmp_path)
        assert sharded.returncode == 0, sharded.stderr
        assert [v for *_, v in losses(tmp_path / "fsdp")] == pytest.approx([v for *_, v in one], rel=RTOL)
        assert json.loads(sharded.stdout)["val_loss"] == pytest.approx(json.loads(results[1][0])["val_loss"], rel=RTOL)


def test_a_hung_rank_makes_the_other_stop_in_one_line_within_the_timeout(runs):
    """SIGSTOP rank 1 mid-run (hung: alive, its sockets open, never answering): rank 0's next collective
    gives up after LLMKIT_COLLECTIVE_TIMEOUT_S and it exits with one `error:` line, not a traceback."""
    root, _, _ = runs
    # 4 s: long enough for two ranks started together on a busy 2-core machine to meet in the process
    # group's first rendezvous (the same timeout), short enough for this test
    timeout = 4
    (root / "hung.jsonl").write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n"
                                             for i in range(8)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMKIT_COLLECTIVE_TIMEOUT_S": str(timeout)}
    with (root / "hung.err").open("w") as err:
        proc = subprocess.Popen(llmkit_argv("sft", "--model", "one", "--data", "hung.jsonl", "--out", "hung",
                                            "--steps", "100000", "--batch-size", "1", "--grad-accum", "2",
                                            "--eval-interval", "100000", "--log-interval", "1", "--threads", "1",
                                            "--dtype", "fp32", ranks=2),
                                cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    ranks: dict[str, int] = {}
    try:
        metrics = root / "hung" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.1)
        ranks = {environ(pid).get("RANK"): pid for pid in worker_pids(proc.pid)}
        os.kill(ranks["1"], signal.SIGSTOP)
        stopped_at = time.monotonic()
        while running(ranks["0"]):
            # margin: the step under way when rank 1 stopped, and rank 0's exit on a busy machine
            assert time.monotonic() - stopped_at < timeout + 8, "rank 0 still waits on the hung rank"
            time.sleep(0.05)
        os.kill(ranks["1"], signal.SIGKILL)  # (torchrun's SIGTERM waits on a stopped process)
        proc.wait(timeout=60)
        assert proc.returncode != 0
        log = (root / "hung.err").read_text()
        errors = [line for line in log.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: rank 0: waited {timeout} s for the other ranks in a collective, which timed out "
                          "(a rank hung, stopped or too slow; LLMKIT_COLLECTIVE_TIMEOUT_S sets the wait, default "
                          "120 s)"], log
    finally:
        for pid in ranks.values():  # the workers run in their own sessions
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent (torchrun) to collect it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("value", ["0", "soon", "inf"])
def test_a_bad_collective_timeout_is_one_line(monkeypatch, value):
    from llmkit.errors import ConfigError
    from llmkit.training.distributed import collective_timeout_s

    monkeypatch.setenv("LLMKIT_COLLECTIVE_TIMEOUT_S", value)
    with pytest.raises(ConfigError, match=f"LLMKIT_COLLECTIVE_TIMEOUT_S='{value}': must be a number of seconds > 0"):
        collective_timeout_s()
    monkeypatch.setenv("LLMKIT_COLLECTIVE_TIMEOUT_S", "2.5")
    assert collective_timeout_s() == 2.5
    monkeypatch.delenv("LLMKIT_COLLECTIVE_TIMEOUT_S")
    assert collective_timeout_s() == 120
