"""FSDP2 for the one Trainer (`--fsdp`, llmkit/training/distributed.py's `wrap`): how a model is cut into
units and sharded over the ranks, in which precision, and how its shards become the usual whole tensors
of a checkpoint (llmkit/training/trainer_checkpoint.py) and back — never torch.distributed.checkpoint,
whose metadata is a pickle. Every function here that touches a sharded model is a collective: every
rank calls it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from llmkit.runtime import Runtime

# methods other than forward that the objectives call on a model (a classifier's pooled logits): FSDP2
# gathers a unit's weights in hooks on forward, so these are hooked the same way
FORWARD_METHODS = ("classify",)


def mixed_precision(runtime: "Runtime") -> "MixedPrecisionPolicy | None":
    """FSDP2's own mixed precision for a run whose precision (llmkit/runtime.py's one choice: bf16 only
    where the device runs it natively — a CUDA GPU with bf16, a CPU with native bf16 that the probe
    measured faster) is bf16: each unit's weights are gathered in bf16 (half the all-gather traffic and
    the memory of the unsharded weights), the gradients reduced in fp32 into the fp32 shards that AdamW
    updates. The Trainer's autocast stays on around it, so the ops autocast keeps in fp32 (softmax,
    norms, the losses) still run in fp32. gloo does both on the CPU (tried: bf16 gathers, fp32 gradient
    shards); on CUDA it is the same policy under NCCL, not yet run on a GPU. An fp32 run: None."""
    if runtime.dtype == "fp32":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=runtime.torch_dtype, reduce_dtype=torch.float32)


def shard(model: torch.nn.Module, mp_policy: "MixedPrecisionPolicy | None" = None) -> None:
    """FSDP2 (`fully_shard`) in place: each layer block its own unit (its weights gathered just before it
    runs and freed after), the rest of the model (embeddings, final norm, head — tied weights stay in one
    unit) the root. Each rank keeps 1/N of every parameter, gradient and AdamW moment. A model whose
    layers share one block (ALBERT) is one unit. Frozen weights (LoRA's base) are sharded too, and get
    no gradient. `mp_policy`: see mixed_precision. A collective: every rank calls it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from llmkit.models.recurrent import MambaBlock, RWKVBlock
    from llmkit.models.transformer import Block

    with torch.no_grad():  # rank 0's weights everywhere first, as DDP does when it wraps a model: each
        for tensor in [*model.parameters(), *model.buffers()]:  # rank keeps its slice of its own copy
            dist.broadcast(tensor, src=0)
    policy = mp_policy or MixedPrecisionPolicy()  # (the default: no casts)
    if not getattr(getattr(model, "cfg", None), "share_layers", False):
        for module in list(model.modules()):
            if isinstance(module, (Block, RWKVBlock, MambaBlock)):
                fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for name in FORWARD_METHODS:
        if callable(getattr(model, name, None)):
            register_fsdp_forward_method(model, name)


def full_model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What llmkit.io.weights.model_tensors gives, gathered whole from the shards: on rank 0 (the
    writer) the full tensors, on the others nothing. Every rank must call it (it is a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_full_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Whole tensors (every rank read the checkpoint) into a sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def full_tensors(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded (DTensor) values gathered whole, in one fixed order on every rank (a collective each)."""
    from torch.distributed.tensor import DTensor

    return {name: flat[name].full_tensor().cpu() if isinstance(flat[name], DTensor) else flat[name]
            for name in sorted(flat)}


def shard_like(params: list[torch.nn.Parameter], flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Optimizer entries "<param index>.<key>" holding whole tensors, sharded as their parameter is
    (the inverse of full_tensors for AdamW's moments; a scalar step count stays as it is)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for name, value in flat.items():
        param = params[int(name.split(".", 1)[0])]
        if isinstance(param, DTensor) and tuple(value.shape) == tuple(param.shape):
            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        out[name] = value
    return out
