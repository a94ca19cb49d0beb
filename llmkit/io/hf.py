"""Hugging Face model directories in and out: GPT-2 and the LLaMA family (LLaMA, SmolLM2, TinyLlama,
Mistral, Qwen2).

A directory is `config.json` (translated by `hf_config`), `model.safetensors` or an index plus
shards (read by `hf_weights`), `tokenizer.json`, and optionally `tokenizer_config.json` (special
token strings and the chat template) and `generation_config.json` (EOS ids). Nothing from the directory is ever imported
or unpickled: `auto_map` and custom code are ignored (../shared/RELIABILITY.md L1, L2, L8).
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from safetensors import SafetensorError
from safetensors.torch import save_file

from llmkit.errors import CheckpointError, ModelFormatError
from llmkit.io.checkpoint import fsync_path, read_json, write_synced
from llmkit.io.input_files import read_regular_bytes
from llmkit.io.output_dir import check_output_dir
from llmkit.io.hf_config import SUPPORTED, config_from_hf, config_to_hf
from llmkit.io.hf_weights import FAMILIES, llmkit_to_hf, plan_weights, read_weights, refuse_pickles
from llmkit.io.weights import load_model_tensors, model_tensors
from llmkit.models.build import skip_init
from llmkit.models.causal_lm import CausalLM
from llmkit.tokenizer import SPECIAL_TOKENS, Tokenizer
from llmkit.tokenizer.chat import DEFAULT_CHAT_TEMPLATE
from llmkit.tokenizer.sentencepiece import read_sentencepiece, sentencepiece_backend

__all__ = ["HFModel", "is_hf_dir", "load_hf", "refuse_pickles", "save_hf"]


def is_hf_dir(path: str | Path) -> bool:
    """A directory whose config.json names a `model_type` and is not an llmkit checkpoint's."""
    try:  # read_json refuses a FIFO (which would block) and bounds hostile JSON
        data = read_json(Path(path) / "config.json")
    except CheckpointError:
        return False
    return isinstance(data, dict) and "model_type" in data and data.get("format") != "llmkit"


class HFModel(NamedTuple):
    model: CausalLM
    tokenizer: Tokenizer
    prefix_ids: list[int]  # what the tokenizer's post-processor puts before a text (LLaMA's BOS)
    eos_ids: list[int]  # generation stops at any of these


# Families whose loaders live in their own modules (imported on first use): model_type → module:function.
OTHER_FAMILIES = {
    "bert": "llmkit.io.hf_encoder:load_hf_encoder", "roberta": "llmkit.io.hf_encoder:load_hf_encoder",
    "albert": "llmkit.io.hf_encoder:load_hf_encoder", "deberta-v2": "llmkit.io.hf_encoder:load_hf_encoder",
    "openai-gpt": "llmkit.io.hf_gpt1:load_hf_gpt1",
    "longformer": "llmkit.io.hf_encoder:load_hf_encoder", "big_bird": "llmkit.io.hf_encoder:load_hf_encoder",
    "t5": "llmkit.io.hf_seq2seq:load_hf_seq2seq", "bart": "llmkit.io.hf_seq2seq:load_hf_seq2seq",
    "mamba": "llmkit.io.hf_recurrent:load_hf_recurrent", "rwkv": "llmkit.io.hf_recurrent:load_hf_recurrent",
}


def load_hf(path: str | Path) -> HFModel:
    """Load a Hugging Face model directory: an llmkit CausalLM in eval mode (float32 parameters,
    whatever the file's dtype) with its tokenizer, prefix ids and EOS ids. Every file is checked
    before the weights are allocated."""
    directory = Path(path)
    config_file = directory / "config.json"
    data = read_json(config_file)
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type in OTHER_FAMILIES:  # encoder-only, encoder-decoder and recurrent families: own name maps
        module, loader = OTHER_FAMILIES[model_type].split(":")
        return getattr(importlib.import_module(module), loader)(directory, data)
    if isinstance(data, dict) and model_type not in SUPPORTED:
        raise ModelFormatError(f"{config_file}: unsupported model_type {model_type!r} "
                               f"(supported: {', '.join(sorted([*SUPPORTED, *OTHER_FAMILIES]))})")
    cfg = config_from_hf(data, str(config_file))
    family = FAMILIES[data["model_type"]]
    plan = plan_weights(directory, cfg, family)
    tokenizer, prefix_ids, eos_ids = load_tokenizer(directory, data, cfg.vocab_size)
    with skip_init():  # load_model_tensors fills every parameter or refuses the file
        model = CausalLM(cfg)
    load_model_tensors(model, read_weights(plan, family), where=str(directory))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embeddings.embed.weight
    return HFModel(model.eval(), tokenizer, prefix_ids, eos_ids)


