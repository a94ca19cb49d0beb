"""What a fine-tuned checkpoint's config.json adds to a plain one, written and read in one place.

A model fine-tuned from SmolLM2 (or any Hugging Face or GGUF model) must still chat like it after
`llmkit.load`: its special-token names, the ids put before a prompt, the ids that end generation
and its chat template are kept under "chat". A LoRA run stores its adapters beside the frozen
weights (exact resume needs them) and names them under "lora"; loading merges them, so every
reader gets a plain model. A reward model's extra tensors are listed under "heads" and set aside
when the checkpoint is loaded as a language model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from llmkit.errors import CheckpointError
from llmkit.io.weights import load_model_tensors


@dataclass(frozen=True)
class ChatInfo:
    template: str | None = None
    prefix_ids: list[int] | None = None
    eos_ids: list[int] | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None

    def token_names(self) -> dict[str, str | None]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}


def chat_info_json(lm: Any) -> dict[str, Any]:
    """The "chat" object for a checkpoint fine-tuned from LanguageModel `lm`."""
    tok = lm.tokenizer
    return {"template": lm.chat_template, "prefix_ids": list(lm.prefix_ids), "eos_ids": list(lm.eos_ids),
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token}


def read_chat_info(meta: dict, where: str) -> ChatInfo | None:
    """The checkpoint's "chat" object, checked; None for checkpoints without one (pretraining runs)."""
    chat = meta.get("chat")
    if chat is None:
        return None
    if not isinstance(chat, dict):
        raise CheckpointError(f"{where}: \"chat\" must be an object")
    for key in ("template", "bos_token", "eos_token", "pad_token"):
        if chat.get(key) is not None and not isinstance(chat[key], str):
            raise CheckpointError(f"{where}: chat.{key} must be a string or null")
    for key in ("prefix_ids", "eos_ids"):
        value = chat.get(key)
        if value is not None and not (isinstance(value, list) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)):
            raise CheckpointError(f"{where}: chat.{key} must be a list of token ids")
    return ChatInfo(**{k: chat.get(k) for k in ChatInfo.__dataclass_fields__})


def load_finetuned_tensors(model: nn.Module, meta: dict, tensors: dict[str, Tensor], *, where: str) -> nn.Module:
    """Load checkpoint tensors into a freshly built model: set aside head tensors, and when the run
    used LoRA, rebuild the adapters, load, and merge them. Returns the (plain) model."""
    heads = meta.get("heads") or []
    if not isinstance(heads, list) or not all(isinstance(h, str) and h for h in heads):
        raise CheckpointError(f"{where}: \"heads\" must be a list of module names")
    tensors = {k: v for k, v in tensors.items() if k.split(".", 1)[0] not in heads}
    lora = meta.get("lora")
    if lora is None:
        load_model_tensors(model, tensors, where=where)
        return model
    from llmkit.errors import ConfigError
    from llmkit.layers.lora import LoraConfig, apply_lora, merge_lora

    try:
        apply_lora(model, LoraConfig.from_dict(lora, where=f"{where}: lora"))
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    load_model_tensors(model, tensors, where=where)
    merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
