"""Tiny, randomly initialised Hugging Face models built in-test (no download), saved with a tokenizer.

Shared by the parity and bad-input tests. The tokenizer is an llmkit byte-level BPE trained on a few
multilingual lines; the LLaMA-family variants get a post-processor that puts BOS first, as real
LLaMA tokenizers do, so the prefix logic is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend, processors

from llmkit.tokenizer import Tokenizer

VOCAB = 300
BOS, EOS, PAD = 0, 1, 2  # llmkit's tokenizer puts <|bos|>, <|eos|>, <|pad|> first

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "我们在学习如何训练语言模型。今天天气很好。",
    "Party time 🎉🎉 with friends 👩‍👩‍👧 and cake 🍰!",
    "def add(a, b):\n    return a + b  # sum\n",
    "   leading, inner    runs\t\tand trailing   \n\n\n",
    "Ünïcödé ñ — “quotes” and Кириллица",
]


def train_tokenizer() -> Tokenizer:
    return Tokenizer.train([t * 10 for t in TEXTS], vocab_size=VOCAB)


def save_tokenizer(tok: Tokenizer, directory: Path, *, bos_prefix: bool) -> None:
    """tokenizer.json (+ a BOS post-processor) and a tokenizer_config.json in both spellings HF uses."""
    backend = Backend.from_str(tok.backend.to_str())
    if bos_prefix:
        backend.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A $B:1", special_tokens=[("<|bos|>", BOS)])
    (directory / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
              "eos_token": {"content": "<|eos|>", "special": True}, "pad_token": "<|pad|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def hf_config(family: str, **overrides):
    import transformers

    ids = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if family == "gpt2":
        return transformers.GPT2Config(n_positions=128, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.1,
                                       **ids, **overrides)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, **ids, **overrides)


def build_hf_model(family: str, directory: Path, tok: Tokenizer, *, seed: int = 0, **overrides):
    """Save a random tiny model + tokenizer into `directory`; return the HF model (eval, fp32)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides),
                                                          attn_implementation="eager").eval()
    # Norm weights start at 1 and biases at 0: perturb them, so a dropped or misplaced one would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    save_tokenizer(tok, directory, bos_prefix=family != "gpt2")
    return model
