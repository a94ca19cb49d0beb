"""Hugging Face `config.json` ⇄ ModelConfig for the decoder families llmkit runs.

GPT-2 (learned positions, LayerNorm with bias, tanh-GELU, tied head) and the LLaMA family (LLaMA,
SmolLM2, TinyLlama, Mistral, Qwen2: RoPE, RMSNorm, SwiGLU, GQA) are configurations of llmkit's one
Transformer, so import is a field-by-field translation. Every value from the file is checked here,
with the file's own field names in the message, before a single weight is allocated (RELIABILITY L5).
RoPE settings are read from both the older top-level `rope_theta` / `rope_scaling` fields and the
`rope_parameters` dict that transformers 5 writes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, ModelFormatError

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")
MAX_LAYERS = 1024
MAX_POSITIONS = 2**24
MAX_WIDTH = 2**20  # hidden, FFN and vocabulary sizes; far above any real model, far below an OOM
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")
_MISSING = object()

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# A gated MLP's activation: llmkit's GeGLU uses tanh-GELU, so exact "gelu" has no match.
LLAMA_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


def _value(data: dict, key: str, where: str, kind: type, *, default: Any = _MISSING,
           lo: float | None = None, hi: float | None = None, parent: str = "") -> Any:
    """`data[key]` checked for type and range; JSON null counts as absent. `parent` names the
    object that holds `data` in the file (e.g. "rope_parameters")."""
    value, name = data.get(key), f"{parent}.{key}" if parent else key
    if value is None:
        if default is _MISSING:
            raise ModelFormatError(f"{where}: missing field '{name}'")
        return default
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind in (int, float) else isinstance(value, kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ModelFormatError(f"{where}: field '{name}' must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ModelFormatError(f"{where}: field '{name}' must be finite, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ModelFormatError(f"{where}: field '{name}'={value!r} is out of range [{lo}, {hi}]")
    return value


def config_from_hf(data: Any, where: str) -> ModelConfig:
    """Translate a parsed Hugging Face config.json; `where` names the file in every error."""
    if not isinstance(data, dict):
        raise ModelFormatError(f"{where}: expected a JSON object, got {type(data).__name__}")
    model_type = data.get("model_type")
    if model_type not in SUPPORTED:
        raise ModelFormatError(f"{where}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED)})")
    fields = _gpt2_fields(data, where) if model_type == "gpt2" else _llama_fields(data, where, model_type)
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def _gpt2_fields(data: dict, where: str) -> dict[str, Any]:
    d = _value(data, "n_embd", where, int, lo=1, hi=MAX_WIDTH)
    heads = _value(data, "n_head", where, int, lo=1, hi=d)
    if d % heads:
        raise ModelFormatError(f"{where}: n_embd={d} is not divisible by n_head={heads}")
    act = _value(data, "activation_function", where, str, default="gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise ModelFormatError(f"{where}: activation_function {act!r} is not supported "
                               f"(supported: {', '.join(GPT2_ACTIVATIONS)})")
    # Variants of GPT-2 attention that llmkit's one attention does not have.
    for name, plain in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
        if data.get(name, plain) != plain:
            raise ModelFormatError(f"{where}: {name}={data[name]!r} is not supported")
    return dict(vocab_size=_value(data, "vocab_size", where, int, lo=1, hi=MAX_WIDTH),
                max_seq_len=_value(data, "n_positions", where, int, lo=1, hi=MAX_POSITIONS),
                d_model=d, n_layers=_value(data, "n_layer", where, int, lo=1, hi=MAX_LAYERS), n_heads=heads,
                d_ff=_value(data, "n_inner", where, int, default=4 * d, lo=1, hi=MAX_WIDTH),
                mlp=GPT2_ACTIVATIONS[act], norm="layernorm", norm_position="pre",
                norm_eps=_value(data, "layer_norm_epsilon", where, float, default=1e-5, lo=1e-30),
                position="learned", bias=True, qkv_bias=True,
                tie_embeddings=_value(data, "tie_word_embeddings", where, bool, default=True), dropout=0.0)


def _llama_fields(data: dict, where: str, model_type: str) -> dict[str, Any]:
    d = _value(data, "hidden_size", where, int, lo=1, hi=MAX_WIDTH)
    heads = _value(data, "num_attention_heads", where, int, lo=1, hi=MAX_WIDTH)
    kv_heads = _value(data, "num_key_value_heads", where, int, default=heads, lo=1, hi=heads)
    head_dim = _value(data, "head_dim", where, int, default=None, lo=2, hi=MAX_WIDTH)
    if head_dim is None and d % heads:
        raise ModelFormatError(f"{where}: hidden_size={d} is not divisible by num_attention_heads={heads}")
    if heads % kv_heads:
        raise ModelFormatError(f"{where}: num_key_value_heads={kv_heads} does not divide "
                               f"num_attention_heads={heads}")
    act = _value(data, "hidden_act", where, str, default="silu")
    if act not in LLAMA_ACTIVATIONS:
        raise ModelFormatError(f"{where}: hidden_act {act!r} is not supported (supported: "
                               f"{', '.join(LLAMA_ACTIVATIONS)})")
    if model_type == "qwen2":  # Qwen2: biases on q/k/v only, never on o_proj or the MLP
        bias, qkv_bias = False, True
    elif model_type == "mistral":
        bias = qkv_bias = False
    else:
        bias = qkv_bias = _value(data, "attention_bias", where, bool, default=False)
        if _value(data, "mlp_bias", where, bool, default=False) != bias:
            raise ModelFormatError(f"{where}: attention_bias={bias} with mlp_bias={not bias} is not supported "
                                   "(llmkit's bias switch covers both)")
    positions = _value(data, "max_position_embeddings", where, int, lo=1, hi=MAX_POSITIONS)
    window, every_layer = _sliding_window(data, where, model_type)
    if window is not None and window >= positions:
        window = None  # a window as long as the context changes nothing
    pattern = {}
    if window is not None and every_layer:  # Mistral: every layer sees the last `window` keys (layers/sparse.py)
        pattern = dict(attention_pattern="sliding_window", attention_window=window)
    elif window is not None:
        # Some layers slide and others do not (Qwen2's max_window_layers, mixed layer_types), which
        # llmkit's one pattern per model cannot express. Capping the context at the window means no token
        # ever attends past it, so every output llmkit produces is one the model defines.
        positions = window
    return dict(vocab_size=_value(data, "vocab_size", where, int, lo=1, hi=MAX_WIDTH),
                max_seq_len=positions, **pattern,
                d_model=d, n_layers=_value(data, "num_hidden_layers", where, int, lo=1, hi=MAX_LAYERS),
                n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                d_ff=_value(data, "intermediate_size", where, int, lo=1, hi=MAX_WIDTH),
                mlp=LLAMA_ACTIVATIONS[act], norm="rmsnorm", norm_position="pre",
                norm_eps=_value(data, "rms_norm_eps", where, float, default=1e-6, lo=1e-30),
                position="rope", bias=bias, qkv_bias=qkv_bias,
                tie_embeddings=_value(data, "tie_word_embeddings", where, bool, default=False), dropout=0.0,
                **rope_fields(data, where, positions))


def _sliding_window(data: dict, where: str, model_type: str) -> tuple[int | None, bool]:
    """(the attention window when some layer uses one, whether every layer does). Mistral: any
    `sliding_window`, every layer; Qwen2: with `use_sliding_window`, the layers from
    `max_window_layers` on; or as `layer_types` says."""
    window = _value(data, "sliding_window", where, int, default=None, lo=1)
    if window is None:
        return None, False
    layer_types = data.get("layer_types")
    if isinstance(layer_types, list):
        sliding = [kind == "sliding_attention" for kind in layer_types]
        return (window, all(sliding)) if any(sliding) else (None, False)
    if model_type == "qwen2":
        layers = _value(data, "num_hidden_layers", where, int, lo=1, hi=MAX_LAYERS)
        first = _value(data, "max_window_layers", where, int, default=28)
        used = _value(data, "use_sliding_window", where, bool, default=False) and first < layers
        return (window, first <= 0) if used else (None, False)
    return window, True


def rope_fields(data: dict, where: str, positions: int) -> dict[str, Any]:
    """RoPE theta and scaling as ModelConfig fields (rope_theta, rope_scaling, rope_factor, …)."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or params  # transformers 5 also lets an old rope_scaling win
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ModelFormatError(f"{where}: field '{name}' must be an object, got {value!r}")
    label = "rope_scaling" if data.get("rope_scaling") else "rope_parameters"
    if "rope_theta" in scaling:
        theta_from, theta_parent = scaling, label
    elif "rope_theta" in params:
        theta_from, theta_parent = params, "rope_parameters"
    else:
        theta_from, theta_parent = data, ""  # transformers 4.x: a top-level field
    theta = _value(theta_from, "rope_theta", where, float, default=10000.0, parent=theta_parent)
    if theta <= 0:
        name = f"{theta_parent}.rope_theta" if theta_parent else "rope_theta"
        raise ModelFormatError(f"{where}: field '{name}' must be positive, got {theta!r}")

    def field(key: str, kind: type, **kwargs: Any) -> Any:
        return _value(scaling, key, where, kind, parent=label, **kwargs)

    partial = scaling.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):  # RoPE on part of each head: llmkit rotates every dim
        raise ModelFormatError(f"{where}: partial_rotary_factor={partial!r} is not supported")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None):
        return dict(rope_theta=theta)
    if kind not in ROPE_SCALINGS:
        raise ModelFormatError(f"{where}: unsupported rope type {kind!r} (supported: default, "
                               f"{', '.join(ROPE_SCALINGS)})")
    if "rope_scaling" not in {f.name for f in dataclasses.fields(ModelConfig)}:
        raise ModelFormatError(f"{where}: rope scaling {kind!r} is not supported by this llmkit version")
    # Phi-3 style configs keep the pretraining length at the top level; transformers prefers that one.
    original = (_value(data, "original_max_position_embeddings", where, int, default=None, lo=1, hi=MAX_POSITIONS)
                or field("original_max_position_embeddings", int, default=positions, lo=1, hi=MAX_POSITIONS))
    factor = field("factor", float, default=positions / original if kind == "yarn" else _MISSING)
    out: dict[str, Any] = dict(rope_theta=theta, rope_scaling=kind, rope_factor=factor)
    if kind == "dynamic":
        out["rope_original_max_seq_len"] = positions  # transformers' dynamic NTK scales past this
    elif kind == "llama3":
        out.update(rope_original_max_seq_len=original,
                   rope_low_freq_factor=field("low_freq_factor", float),
                   rope_high_freq_factor=field("high_freq_factor", float))
    elif kind == "yarn":
        out.update(rope_original_max_seq_len=original, **_yarn_fields(field, where, factor))
    return out


