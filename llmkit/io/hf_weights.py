"""Hugging Face weight files: the name map per family, shard hygiene, and shape checks.

GPT-2 stores its Conv1D weights transposed, (in, out), and fuses q/k/v into `c_attn`; they are
transposed and split here (nanoGPT's `from_pretrained` does the same). The LLaMA family already
uses llmkit's module names, so its map is a renaming. Every file and shard is opened with
safetensors only (no pickle, L1/L2); shard names from an index must stay inside the model directory
(L9); every tensor's name and shape is checked against the config on the meta device before any
weight is allocated (L5).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.errors import CheckpointError, ModelFormatError
from llmkit.io.safe_json import read_json
from llmkit.io.safetensors_header import check_unique_keys
from llmkit.io.weights import model_tensors
from llmkit.models.causal_lm import CausalLM

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Non-persistent buffers that some exporters wrote anyway: a causal mask and RoPE frequencies.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # quantised or FP8 weights need scales llmkit cannot apply yet


class Entry(NamedTuple):
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Family:
    prefix: str  # of every HF name except lm_head ("transformer." / "model.")
    names: tuple[tuple[str, str], ...]  # (HF name, llmkit name) templates; {} is a layer index or weight/bias
    conv1d: str = r"(?!)"  # HF names whose 2-D weight is stored (in, out): GPT-2's Conv1D


GPT2 = Family("transformer.", (
    ("wte.weight", "embeddings.embed.weight"), ("wpe.weight", "embeddings.pos_embed.weight"),
    ("ln_f.{}", "stack.final_norm.{}"), ("lm_head.weight", "lm_head.weight"),
    ("h.{}.ln_1.{}", "stack.blocks.{}.norm1.{}"), ("h.{}.ln_2.{}", "stack.blocks.{}.norm2.{}"),
    ("h.{}.attn.c_attn.{}", "stack.blocks.{}.attn.qkv_proj.{}"),  # split into q/k/v below
    ("h.{}.attn.c_proj.{}", "stack.blocks.{}.attn.o_proj.{}"),
    ("h.{}.mlp.c_fc.{}", "stack.blocks.{}.mlp.up_proj.{}"), ("h.{}.mlp.c_proj.{}", "stack.blocks.{}.mlp.down_proj.{}"),
), conv1d=r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")

LLAMA = Family("model.", (
    ("embed_tokens.weight", "embeddings.embed.weight"), ("norm.weight", "stack.final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{}.input_layernorm.weight", "stack.blocks.{}.norm1.weight"),
    ("layers.{}.post_attention_layernorm.weight", "stack.blocks.{}.norm2.weight"),
    *((f"layers.{{}}.self_attn.{p}_proj.{{}}", f"stack.blocks.{{}}.attn.{p}_proj.{{}}") for p in "qkvo"),
    *((f"layers.{{}}.mlp.{p}_proj.{{}}", f"stack.blocks.{{}}.mlp.{p}_proj.{{}}") for p in ("gate", "up", "down")),
))

FAMILIES = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}


def _translate(name: str, family: Family, *, to_llmkit: bool) -> str | None:
    for hf, ours in family.names:
        src, dst = (hf, ours) if to_llmkit else (ours, hf)
        match = re.fullmatch(re.escape(src).replace(r"\{\}", r"([^.]+)"), name)
        if match:
            return dst.format(*match.groups())
    return None


def hf_to_llmkit(tensors: dict[str, Tensor], family: Family) -> dict[str, Tensor]:
    """HF names (prefix already stripped) → llmkit names, GPT-2's Conv1D transposed and c_attn split."""
    out = {}
    for name, t in tensors.items():
        ours = _translate(name, family, to_llmkit=True)
        assert ours is not None, f"unchecked tensor name {name}"
        t = t.t() if re.fullmatch(family.conv1d, name) else t
        if ".qkv_proj." in ours:  # (3C, C) weight or (3C,) bias: q, k, v stacked along dim 0
            for part, piece in zip("qkv", t.chunk(3, dim=0)):
                out[ours.replace("qkv_proj", f"{part}_proj")] = piece
        else:
            out[ours] = t
    return out