# ---- tokenizer ----------------------------------------------------------------------------------

def _token_string(value: Any, where: Path, key: str) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": "...", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise ModelFormatError(f"{where}: {key} must be a string or {{\"content\": ...}}, got {value!r}")
    return value


def _token_ids(source: dict, key: str, where: Path, vocab_size: int) -> list[int]:
    value = source.get(key)
    ids = [] if value is None else value if isinstance(value, list) else [value]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
            raise ModelFormatError(f"{where}: {key} {i!r} is not a token id (0..{vocab_size - 1})")
    return ids


def load_tokenizer(directory: Path, config: dict, vocab_size: int) -> tuple[Tokenizer, list[int], list[int]]:
    """tokenizer.json with the special tokens of tokenizer_config.json; the ids its post-processor puts
    before a text; and the EOS ids from generation_config.json (else config.json) and the tokenizer."""
    file = directory / "tokenizer.json"
    spm_file = next((f for f in (directory / "tokenizer.model", directory / "spiece.model") if f.is_file()), None)
    if not file.is_file() and spm_file is None:
        raise ModelFormatError(f"{file}: no such file (llmkit reads tokenizer.json, or a SentencePiece "
                               "tokenizer.model / spiece.model; a vocab.json alone is not supported)")
    tc_file = directory / "tokenizer_config.json"
    tc = read_json(tc_file) if tc_file.exists() else {}
    if not isinstance(tc, dict):
        raise ModelFormatError(f"{tc_file}: expected a JSON object")
    specials = {key: _token_string(tc.get(f"{key}_token"), tc_file, f"{key}_token") for key in ("bos", "eos", "pad")}
    if file.is_file():
        tokenizer = Tokenizer.load(file, bos_token=specials["bos"], eos_token=specials["eos"],
                                   pad_token=specials["pad"])
    else:  # SentencePiece only (older LLaMA-family and T5 directories)
        tokenizer = sentencepiece_tokenizer(spm_file, tc, tc_file, specials)
        file = spm_file
    for key, token in specials.items():
        if token is not None and tokenizer.token_to_id(token) is None:
            raise ModelFormatError(f"{tc_file}: {key}_token {token!r} is not in {file.name}")
    if tokenizer.vocab_size > vocab_size:
        raise ModelFormatError(f"{file}: {tokenizer.vocab_size} tokens, more than config.json's "
                               f"vocab_size {vocab_size}")
    gen_file = directory / "generation_config.json"
    source, where = (read_json(gen_file), gen_file) if gen_file.exists() else (config, directory / "config.json")
    if not isinstance(source, dict):
        raise ModelFormatError(f"{where}: expected a JSON object")
    for key in ("bos_token_id", "pad_token_id"):  # unused here, but an id past the vocabulary is a bad file (L6)
        _token_ids(source, key, where, vocab_size)
    eos = _token_ids(source, "eos_token_id", where, vocab_size) + [tokenizer.eos_id] * (tokenizer.eos_id is not None)
    return tokenizer, tokenizer.prefix_ids(), list(dict.fromkeys(eos))


def sentencepiece_tokenizer(spm_file: Path, tc: dict, tc_file: Path, specials: dict[str, str | None]) -> Tokenizer:
    """A Tokenizer from a SentencePiece model; like transformers' LlamaTokenizer, BOS is put before
    every text unless tokenizer_config.json sets add_bos_token to false."""
    from tokenizers import processors

    backend = sentencepiece_backend(read_sentencepiece(spm_file))
    vocab = backend.get_vocab(with_added_tokens=True)
    names = {key: specials[key] if specials[key] is not None else default
             for key, default in (("bos", "<s>"), ("eos", "</s>"), ("pad", None))}
    names = {key: name if name in vocab else None for key, name in names.items()}
    add_bos = tc.get("add_bos_token", True)
    if not isinstance(add_bos, bool):
        raise ModelFormatError(f"{tc_file}: add_bos_token must be true or false, got {add_bos!r}")
    if add_bos and names["bos"] is not None:
        bos = names["bos"]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, vocab[bos])])
    return Tokenizer(backend, bos_token=names["bos"], eos_token=names["eos"], pad_token=names["pad"])


