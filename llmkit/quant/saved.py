"""A quantised model on disk, and back: a directory `llmkit.load` reads like any checkpoint.

    DIR/config.json        {"format": "llmkit", "model": ModelConfig, "quantization": QuantScheme, "chat": …}
    DIR/model.safetensors  int4 layers: <name>.packed_codes (uint8, two codes a byte), .scale, .offset (bf16);
                           int8 layers: <name>.codes (int8), .scale (bf16); optional .bias, .act_scale (AWQ);
                           every other tensor (embeddings, norms, layers left in full precision) as it was
    DIR/tokenizer.json

Names are those of the model with fused projections (`attn.qkv_proj`, `mlp.gate_up_proj`). The
directory is written beside its destination under a temporary name and renamed at the end, so a
failed run leaves nothing at DIR. Nothing is pickled: safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from llmkit.config import ModelConfig
from llmkit.errors import CheckpointError, ModelFormatError
from llmkit.inference.optimize import prepare_for_decoding
from llmkit.io.finetuned import chat_info_json, load_finetuned_tensors
from llmkit.io.output_dir import check_output_dir, run_config_json, write_config_json
from llmkit.layers.quantized import QuantizedWeight, is_quantized, quantized_layer
from llmkit.models.build import build_model, skip_init
from llmkit.quant.scheme import QuantScheme

CODE_NAMES = {"packed_codes": 4, "codes": 8}


def save_quantized(lm: Any, out: str | Path) -> Path:
    """Write quantised `lm` (its model holds the layers quantize_model made) as a directory `out`."""
    out = Path(out)
    scheme: QuantScheme = lm.model.quantization
    meta = run_config_json(lm.model.cfg, quantization=scheme.to_json(), chat=chat_info_json(lm))
    tensors = {k: v.detach().contiguous() for k, v in lm.model.state_dict().items()}
    if lm.model.cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # the embedding's own tensor, under a second name (a kept head)
    with new_directory(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "llmkit-quantized"})
        lm.tokenizer.save(tmp)
        write_config_json(tmp, meta)
    return out


@contextlib.contextmanager
def new_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out`, renamed to `out` when the block ends without an error and
    removed when it does not: a refused or failed run leaves nothing at `out` (llmkit/io/output_dir.py:
    a new directory, never one written over)."""
    check_output_dir(out, empty=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the model readable by its writer alone
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_quantized_model(meta: dict, tensors: dict[str, Tensor], *, where: str) -> nn.Module:
    """The model a quantised checkpoint describes, its quantised layers built from their saved codes."""
    scheme = QuantScheme.from_json(meta["quantization"], where=where)
    if meta.get("lora") is not None or meta.get("heads"):
        raise CheckpointError(f"{where}: a quantised model carries no LoRA adapters or extra heads")
    cfg = ModelConfig.from_dict(meta["model"], where=where)
    with skip_init():  # every tensor is loaded below, strictly
        model = build_model(cfg)
    prepare_for_decoding(model)  # the fused names the codes were saved under
    for name, bits in _quantized_names(tensors):
        linear = model.get_submodule(name) if _has_module(model, name) else None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{where}: quantised tensors for {name!r}, which is not a linear layer of the model")
        q = _weight(tensors, name, bits, linear, where)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized_layer(q))
    load_finetuned_tensors(model, meta, tensors, where=where)  # the rest, strictly; heads set aside
    model.quantization = scheme
    return model.eval()


def _quantized_names(tensors: dict[str, Tensor]) -> list[tuple[str, int]]:
    found = []
    for key in tensors:
        name, _, leaf = key.rpartition(".")
        if leaf in CODE_NAMES and name:
            found.append((name, CODE_NAMES[leaf]))
    return found


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _weight(tensors: dict[str, Tensor], name: str, bits: int, linear: nn.Linear, where: str) -> QuantizedWeight:
    """The saved codes of `name`, checked against the layer they replace."""
    N, K = linear.out_features, linear.in_features
    get = lambda leaf: tensors.get(f"{name}.{leaf}")  # noqa: E731
    codes, scale = get("packed_codes" if bits == 4 else "codes"), get("scale")
    offset = get("offset") if bits == 4 else None
    if scale is None or (bits == 4 and offset is None):
        raise CheckpointError(f"{where}: {name} has codes but no scale" + (" or offset" if bits == 4 else ""))
    if bits == 4:
        if codes.dtype.is_floating_point or codes.element_size() != 1 or tuple(codes.shape) != (N, K // 2):
            raise CheckpointError(f"{where}: {name}.packed_codes must be uint8 of shape {(N, K // 2)}")
        codes = codes.view(torch.uint8)
        codes = torch.stack([codes & 15, codes >> 4], -1).reshape(N, K)  # low nibble: the even column
    elif codes.dtype.is_floating_point or codes.element_size() != 1 or tuple(codes.shape) != (N, K):
        raise CheckpointError(f"{where}: {name}.codes must be int8 of shape {(N, K)}")
    groups = scale.shape[1] if scale.dim() == 2 else 0
    if scale.dim() != 2 or scale.shape[0] != N or groups == 0 or K % groups or (K // groups) % 2 or \
            (offset is not None and tuple(offset.shape) != tuple(scale.shape)):
        raise CheckpointError(f"{where}: {name}.scale has shape {tuple(scale.shape)}; needs ({N}, groups) "
                              f"with groups dividing {K} into even sizes" + (", and offset the same" if bits == 4 else ""))
    act_scale, bias = get("act_scale"), get("bias")
    for leaf, t, shape in (("scale", scale, scale.shape), ("offset", offset, scale.shape), ("bias", bias, (N,)),
                           ("act_scale", act_scale, (K,))):
        if t is None:
            continue
        if not t.is_floating_point() or tuple(t.shape) != tuple(shape):
            raise ModelFormatError(f"{where}: {name}.{leaf} must be a floating-point tensor of shape {tuple(shape)}")
        if not bool(torch.isfinite(t.float()).all()):  # one NaN scale would make every logit NaN
            raise ModelFormatError(f"{where}: {name}.{leaf} holds NaN or infinite values")
    if offset is None:
        offset = scale.new_zeros(scale.shape)
    return QuantizedWeight(codes.view(torch.int8) if bits == 8 else codes, scale, offset, bias, act_scale)


def refuse_export(model: nn.Module, what: str) -> None:
    """`convert --to hf` writes full-precision models; a quantised one is refused in one line."""
    scheme = getattr(model, "quantization", None)
    if scheme is not None or any(is_quantized(m) for m in model.modules()):
        kind = scheme.describe() if scheme is not None else "quantised"
        raise ModelFormatError(f"{what} is quantised ({kind}); convert --to hf writes full-precision models only: "
                               "convert the model it was quantised from")
