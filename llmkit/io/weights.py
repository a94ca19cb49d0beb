"""Model weights ⇄ flat tensor dicts, with the checks that make a wrong file fail loudly.

Tied embeddings are stored once (the LM head shares the token embedding), as Hugging Face does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmkit.errors import CheckpointError, ModelFormatError


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    state = model.state_dict()
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_model_tensors(model: nn.Module, tensors: dict[str, Tensor], *, where: str) -> None:
    """Copy `tensors` into `model`, refusing missing, unexpected or wrongly shaped entries."""
    check_model_tensors(model, tensors, where=where)
    model.load_state_dict(tensors, strict=False)


def check_model_tensors(model: nn.Module, tensors: dict[str, Tensor], *, where: str) -> None:
    """Refuse tensors that are missing, unexpected, wrongly shaped or not finite for `model` (whose
    parameters may be shards: a sharded tensor reports its whole shape)."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}" + (" …" if len(missing) > 3 else "")] if missing else []) + \
                ([f"unexpected {', '.join(unexpected[:3])}" + (" …" if len(unexpected) > 3 else "")]
                 if unexpected else [])
        raise CheckpointError(f"{where}: weights do not match the config ({'; '.join(parts)})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"the config needs {tuple(expected[name].shape)}")
        check_finite(name, tensor, where)


def check_finite(name: str, tensor: Tensor, where: str) -> None:
    """Refuse a NaN or infinite weight: it loads silently, then every logit is NaN and greedy decoding
    prints token 0 for ever. One pass over the tensor: its min and max are finite only if all of it is
    (both propagate NaN), and nothing as large as the tensor is allocated."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    low, high = torch.aminmax(tensor)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        raise ModelFormatError(f"{where}: tensor {name} holds NaN or infinite values; the file is corrupt")
