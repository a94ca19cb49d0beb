"""Tests for the training loop and `pretrain`: learning, exact resume and the non-finite guard
(RELIABILITY T3, T6). Kill -9 tests live in test_kill_resume.py, `--config FILE` in test_train_config_file.py.

Everything runs on CPU with the `gpt2-tiny` preset, seq_len 32 and a ~60 KB corpus (the stdlib's
json package plus generated text), on one torch thread so that losses are reproducible.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import llmkit
from llmkit.config import preset
from llmkit.errors import CheckpointError, NonFiniteError
from llmkit.io.checkpoint import latest_checkpoint, list_checkpoints, load_tensors, read_json
from llmkit.models.causal_lm import CausalLM
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer
from llmkit.training.objectives import next_token_loss
from llmkit.training.pretrain import pretrain
from train_helpers import (  # noqa: F401 (corpus and _one_thread are fixtures)
    TOL, _one_thread, assert_losses_equal, corpus, max_tensor_diff, rows_of, train_losses, val_losses)


# -- learning and exact resume -------------------------------------------------------------------

DROPOUT = {"dropout": 0.1}


def resume_cfg(steps: int, **changes) -> TrainConfig:
    """fp32, one thread, dropout (via DROPOUT), grad_accum 2, eval/checkpoint every 5 steps.
    min_lr_ratio=1 keeps the LR constant after warmup, so a run with steps=10 follows the same
    schedule as one with steps=20 for its first 10 steps (the cosine decay depends on `steps`)."""
    base = dict(preset="gpt2-tiny", steps=steps, batch_size=4, seq_len=32, grad_accum=2, lr=3e-3,
                warmup_steps=3, min_lr_ratio=1.0, eval_interval=5, eval_batches=2, log_interval=1,
                vocab_size=320, seed=7, dtype="fp32", threads=1)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def run_a(corpus, tmp_path_factory) -> Path:
    """Run A: 20 steps in one go."""
    out = tmp_path_factory.mktemp("run_a") / "run"
    state = pretrain([corpus], out, resume_cfg(20), model_overrides=DROPOUT)
    assert state.step == 20
    return out


@pytest.fixture(scope="module")
def run_b_first_half(corpus, tmp_path_factory) -> Path:
    """Run B, first part: the same config with steps=10 (tests copy it before resuming)."""
    out = tmp_path_factory.mktemp("run_b") / "run"
    pretrain([corpus], out, resume_cfg(10), model_overrides=DROPOUT)
    return out


def test_training_lowers_train_and_validation_loss(run_a):
    train = train_losses(run_a)
    assert sorted(train) == list(range(1, 21)), "log_interval=1 logs every step"
    first, last = train[1], train[20]
    assert last < first - 0.3, f"train loss did not fall: step 1 {first:.4f}, step 20 {last:.4f}"
    val = val_losses(run_a)
    assert sorted(val) == [5, 10, 15, 20]
    assert val[20] < val[5] - 0.1, f"validation loss did not fall: {val}"
    rows = rows_of(run_a)
    assert all(0 < r["lr"] <= 3e-3 * (1 + 1e-9) for r in rows if "lr" in r)
    assert all(r["val_ppl"] > 1 for r in rows if "val_ppl" in r)


def test_resume_is_exact(run_a, run_b_first_half, corpus, tmp_path):
    run_b = tmp_path / "run_b"
    shutil.copytree(run_b_first_half, run_b)
    assert latest_checkpoint(run_b / "checkpoints").name == "step-00000010"
    events = []
    state = pretrain([corpus], run_b, resume_cfg(20),
                     model_overrides=DROPOUT, resume=True, on_event=lambda k, i: events.append((k, i)))
    assert state.step == 20
    assert ("resume", {"path": str(run_b / "checkpoints" / "step-00000010"), "step": 10}) in events
    assert_losses_equal(train_losses(run_b), train_losses(run_a))
    assert_losses_equal(val_losses(run_b), val_losses(run_a))
    ckpt_a, ckpt_b = latest_checkpoint(run_a / "checkpoints"), latest_checkpoint(run_b / "checkpoints")
    assert ckpt_a.name == ckpt_b.name == "step-00000020"
    assert max_tensor_diff(load_tensors(ckpt_a / "model.safetensors"),
                           load_tensors(ckpt_b / "model.safetensors")) <= TOL
    assert max_tensor_diff(load_tensors(ckpt_a / "optimizer.safetensors"),
                           load_tensors(ckpt_b / "optimizer.safetensors")) <= TOL
    state_a, state_b = read_json(ckpt_a / "train_state.json"), read_json(ckpt_b / "train_state.json")
    assert state_a["tokens_seen"] == state_b["tokens_seen"] == 20 * 2 * 4 * 32


def test_resume_without_rng_restore_differs(run_a, run_b_first_half, corpus, tmp_path, monkeypatch):
    """Negative control: if the dropout RNG is not restored, the resumed losses change — so the
    exact-resume test above really depends on the RNG state being saved and loaded."""
    run_c = tmp_path / "run_c"
    shutil.copytree(run_b_first_half, run_c)
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    pretrain([corpus], run_c, resume_cfg(20), model_overrides=DROPOUT, resume=True)
    got, want = train_losses(run_c), train_losses(run_a)
    assert all(abs(got[s] - want[s]) <= TOL for s in range(1, 11)), "the first half is unchanged"
    diffs = [abs(got[s] - want[s]) for s in range(11, 21)]
    assert max(diffs) > 1e-4, "resume without the RNG state gave the same losses: test is insensitive"


def test_resume_after_ctrl_c_mid_interval_is_exact(corpus, tmp_path):
    """Ctrl-C at step 7 (not a checkpoint step) saves; resuming reproduces an uninterrupted run,
    with the default cosine schedule, step by step (losses and learning rates). LLaMA-style model
    (RoPE, RMSNorm, SwiGLU, untied head) to cover the other preset family."""
    cfg = resume_cfg(20, min_lr_ratio=0.1, preset="llama-tiny")
    ref, run = tmp_path / "ref", tmp_path / "interrupted"
    pretrain([corpus], ref, cfg, model_overrides=DROPOUT)

    def interrupt(row: dict) -> None:
        if row["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain([corpus], run, cfg, model_overrides=DROPOUT, on_step=interrupt)
    assert latest_checkpoint(run / "checkpoints").name == "step-00000007"
    pretrain([corpus], run, cfg, model_overrides=DROPOUT, resume=True)
    assert_losses_equal(train_losses(run), train_losses(ref))
    lrs = lambda r: {x["step"]: x["lr"] for x in rows_of(r) if "lr" in x}  # noqa: E731
    assert lrs(run) == lrs(ref)
    assert max_tensor_diff(load_tensors(latest_checkpoint(ref / "checkpoints") / "model.safetensors"),
                           load_tensors(latest_checkpoint(run / "checkpoints") / "model.safetensors")) <= TOL


def test_resume_skips_a_corrupt_newest_checkpoint(run_b_first_half, corpus, tmp_path):
    """The newest checkpoint fails its sha256 check → resume falls back to the previous one."""
    run = tmp_path / "run"
    shutil.copytree(run_b_first_half, run)
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names == ["step-00000005", "step-00000010"]
    weights = run / "checkpoints" / "step-00000010" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    events = []
    state = pretrain([corpus], run, resume_cfg(10), model_overrides=DROPOUT, resume=True,
                     on_event=lambda k, i: events.append((k, i)))
    assert ("resume", {"path": str(run / "checkpoints" / "step-00000005"), "step": 5}) in events
    assert state.step == 10
    llmkit.load(run)  # the re-saved step 10 verifies


def test_resume_refuses_when_every_checkpoint_is_corrupt(run_b_first_half, corpus, tmp_path):
    """`resume=True` with checkpoints present but none intact must not silently start over from
    step 0 (and append a second step 1.. to metrics.jsonl); it should say what is wrong."""
    run = tmp_path / "run"
    shutil.copytree(run_b_first_half, run)
    for ckpt in list_checkpoints(run / "checkpoints"):
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        pretrain([corpus], run, resume_cfg(10), model_overrides=DROPOUT, resume=True)


# -- the non-finite guard (T6), on the Trainer directly -------------------------------------------

class _InfGrad(torch.autograd.Function):
    """Adds 0 to the loss, but puts +Inf into element 0 of the input's gradient."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, grad_out):
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype)
        grad.view(-1)[0] = float("inf")
        return grad


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class Probe:
    """A Trainer on random tokens whose loss_fn injects NaN loss or an Inf gradient at chosen steps
    (1-based) and micro-batch, and records the parameters at the start of every step."""

    def __init__(self, out_dir: Path, *, bad_steps=(), kind="nan", micro=0, steps=6, grad_accum=1,
                 skip=0, grad_clip=1.0) -> None:
        torch.manual_seed(0)
        self.model = CausalLM(preset("gpt2-tiny", vocab_size=64, max_seq_len=16))
        cfg = TrainConfig(preset="gpt2-tiny", steps=steps, batch_size=2, seq_len=16, grad_accum=grad_accum,
                          lr=1e-2, warmup_steps=0, eval_interval=1000, log_interval=1, vocab_size=64,
                          skip_nonfinite_steps=skip, grad_clip=grad_clip)
        self.bad_steps, self.kind, self.micro = set(bad_steps), kind, micro
        self.before: dict[int, dict[str, torch.Tensor]] = {}  # step → params at its start
        self.grads_clear: dict[int, bool] = {}
        self.calls: dict[int, int] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}  # step → params after its update
        # one 2-D weight inside a block (not the tied embedding)
        self.inf_param = next(p for n, p in self.model.named_parameters() if p.dim() == 2 and "emb" not in n)
        self.trainer = Trainer(self.model, cfg, loss_fn=self.loss_fn, get_batch=self.batch, out_dir=out_dir)

    @staticmethod
    def batch(index: int):
        tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(index))
        return tokens[:, :-1], tokens[:, 1:]

    def loss_fn(self, model, batch):
        step = self.trainer.state.step + 1
        micro = self.calls.get(step, 0)
        self.calls[step] = micro + 1
        if micro == 0:
            self.before[step] = snapshot(model)
            self.grads_clear[step] = all(p.grad is None for p in model.parameters())
        loss, metrics = next_token_loss(model, batch)
        if step in self.bad_steps and micro == self.micro:
            if self.kind == "nan":
                loss = loss * float("nan")
            else:
                loss = loss + _InfGrad.apply(self.inf_param)
        return loss, metrics

    def run(self):
        return self.trainer.run(on_step=lambda row: self.after.__setitem__(row["step"], snapshot(self.model)))