def _tokenizer_json(tokenizer: Tokenizer, prefix_ids: Sequence[int] | None) -> str:
    """tokenizer.json, with a post-processor that adds `prefix_ids` when the tokenizer has none, so
    transformers' tokenizer gives the model what it was trained on (llmkit's own models see EOS first)."""
    if prefix_ids is None or list(prefix_ids) == tokenizer.prefix_ids():
        return tokenizer.backend.to_str(pretty=True)
    if tokenizer.backend.post_processor is not None:
        raise ModelFormatError("cannot export: the tokenizer's post-processor adds "
                               f"{tokenizer.prefix_ids()} but the model expects {list(prefix_ids)}")
    from tokenizers import Tokenizer as Backend, processors

    backend = Backend.from_str(tokenizer.backend.to_str())
    tokens = [tokenizer.id_to_token(i) for i in prefix_ids]
    backend.post_processor = processors.TemplateProcessing(
        single=[*tokens, "$A"], pair=[*tokens, "$A", "$B:1"],
        special_tokens=list(dict.fromkeys(zip(tokens, prefix_ids))))
    return backend.to_str(pretty=True)


# ---- export -------------------------------------------------------------------------------------

def save_hf(model: CausalLM, tokenizer: Tokenizer, out_dir: str | Path, *,
            prefix_ids: Sequence[int] | None = None, eos_ids: Sequence[int] | None = None,
            chat_template: str | None = None) -> Path:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json, generation_config.json) that transformers loads as the same model.
    `chat_template` is the model's own (LanguageModel.chat_template); see `export_chat_template`.

    It is written into a temporary sibling and renamed into place, so `out_dir` is complete or absent.
    """
    out, cfg = check_output_dir(out_dir, empty=True), model.cfg  # a new directory, never one written over
    dtype = next(model.parameters()).dtype
    if cfg.arch == "encoder":
        from llmkit.io.hf_encoder import encoder_hf_export

        config, tensors = encoder_hf_export(model, dtype=str(dtype).removeprefix("torch."))  # token / span heads too
        if config.get("pad_token_id", tokenizer.pad_id) != tokenizer.pad_id:  # RoBERTa's positions start past it
            raise ModelFormatError(f"cannot export to Hugging Face roberta: position_offset={cfg.position_offset} "
                                   f"needs the pad token at id {config['pad_token_id']}, the tokenizer has "
                                   f"{tokenizer.pad_id}")
    elif cfg.arch == "encoder-decoder":
        from llmkit.io.hf_seq2seq import config_to_hf_seq2seq, to_hf_tensors

        config = config_to_hf_seq2seq(cfg, dtype=str(dtype).removeprefix("torch."))
        tensors = {n: t.detach().cpu().contiguous() for n, t in to_hf_tensors(model_tensors(model), cfg).items()}
    elif cfg.body != "transformer":
        from llmkit.io.hf_recurrent import llmkit_to_hf_recurrent, recurrent_config_to_hf

        config = recurrent_config_to_hf(cfg, dtype=str(dtype).removeprefix("torch."))
        tensors = {n: t.detach().cpu().contiguous()
                   for n, t in llmkit_to_hf_recurrent(model_tensors(model), cfg).items()}
    elif cfg.norm_position == "post":  # the post-norm decoder: GPT-1
        from llmkit.io.hf_gpt1 import GPT1, gpt1_config_to_hf

        config = gpt1_config_to_hf(cfg, dtype=str(dtype).removeprefix("torch."))
        tensors = {n: t.detach().cpu().contiguous() for n, t in llmkit_to_hf(model_tensors(model), GPT1).items()}
    else:
        config = config_to_hf(cfg, dtype=str(dtype).removeprefix("torch."))
        family = FAMILIES[config["model_type"]]
        tensors = {n: t.detach().cpu().contiguous() for n, t in llmkit_to_hf(model_tensors(model), family).items()}
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelFormatError(f"cannot export: the tokenizer has {tokenizer.vocab_size} tokens, the model "
                               f"only {cfg.vocab_size}")
    eos = list(eos_ids) if eos_ids is not None else [tokenizer.eos_id] * (tokenizer.eos_id is not None)
    ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=eos[0] if len(eos) == 1 else eos or None,
               pad_token_id=tokenizer.pad_id)
    if cfg.arch == "encoder-decoder":  # generate() reads the decoder's first token from generation_config.json
        ids["decoder_start_token_id"] = cfg.decoder_start_token_id
    tokens = {f"{k}_token": getattr(tokenizer, f"{k}_token") for k in ("bos", "eos", "pad")}
    if cfg.arch == "encoder" and tokenizer.mask_id is not None:
        tokens["mask_token"] = tokenizer.mask_token  # fill-mask pipelines look for it
    if cfg.arch not in ("encoder", "encoder-decoder"):  # chat formats belong to decoder-only models
        tokens["chat_template"] = export_chat_template(tokenizer, chat_template)
    json_files = {
        "config.json": {**config, **ids},
        "generation_config.json": ids,
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                                  "clean_up_tokenization_spaces": False,
                                  **{k: v for k, v in tokens.items() if v is not None}},
    }
    if cfg.arch == "encoder-decoder":
        from llmkit.io.hf_seq2seq import seq2seq_tokenizer_json

        tok_json = seq2seq_tokenizer_json(tokenizer)
    else:
        tok_json = _tokenizer_json(tokenizer, prefix_ids)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        fsync_path(tmp / "model.safetensors")
        write_synced(tmp / "tokenizer.json", tok_json.encode("utf-8"))
        for name, obj in json_files.items():
            write_synced(tmp / name, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        fsync_path(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory portably
        os.rename(tmp, out)
        fsync_path(out.parent)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())
        raise CheckpointError(f"{out}: cannot write ({reason})") from exc
    return out


def export_chat_template(tokenizer: Tokenizer, template: str | None) -> str | None:
    """The template `transformers` should render chats with: the model's own; else, for a tokenizer
    with llmkit's role tokens, llmkit's default template — what `llmkit chat` renders for that model.
    None (nothing written) for a model with neither: it has no chat format to export."""
    if template is not None:
        return template
    roles = [SPECIAL_TOKENS[name] for name in ("system", "user", "assistant", "end")]
    return DEFAULT_CHAT_TEMPLATE if all(tokenizer.token_to_id(t) is not None for t in roles) else None


def _read_template(file: Path) -> str:
    """A chat_template.jinja: a regular file of UTF-8 text (a FIFO would block; size is capped)."""
    try:
        return read_regular_bytes(file, error=ModelFormatError, what="chat template").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelFormatError(f"{file}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def hf_chat_template(directory: str | Path) -> str | None:
    """The model's chat template: `chat_template.jinja` (current transformers) or the
    `chat_template` of tokenizer_config.json (a string, or a list of named templates: "default")."""
    directory = Path(directory)
    template = None
    if (directory / "chat_template.jinja").exists():
        template = _read_template(directory / "chat_template.jinja")
    elif (directory / "tokenizer_config.json").exists():
        data = read_json(directory / "tokenizer_config.json")
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
    if template == DEFAULT_CHAT_TEMPLATE:
        return None  # an llmkit export of a model without its own template: it loads back as it was
    return template if isinstance(template, str) else None
