"""Hugging Face encoder-decoder directories in and out: T5 (v1.0 and v1.1 / Flan-T5) and BART.

Both are configurations of llmkit's one Transformer (models/seq2seq.py), so import is a translation
of `config.json` fields and of tensor names; nothing is computed differently per family. The file
layer is llmkit.io.hf_weights' (safetensors only, shards kept inside the directory, every name,
shape and dtype checked on the meta device before a weight is allocated).

Tied head: transformers 5 ties T5's `lm_head` to `shared` unless the file stores a different
`lm_head.weight`, so llmkit unties exactly when the file stores one. T5's d^-0.5 rescale of the
decoder output follows `scale_decoder_outputs` (transformers 5) or else `tie_word_embeddings` (4.x).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, ModelFormatError
from llmkit.io.hf_config import MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH, _value
from llmkit.io.hf_weights import Family, _open, _translate, check_tensors, read_headers, weight_files
from llmkit.io.weights import load_model_tensors, model_tensors
from llmkit.models.seq2seq import Seq2SeqLM

SEQ2SEQ_TYPES = ("t5", "bart")
T5_MLPS = {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu", "gated-silu": "swiglu"}
BART_ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# Stored by some exporters but never read: the stacks' copies of `shared`, the unused relative bias of
# T5's first cross-attention, fairseq's version counters.
IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
           "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
           "encoder.version", "decoder.version")
TOP_LEVEL = ("lm_head.weight", "final_logits_bias")  # BART names outside its "model." prefix


def _t5_family(gated: bool) -> Family:
    names = [("shared.weight", "embeddings.embed.weight"), ("lm_head.weight", "lm_head.weight")]
    mlp = ([("wi_0", "gate_proj"), ("wi_1", "up_proj")] if gated else [("wi", "up_proj")]) + [("wo", "down_proj")]
    for stack in ("encoder", "decoder"):
        names += [(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                   f"{stack}.relative_bias.weight"),
                  (f"{stack}.final_layer_norm.weight", f"{stack}.final_norm.weight")]
        # T5 numbers a block's sub-layers: self-attention, [cross-attention,] feed-forward
        parts = [("0.SelfAttention", "attn", "0.layer_norm", "norm1")]
        if stack == "decoder":
            parts.append(("1.EncDecAttention", "cross_attn", "1.layer_norm", "cross_norm"))
        ff = len(parts)
        names += [(f"{stack}.block.{{}}.layer.{hf}.{p}.weight", f"{stack}.blocks.{{}}.{ours}.{p}_proj.weight")
                  for hf, ours, _, _ in parts for p in "qkvo"]
        names += [(f"{stack}.block.{{}}.layer.{hf_norm}.weight", f"{stack}.blocks.{{}}.{norm}.weight")
                  for _, _, hf_norm, norm in parts]
        names += [(f"{stack}.block.{{}}.layer.{ff}.DenseReluDense.{hf}.weight", f"{stack}.blocks.{{}}.mlp.{p}.weight")
                  for hf, p in mlp]
        names.append((f"{stack}.block.{{}}.layer.{ff}.layer_norm.weight", f"{stack}.blocks.{{}}.norm2.weight"))
    return Family("", tuple(names))


def _bart_family() -> Family:
    names = [("shared.weight", "embeddings.embed.weight"), ("lm_head.weight", "lm_head.weight"),
             ("final_logits_bias", "final_logits_bias")]
    for stack, embeddings in (("encoder", "embeddings"), ("decoder", "decoder_embeddings")):
        names += [(f"{stack}.embed_positions.weight", f"{embeddings}.pos_embed.weight"),
                  (f"{stack}.layernorm_embedding.{{}}", f"{embeddings}.norm.{{}}")]
        attns = [("self_attn", "attn", "norm1")] + ([("encoder_attn", "cross_attn", "cross_norm")]
                                                    if stack == "decoder" else [])
        for hf, ours, norm in attns:
            names += [(f"{stack}.layers.{{}}.{hf}.{p}_proj.{{}}", f"{stack}.blocks.{{}}.{ours}.{p}_proj.{{}}")
                      for p in "qkv"]
            names += [(f"{stack}.layers.{{}}.{hf}.out_proj.{{}}", f"{stack}.blocks.{{}}.{ours}.o_proj.{{}}"),
                      (f"{stack}.layers.{{}}.{hf}_layer_norm.{{}}", f"{stack}.blocks.{{}}.{norm}.{{}}")]
        names += [(f"{stack}.layers.{{}}.fc1.{{}}", f"{stack}.blocks.{{}}.mlp.up_proj.{{}}"),
                  (f"{stack}.layers.{{}}.fc2.{{}}", f"{stack}.blocks.{{}}.mlp.down_proj.{{}}"),
                  (f"{stack}.layers.{{}}.final_layer_norm.{{}}", f"{stack}.blocks.{{}}.norm2.{{}}")]
    return Family("model.", tuple(names))


def family_of(cfg: ModelConfig) -> tuple[str, Family]:
    """("t5" | "bart", its name map) for an encoder-decoder config."""
    if cfg.position == "relative":
        return "t5", _t5_family(cfg.gated_mlp)
    return "bart", _bart_family()


# ---- config.json --------------------------------------------------------------------------------

def config_from_hf_seq2seq(data: dict, where: str, *, stored_head: bool) -> ModelConfig:
    """ModelConfig of a T5 or BART config.json; `stored_head`: the weights hold their own lm_head."""
    fields = _t5_fields(data, where) if data["model_type"] == "t5" else _bart_fields(data, where)
    if fields["n_decoder_layers"] == fields["n_layers"]:
        fields["n_decoder_layers"] = None  # the default: a symmetric model reads as the presets write it
    try:
        return ModelConfig(arch="encoder-decoder", tie_embeddings=not stored_head, dropout=0.0, **fields)
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def _t5_fields(data: dict, where: str) -> dict[str, Any]:
    d = _value(data, "d_model", where, int, lo=1, hi=MAX_WIDTH)
    proj = _value(data, "feed_forward_proj", where, str, default="relu")
    if proj not in T5_MLPS:
        raise ModelFormatError(f"{where}: feed_forward_proj {proj!r} is not supported "
                               f"(supported: {', '.join(T5_MLPS)})")
    layers = _value(data, "num_layers", where, int, lo=1, hi=MAX_LAYERS)
    tied = _value(data, "tie_word_embeddings", where, bool, default=True)
    pad = _value(data, "pad_token_id", where, int, default=0, lo=0)
    return dict(vocab_size=_value(data, "vocab_size", where, int, lo=1, hi=MAX_WIDTH),
                max_seq_len=_value(data, "n_positions", where, int, default=512, lo=1, hi=MAX_POSITIONS),
                d_model=d, n_layers=layers,
                n_decoder_layers=_value(data, "num_decoder_layers", where, int, default=layers, lo=1, hi=MAX_LAYERS),
                n_heads=_value(data, "num_heads", where, int, lo=1, hi=MAX_WIDTH),
                head_dim=_value(data, "d_kv", where, int, lo=1, hi=MAX_WIDTH),
                d_ff=_value(data, "d_ff", where, int, lo=1, hi=MAX_WIDTH), mlp=T5_MLPS[proj],
                norm="rmsnorm", norm_position="pre", norm_eps=_value(data, "layer_norm_epsilon", where, float,
                                                                     default=1e-6, lo=1e-30),
                position="relative", bias=False, scale_attention=False,
                relative_buckets=_value(data, "relative_attention_num_buckets", where, int, default=32, lo=1),
                relative_max_distance=_value(data, "relative_attention_max_distance", where, int, default=128, lo=1),
                rescale_head=_value(data, "scale_decoder_outputs", where, bool, default=tied),
                decoder_start_token_id=_value(data, "decoder_start_token_id", where, int, default=pad, lo=0))


def _bart_fields(data: dict, where: str) -> dict[str, Any]:
    for enc, dec in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if data.get(enc) != data.get(dec):
            raise ModelFormatError(f"{where}: {enc}={data.get(enc)!r} != {dec}={data.get(dec)!r} is not supported")
    for name in ("scale_embedding", "normalize_before", "add_final_layer_norm"):  # mBART-style variants
        if data.get(name):
            raise ModelFormatError(f"{where}: {name}={data[name]!r} is not supported")
    act = _value(data, "activation_function", where, str, default="gelu")
    if act not in BART_ACTIVATIONS:
        raise ModelFormatError(f"{where}: activation_function {act!r} is not supported "
                               f"(supported: {', '.join(BART_ACTIVATIONS)})")
    d = _value(data, "d_model", where, int, lo=1, hi=MAX_WIDTH)
    heads = _value(data, "encoder_attention_heads", where, int, lo=1, hi=d)
    if d % heads:
        raise ModelFormatError(f"{where}: d_model={d} is not divisible by encoder_attention_heads={heads}")
    return dict(vocab_size=_value(data, "vocab_size", where, int, lo=1, hi=MAX_WIDTH),
                max_seq_len=_value(data, "max_position_embeddings", where, int, lo=1, hi=MAX_POSITIONS),
                d_model=d, n_layers=_value(data, "encoder_layers", where, int, lo=1, hi=MAX_LAYERS),
                n_decoder_layers=_value(data, "decoder_layers", where, int, lo=1, hi=MAX_LAYERS), n_heads=heads,
                d_ff=_value(data, "encoder_ffn_dim", where, int, lo=1, hi=MAX_WIDTH), mlp=BART_ACTIVATIONS[act],
                norm="layernorm", norm_position="post", norm_eps=1e-5, position="learned", position_offset=2,
                embed_norm=True, bias=True, final_logits_bias=True,
                decoder_start_token_id=_value(data, "decoder_start_token_id", where, int, default=2, lo=0))


def config_to_hf_seq2seq(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """The config.json that transformers reads back as the same model."""
    kind, _ = family_of(cfg)
    if cfg.n_kv_heads != cfg.n_heads:
        raise ModelFormatError(f"cannot export to Hugging Face {kind}: n_kv_heads={cfg.n_kv_heads} (it needs n_heads)")
    common = dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, is_encoder_decoder=True,
                  decoder_start_token_id=cfg.decoder_start_token_id, tie_word_embeddings=cfg.tie_embeddings,
                  dtype=dtype)
    if kind == "t5":
        wants = dict(norm="rmsnorm", norm_position="pre", bias=False, scale_attention=False, embed_norm=False,
                     final_logits_bias=False)
        _require(cfg, kind, wants, {"relu", "gelu", "geglu", "swiglu"})
        proj = {v: k for k, v in T5_MLPS.items()}[cfg.mlp]
        return dict(architectures=["T5ForConditionalGeneration"], model_type="t5", **common, d_kv=cfg.head_dim,
                    d_ff=cfg.d_ff, num_layers=cfg.n_layers, num_decoder_layers=cfg.decoder_layers,
                    num_heads=cfg.n_heads, relative_attention_num_buckets=cfg.relative_buckets,
                    relative_attention_max_distance=cfg.relative_max_distance, n_positions=cfg.max_seq_len,
                    dropout_rate=0.0, layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=proj,
                    scale_decoder_outputs=cfg.rescale_head)
    wants = dict(norm="layernorm", norm_position="post", bias=True, qkv_bias=True, scale_attention=True,
                 position="learned", position_offset=2, embed_norm=True, norm_eps=1e-5, rescale_head=False)
    _require(cfg, kind, wants, set(BART_ACTIVATIONS.values()))
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ModelFormatError("cannot export to Hugging Face bart: head_dim × n_heads != d_model")
    act = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new"}[cfg.mlp]
    return dict(architectures=["BartForConditionalGeneration"], model_type="bart", **common,
                max_position_embeddings=cfg.max_seq_len, encoder_layers=cfg.n_layers,
                decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.n_heads,
                decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff,
                activation_function=act, scale_embedding=False, dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0, forced_eos_token_id=None)


def _require(cfg: ModelConfig, kind: str, wants: dict[str, Any], mlps: set[str]) -> None:
    for name, wanted in wants.items():
        if getattr(cfg, name) != wanted:
            raise ModelFormatError(f"cannot export to Hugging Face {kind}: {name}={getattr(cfg, name)!r} "
                                   f"(it needs {wanted!r})")
    if cfg.mlp not in mlps:
        raise ModelFormatError(f"cannot export to Hugging Face {kind}: mlp={cfg.mlp!r} "
                               f"(supported: {', '.join(sorted(mlps))})")


def seq2seq_tokenizer_json(tokenizer) -> str:
    """tokenizer.json for an exported encoder-decoder: a tokenizer without a post-processor (llmkit's)
    gets one that appends EOS, so transformers' tokenizer builds the sources llmkit trains on
    (`source_ids`); a Hugging Face tokenizer's own post-processor is kept as it is."""
    if tokenizer.backend.post_processor is not None or tokenizer.eos_id is None:
        return tokenizer.backend.to_str(pretty=True)
    from tokenizers import Tokenizer as Backend, processors

    backend = Backend.from_str(tokenizer.backend.to_str())
    eos = tokenizer.eos_token
    backend.post_processor = processors.TemplateProcessing(single=["$A", eos], pair=["$A", eos, "$B:1", f"{eos}:1"],
                                                           special_tokens=[(eos, tokenizer.eos_id)])
    return backend.to_str(pretty=True)


# ---- weights ------------------------------------------------------------------------------------

def _canonical(name: str, family: Family) -> str:
    """A file's tensor name without the family prefix (bare BartModel files have none)."""
    return name.removeprefix(family.prefix) if family.prefix else name


def to_hf_tensors(tensors: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """llmkit names → the names (and shapes) transformers saves."""
    _, family = family_of(cfg)
    out = {}
    for name, t in tensors.items():
        hf = _translate(name, family, to_llmkit=False)
        assert hf is not None, f"no Hugging Face name for {name}"
        if hf == "final_logits_bias":
            t = t[None]  # transformers keeps it (1, vocab)
        out[hf if hf in TOP_LEVEL else family.prefix + hf] = t
    return out


def load_hf_seq2seq(directory: Path, data: dict):
    """Load a T5 or BART directory as (Seq2SeqLM in eval mode, tokenizer, prefix ids, EOS ids)."""
    from llmkit.io.hf import HFModel, load_tokenizer  # hf.py dispatches here: import late, no cycle
    from llmkit.models.build import skip_init

    where = str(directory / "config.json")
    files, weight_map = weight_files(directory)
    entries = read_headers(files, weight_map)
    kind = data["model_type"]
    prefix = "model." if kind == "bart" else ""
    found = {name.removeprefix(prefix): name for name in entries if name.removeprefix(prefix) not in IGNORED}
    if "shared.weight" not in found and "encoder.embed_tokens.weight" in entries:  # only the stack's copy stored
        found["shared.weight"] = "encoder.embed_tokens.weight"
    cfg = config_from_hf_seq2seq(data, where, stored_head="lm_head.weight" in found)
    _, family = family_of(cfg)
    with torch.device("meta"):
        expected = {_canonical(n, family): tuple(t.shape)
                    for n, t in to_hf_tensors(model_tensors(Seq2SeqLM(cfg)), cfg).items()}
    # transformers lets BART files omit final_logits_bias (zeros)
    check_tensors(directory, entries, found, expected, optional=frozenset({"final_logits_bias"}),
                  model=f"{kind} model")
    tokenizer, prefix_ids, eos_ids = load_tokenizer(directory, data, cfg.vocab_size)
    tensors = {}
    for file in dict.fromkeys(entries[original].file for original in found.values()):
        with _open(file) as f:
            for name, original in found.items():
                if entries[original].file == file:
                    tensors[_translate(name, family, to_llmkit=True)] = f.get_tensor(original).float()
    if cfg.final_logits_bias:
        tensors["final_logits_bias"] = tensors.get("final_logits_bias", torch.zeros(1, cfg.vocab_size)).reshape(-1)
    with skip_init():  # load_model_tensors fills every parameter or refuses the file
        model = Seq2SeqLM(cfg)
    load_model_tensors(model, tensors, where=str(directory))
    model.tie_weights()
    return HFModel(model.eval(), tokenizer, prefix_ids, eos_ids)
