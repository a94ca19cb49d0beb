"""LoRA (Hu et al., 2021): train a low-rank update B·A beside a frozen weight, merge it in for export.

`apply_lora(model, cfg)` swaps every targeted `Linear` (matched by its attribute name, e.g. q_proj,
v_proj) for a `LoRALinear` that keeps the same `weight`/`bias` parameters — so checkpoint names of
the base weights do not change — and adds `lora_A` (rank × in) and `lora_B` (out × rank). The
output is W·x + (alpha/rank)·B·A·x; B starts at zero, so training starts from the base model
exactly. Everything except the adapters is frozen. `merge_lora(model)` folds W += (alpha/rank)·B·A
and puts plain `Linear` layers back: the merged model is an ordinary model of the same config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmkit.errors import ConfigError
from llmkit.layers.linear import Linear


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"--lora-rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"--lora-alpha must be a positive number, got {self.alpha!r}")
        targets = tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"--lora-targets must name one or more layers, got {self.targets!r}")
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "lora") -> "LoraConfig":
        if not isinstance(data, dict) or set(data) - {f.name for f in dataclasses.fields(cls)}:
            raise ConfigError(f"{where}: expected {{\"rank\", \"alpha\", \"targets\"}}, got {data!r}")
        return cls(**{**data, "targets": tuple(data.get("targets", cls.targets))})


class LoRALinear(Linear):
    """A Linear whose frozen weight gets a trainable low-rank update."""

    def __init__(self, base: Linear, rank: int, alpha: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight  # the same Parameter objects: names and values unchanged
        self.bias = base.bias
        self.scaling = alpha / rank
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + (x @ self.lora_A.t().to(x.dtype)) @ self.lora_B.t().to(x.dtype) * self.scaling

    @torch.no_grad()
    def merged(self) -> Linear:
        """A plain Linear computing the same function (W + scaling·B·A), sharing the bias."""
        out = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        out.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype),
                                  requires_grad=self.weight.requires_grad)
        out.bias = self.bias
        return out


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Add adapters to the targeted Linear layers and freeze everything else; returns their names."""
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    if tied and "lm_head" in cfg.targets:
        raise ConfigError("--lora-targets: lm_head shares its weight with the embedding in this model; "
                          "adapting it would change the embedding too")
    names = [n for n, m in model.named_modules()
             if type(m) is Linear and n.rpartition(".")[2] in cfg.targets]
    if not names:
        found = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if type(m) is Linear})
        raise ConfigError(f"--lora-targets {','.join(cfg.targets)} matched no layer; "
                          f"this model's linear layers are {', '.join(found)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _swap(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and restore plain Linear layers (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _swap(model, name, module.merged())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())
