"""`--optimizer muon`: which weights Muon updates, that it learns, and that its state resumes exactly."""

from __future__ import annotations

import json

import torch
from torch import nn

from llmkit.config import preset
from llmkit.models.build import build_model
from llmkit.runtime import Runtime
from llmkit.training.config import TrainConfig
from llmkit.training.loop import Trainer
from llmkit.training.optim import Optimizers, build_optimizer, muon_params

CPU_FP32 = Runtime(torch.device("cpu"), "fp32", 1, "test")


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = build_model(preset("llama-tiny", vocab_size=320, tie_embeddings=False))
    hidden = muon_params(model)
    names = {n for n, p in model.named_parameters() if id(p) in hidden}
    assert names and all(".attn." in n or ".mlp." in n for n in names)
    assert not any("embed" in n or "head" in n or "norm" in n for n in names)
    opt = build_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, Optimizers) and isinstance(opt.optimizers[0], torch.optim.Muon)
    in_muon = {id(p) for g in opt.optimizers[0].param_groups for p in g["params"]}
    in_adamw = {id(p) for g in opt.optimizers[1].param_groups for p in g["params"]}
    assert in_muon == hidden and not in_muon & in_adamw
    assert in_muon | in_adamw == {id(p) for p in model.parameters()}


def run(tmp_path, steps: int, resume: bool = False) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    xs = torch.randn(512, 8, generator=torch.Generator().manual_seed(1))
    ys = xs[:, :4].sum(-1, keepdim=True) / 2  # a linear target: learnt in a few steps

    def loss_fn(m, batch):
        x, y = batch
        return ((m(x) - y) ** 2).mean(), {"tokens": x.shape[0]}

    cfg = TrainConfig(optimizer="muon", steps=steps, lr=2e-2, warmup_steps=2, min_lr_ratio=1.0, eval_interval=5,
                      log_interval=1, dtype="fp32", threads=1)
    trainer = Trainer(model, cfg, loss_fn=loss_fn, get_batch=lambda i: (xs[i * 32 % 512:][:32], ys[i * 32 % 512:][:32]),
                      out_dir=tmp_path, runtime=CPU_FP32)
    if resume:
        trainer.resume()
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows]


def test_muon_learns_and_resumes_exactly(tmp_path):
    whole = run(tmp_path / "whole", 20)
    assert whole[-1] < whole[0] / 2, whole
    run(tmp_path / "split", 10)
    split = run(tmp_path / "split", 20, resume=True)
    assert split == whole  # momentum buffers and AdamW moments come back bit for bit
