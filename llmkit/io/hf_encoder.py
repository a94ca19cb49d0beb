"""Hugging Face encoder-only directories (BERT, RoBERTa, ALBERT) in and out.

They are configurations of llmkit's one Transformer (post-norm, learned positions, exact GELU, an
embedding LayerNorm): RoBERTa adds a position offset (its table starts at padding_idx + 1) and one
token type; ALBERT a factorised embedding projected up to the hidden size and one block shared by
every layer. Loading reuses hf_weights' file checks (safetensors only, shard names inside the
directory, every tensor's name and shape checked against the config on the meta device before any
weight is allocated). A bare `BertModel` (such as all-MiniLM-L6-v2) has no MLM head: it loads with
`mlm_head=False`, for hidden states and sentence embeddings.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, ModelFormatError
from llmkit.io.hf_config import MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH, _value
from llmkit.io.hf_task_heads import body_name, hf_task_config, is_head_tensor, task_from_hf
from llmkit.io.hf_weights import _open, check_tensors, read_headers, weight_files
from llmkit.io.weights import load_model_tensors, model_tensors
from llmkit.models.build import skip_init
from llmkit.models.masked_lm import MaskedLM
from llmkit.models.token_heads import task_model

ENCODER_TYPES = ("bert", "roberta", "albert", "deberta-v2")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass(frozen=True)
class EncoderFamily:
    prefix: str  # of the encoder's names in a *ForMaskedLM file ("bert."); a bare *Model has none
    head: str  # how the MLM head's names start ("cls.predictions."); they never carry the prefix
    names: tuple[tuple[str, str], ...]  # (HF name without prefix, llmkit name); {} is a layer or weight/bias
    ignored: str  # regex of names llmkit does not use: buffers, the pooler, the NSP/SOP heads


_EMBEDDINGS = (
    ("embeddings.word_embeddings.weight", "embeddings.embed.weight"),
    ("embeddings.position_embeddings.weight", "embeddings.pos_embed.weight"),
    ("embeddings.token_type_embeddings.weight", "embeddings.type_embed.weight"),
    ("embeddings.LayerNorm.{}", "embeddings.norm.{}"),
)
_BERT_LAYER = (
    *((f"encoder.layer.{{}}.attention.self.{hf}.{{}}", f"stack.blocks.{{}}.attn.{ours}.{{}}")
      for hf, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))),
    ("encoder.layer.{}.attention.output.dense.{}", "stack.blocks.{}.attn.o_proj.{}"),
    ("encoder.layer.{}.attention.output.LayerNorm.{}", "stack.blocks.{}.norm1.{}"),
    ("encoder.layer.{}.intermediate.dense.{}", "stack.blocks.{}.mlp.up_proj.{}"),
    ("encoder.layer.{}.output.dense.{}", "stack.blocks.{}.mlp.down_proj.{}"),
    ("encoder.layer.{}.output.LayerNorm.{}", "stack.blocks.{}.norm2.{}"),
)
_IGNORED = r"(embeddings\.(position_ids|token_type_ids)|pooler\..*)"

BERT = EncoderFamily("bert.", "cls.predictions.", (
    *_EMBEDDINGS, *_BERT_LAYER,
    ("cls.predictions.transform.dense.{}", "head_transform.dense.{}"),
    ("cls.predictions.transform.LayerNorm.{}", "head_transform.norm.{}"),
    ("cls.predictions.decoder.weight", "lm_head.weight"), ("cls.predictions.bias", "lm_head.bias"),
), _IGNORED[:-1] + r"|cls\.seq_relationship\..*)")

ROBERTA = EncoderFamily("roberta.", "lm_head.", (
    *_EMBEDDINGS, *_BERT_LAYER,
    ("lm_head.dense.{}", "head_transform.dense.{}"), ("lm_head.layer_norm.{}", "head_transform.norm.{}"),
    ("lm_head.decoder.weight", "lm_head.weight"), ("lm_head.bias", "lm_head.bias"),
), _IGNORED)

_ALBERT_LAYER = "encoder.albert_layer_groups.0.albert_layers.0."
ALBERT = EncoderFamily("albert.", "predictions.", (
    *_EMBEDDINGS,
    ("encoder.embedding_hidden_mapping_in.{}", "embeddings.project.{}"),
    *((f"{_ALBERT_LAYER}attention.{hf}.{{}}", f"stack.blocks.0.attn.{ours}.{{}}")
      for hf, ours in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("dense", "o_proj"))),
    (f"{_ALBERT_LAYER}attention.LayerNorm.{{}}", "stack.blocks.0.norm1.{}"),
    (f"{_ALBERT_LAYER}ffn.{{}}", "stack.blocks.0.mlp.up_proj.{}"),
    (f"{_ALBERT_LAYER}ffn_output.{{}}", "stack.blocks.0.mlp.down_proj.{}"),
    (f"{_ALBERT_LAYER}full_layer_layer_norm.{{}}", "stack.blocks.0.norm2.{}"),
    ("predictions.dense.{}", "head_transform.dense.{}"), ("predictions.LayerNorm.{}", "head_transform.norm.{}"),
    ("predictions.decoder.weight", "lm_head.weight"), ("predictions.bias", "lm_head.bias"),
), _IGNORED[:-1] + r"|sop_classifier\..*)")

FAMILIES = {"bert": BERT, "roberta": ROBERTA, "albert": ALBERT}
# model_type → (module, family, config_from_hf, config_to_hf) for the sparse-attention encoders
SPARSE_ENCODERS = {
    "longformer": ("llmkit.io.hf_longformer", "LONGFORMER", "longformer_config_from_hf", "longformer_config_to_hf"),
    "big_bird": ("llmkit.io.hf_bigbird", "BIGBIRD", "bigbird_config_from_hf", "bigbird_config_to_hf"),
}


def family_of(config: dict) -> EncoderFamily:
    """The name map of a config.json (DeBERTa's depends on its head and position settings)."""
    if config["model_type"] == "deberta-v2":
        from llmkit.io.hf_deberta import deberta_family

        return deberta_family(config)
    if config["model_type"] in SPARSE_ENCODERS:  # Longformer, BigBird: their own modules
        module, name, _, _ = SPARSE_ENCODERS[config["model_type"]]
        return getattr(importlib.import_module(module), name)
    return FAMILIES[config["model_type"]]


def _translate(name: str, names: tuple[tuple[str, str], ...], *, to_llmkit: bool) -> str | None:
    for hf, ours in names:
        src, dst = (hf, ours) if to_llmkit else (ours, hf)
        match = re.fullmatch(re.escape(src).replace(r"\{\}", r"([^.]+)"), name)
        if match:
            return dst.format(*match.groups())
    return None


# ---- config.json ----------------------------------------------------------------------------------

def encoder_config_from_hf(data: dict, where: str, *, mlm_head: bool) -> ModelConfig:
    """Translate a BERT/RoBERTa/ALBERT config.json; every value is checked, naming the file's field."""
    model_type = data["model_type"]
    if model_type == "deberta-v2":
        from llmkit.io.hf_deberta import deberta_config_from_hf

        return deberta_config_from_hf(data, where, mlm_head=mlm_head)
    if model_type in SPARSE_ENCODERS:
        module, _, name, _ = SPARSE_ENCODERS[model_type]
        return getattr(importlib.import_module(module), name)(data, where, mlm_head=mlm_head)
    d = _value(data, "hidden_size", where, int, lo=1, hi=MAX_WIDTH)
    heads = _value(data, "num_attention_heads", where, int, lo=1, hi=d)
    if d % heads:
        raise ModelFormatError(f"{where}: hidden_size={d} is not divisible by num_attention_heads={heads}")
    act = _value(data, "hidden_act", where, str, default="gelu_new" if model_type == "albert" else "gelu")
    if act not in ACTIVATIONS:
        raise ModelFormatError(f"{where}: hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    for name, plain in (("position_embedding_type", "absolute"), ("is_decoder", False),
                        ("add_cross_attention", False), ("num_hidden_groups", 1), ("inner_group_num", 1)):
        if data.get(name, plain) not in (plain, None):
            raise ModelFormatError(f"{where}: {name}={data[name]!r} is not supported (llmkit needs {plain!r})")
    positions = _value(data, "max_position_embeddings", where, int, lo=1, hi=MAX_POSITIONS)
    offset = 0
    if model_type == "roberta":  # positions count from padding_idx + 1, so the table has that many extra rows
        offset = _value(data, "pad_token_id", where, int, default=1, lo=0, hi=positions - 2) + 1
    fields: dict[str, Any] = dict(
        arch="encoder", vocab_size=_value(data, "vocab_size", where, int, lo=1, hi=MAX_WIDTH),
        max_seq_len=positions - offset, position_offset=offset, d_model=d, n_heads=heads,
        n_layers=_value(data, "num_hidden_layers", where, int, lo=1, hi=MAX_LAYERS),
        d_ff=_value(data, "intermediate_size", where, int, lo=1, hi=MAX_WIDTH), mlp=ACTIVATIONS[act],
        norm="layernorm", norm_position="post", position="learned", bias=True, embed_norm=True,
        norm_eps=_value(data, "layer_norm_eps", where, float, default=1e-12, lo=1e-30),
        type_vocab_size=_value(data, "type_vocab_size", where, int, default=2, lo=0, hi=MAX_WIDTH),
        tie_embeddings=_value(data, "tie_word_embeddings", where, bool, default=True), mlm_head=mlm_head)
    if model_type == "albert":
        fields.update(embed_dim=_value(data, "embedding_size", where, int, lo=1, hi=MAX_WIDTH), share_layers=True)
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def encoder_config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json for transformers: BERT, or RoBERTa / ALBERT / DeBERTa when the config is theirs."""
    if cfg.position == "disentangled":
        from llmkit.io.hf_deberta import deberta_config_to_hf

        return deberta_config_to_hf(cfg, dtype=dtype)
    if cfg.attention_pattern in ("longformer", "bigbird"):
        module, _, _, name = SPARSE_ENCODERS["longformer" if cfg.attention_pattern == "longformer" else "big_bird"]
        return getattr(importlib.import_module(module), name)(cfg, dtype=dtype)
    model_type = "albert" if cfg.share_layers else "roberta" if cfg.position_offset else "bert"
    wants = dict(norm="layernorm", norm_position="post", position="learned", bias=True, qkv_bias=True,
                 embed_norm=True, n_kv_heads=cfg.n_heads, num_labels=0, attention_pattern="full")
    if cfg.mlp not in ("gelu", "gelu_tanh", "relu"):
        wants["mlp"] = "gelu"
    if model_type != "albert" and cfg.embedding_dim != cfg.d_model:
        wants["embed_dim"] = cfg.d_model
    for name, wanted in wants.items():
        if getattr(cfg, name) != wanted:
            raise ModelFormatError(f"cannot export to Hugging Face {model_type}: {name}={getattr(cfg, name)!r} "
                                   f"(it needs {wanted!r})")
    if cfg.type_vocab_size == 0:
        raise ModelFormatError("cannot export type_vocab_size=0: transformers' BERT always adds token types")
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ModelFormatError(f"cannot export: head_dim={cfg.head_dim} × n_heads={cfg.n_heads} != d_model")
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.mlp]
    arch = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "albert": "AlbertForMaskedLM"}[model_type]
    out = dict(architectures=[arch] if cfg.mlm_head else [arch.replace("ForMaskedLM", "Model")],
               model_type=model_type, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
               num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, intermediate_size=cfg.d_ff,
               hidden_act=act, max_position_embeddings=cfg.max_seq_len + cfg.position_offset,
               type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.norm_eps,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, position_embedding_type="absolute",
               tie_word_embeddings=cfg.tie_embeddings, dtype=dtype)
    if model_type == "roberta":
        out["pad_token_id"] = cfg.position_offset - 1
    if model_type == "albert":
        out.update(embedding_size=cfg.embedding_dim, num_hidden_groups=1, inner_group_num=1)
    return out


# ---- weights --------------------------------------------------------------------------------------

def _canonical(name: str, family: EncoderFamily) -> str:
    """A file's tensor name without the model prefix (bare *Model files have none)."""
    return name.removeprefix(family.prefix)


def build_encoder(cfg: ModelConfig, task: dict | None, where: str):
    """The MaskedLM of `cfg`, inside the task model `task` describes (llmkit.io.hf_task_heads) if any."""
    model = MaskedLM(cfg)
    return model if task is None else task_model(model, task, where=where)


def _hf_name(ours: str, family: EncoderFamily) -> str | None:
    """The canonical HF name of an llmkit tensor (a task model's head keeps its name, its body loses `encoder.`)."""
    return ours if is_head_tensor(ours) else _translate(body_name(ours), family.names, to_llmkit=False)


def expected_tensors(cfg: ModelConfig, family: EncoderFamily,
                     task: dict | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Canonical HF name → (llmkit name, shape), from a model on the meta device (no memory)."""
    with torch.device("meta"):
        meta = build_encoder(cfg, task, "config.json")
    out = {}
    for ours, t in model_tensors(meta).items():
        hf = _hf_name(ours, family)
        assert hf is not None, f"no Hugging Face name for {ours}"
        out[hf] = (ours, tuple(t.shape))
    return out


def load_encoder_weights(directory: Path, data: dict) -> tuple[MaskedLM, ModelConfig]:
    """Check every tensor's name, shape and dtype against config.json, then read them into a MaskedLM
    (inside a TokenClassifier / SpanQA for *ForTokenClassification / *ForQuestionAnswering)."""
    family = family_of(data)
    task = task_from_hf(data, str(directory / "config.json"))
    files, weight_map = weight_files(directory)
    entries = read_headers(files, weight_map)
    found = {_canonical(n, family): n for n in entries if not re.fullmatch(family.ignored, _canonical(n, family))}
    # The decoder's bias is stored twice, as `<head>bias` and `<head>decoder.bias`. transformers 5 ties
    # the two only with tied embeddings, and its forward uses the decoder's: that one wins when present.
    if f"{family.head}decoder.bias" in found:
        found[f"{family.head}bias"] = found.pop(f"{family.head}decoder.bias")
    mlm_head = any(name.startswith(family.head) for name in found)
    cfg = encoder_config_from_hf(data, str(directory / "config.json"), mlm_head=mlm_head)
    expected = expected_tensors(cfg, family, task)
    head_weight = f"{family.head}decoder.weight"
    if cfg.tie_embeddings:
        found.pop(head_weight, None)  # the tied decoder is the word embedding
    check_tensors(directory, entries, found, {name: shape for name, (_, shape) in expected.items()},
                  model=f"{data['model_type']} model")
    tensors: dict[str, Tensor] = {}
    for file in dict.fromkeys(entries[original].file for original in found.values()):
        with _open(file) as f:
            for name, original in found.items():
                if entries[original].file != file:
                    continue
                try:
                    tensors[expected[name][0]] = f.get_tensor(original).float()
                except Exception as exc:  # safetensors raises several types for a truncated or corrupt file
                    raise ModelFormatError(f"{file}: cannot read tensor {original} "
                                           f"({' '.join(str(exc).split())})") from None
    with skip_init():  # load_model_tensors fills every parameter or refuses the file
        model = build_encoder(cfg, task, str(directory / "config.json"))
    load_model_tensors(model, tensors, where=str(directory))
    model.tie_weights()
    return model.eval(), cfg


def encoder_hf_export(model, *, dtype: str = "float32") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """config.json and tensors of an encoder, or of a token / span task model around one."""
    config = encoder_config_to_hf(model.cfg, dtype=dtype)
    if hasattr(model, "task_json"):
        config.update(hf_task_config(model, config["architectures"][0]))
    return config, encoder_tensors_to_hf(model)


def encoder_tensors_to_hf(model: MaskedLM) -> dict[str, Tensor]:
    """llmkit tensors under transformers' names (the body prefixed; the MLM, token and span heads not)."""
    family = family_of(encoder_config_to_hf(model.cfg))
    out = {}
    for ours, t in model_tensors(model).items():
        hf = _hf_name(ours, family)
        if hf is None:
            raise ModelFormatError(f"cannot export tensor {ours} to Hugging Face")
        unprefixed = hf.startswith(family.head) or is_head_tensor(hf)
        out[hf if unprefixed else family.prefix + hf] = t.detach().cpu().contiguous()
    if f"{family.head}bias" in out:  # both spellings of the decoder bias (see load_encoder_weights)
        out[f"{family.head}decoder.bias"] = out[f"{family.head}bias"].clone()
    return out


# ---- the directory --------------------------------------------------------------------------------

def load_hf_encoder(directory: Path, data: dict):
    """A BERT/RoBERTa/ALBERT directory as an HFModel: the MaskedLM in eval mode, float32, with its
    tokenizer (mask token from tokenizer_config.json), the ids put before a text ([CLS]) and no EOS."""
    from llmkit.io.checkpoint import read_json
    from llmkit.io.hf import HFModel, _token_string, load_tokenizer

    model, cfg = load_encoder_weights(directory, data)
    if data["model_type"] == "deberta-v2" and not (directory / "tokenizer.json").is_file():
        from llmkit.io.hf_deberta import load_deberta_tokenizer  # its spm.model, as DeBERTa ships it

        tokenizer = load_deberta_tokenizer(directory, cfg.vocab_size)
        return HFModel(model, tokenizer, tokenizer.prefix_ids(), [])
    tokenizer, prefix_ids, _ = load_tokenizer(directory, data, cfg.vocab_size)
    tc_file = directory / "tokenizer_config.json"
    mask = _token_string(read_json(tc_file).get("mask_token"), tc_file, "mask_token") if tc_file.exists() else None
    tokenizer.mask_token = mask
    if mask is not None and tokenizer.mask_id is None:
        raise ModelFormatError(f"{tc_file}: mask_token {mask!r} is not in tokenizer.json")
    return HFModel(model, tokenizer, prefix_ids, [])
