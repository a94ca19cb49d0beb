"""LayerNorm (Ba et al. 2016) with an optional bias, and RMSNorm (Zhang & Sennrich 2019).

RMSNorm drops LayerNorm's mean subtraction and bias: x / sqrt(mean(x²) + eps) · g. It is computed
in fp32 whatever the input dtype, as LLaMA does, because the sum of squares overflows in fp16.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6, bias: bool = False) -> None:
        super().__init__()
        assert not bias, "RMSNorm has no bias"
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # torch's fused kernel: one op instead of six, which matters when decoding runs ~60 norms a token
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


def build_norm(kind: str, dim: int, *, eps: float, bias: bool) -> nn.Module:
    return NORMS[kind](dim, eps=eps, bias=bias and kind == "layernorm")