def _yarn_fields(field: Callable[..., Any], where: str, factor: float) -> dict[str, Any]:
    attention = field("attention_factor", float, default=None)
    mscale = field("mscale", float, default=None)
    mscale_all = field("mscale_all_dim", float, default=None)
    if attention is None and mscale and mscale_all:  # DeepSeek's form of the attention factor
        def get_mscale(m: float) -> float:
            return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
        attention = get_mscale(mscale) / get_mscale(mscale_all)
    out = dict(rope_attention_factor=attention,
               # transformers reads these with `or`, so 0 and null both mean the paper's defaults
               rope_beta_fast=field("beta_fast", float, default=None) or 32.0,
               rope_beta_slow=field("beta_slow", float, default=None) or 1.0)
    truncate = field("truncate", bool, default=True)
    if "rope_truncate" in {f.name for f in dataclasses.fields(ModelConfig)}:
        out["rope_truncate"] = truncate
    elif not truncate:
        raise ModelFormatError(f"{where}: rope truncate=false is not supported by this llmkit version")
    return out


# ---- export ------------------------------------------------------------------------------------

def _export_family(cfg: ModelConfig) -> str:
    """"gpt2", "llama", "mistral" (LLaMA with a sliding window) or "qwen2"; otherwise a one-line error
    naming what does not fit."""
    if cfg.position == "learned":
        family, wants = "gpt2", dict(norm="layernorm", norm_position="pre", bias=True, qkv_bias=True,
                                     n_kv_heads=cfg.n_heads)
        if cfg.mlp not in ("gelu_tanh", "gelu", "relu"):
            wants["mlp"] = "gelu_tanh"
    elif cfg.position == "rope":
        family = "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
        wants = dict(norm="rmsnorm", norm_position="pre")
        if family == "qwen2":
            wants["mlp"] = "swiglu"
        elif cfg.qkv_bias != cfg.bias:
            wants["qkv_bias"] = cfg.bias
        if cfg.mlp not in ("swiglu", "geglu"):
            wants["mlp"] = "swiglu"
    else:
        raise ModelFormatError(f"cannot export position={cfg.position!r} to Hugging Face "
                               "(GPT-2 needs 'learned', LLaMA/Qwen2 need 'rope')")
    if family in ("gpt2", "qwen2") and cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ModelFormatError(f"cannot export to Hugging Face {family}: head_dim={cfg.head_dim} × "
                               f"n_heads={cfg.n_heads} != d_model={cfg.d_model}")
    if family == "llama" and cfg.attention_pattern == "sliding_window" and not cfg.bias:
        family = "mistral"  # Mistral is LLaMA with every layer attending to a sliding window (and no biases)
    else:
        wants["attention_pattern"] = "full"  # the other families attend to every key (layers/sparse.py)
    wants.update(qk_norm=False, logit_softcap=0.0)  # none of these families has them
    for name, wanted in wants.items():
        if getattr(cfg, name) != wanted:
            raise ModelFormatError(f"cannot export to Hugging Face {family}: {name}={getattr(cfg, name)!r} "
                                   f"(it needs {wanted!r})")
    return family


