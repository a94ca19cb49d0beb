"""Shared by the PPO tests: a tiny random llmkit model directory and a rule-based toy reward."""

from __future__ import annotations

from pathlib import Path

import torch

import llmkit
from llmkit.config import preset
from llmkit.io.checkpoint import save_checkpoint
from llmkit.io.weights import model_tensors
from llmkit.models.causal_lm import CausalLM
from llmkit.tokenizer import Tokenizer


def make_tiny_model(root: Path, *, seed: int = 0) -> Path:
    """A randomly initialised 2-layer, width-32 GPT-2-style checkpoint with a 300-token BPE, saved as
    a training output directory that `llmkit.load` and `--policy` accept."""
    tok = Tokenizer.train(["hello world abc " * 50, "the quick brown fox jumps"], 300)
    tok_file = tok.save(root)
    torch.manual_seed(seed)
    cfg = preset("gpt2-tiny", vocab_size=tok.vocab_size, d_model=32, max_seq_len=64)
    save_checkpoint(root / "checkpoints", 0, tensors={"model.safetensors": model_tensors(CausalLM(cfg))},
                    json_files={"config.json": {"format": "llmkit", "version": llmkit.__version__,
                                                "model": cfg.to_dict()}},
                    copy_files={"tokenizer.json": tok_file})
    return root


def a_fraction(prompt: str, response: str) -> float:
    """Toy rule-based reward: the fraction of the response's characters that are "a"."""
    return sum(c == "a" for c in response) / max(len(response), 1)
