"""Tiny models and record files for the post-training tests (SFT, reward model, DPO), built in-test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from llmkit.config import preset
from llmkit.io.checkpoint import read_json, save_checkpoint
from llmkit.io.weights import model_tensors
from llmkit.models.causal_lm import CausalLM
from llmkit.tokenizer import Tokenizer
from llmkit.training.config import TrainConfig

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TEXTS = ["What is 2+3? The answer is 5. ", "Say hello. hello world. yes no maybe ", "the quick brown fox jumps "]
# Few steps, small batches, an evaluation at the end only: seconds per run on two busy cores.
FAST = dict(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_interval=12, eval_batches=2, log_interval=1,
            weight_decay=0.0, val_fraction=0.1, seed=0)


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train([t * 20 for t in TEXTS], vocab_size=300)


def save_tiny_model(root: Path, *, preset_name: str = "llama-tiny", seed: int = 0) -> Path:
    """An llmkit run directory (checkpoints/step-00000000) holding a random tiny model."""
    tok = tiny_tokenizer()
    root.mkdir(parents=True, exist_ok=True)
    tok.save(root)
    cfg = preset(preset_name, vocab_size=tok.vocab_size)
    torch.manual_seed(seed)
    model = CausalLM(cfg)
    save_checkpoint(root / "checkpoints", 0, tensors={"model.safetensors": model_tensors(model)},
                    json_files={"config.json": {"format": "llmkit", "model": cfg.to_dict()}},
                    copy_files={"tokenizer.json": root / "tokenizer.json"})
    return root


def save_tiny_hf_chat_model(directory: Path) -> Path:
    """A Hugging Face directory with its own chat template (ChatML) and EOS token, like SmolLM2's."""
    import llmkit
    from llmkit.io.hf import save_hf

    lm = llmkit.load(save_tiny_model(directory.with_name(directory.name + "_src")))
    save_hf(lm.model, lm.tokenizer, directory)
    config = read_json(directory / "tokenizer_config.json")
    config["eos_token"] = "<|end|>"
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (directory / "chat_template.jinja").write_text(CHATML, encoding="utf-8")
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def addition_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        rows.append({"instruction": f"What is {a}+{b}?", "output": f"The answer is {a + b}."})
    return rows


def easy_preferences(n: int, seed: int = 0) -> list[dict]:
    """Chosen always says "yes", rejected always "no": a rule a tiny model learns in a few steps."""
    rng = random.Random(seed)
    return [{"prompt": f"What is {rng.randint(0, 9)}+{rng.randint(0, 9)}?", "chosen": "yes hello world",
             "rejected": "no the quick brown fox"} for _ in range(n)]


def fast_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**FAST, **overrides})