def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """The config.json that transformers reads back as the same model."""
    family = _export_family(cfg)
    if family == "gpt2":
        act = {v: k for k, v in GPT2_ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[cfg.mlp]
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                    n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                    n_inner=cfg.d_ff, activation_function=act, layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings,
                    dtype=dtype)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    scaling = getattr(cfg, "rope_scaling", "none")
    if scaling != "none":
        rope.update(rope_type=scaling, factor=cfg.rope_factor)
        if scaling in ("yarn", "llama3"):
            rope["original_max_position_embeddings"] = cfg.rope_original_max_seq_len
        if scaling == "llama3":
            rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
        if scaling == "yarn":
            rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                        truncate=getattr(cfg, "rope_truncate", True))
            if cfg.rope_attention_factor is not None:
                rope["attention_factor"] = cfg.rope_attention_factor
        if scaling == "dynamic" and cfg.rope_original_max_seq_len != cfg.max_seq_len:
            raise ModelFormatError("cannot export rope_scaling='dynamic' with rope_original_max_seq_len "
                                   f"{cfg.rope_original_max_seq_len} != max_seq_len {cfg.max_seq_len}")
    architecture = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(family, "LlamaForCausalLM")
    out = dict(architectures=[architecture], model_type=family,
               vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, hidden_size=cfg.d_model,
               intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
               num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
               hidden_act="silu" if cfg.mlp == "swiglu" else "gelu_pytorch_tanh", rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0,
               # both spellings: transformers 5 reads rope_parameters, 4.x reads rope_theta / rope_scaling
               rope_parameters=rope, rope_theta=cfg.rope_theta, rope_scaling=rope if scaling != "none" else None,
               dtype=dtype)
    if family == "qwen2":
        del out["head_dim"]  # Qwen2 derives it from hidden_size / heads (checked equal above)
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    elif family == "mistral":  # no bias switches in Mistral's config (it has none)
        out.update(sliding_window=cfg.attention_window)
    else:
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    return out