@pytest.mark.parametrize("kind,grad_accum,micro,grad_clip", [
    ("nan", 1, 0, 1.0), ("nan", 2, 1, 1.0), ("inf_grad", 1, 0, 1.0), ("inf_grad", 2, 1, 0.0)])
def test_nonfinite_step_stops_before_the_update(tmp_path, kind, grad_accum, micro, grad_clip):
    probe = Probe(tmp_path, bad_steps={3}, kind=kind, micro=micro, grad_accum=grad_accum, grad_clip=grad_clip)
    with pytest.raises(NonFiniteError) as info:
        probe.run()
    message = str(info.value)
    assert re.search(r"\bstep 3\b", message), message
    assert ("loss" if kind == "nan" else "gradient norm") in message, message
    assert "\n" not in message
    assert not same_params(probe.before[3], probe.before[1]), "steps 1–2 must have moved the weights"
    assert same_params(snapshot(probe.model), probe.after[2]), "step 3 changed the weights"
    assert all(torch.isfinite(p).all() for p in probe.model.parameters())
    assert sorted(train_losses(tmp_path)) == [1, 2]
    assert probe.trainer.state.step == 2
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_skip_nonfinite_steps_skips_one_bad_step_and_finishes(tmp_path):
    probe = Probe(tmp_path, bad_steps={3}, kind="nan", micro=1, grad_accum=2, skip=2)
    state = probe.run()
    assert state.step == 6 and state.skipped_steps == 1 and state.consecutive_skips == 0
    assert same_params(probe.before[4], probe.before[3]), "the skipped step changed the weights"
    assert probe.grads_clear[4], "gradients of the skipped step leaked into the next one"
    assert not same_params(probe.before[5], probe.before[4]), "steps after the skip must train"
    assert sorted(train_losses(tmp_path)) == [1, 2, 4, 5, 6]
    opt_steps = {float(s["step"]) for s in probe.trainer.optimizer.state.values()}
    assert opt_steps == {5.0}, "AdamW must have stepped 5 times (6 steps, 1 skipped)"
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt is not None and ckpt.name == "step-00000006"
    assert read_json(ckpt / "train_state.json")["skipped_steps"] == 1


