"""Position-wise feed-forward networks: the plain MLP (GPT-2, BERT) and the gated MLP (LLaMA).

MLP:       down(act(up(x)))
GatedMLP:  down(act(gate(x)) * up(x))   — SwiGLU uses SiLU, GeGLU uses GELU (Shazeer 2020,
           "GLU Variants Improve Transformer", arXiv 2002.05202).
"""

import torch.nn.functional as F
from torch import Tensor, nn

from llmkit.layers.linear import Linear

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new"
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),  # ReLU² (Primer, So et al. 2021; modded-nanoGPT)
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, *, kind: str, bias: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.act = ACTIVATIONS[kind]
        self.up_proj = Linear(d_model, d_ff, bias=bias)
        self.down_proj = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.down_proj(self.act(self.up_proj(x)))
        return self.dropout(y) if self.training and self.dropout.p else y


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, *, kind: str, bias: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.act = ACTIVATIONS[kind]
        self.gate_proj = Linear(d_model, d_ff, bias=bias)
        self.up_proj = Linear(d_model, d_ff, bias=bias)
        self.down_proj = Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.gate_up_proj: nn.Module | None = None  # gate and up fused for decoding (inference/optimize.py)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        y = self.down_proj(self.act(gate) * up)
        return self.dropout(y) if self.training and self.dropout.p else y  # no module call when it is a no-op


def build_mlp(kind: str, d_model: int, d_ff: int, *, bias: bool, dropout: float) -> nn.Module:
    cls = GatedMLP if kind in ("swiglu", "geglu") else MLP
    return cls(d_model, d_ff, kind=kind, bias=bias, dropout=dropout)