def llmkit_to_hf(tensors: dict[str, Tensor], family: Family) -> dict[str, Tensor]:
    """The inverse of hf_to_llmkit, with the family's prefix put back."""
    fused, fuse = {}, any(".qkv_proj." in ours for _, ours in family.names)  # GPT-2, GPT-1: one c_attn
    for name, t in tensors.items():
        if fuse and ".attn.q_proj." in name:
            parts = [tensors[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            fused[name.replace("q_proj", "qkv_proj")] = torch.cat(parts, dim=0)
        elif not (fuse and (".attn.k_proj." in name or ".attn.v_proj." in name)):
            fused[name] = t
    out = {}
    for name, t in fused.items():
        hf = _translate(name, family, to_llmkit=False)
        assert hf is not None, f"no Hugging Face name for {name}"
        t = t.t() if re.fullmatch(family.conv1d, hf) else t
        out[hf if hf.startswith("lm_head") else family.prefix + hf] = t
    return out


# ---- reading the directory ----------------------------------------------------------------------

def refuse_pickles(directory: Path) -> None:
    """Raise naming the first pickle checkpoint in `directory` (or `directory` itself, a file)."""
    candidates = [directory] if directory.is_file() else sorted(directory.iterdir()) if directory.is_dir() else []
    for file in candidates:
        if file.suffix.lower() in PICKLE_SUFFIXES and file.is_file():
            raise CheckpointError(f"{file}: pickle checkpoints are refused (they can run code); convert to "
                                  "safetensors, e.g. with transformers' save_pretrained(safe_serialization=True)")


def _inside(directory: Path, file: Path) -> Path:
    """`file` if it is a regular file whose real path stays in `directory` (or in the blob store of a
    Hugging Face hub cache, whose snapshot files are symlinks into ../../blobs)."""
    try:  # a name from an index may be too long for the file system, or loop through links
        real, roots = file.resolve(), [directory.resolve()]
        if directory.parent.name == "snapshots":
            roots.append((directory.parent.parent / "blobs").resolve())
        regular = real.is_file()
    except OSError as exc:
        raise ModelFormatError(f"{str(file)[:300]}: cannot be opened ({exc.strerror or exc})") from None
    if not any(real.is_relative_to(root) for root in roots):
        raise ModelFormatError(f"{file}: resolves to {real}, outside the model directory")
    if not regular:
        raise ModelFormatError(f"{file}: no such file")
    return file


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    """json object hook: a name listed twice (e.g. one tensor mapped to two shards) is an error,
    where plain json.loads would silently keep the last one."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"key {key!r} appears twice")
        seen.add(key)
    return dict(pairs)


def weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files to read and, for a sharded model, the index's tensor → shard map."""
    if (directory / "model.safetensors").exists():
        return [_inside(directory, directory / "model.safetensors")], None
    index = directory / INDEX
    if not index.exists():
        refuse_pickles(directory)
        raise ModelFormatError(f"{directory}: no model.safetensors or {INDEX}")
    # safe_json: a regular file, bounded size and nesting; the hook keeps duplicate names an error
    data = read_json(_inside(directory, index), what="shard index", error=ModelFormatError,
                     object_pairs_hook=_no_duplicates)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFormatError(f"{index}: 'weight_map' must map tensor names to shard file names")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if shard in ("", ".", "..") or any(c in shard for c in "/\\\0") or os.path.isabs(shard):
            raise ModelFormatError(f"{index}: shard {shard!r} is not a plain file name in the model directory")
        _inside(directory, directory / shard)
    return [directory / s for s in shards], weight_map


def _open(file: Path):
    try:
        check_unique_keys(file)
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFormatError(f"{file}: corrupt safetensors file ({' '.join(str(exc).split())})") from None


def read_headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, Entry]:
    """Tensor name → (file, shape, dtype), from the headers only; the data stays on disk."""
    entries: dict[str, Entry] = {}
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                if name in entries:
                    raise ModelFormatError(f"{file}: tensor {name} is also in {entries[name].file.name}")
                if weight_map is not None and weight_map.get(name) != file.name:
                    raise ModelFormatError(f"{file}: tensor {name} is not mapped to this shard in {INDEX}")
                info = f.get_slice(name)
                entries[name] = Entry(file, tuple(info.get_shape()), info.get_dtype())
    for name, shard in (weight_map or {}).items():
        if name not in entries:
            raise ModelFormatError(f"{files[0].parent / INDEX}: tensor {name} is not in its shard {shard}")
    return entries


def expected_shapes(cfg: ModelConfig, family: Family) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes the config implies, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        meta = CausalLM(cfg)
    return {name: tuple(t.shape) for name, t in llmkit_to_hf(model_tensors(meta), family).items()}


def _strip(name: str, family: Family) -> str:
    # Bare base models (GPT2Model, LlamaModel) save their names without the prefix.
    return name if name.startswith(family.prefix) or name.startswith("lm_head.") else family.prefix + name


def check_shapes(directory: Path, entries: dict[str, Entry], expected: dict[str, tuple[int, ...]],
                 family: Family, *, tied: bool) -> dict[str, str]:
    """Match file tensors to the config's; return canonical name → name in the file."""
    found = {_strip(n, family): n for n in entries if not n.endswith(IGNORED_SUFFIXES)}
    if tied:
        found.pop("lm_head.weight", None)  # some exporters store the tied head twice; the embedding wins
    check_tensors(directory, entries, found, expected)
    return found


def check_tensors(directory: Path, entries: dict[str, Entry], found: dict[str, str],
                  expected: dict[str, tuple[int, ...]], *, optional: frozenset[str] = frozenset(),
                  model: str = "model") -> None:
    """The file's tensors (`found`: canonical name → name in the file) against the config's: every
    expected one present (unless optional), none unexpected, the config's shapes, float dtypes. Used
    by every Hugging Face family's loader, before any tensor data is read."""
    for name in expected:
        if name not in found and name not in optional:
            raise ModelFormatError(f"{directory}: missing tensor {name} (config.json needs it)")
    for name, original in found.items():
        file, shape, dtype = entries[original]
        if name not in expected:
            raise ModelFormatError(f"{file}: unexpected tensor {original} (not in a {len(expected)}-tensor {model} "
                                   "described by config.json)")
        if shape != expected[name]:
            raise ModelFormatError(f"{file}: tensor {original} has shape {shape}, config.json needs "
                                   f"{expected[name]}")
        if dtype not in FLOAT_DTYPES:
            raise ModelFormatError(f"{file}: tensor {original} has dtype {dtype} (supported: "
                                   f"{', '.join(FLOAT_DTYPES)})")


def plan_weights(directory: Path, cfg: ModelConfig, family: Family) -> dict[str, tuple[Path, str]]:
    """Check every weight file against the config without reading tensor data; return, per HF name
    (with prefix), the file and the name it has there."""
    files, weight_map = weight_files(directory)
    entries = read_headers(files, weight_map)
    names = check_shapes(directory, entries, expected_shapes(cfg, family), family, tied=cfg.tie_embeddings)
    return {name: (entries[original].file, original) for name, original in names.items()}


def read_weights(plan: dict[str, tuple[Path, str]], family: Family) -> dict[str, Tensor]:
    """Read the planned tensors, one file open at a time, renamed for llmkit."""
    raw: dict[str, Tensor] = {}
    for file in dict.fromkeys(file for file, _ in plan.values()):
        with _open(file) as f:
            for name, (where, original) in plan.items():
                if where != file:
                    continue
                try:
                    raw[name.removeprefix(family.prefix)] = f.get_tensor(original)
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise ModelFormatError(f"{file}: cannot read tensor {original} "
                                           f"({' '.join(str(exc).split())})") from None
    return hf_to_llmkit(raw, family)
