"""ModelConfig: one frozen description of a model, interpreted by one set of layers.

A GPT-2 and a LLaMA differ only in the fields below (norm kind and placement, MLP kind, position
scheme, biases, tying). Presets are plain dicts; a preset name selects field values, never a code
path. Derived values and range checks live in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from llmkit.errors import ConfigError

Norm = Literal["layernorm", "rmsnorm"]
NormPosition = Literal["pre", "post"]
MLPKind = Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu"]
PositionKind = Literal["learned", "sinusoidal", "rope", "alibi", "none"]
RopeScaling = Literal["none", "linear", "dynamic", "yarn", "llama3"]
Arch = Literal["decoder", "encoder", "encoder-decoder"]
Body = Literal["transformer", "rwkv", "mamba"]

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLP_KINDS = ("gelu", "gelu_tanh", "relu", "swiglu", "geglu")
POSITION_KINDS = ("learned", "sinusoidal", "rope", "alibi", "none")
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3")
ARCHS = ("decoder", "encoder", "encoder-decoder")
BODIES = ("transformer", "rwkv", "mamba")


def check_field_types(obj: Any, where: str) -> None:
    """Reject values whose type does not match the dataclass annotation (JSON gives "3" for 3)."""
    for f in dataclasses.fields(obj):
        value, annotation = getattr(obj, f.name), str(f.type)
        if value is None and annotation.endswith("| None"):
            continue
        base = annotation.replace(" | None", "")
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"int": is_number and float(value).is_integer(), "float": is_number,
              "bool": isinstance(value, bool)}.get(base, isinstance(value, str))  # str and Literal kinds
        if not ok:
            expected = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(base, "a string")
            raise ConfigError(f"{where}.{f.name} must be {expected}, got {value!r}")
        if base == "int" and not isinstance(value, int):
            object.__setattr__(obj, f.name, int(value))  # 3.0 from JSON is 3


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    max_seq_len: int = 256
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None → n_heads (MHA); 1 → MQA; in between → GQA
    head_dim: int | None = None  # None → d_model // n_heads
    d_ff: int | None = None  # None → 4·d_model (gelu/relu) or LLaMA's 8/3·d_model rounded (gated)
    mlp: MLPKind = "gelu_tanh"
    norm: Norm = "layernorm"
    norm_position: NormPosition = "pre"
    norm_eps: float = 1e-5
    position: PositionKind = "learned"
    rope_theta: float = 10000.0
    # RoPE context extension, named as in transformers' rope_parameters (see layers/position.py).
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_original_max_seq_len: int | None = None  # pretraining context; None → max_seq_len (dynamic/yarn/llama3)
    rope_attention_factor: float | None = None  # YaRN cos/sin multiplier; None → 0.1·ln(factor) + 1
    rope_beta_fast: float = 32.0  # YaRN: dims turning more than this often over the context keep their frequency
    rope_beta_slow: float = 1.0  # YaRN: dims turning less than this often are fully interpolated
    rope_truncate: bool = True  # YaRN: round the ramp's ends to whole dims (gpt-oss sets False)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    bias: bool = True  # biases in every linear layer and LayerNorm
    qkv_bias: bool | None = None  # None → bias (Qwen2: True with bias=False)
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # Which stacks exist: a causal decoder (GPT, LLaMA), a bidirectional encoder (BERT), or both
    # with cross-attention (T5, BART).
    arch: Arch = "decoder"
    # What mixes information across positions in each layer: attention, or a recurrence with a
    # fixed-size state (RWKV, Mamba).
    body: Body = "transformer"
    # --- encoder-only (BERT family) ---
    # --- encoder-decoder (T5, BART) ---
    # --- attention patterns for long context (sliding window, global tokens, block-sparse) ---
    # --- linear-time bodies (RWKV, Mamba) ---

    def __post_init__(self) -> None:
        def derive(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        check_field_types(self, "ModelConfig")

        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name, allowed in (("mlp", MLP_KINDS), ("norm", NORMS), ("norm_position", NORM_POSITIONS),
                              ("position", POSITION_KINDS), ("rope_scaling", ROPE_SCALINGS),
                              ("arch", ARCHS), ("body", BODIES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"ModelConfig.{name} must be one of {', '.join(allowed)}; "
                                  f"got {getattr(self, name)!r}")
        for name in ("n_kv_heads", "head_dim", "d_ff", "rope_original_max_seq_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"ModelConfig.{name} must be a positive integer or None, got {value!r}")
        if self.n_kv_heads is None:
            derive("n_kv_heads", self.n_heads)
        if self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads:
            raise ConfigError(f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(f"ModelConfig.d_model={self.d_model} is not divisible by "
                                  f"n_heads={self.n_heads}; set head_dim explicitly")
            derive("head_dim", self.d_model // self.n_heads)
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.d_ff is None:
            gated = self.mlp in ("swiglu", "geglu")
            # LLaMA keeps the gated MLP's parameter count equal to a 4x MLP: 2/3 of 4·d, rounded up to 64.
            derive("d_ff", 64 * math.ceil(8 * self.d_model / 3 / 64) if gated else 4 * self.d_model)
        if self.qkv_bias is None:
            derive("qkv_bias", self.bias)
        for name in ("norm_eps", "rope_theta", "init_std", "rope_factor", "rope_attention_factor", "rope_beta_fast",
                     "rope_beta_slow", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(float(value)) or value <= 0):
                raise ConfigError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        if self.rope_scaling != "none":
            self._check_rope_scaling()
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def _check_rope_scaling(self) -> None:
        if self.position != "rope":
            raise ConfigError(f"ModelConfig.rope_scaling={self.rope_scaling!r} needs position='rope', "
                              f"got {self.position!r}")
        if self.rope_factor < 1:
            raise ConfigError(f"ModelConfig.rope_factor must be >= 1 with rope_scaling, got {self.rope_factor!r}")
        if self.rope_scaling == "dynamic" and self.head_dim <= 2:  # NTK's exponent D/(D-2)
            raise ConfigError(f"ModelConfig.head_dim={self.head_dim} must be > 2 for rope_scaling='dynamic'")
        if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ConfigError(f"ModelConfig.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                              f"rope_low_freq_factor={self.rope_low_freq_factor}")
        if self.rope_original_max_seq_len is None and self.rope_scaling != "linear":
            # transformers' default too: dynamic reads max_position_embeddings, yarn/llama3 fall back to it
            object.__setattr__(self, "rope_original_max_seq_len", self.max_seq_len)

    @property
    def gated_mlp(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown model field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a wrong type reached a comparison in __post_init__
            raise ConfigError(f"{where}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def non_default_fields(self) -> dict[str, Any]:
        """Fields whose value differs from the field's default (derived ones, defaulting to None, always
        do): a fingerprint that survives llmkit adding new fields with defaults between runs."""
        return {k: v for k, v in self.to_dict().items() if v != getattr(type(self), k)}

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count, computed from the fields (checked against the module in tests)."""
        d, f, L = self.d_model, self.d_ff, self.n_layers
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * q_out + 2 * d * kv_out + q_out * d
        if self.qkv_bias:
            attn += q_out + 2 * kv_out
        if self.bias:
            attn += d
        mlp = (3 if self.gated_mlp else 2) * d * f + ((2 if self.gated_mlp else 1) * f + d if self.bias else 0)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        total = L * (attn + mlp + 2 * norm) + (norm if self.norm_position == "pre" else 0)
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.position == "learned":
                total += self.max_seq_len * d
        return total


_GPT2 = dict(mlp="gelu_tanh", norm="layernorm", position="learned", bias=True, tie_embeddings=True)
_LLAMA = dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False, tie_embeddings=False, norm_eps=1e-6)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny sizes for tests: a second or two to build and run
    "gpt2-tiny": dict(_GPT2, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "llama-tiny": dict(_LLAMA, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128),
    # the embedded demo's model: sized to learn the most in ~4 minutes on 2 CPU cores
    "gpt2-demo": dict(_GPT2, d_model=256, n_layers=4, n_heads=4, max_seq_len=256),
    "llama-demo": dict(_LLAMA, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
    # the benchmark's config (6 layers, 6 heads, width 384, context 256)
    "gpt2-mini": dict(_GPT2, d_model=384, n_layers=6, n_heads=6, max_seq_len=256),
    "llama-mini": dict(_LLAMA, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, max_seq_len=256),
    # the published shapes
    "gpt2-small": dict(_GPT2, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, vocab_size=50257),
    "gpt2-medium": dict(_GPT2, d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024, vocab_size=50257),
    "llama-1b": dict(_LLAMA, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                     max_seq_len=2048, vocab_size=32000, rope_theta=500000.0),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a named preset, with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides}, where=f"preset {name}")
