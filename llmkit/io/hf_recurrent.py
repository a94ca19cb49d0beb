"""Hugging Face Mamba (`MambaForCausalLM`) and RWKV-4 (`RwkvForCausalLM`) directories in llmkit.

Both are configurations of llmkit's CausalLM with a linear-time body, so import is a config
translation plus a weight-name map. The only reshaping: RWKV stores its token-shift mixes as
(1, 1, d), llmkit as (d,) (a 1-D parameter, so the optimiser does not weight-decay it).

transformers' RWKV halves the residual stream every `rescale_every` layers at inference time (and
scales the weights to match) to keep fp16 in range; between LayerNorms that changes nothing but
the eps term, so llmkit runs the weights unscaled. Files are read with safetensors only, and every
tensor's name and shape is checked against the config before a weight is allocated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, ModelFormatError
from llmkit.io.hf_config import MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH, _value
from llmkit.io.hf_weights import _open, check_tensors, read_headers, weight_files
from llmkit.io.weights import load_model_tensors, model_tensors

MODEL_TYPES = ("mamba", "rwkv")
# Mamba has no positions and no trained context length; this is only generation's window.
MAMBA_CONTEXT = 4096

MAMBA_NAMES = (
    ("backbone.embeddings.weight", "embeddings.embed.weight"), ("backbone.norm_f.weight", "stack.final_norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("backbone.layers.{}.norm.weight", "stack.blocks.{}.norm.weight"),
    ("backbone.layers.{}.mixer.conv1d.{}", "stack.blocks.{}.mixer.conv.{}"),
    ("backbone.layers.{}.mixer.out_proj.{}", "stack.blocks.{}.mixer.o_proj.{}"),
    *((f"backbone.layers.{{}}.mixer.{p}.{{}}", f"stack.blocks.{{}}.mixer.{p}.{{}}")
      for p in ("in_proj", "x_proj", "dt_proj")),
    *((f"backbone.layers.{{}}.mixer.{p}", f"stack.blocks.{{}}.mixer.{p}") for p in ("A_log", "D")),
)

_RWKV_TIME = (("time_decay", "time_decay"), ("time_first", "time_first"), ("time_mix_key", "mix_k"),
              ("time_mix_value", "mix_v"), ("time_mix_receptance", "mix_r"), ("key.weight", "k_proj.weight"),
              ("value.weight", "v_proj.weight"), ("receptance.weight", "r_proj.weight"),
              ("output.weight", "o_proj.weight"))
_RWKV_CHANNEL = (("time_mix_key", "mix_k"), ("time_mix_receptance", "mix_r"), ("key.weight", "up_proj.weight"),
                 ("receptance.weight", "r_proj.weight"), ("value.weight", "down_proj.weight"))
RWKV_NAMES = (
    ("rwkv.embeddings.weight", "embeddings.embed.weight"), ("rwkv.blocks.0.pre_ln.{}", "stack.input_norm.{}"),
    ("rwkv.ln_out.{}", "stack.final_norm.{}"), ("head.weight", "lm_head.weight"),
    ("rwkv.blocks.{}.ln1.{}", "stack.blocks.{}.norm1.{}"), ("rwkv.blocks.{}.ln2.{}", "stack.blocks.{}.norm2.{}"),
    *((f"rwkv.blocks.{{}}.attention.{hf}", f"stack.blocks.{{}}.time_mix.{ours}") for hf, ours in _RWKV_TIME),
    *((f"rwkv.blocks.{{}}.feed_forward.{hf}", f"stack.blocks.{{}}.channel_mix.{ours}") for hf, ours in _RWKV_CHANNEL),
)
NAMES = {"mamba": MAMBA_NAMES, "rwkv": RWKV_NAMES}
HEAD = {"mamba": "lm_head.weight", "rwkv": "head.weight"}


# ---- config -------------------------------------------------------------------------------------

def recurrent_config_from_hf(data: dict, where: str) -> ModelConfig:
    """Translate a Mamba or RWKV config.json; `where` names the file in every error."""
    model_type = data.get("model_type")
    common = dict(vocab_size=_value(data, "vocab_size", where, int, lo=1, hi=MAX_WIDTH),
                  d_model=_value(data, "hidden_size", where, int, lo=1, hi=MAX_WIDTH),
                  n_layers=_value(data, "num_hidden_layers", where, int, lo=1, hi=MAX_LAYERS),
                  norm_eps=_value(data, "layer_norm_epsilon", where, float, default=1e-5, lo=0.0),
                  body=model_type, position="none", n_heads=1)
    if model_type == "mamba":
        act = _value(data, "hidden_act", where, str, default="silu")
        if act not in ("silu", "swish"):
            raise ModelFormatError(f"{where}: hidden_act {act!r} is not supported for mamba (supported: silu)")
        rank = data.get("time_step_rank", "auto")
        fields = dict(common, norm="rmsnorm", bias=_value(data, "use_bias", where, bool, default=False),
                      tie_embeddings=_value(data, "tie_word_embeddings", where, bool, default=True),
                      max_seq_len=MAMBA_CONTEXT,
                      ssm_state=_value(data, "state_size", where, int, default=16, lo=1, hi=MAX_WIDTH),
                      ssm_conv=_value(data, "conv_kernel", where, int, default=4, lo=1, hi=1024),
                      ssm_expand=_value(data, "expand", where, int, default=2, lo=1, hi=1024),
                      ssm_conv_bias=_value(data, "use_conv_bias", where, bool, default=True),
                      ssm_dt_rank=None if rank == "auto" else _value(data, "time_step_rank", where, int,
                                                                     lo=1, hi=MAX_WIDTH))
    else:
        fields = dict(common, norm="layernorm", bias=True,
                      tie_embeddings=_value(data, "tie_word_embeddings", where, bool, default=False),
                      max_seq_len=_value(data, "context_length", where, int, default=1024, lo=1, hi=MAX_POSITIONS),
                      rwkv_attention_dim=_value(data, "attention_hidden_size", where, int, default=None,
                                                lo=1, hi=MAX_WIDTH),
                      d_ff=_value(data, "intermediate_size", where, int, default=None, lo=1, hi=MAX_WIDTH))
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def recurrent_config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """The config.json that transformers reads back as the same Mamba or RWKV model."""
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, dtype=dtype)
    if cfg.body == "mamba":
        if cfg.norm != "rmsnorm":
            raise ModelFormatError(f"cannot export to Hugging Face mamba: norm={cfg.norm!r} (it needs rmsnorm)")
        return dict(common, architectures=["MambaForCausalLM"], model_type="mamba", state_size=cfg.ssm_state,
                    expand=cfg.ssm_expand, conv_kernel=cfg.ssm_conv, use_bias=cfg.bias,
                    use_conv_bias=cfg.ssm_conv_bias, time_step_rank=cfg.ssm_dt_rank, hidden_act="silu")
    if cfg.norm != "layernorm" or not cfg.bias:
        raise ModelFormatError("cannot export to Hugging Face rwkv: it needs LayerNorms with bias")
    return dict(common, architectures=["RwkvForCausalLM"], model_type="rwkv", context_length=cfg.max_seq_len,
                attention_hidden_size=cfg.rwkv_attention_dim, intermediate_size=cfg.d_ff, rescale_every=0)


# ---- weights ------------------------------------------------------------------------------------

def _translate(name: str, table: tuple[tuple[str, str], ...], *, to_llmkit: bool) -> str | None:
    for hf, ours in table:
        src, dst = (hf, ours) if to_llmkit else (ours, hf)
        match = re.fullmatch(re.escape(src).replace(r"\{\}", r"([^.]+)"), name)
        if match:
            return dst.format(*match.groups())
    return None


def _is_mix(llmkit_name: str) -> bool:
    return bool(re.search(r"\.mix_[kvr]$", llmkit_name))


def hf_to_llmkit_recurrent(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """A Mamba / RWKV state dict (HF names) → llmkit names; a tied head is dropped (stored once)."""
    out = {}
    for name, t in tensors.items():
        if cfg.tie_embeddings and name == HEAD[cfg.body]:
            continue
        ours = _translate(name, NAMES[cfg.body], to_llmkit=True)
        if ours is None:
            raise ModelFormatError(f"unexpected tensor {name} for a Hugging Face {cfg.body} model")
        out[ours] = t.reshape(-1) if _is_mix(ours) else t
    return out


def llmkit_to_hf_recurrent(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    out = {}
    for name, t in tensors.items():
        hf = _translate(name, NAMES[cfg.body], to_llmkit=False)
        assert hf is not None, f"no Hugging Face name for {name}"
        out[hf] = t.reshape(1, 1, -1) if _is_mix(name) else t
    return out


def load_hf_recurrent(directory: Path, data: dict):
    """A Mamba or RWKV directory as an HFModel: the CausalLM in eval mode (float32) with its tokenizer."""
    from llmkit.io.hf import HFModel, load_tokenizer
    from llmkit.models.build import skip_init
    from llmkit.models.causal_lm import CausalLM

    cfg = recurrent_config_from_hf(data, str(directory / "config.json"))
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in
                    llmkit_to_hf_recurrent(model_tensors(CausalLM(cfg)), cfg).items()}
    files, weight_map = weight_files(directory)
    entries = read_headers(files, weight_map)
    found = {n: n for n in entries}
    if cfg.tie_embeddings:
        found.pop(HEAD[cfg.body], None)  # a tied head stored twice: the embedding wins
    check_tensors(directory, entries, found, expected, model=f"{cfg.body} model")
    tokenizer, prefix_ids, eos_ids = load_tokenizer(directory, data, cfg.vocab_size)
    raw: dict[str, Tensor] = {}
    for file in dict.fromkeys(entries[n].file for n in found):
        with _open(file) as f:
            for name in (n for n in found if entries[n].file == file):
                try:
                    raw[name] = f.get_tensor(name).float()
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    reason = " ".join(str(exc).split())
                    raise ModelFormatError(f"{file}: cannot read tensor {name} ({reason})") from None
    with skip_init():
        model = CausalLM(cfg)
    load_model_tensors(model, hf_to_llmkit_recurrent(raw, cfg), where=str(directory))
    model.tie_weights()
    return HFModel(model.eval(), tokenizer, prefix_ids, eos_ids)
