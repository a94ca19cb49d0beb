"""Scalar heads on the decoder backbone: the reward model, and the value head PPO uses.

A reward model is the language model with its vocabulary projection unused and one more Linear
(d_model → 1) read at the last real token of each sequence: by then the causal stack has seen the
whole prompt and response (Ouyang et al. 2022; TRL's RewardTrainer). `RewardModel` subclasses
CausalLM, so its checkpoint holds exactly the LM's tensors plus `reward_head.*`: `llmkit.load` on
a reward-model directory returns the LM (the head is set aside), `load_reward_model` the scorer.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.layers.linear import Linear
from llmkit.models.causal_lm import CausalLM

REWARD_HEAD = "reward_head"


class ScalarHead(nn.Module):
    """d_model → one number per position; small init so the first rewards/values are near zero."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = Linear(d_model, 1)
        nn.init.normal_(self.proj.weight, std=1.0 / (d_model + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:  # (B, T, C) → (B, T)
        return self.proj(hidden).squeeze(-1)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token (mask 1 = real), for right or left padding alike."""
    T = attention_mask.shape[-1]
    return (T - 1) - attention_mask.long().flip(-1).argmax(-1)


class RewardModel(CausalLM):
    """CausalLM backbone + `reward_head`; `forward` gives one reward per sequence, shape (B,)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.reward_head = ScalarHead(cfg.d_model)

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask)
        last = last_token_index(attention_mask)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, C)
        return self.reward_head(picked.unsqueeze(1)).squeeze(1).float()

    @classmethod
    def from_lm(cls, lm_model: CausalLM) -> "RewardModel":
        """A reward model whose backbone starts as a copy of `lm_model` (head freshly initialised)."""
        rm = cls(lm_model.cfg)
        missing, unexpected = rm.load_state_dict(lm_model.state_dict(), strict=False)
        assert not unexpected and all(k.startswith(REWARD_HEAD + ".") for k in missing), (missing, unexpected)
        rm.tie_weights()
        return rm.to(next(lm_model.parameters()).dtype)


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """-log σ(r_chosen − r_rejected), averaged: the chosen response should score higher."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


class LoadedRewardModel(NamedTuple):
    model: RewardModel  # eval mode
    lm: "object"  # the llmkit.LanguageModel of the same directory: tokenizer and chat format


def load_reward_model(path: str | Path) -> LoadedRewardModel:
    """A `llmkit reward` output (or one of its checkpoints) as a scorer: the RewardModel with its
    trained head, and the LanguageModel that knows how to render a prompt and response."""
    import llmkit
    from llmkit.api import resolve_checkpoint
    from llmkit.errors import CheckpointError
    from llmkit.io.checkpoint import load_tensors

    lm = llmkit.load(path)
    ckpt = resolve_checkpoint(path)
    head = {k[len(REWARD_HEAD) + 1:]: v for k, v in load_tensors(ckpt / "model.safetensors").items()
            if k.startswith(REWARD_HEAD + ".")}
    if not head:
        raise CheckpointError(f"{ckpt}: not a reward model (no {REWARD_HEAD} tensors; train one with "
                              "`llmkit reward`)")
    rm = RewardModel.from_lm(lm.model)
    try:
        rm.reward_head.load_state_dict({k: v.to(rm.reward_head.proj.weight.dtype) for k, v in head.items()})
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt}: reward head does not match the model ({' '.join(str(exc).split())[:200]})") \
            from None
    return LoadedRewardModel(rm.eval(), lm)