def test_skip_counts_consecutive_bad_steps_only(tmp_path):
    probe = Probe(tmp_path, bad_steps={2, 4}, kind="inf_grad", skip=1)
    state = probe.run()
    assert state.step == 6 and state.skipped_steps == 2


def test_too_many_consecutive_bad_steps_stop(tmp_path):
    probe = Probe(tmp_path, bad_steps={3, 4, 5}, kind="nan", skip=2)
    with pytest.raises(NonFiniteError, match=r"\bstep 5\b"):
        probe.run()
    assert probe.trainer.state.skipped_steps == 2
    assert same_params(snapshot(probe.model), probe.after[2])


def test_checkpoint_with_nan_weights_is_refused(tmp_path):
    probe = Probe(tmp_path, steps=2)
    probe.run()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert before == ["step-00000002"]
    with torch.no_grad():
        next(probe.model.parameters()).view(-1)[0] = float("nan")
    probe.trainer.state.step = 3
    with pytest.raises(NonFiniteError, match="non-finite"):
        probe.trainer.save()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_resume_refuses_a_changed_model_config(corpus, tmp_path):
    cfg = TrainConfig(preset="gpt2-tiny", steps=2, batch_size=2, seq_len=32, vocab_size=300, eval_interval=2,
                      eval_batches=1, threads=1)
    pretrain([corpus], tmp_path, cfg)
    with pytest.raises(CheckpointError, match="model_config changed"):
        pretrain([corpus], tmp_path, TrainConfig(**{**cfg.to_dict(), "steps": 4}), resume=True,
                 model_overrides={"d_ff": 128})
    state = pretrain([corpus], tmp_path, TrainConfig(**{**cfg.to_dict(), "steps": 4}), resume=True)
    assert state.step == 4  # the unchanged config resumes


