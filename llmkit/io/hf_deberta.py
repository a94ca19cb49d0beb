"""Hugging Face DeBERTa v2/v3 (`model_type: deberta-v2`) directories in and out.

DeBERTa is BERT's post-norm encoder with disentangled attention (position="disentangled",
layers/disentangled.py): this module is its config translation and weight-name map; loading and
export go through hf_encoder, like BERT's. Two MLM heads exist in transformers' DebertaV2ForMaskedLM
and both are llmkit's one MLM head: the `legacy` one (BERT's `cls.predictions.*`, the default) and
the original DeBERTa one (`lm_predictions.lm_head.*`, decoder always tied to the word embeddings).
Neither is the paper's enhanced mask decoder: transformers keeps no weights for it (it ignores
`mask_predictions.*`) and never runs it, and llmkit matches transformers. The convolution after the
first layer that deberta-v2-xlarge/xxlarge use (`conv_kernel_size`) is `ModelConfig.conv_kernel`.

DeBERTa's checkpoints ship their tokenizer as `spm.model`, a SentencePiece unigram model, and no
tokenizer.json: `load_deberta_tokenizer` reads it with llmkit's own protobuf reader
(llmkit.tokenizer.sentencepiece, no sentencepiece library) and frames texts as transformers'
DebertaV2Tokenizer does: `[CLS] A [SEP]`, `[CLS] A [SEP] B [SEP]` (B of token type 1), with
`[MASK]` appended to the vocabulary when the model file lacks it (deberta-v3's id 128000).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.config import ModelConfig
from llmkit.errors import ConfigError, ModelFormatError
from llmkit.io.hf_config import MAX_LAYERS, MAX_POSITIONS, MAX_WIDTH, _value
from llmkit.io.hf_encoder import ACTIVATIONS, EncoderFamily

_LAYER = "encoder.layer.{}."
_BODY = (
    ("embeddings.word_embeddings.weight", "embeddings.embed.weight"),
    ("embeddings.position_embeddings.weight", "embeddings.pos_embed.weight"),
    ("embeddings.token_type_embeddings.weight", "embeddings.type_embed.weight"),
    ("embeddings.LayerNorm.{}", "embeddings.norm.{}"),
    ("encoder.rel_embeddings.weight", "stack.relative_embed.table.weight"),
    ("encoder.LayerNorm.{}", "stack.relative_embed.norm.{}"),
    ("encoder.conv.conv.{}", "stack.conv.conv.{}"), ("encoder.conv.LayerNorm.{}", "stack.conv.norm.{}"),
    *((f"{_LAYER}attention.self.{hf}.{{}}", f"stack.blocks.{{}}.attn.{ours}.{{}}")
      for hf, ours in (("query_proj", "q_proj"), ("key_proj", "k_proj"), ("value_proj", "v_proj"),
                       ("pos_key_proj", "disentangled.pos_k_proj"), ("pos_query_proj", "disentangled.pos_q_proj"))),
    (f"{_LAYER}attention.output.dense.{{}}", "stack.blocks.{}.attn.o_proj.{}"),
    (f"{_LAYER}attention.output.LayerNorm.{{}}", "stack.blocks.{}.norm1.{}"),
    (f"{_LAYER}intermediate.dense.{{}}", "stack.blocks.{}.mlp.up_proj.{}"),
    (f"{_LAYER}output.dense.{{}}", "stack.blocks.{}.mlp.down_proj.{}"),
    (f"{_LAYER}output.LayerNorm.{{}}", "stack.blocks.{}.norm2.{}"),
)
_LEGACY_HEAD = (
    ("cls.predictions.transform.dense.{}", "head_transform.dense.{}"),
    ("cls.predictions.transform.LayerNorm.{}", "head_transform.norm.{}"),
    ("cls.predictions.decoder.weight", "lm_head.weight"), ("cls.predictions.bias", "lm_head.bias"),
)
_DEBERTA_HEAD = (  # the original DeBERTa head: its decoder is the word embedding itself
    ("lm_predictions.lm_head.dense.{}", "head_transform.dense.{}"),
    ("lm_predictions.lm_head.LayerNorm.{}", "head_transform.norm.{}"),
    ("lm_predictions.lm_head.bias", "lm_head.bias"),
)
# DeBERTa's conv_act names (transformers' ACT2FN) → ModelConfig.conv_activation
CONV_ACTIVATIONS = {"tanh": "tanh", "gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}
# buffers, the replaced-token-detection head of v3 checkpoints (transformers ignores it too)
_IGNORED = r"embeddings\.position_ids|mask_predictions\..*"


def deberta_family(config: dict) -> EncoderFamily:
    """The name map for a DeBERTa config.json: its head as `legacy` says; a position table that
    `position_biased_input: false` leaves unused is ignored, as transformers does."""
    ignored = _IGNORED if config.get("position_biased_input", True) else _IGNORED + r"|embeddings\.position_embeddings\..*"
    if config.get("legacy", True) is False:
        return EncoderFamily("deberta.", "lm_predictions.", (*_BODY, *_DEBERTA_HEAD), f"({ignored})")
    return EncoderFamily("deberta.", "cls.predictions.", (*_BODY, *_LEGACY_HEAD), f"({ignored})")


def _attention_terms(data: dict, where: str) -> tuple[bool, bool]:
    """pos_att_type: a list or a "p2c|c2p" string of the extra score terms."""
    value = data.get("pos_att_type") or []
    terms = [t.strip().lower() for t in value.split("|")] if isinstance(value, str) else value
    if not isinstance(terms, list) or any(t not in ("c2p", "p2c") for t in terms):
        raise ModelFormatError(f"{where}: pos_att_type={value!r} is not supported (llmkit has c2p and p2c)")
    return "c2p" in terms, "p2c" in terms


def deberta_config_from_hf(data: dict, where: str, *, mlm_head: bool) -> ModelConfig:
    """Translate a DeBERTa v2/v3 config.json; every value is checked, naming the file's field."""
    d = _value(data, "hidden_size", where, int, lo=1, hi=MAX_WIDTH)
    heads = _value(data, "num_attention_heads", where, int, lo=1, hi=d)
    if d % heads:
        raise ModelFormatError(f"{where}: hidden_size={d} is not divisible by num_attention_heads={heads}")
    act = _value(data, "hidden_act", where, str, default="gelu")
    if act not in ACTIVATIONS:
        raise ModelFormatError(f"{where}: hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    # What llmkit's DeBERTa does not have, each with the value that means "absent".
    for name, plain in (("relative_attention", True), ("conv_groups", 1), ("embedding_size", d),
                        ("attention_head_size", d // heads), ("is_decoder", False)):
        if data.get(name, plain) not in (plain, None):
            raise ModelFormatError(f"{where}: {name}={data[name]!r} is not supported (llmkit needs {plain!r})")
    if "relative_attention" not in data:  # transformers' default is False: plain BERT attention
        raise ModelFormatError(f"{where}: relative_attention is not set (llmkit needs true)")
    norms = _value(data, "norm_rel_ebd", where, str, default="none")
    norms = {n.strip().lower() for n in norms.split("|")}
    if not norms <= {"none", "layer_norm"}:
        raise ModelFormatError(f"{where}: norm_rel_ebd={data['norm_rel_ebd']!r} is not supported "
                               "(llmkit has layer_norm or none)")
    positions = _value(data, "max_position_embeddings", where, int, default=512, lo=1, hi=MAX_POSITIONS)
    buckets = _value(data, "position_buckets", where, int, default=-1, hi=1 << 12)
    max_distance = _value(data, "max_relative_positions", where, int, default=-1, hi=MAX_POSITIONS)
    c2p, p2c = _attention_terms(data, where)
    legacy = _value(data, "legacy", where, bool, default=True)
    conv = _value(data, "conv_kernel_size", where, int, default=0, lo=0, hi=1 << 10)
    conv_act = _value(data, "conv_act", where, str, default="tanh")
    if conv and conv_act not in CONV_ACTIVATIONS:
        raise ModelFormatError(f"{where}: conv_act {conv_act!r} is not supported (supported: {', '.join(CONV_ACTIVATIONS)})")
    fields: dict[str, Any] = dict(
        arch="encoder", vocab_size=_value(data, "vocab_size", where, int, lo=1, hi=MAX_WIDTH),
        max_seq_len=positions, d_model=d, n_heads=heads,
        n_layers=_value(data, "num_hidden_layers", where, int, lo=1, hi=MAX_LAYERS),
        d_ff=_value(data, "intermediate_size", where, int, lo=1, hi=MAX_WIDTH), mlp=ACTIVATIONS[act],
        norm="layernorm", norm_position="post", position="disentangled", bias=True, embed_norm=True,
        norm_eps=_value(data, "layer_norm_eps", where, float, default=1e-7, lo=1e-30),
        type_vocab_size=_value(data, "type_vocab_size", where, int, default=0, lo=0, hi=MAX_WIDTH),
        # the original head always decodes with the word embeddings, whatever tie_word_embeddings says
        tie_embeddings=not legacy or _value(data, "tie_word_embeddings", where, bool, default=True),
        mlm_head=mlm_head, relative_buckets=max(buckets, 0),
        relative_max_distance=max_distance if max_distance >= 1 else positions,  # transformers' fallback
        content_to_position=c2p, position_to_content=p2c,
        share_position_projections=_value(data, "share_att_key", where, bool, default=False),
        relative_embed_norm="layer_norm" in norms,
        add_absolute_positions=_value(data, "position_biased_input", where, bool, default=True),
        conv_kernel=conv, conv_activation=CONV_ACTIVATIONS[conv_act] if conv else "tanh")
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def deberta_config_to_hf(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """config.json for transformers' DebertaV2: the original DeBERTa head (legacy=false) when the
    decoder is tied, as DeBERTa's own checkpoints have it; BERT's (legacy) head when untied."""
    wants = dict(norm="layernorm", norm_position="post", bias=True, qkv_bias=True, embed_norm=True,
                 n_kv_heads=cfg.n_heads, num_labels=0, embedding_dim=cfg.d_model, position_offset=0,
                 share_layers=False, qk_norm=False)
    if cfg.mlp not in ("gelu", "gelu_tanh", "relu"):
        wants["mlp"] = "gelu"
    for name, wanted in wants.items():
        if getattr(cfg, name) != wanted:
            raise ModelFormatError(f"cannot export to Hugging Face deberta-v2: {name}={getattr(cfg, name)!r} "
                                   f"(it needs {wanted!r})")
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ModelFormatError(f"cannot export: head_dim={cfg.head_dim} × n_heads={cfg.n_heads} != d_model")
    architecture = "DebertaV2ForMaskedLM" if cfg.mlm_head else "DebertaV2Model"
    return dict(architectures=[architecture], model_type="deberta-v2", vocab_size=cfg.vocab_size,
                hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                intermediate_size=cfg.d_ff, hidden_act={"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.mlp],
                max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
                layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                relative_attention=True, position_buckets=cfg.relative_buckets or -1,
                max_relative_positions=cfg.relative_max_distance,
                pos_att_type=[t for t, on in (("p2c", cfg.position_to_content), ("c2p", cfg.content_to_position)) if on],
                share_att_key=cfg.share_position_projections,
                norm_rel_ebd="layer_norm" if cfg.relative_embed_norm else "none",
                position_biased_input=cfg.add_absolute_positions, legacy=not cfg.tie_embeddings,
                conv_kernel_size=cfg.conv_kernel, conv_act={v: k for k, v in CONV_ACTIVATIONS.items()}[cfg.conv_activation],
                tie_word_embeddings=cfg.tie_embeddings, dtype=dtype)


# ---- tokenizer: spm.model ----------------------------------------------------------------------------

# tokenizer_config.json keys (with transformers' DebertaV2Tokenizer defaults) naming the special tokens
_SPECIALS = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"}


def load_deberta_tokenizer(directory: Path, vocab_size: int):
    """The Tokenizer of a DeBERTa directory without tokenizer.json, from its `spm.model`."""
    from tokenizers import AddedToken, normalizers, processors

    from llmkit.io.checkpoint import read_json
    from llmkit.io.hf import _token_string
    from llmkit.tokenizer import Tokenizer
    from llmkit.tokenizer.sentencepiece import read_sentencepiece, sentencepiece_backend

    spm_file = directory / "spm.model"
    if not spm_file.is_file():
        raise ModelFormatError(f"{directory / 'tokenizer.json'}: no such file (a DeBERTa directory has "
                               "tokenizer.json or spm.model)")
    tc_file = directory / "tokenizer_config.json"
    tc = read_json(tc_file) if tc_file.exists() else {}
    if not isinstance(tc, dict):
        raise ModelFormatError(f"{tc_file}: expected a JSON object")
    # Options of DebertaV2Tokenizer that llmkit does not rebuild, each with the value that means "off".
    for key, plain in (("split_by_punct", False), ("add_prefix_space", True)):
        if tc.get(key, plain) != plain:
            raise ModelFormatError(f"{tc_file}: {key}={tc[key]!r} is not supported (llmkit needs {plain!r})")
    lower = tc.get("do_lower_case", False)
    if not isinstance(lower, bool):
        raise ModelFormatError(f"{tc_file}: do_lower_case must be true or false, got {lower!r:.40}")
    names = {key: _token_string(tc.get(f"{key}_token"), tc_file, f"{key}_token") or default
             for key, default in _SPECIALS.items()}
    backend = sentencepiece_backend(read_sentencepiece(spm_file))
    if lower:  # transformers lower-cases before SentencePiece's own normaliser
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), backend.normalizer])
    if backend.token_to_id(names["mask"]) is None:  # DeBERTa v3's [MASK] is not in spm.model: it comes next
        backend.add_special_tokens([AddedToken(names["mask"], special=True, normalized=False)])
    for key in ("cls", "sep", "pad"):
        if backend.token_to_id(names[key]) is None:
            raise ModelFormatError(f"{spm_file}: the {key} token {names[key]!r} is not one of its pieces")
    if backend.get_vocab_size(with_added_tokens=True) > vocab_size:
        raise ModelFormatError(f"{spm_file}: {backend.get_vocab_size(with_added_tokens=True)} tokens with "
                               f"{names['mask']}, more than config.json's vocab_size {vocab_size}")
    cls, sep = names["cls"], names["sep"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])
    return Tokenizer(backend, bos_token=cls, eos_token=sep, pad_token=names["pad"], mask_token=names["mask"])
