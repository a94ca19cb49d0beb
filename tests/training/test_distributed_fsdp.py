"""--fsdp on the commands outside `train`, without starting ranks: who takes it, the one-line refusal
outside torchrun, and FSDP2's precision as llmkit/runtime.py's choice sets it. (Two ranks training
with it, against one process, are in test_distributed.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from llmkit.cli import build_parser, main as cli_main
from llmkit.runtime import Runtime
from llmkit.training.sharding import mixed_precision

SHARDED = ("sft", "reward", "dpo", "finetune-classifier", "finetune-tokens", "finetune-qa", "finetune-seq2seq",
           "extend", "train")


def flags_of(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {option for action in sub.choices[command]._actions for option in action.option_strings}


@pytest.mark.parametrize("command", SHARDED)
def test_every_fine_tune_on_the_trainer_takes_fsdp(command):
    assert "--fsdp" in flags_of(command)


@pytest.mark.parametrize("command", ["ppo", "rlhf-demo", "demo", "seq2seq-demo"])
def test_commands_that_cannot_shard_do_not_take_it(command):
    """PPO: each rank samples its own share of a rollout, a different number of forward passes per
    rank, which FSDP's weight gathers cannot follow; the demos do not run under torchrun."""
    assert "--fsdp" not in flags_of(command)


@pytest.mark.parametrize("command", ["sft", "dpo", "finetune-classifier", "finetune-seq2seq"])
def test_fsdp_without_torchrun_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "x", "label": "a"}) + "\n")
    assert cli_main([command, "--model", "nowhere", "--data", "data.jsonl", "--out", "out", "--fsdp"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --fsdp shards the model over the ranks torchrun starts: run it as "
        f"`torchrun --nproc_per_node=N -m llmkit {command} … --fsdp`"]
    assert not (tmp_path / "out").exists()


def runtime(device: str, dtype: str) -> Runtime:
    return Runtime(torch.device(device), dtype, threads=1, reason="test")


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_fsdp_gathers_in_bf16_and_reduces_in_fp32_where_the_run_is_bf16(device):
    policy = mixed_precision(runtime(device, "bf16"))
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_fsdp_keeps_fp32_weights_in_an_fp32_run(device):
    assert mixed_precision(runtime(device, "fp32")) is None


@pytest.fixture
def one_rank_group():
    """A process group of this process alone (gloo, an in-memory store: no port): what fully_shard needs."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_bf16_run_computes_with_bf16_weights_and_keeps_fp32_shards_and_gradients(one_rank_group):
    """The policy at work on the CPU (gloo): inside the forward pass a layer's weight is bf16, the
    parameters and their gradients stay fp32, and the loss is the unsharded model's under the same
    autocast to bf16 rounding."""
    from llmkit.config import preset
    from llmkit.models.build import build_model
    from llmkit.training.sharding import shard
    from llmkit.training.objectives import next_token_loss

    torch.manual_seed(0)
    model = build_model(preset("llama-tiny", vocab_size=64))
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    batch = (ids[:, :-1], ids[:, 1:])
    bf16 = runtime("cpu", "bf16")
    with bf16.autocast():
        whole, _ = next_token_loss(model, batch)
    shard(model, mixed_precision(bf16))
    seen = []
    projection = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    projection.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    with bf16.autocast():
        loss, _ = next_token_loss(model, batch)
    loss.backward()
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters())
    # autocast alone rounds the inputs of each matrix product to bf16; the policy also rounds the weights
    # autocast leaves fp32 (norms, embeddings). Bound: one bf16 rounding, 2^-8 relative; measured 1.6e-5
    # (AVX512 and AVX2), as most of the rounding is autocast's in both
    assert float(loss.detach()) == pytest.approx(float(whole.detach()), rel=2 ** -8)