def test_dtype_auto_keeps_the_precision_the_run_started_with(run_b_first_half, tmp_path):
    """A run resumed with --dtype auto keeps its checkpoint's precision even where the probe now picks
    another, and decides so when the Trainer is built (before FSDP would fix its mixed-precision policy)."""
    import dataclasses

    from llmkit.runtime import make_runtime

    out = tmp_path / "run"
    shutil.copytree(run_b_first_half, out)
    assert read_json(latest_checkpoint(out / "checkpoints") / "train_state.json")["runtime"]["dtype"] == "fp32"
    bf16 = dataclasses.replace(make_runtime("cpu", "fp32", 1, training=True), dtype="bf16", reason="the probe, this time")
    model = CausalLM(preset("gpt2-tiny", vocab_size=320))
    batch = lambda index: (torch.zeros(2, 8, dtype=torch.long),) * 2  # noqa: E731 (never called)
    resumed = Trainer(model, resume_cfg(20, dtype="auto"), loss_fn=next_token_loss, get_batch=batch,
                      out_dir=out, runtime=bf16)
    assert (resumed.runtime.dtype, resumed.runtime.reason) == ("fp32", "as chosen when the run started")
    fresh = Trainer(model, resume_cfg(20, dtype="auto"), loss_fn=next_token_loss, get_batch=batch,
                    out_dir=tmp_path / "fresh", runtime=bf16)
    assert fresh.runtime.dtype == "bf16"  # nothing to keep: the probe's choice stands
    explicit = Trainer(model, resume_cfg(20, dtype="bf16"), loss_fn=next_token_loss, get_batch=batch,
                       out_dir=out, runtime=bf16)
    assert explicit.runtime.dtype == "bf16"  # --dtype bf16 asked for: as asked
