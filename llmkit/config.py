"""ModelConfig: one frozen description of a model, interpreted by one set of layers.

A GPT-2 and a LLaMA differ only in the fields below (norm kind and placement, MLP kind, position
scheme, biases, tying). Presets are plain dicts; a preset name selects field values, never a code
path. Derived values and range checks live in `__post_init__`; the checks of each family in
llmkit/config_checks.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from llmkit.config_checks import (check_attention_pattern, check_encoder_fields, check_recurrent_fields,
                                  check_rope_scaling, check_seq2seq_fields)
from llmkit.errors import ConfigError

Norm = Literal["layernorm", "rmsnorm"]
NormPosition = Literal["pre", "post"]
MLPKind = Literal["gelu", "gelu_tanh", "relu", "relu2", "swiglu", "geglu"]
PositionKind = Literal["learned", "sinusoidal", "rope", "alibi", "relative", "disentangled", "none"]
RopeScaling = Literal["none", "linear", "dynamic", "yarn", "llama3"]
Arch = Literal["decoder", "encoder", "encoder-decoder"]
Body = Literal["transformer", "rwkv", "mamba"]
AttentionPattern = Literal["full", "sliding_window", "longformer", "bigbird"]
ConvActivation = Literal["tanh", "gelu", "gelu_tanh", "relu"]

NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
MLP_KINDS = ("gelu", "gelu_tanh", "relu", "relu2", "swiglu", "geglu")
POSITION_KINDS = ("learned", "sinusoidal", "rope", "alibi", "relative", "disentangled", "none")
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn", "llama3")
ARCHS = ("decoder", "encoder", "encoder-decoder")
BODIES = ("transformer", "rwkv", "mamba")
ATTENTION_PATTERNS = ("full", "sliding_window", "longformer", "bigbird")
CONV_ACTIVATIONS = ("tanh", "gelu", "gelu_tanh", "relu")


# Upper bounds on sizes and counts, far past every published model (vocabularies reach 262k, widths
# 25,600, depths 126, contexts 10M): a larger value is a typo or an attack, and refused before any
# tensor is sized from it (`{"d_model": 1000000}` used to reach the allocator, `n_layers: 100000`
# to build modules for minutes). What fits under them is then checked against memory (llmkit.memory).
LIMITS = {"vocab_size": 1 << 22, "max_seq_len": 1 << 24, "d_model": 1 << 16, "n_layers": 1024, "n_heads": 1024,
          "n_kv_heads": 1024, "head_dim": 1 << 13, "d_ff": 1 << 19, "rope_original_max_seq_len": 1 << 24,
          "type_vocab_size": 1 << 16, "position_offset": 1 << 16, "embed_dim": 1 << 16, "num_labels": 1 << 20,
          "n_decoder_layers": 1024, "relative_buckets": 1 << 12, "relative_max_distance": 1 << 24,
          "decoder_start_token_id": 1 << 22, "attention_window": 1 << 24, "attention_global_tokens": 1 << 24,
          "attention_block_size": 1 << 16, "attention_random_blocks": 1 << 16, "attention_seed": (1 << 63) - 1,
          "attention_dense_up_to": 1 << 24,
          "ssm_state": 1 << 12, "conv_kernel": 1 << 10, "ssm_conv": 1 << 10, "ssm_expand": 64, "ssm_dt_rank": 1 << 16,
          "rwkv_attention_dim": 1 << 16}


def check_limits(obj: Any, where: str) -> None:
    """Every numeric field finite, and at most its LIMITS entry (lower bounds are checked per field)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}.{f.name} must be a finite number, got {value!r}")
        if isinstance(value, int) and not isinstance(value, bool) and f.name in LIMITS and value > LIMITS[f.name]:
            raise ConfigError(f"{where}.{f.name}={value} is larger than llmkit allows ({LIMITS[f.name]:,})")


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
    # Small-model training records (modded-nanoGPT, OLMo 2, Gemma 2): RMS-normalise each head's query and
    # key before RoPE; cap logits smoothly at ±logit_softcap (cap·tanh(z/cap); 0 = off); start each
    # block's output projections (attention o_proj, MLP down_proj) at zero, so every block begins as
    # the identity on the residual stream.
    qk_norm: bool = False
    logit_softcap: float = 0.0
    zero_init_residual: bool = False
    init_std: float = 0.02
    # Which stacks exist: a causal decoder (GPT, LLaMA), a bidirectional encoder (BERT), or both
    # with cross-attention (T5, BART).
    arch: Arch = "decoder"
    # What mixes information across positions in each layer: attention, or a recurrence with a
    # fixed-size state (RWKV, Mamba).
    body: Body = "transformer"
    # --- encoder-only (BERT family) ---
    type_vocab_size: int = 0  # BERT's segment (token type) embeddings; 0 = none; RoBERTa has 1
    position_offset: int = 0  # RoBERTa counts positions from padding_idx + 1 = 2; the table grows by this
    embed_norm: bool = False  # LayerNorm on the summed embeddings (BERT, RoBERTa, ALBERT)
    embed_dim: int | None = None  # ALBERT's factorised embedding width, projected up to d_model; None → d_model
    share_layers: bool = False  # ALBERT: one block's weights applied n_layers times
    mlm_head: bool = True  # BERT's MLM head; False for a bare BertModel (e.g. sentence-embedding models)
    num_labels: int = 0  # > 0 adds a sequence-classification head over mean-pooled hidden states
    # DeBERTa v2/v3 (position="disentangled"; He et al. 2020, arXiv 2006.03654): besides content·content,
    # attention scores each query against the embedding of its distance to the key (content→position)
    # and each key against the embedding of that distance seen from the query (position→content).
    # Distances are log-bucketed as DeBERTa v2 does: exact within ±relative_buckets/2, logarithmic
    # beyond, reaching the last of relative_buckets each side at relative_max_distance (relative_buckets
    # = 0: no buckets, distances clipped at ±relative_max_distance). One table of relative embeddings
    # (LayerNorm-ed when relative_embed_norm) serves every layer, projected by each layer's own query and
    # key projections (share_position_projections, DeBERTa's share_att_key) or by separate ones. It is a
    # decoder position kind too (causal, GQA, KV cache: distances are between buffer indices, like ALiBi's).
    content_to_position: bool = True
    position_to_content: bool = True
    share_position_projections: bool = True
    relative_embed_norm: bool = True
    add_absolute_positions: bool = False  # also a learned position table at the embedding (v2's position_biased_input)
    # DeBERTa v2 (xlarge, xxlarge): a convolution of width conv_kernel (odd; 0 = none) over the embedding
    # output, added to the first layer's output before a LayerNorm (encoders only: it sees both sides).
    conv_kernel: int = 0
    conv_activation: ConvActivation = "tanh"
    # --- encoder-decoder (T5, BART) ---
    n_decoder_layers: int | None = None  # None → n_layers; read `decoder_layers` (None keeps old fingerprints)
    # T5's relative position bias (position="relative"): distances are binned into buckets, exact up
    # to half of them and logarithmic beyond, all distances ≥ relative_max_distance sharing the last.
    # DeBERTa (position="disentangled") reads both fields as its position_buckets and max_relative_positions.
    relative_buckets: int = 32
    relative_max_distance: int = 128
    scale_attention: bool = True  # divide q·k by √head_dim; T5 does not (its initialisation absorbs it)
    rescale_head: bool = False  # T5 with a tied head: decoder output × d_model^-0.5 before the LM head
    final_logits_bias: bool = False  # BART: a (vocab,) bias buffer added to the logits
    decoder_start_token_id: int = 0  # the decoder's first input (T5: the pad id 0; BART: </s> = 2)
    # --- attention patterns for long context (sliding window, global tokens, block-sparse) ---
    # Which keys each query may see (see llmkit/layers/sparse.py): every one ("full"); those fewer than
    # attention_window positions away ("sliding_window", Mistral/Longformer local); that plus the first
    # attention_global_tokens positions, which see and are seen by all ("longformer"); or BigBird's
    # blocks of attention_block_size: attention_window // block_size neighbouring blocks each side,
    # the global tokens, and attention_random_blocks random blocks per query block, drawn from
    # attention_seed ("bigbird"). Causal models intersect each pattern with the causal mask.
    attention_pattern: AttentionPattern = "full"
    attention_window: int | None = None
    attention_global_tokens: int = 0
    attention_block_size: int = 16
    attention_random_blocks: int = 0
    attention_seed: int = 0
    # transformers' Longformer and BigBird (encoders; llmkit/io/hf_longformer.py, hf_bigbird.py). Positions the
    # attention mask marks 2 are global too. Longformer: global queries, and the keys and values they read, have
    # their own q/k/v projections (attention_global_projections). BigBird: the block holding the last position is
    # global (attention_global_last_block), and a sequence of at most attention_dense_up_to tokens attends fully.
    attention_global_projections: bool = False
    attention_global_last_block: bool = False
    attention_dense_up_to: int = 0
    # --- linear-time bodies (RWKV, Mamba) ---
    # Mamba (Gu & Dao 2023): each block widens to ssm_expand·d_model channels, runs a causal depthwise
    # conv of width ssm_conv, then a selective scan with an ssm_state-sized state per channel whose
    # step Δ comes from a rank-ssm_dt_rank projection (None → ceil(d_model / 16), as the paper).
    # `bias` gives the in/out projections biases; the conv has its own switch.
    ssm_state: int = 16
    ssm_conv: int = 4
    ssm_expand: int = 2
    ssm_dt_rank: int | None = None
    ssm_conv_bias: bool = True
    # RWKV-4: the time-mix (WKV) width; None → d_model. The channel-mix width is d_ff (None → 4·d_model).
    rwkv_attention_dim: int | None = None

    def __post_init__(self) -> None:
        def derive(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        check_field_types(self, "ModelConfig")
        check_limits(self, "ModelConfig")

        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name, allowed in (("mlp", MLP_KINDS), ("norm", NORMS), ("norm_position", NORM_POSITIONS),
                              ("position", POSITION_KINDS), ("rope_scaling", ROPE_SCALINGS),
                              ("arch", ARCHS), ("body", BODIES), ("attention_pattern", ATTENTION_PATTERNS),
                              ("conv_activation", CONV_ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"ModelConfig.{name} must be one of {', '.join(allowed)}; "
                                  f"got {getattr(self, name)!r}")
        if not (math.isfinite(self.logit_softcap) and self.logit_softcap >= 0):
            raise ConfigError(f"ModelConfig.logit_softcap must be ≥ 0 (0 = off), got {self.logit_softcap!r}")
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
        if self.d_ff is None and self.body == "rwkv":
            derive("d_ff", 4 * self.d_model)  # RWKV's channel-mix is squared-ReLU, never gated
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
            check_rope_scaling(self)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        check_encoder_fields(self)
        check_seq2seq_fields(self)
        check_attention_pattern(self)
        check_recurrent_fields(self)

    @property
    def ssm_inner(self) -> int:
        """Mamba's inner width: channels of the conv and the scan."""
        return self.ssm_expand * self.d_model

    @property
    def embedding_dim(self) -> int:
        """Width of the token/position tables (embed_dim is left None, not derived, so that configs
        saved before the field existed keep their resume fingerprint)."""
        return self.embed_dim or self.d_model

    @property
    def relative_span(self) -> int:
        """DeBERTa's relative table has 2·span rows: distances -span..span-1 after bucketing."""
        return self.relative_buckets or self.relative_max_distance

    @property
    def learned_positions(self) -> bool:
        """Whether the embedding adds a learned absolute position table."""
        return self.position == "learned" or self.add_absolute_positions

    @property
    def decoder_layers(self) -> int:
        """Blocks in an encoder-decoder's decoder stack."""
        return self.n_decoder_layers or self.n_layers

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
        if self.body != "transformer":
            return self._recurrent_params(embeddings=embeddings)
        d, f, L = self.d_model, self.d_ff, self.n_layers
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * q_out + 2 * d * kv_out + q_out * d
        if self.qkv_bias:
            attn += q_out + 2 * kv_out
        if self.bias:
            attn += d
        if self.qk_norm:
            attn += 2 * self.head_dim
        if self.attention_global_projections:  # Longformer's own q/k/v for global queries
            attn += d * q_out + 2 * d * kv_out + (q_out + 2 * kv_out if self.qkv_bias else 0)
        mlp = (3 if self.gated_mlp else 2) * d * f + ((2 if self.gated_mlp else 1) * f + d if self.bias else 0)
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        if self.position == "disentangled" and not self.share_position_projections:  # own position q/k projections
            attn += (self.content_to_position + self.position_to_content) * (d * q_out + (q_out if self.qkv_bias else 0))
        stored_layers = 1 if self.share_layers else L  # ALBERT stores one block
        total = stored_layers * (attn + mlp + 2 * norm) + (norm if self.norm_position == "pre" else 0)
        if self.position == "disentangled":  # DeBERTa's relative table, shared by the layers, and its LayerNorm
            total += 2 * self.relative_span * d + (norm if self.relative_embed_norm else 0)
        if self.conv_kernel:  # DeBERTa v2's convolution after the first layer, with its LayerNorm
            total += d * d * self.conv_kernel + (d if self.bias else 0) + norm
        if self.arch == "encoder":
            return total + self._encoder_extra_params(embeddings=embeddings)
        if self.arch == "encoder-decoder":
            return total + self._seq2seq_extra_params(attn, mlp, norm, embeddings=embeddings)
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.learned_positions:
                total += self.max_seq_len * d
        return total

    def _recurrent_params(self, *, embeddings: bool) -> int:
        """RWKV-4 or Mamba blocks (layers/recurrent.py), the final norm (and RWKV's norm after the
        embedding), and the token table plus the head when untied."""
        d, L = self.d_model, self.n_layers
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        if self.body == "rwkv":
            a, f = self.rwkv_attention_dim, self.d_ff
            time_mix = 2 * a + 3 * d + 3 * d * a + a * d  # decay, bonus, 3 mixes, k/v/r, output
            channel_mix = 2 * d + 2 * d * f + d * d  # 2 mixes, key/value, receptance
            total = L * (time_mix + channel_mix + 2 * norm) + 2 * norm
        else:
            e, n, r, k = self.ssm_inner, self.ssm_state, self.ssm_dt_rank, self.ssm_conv
            mixer = (d * 2 * e + e * d + (2 * e + d if self.bias else 0)  # in/out projections
                     + e * k + (e if self.ssm_conv_bias else 0)  # depthwise conv
                     + e * (r + 2 * n) + r * e + e  # x → (Δ, B, C); Δ's up-projection with bias
                     + e * n + e)  # A_log, D
            total = L * (mixer + norm) + norm
        if embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    def _seq2seq_extra_params(self, attn: int, mlp: int, norm: int, *, embeddings: bool) -> int:
        """The decoder stack (self-attention, cross-attention, MLP, three norms per block), both stacks'
        relative-bias tables and embedding norms, and the embeddings: one token table shared by both
        stacks (and the head when tied), a learned position table per stack."""
        total = self.decoder_layers * (2 * attn + mlp + 3 * norm) + (norm if self.norm_position == "pre" else 0)
        total += 2 * norm * self.embed_norm
        if self.position == "relative":
            total += 2 * self.relative_buckets * self.n_heads
        if embeddings:
            total += self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
            if self.position == "learned":
                total += 2 * (self.max_seq_len + self.position_offset) * self.d_model
        return total

    def _encoder_extra_params(self, *, embeddings: bool) -> int:
        """Embeddings (with token types, norm, ALBERT's projection) and the MLM/classifier heads."""
        d, e, v = self.d_model, self.embedding_dim, self.vocab_size
        ln = 2 * e if self.bias else e
        total = (d * e + d if e != d else 0) + (ln if self.embed_norm else 0)
        if self.mlm_head:  # dense d→e, LayerNorm(e), decoder bias (+ its weight when untied)
            total += d * e + e + ln + v + (0 if self.tie_embeddings else v * e)
        if self.num_labels:
            total += d * self.num_labels + self.num_labels
        if embeddings:
            positions = self.max_seq_len + self.position_offset if self.learned_positions else 0
            total += (v + positions + self.type_vocab_size) * e
        return total


# The named presets live in llmkit/presets.py; re-exported so `from llmkit.config import preset` works.
from llmkit.presets import PRESETS, preset  # noqa: E402,F401  (after ModelConfig: presets.py builds them lazily)
