"""The tokenizer stored in a GGUF file's metadata, rebuilt as a `tokenizers` byte-level BPE.

A GGUF has no tokenizer.json: it lists the vocabulary (`tokenizer.ggml.tokens`, already spelled in
GPT-2's byte alphabet), the merges, a type per token (3 = control, 4 = user-defined), the special
ids, and names its pre-tokenizer family (`tokenizer.ggml.pre`). The split rules are llama.cpp's for
that family (`llama-vocab.cpp`), taken from a fixed table here, so a file can never inject a
regular expression (RELIABILITY L6). Every id and string is checked before the vocabulary is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from llmkit.errors import ModelFormatError
from llmkit.tokenizer import Tokenizer

MAX_TOKEN_BYTES = 65536
CONTROL, USER_DEFINED = 3, 4
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # llama.cpp splits off every numeral (\p{N}) first, then applies GPT-2's regex: tokenizers' Digits
    # (char::is_numeric, the same class) + ByteLevel. transformers' GGUF converter omits the first step.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split(pattern: str) -> Any:
    return lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    "default": _gpt2, "gpt2": _gpt2,
    "smollm": _digits_then_gpt2, "starcoder": _digits_then_gpt2, "refact": _digits_then_gpt2,
    "codeshell": _digits_then_gpt2,
    "llama-bpe": _split(_LLAMA3), "llama3": _split(_LLAMA3), "llama-v3": _split(_LLAMA3), "smaug-bpe": _split(_LLAMA3),
    "qwen2": _split(_QWEN2), "deepseek-r1-qwen": _split(_QWEN2),
}
# llama.cpp's LLAMA3 family: a piece that is a whole vocabulary token is taken as is (tiktoken's rule,
# `ignore_merges` in tokenizers), and BOS is added unless the file says otherwise.
LLAMA3_FAMILY = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
SPECIAL_IDS = ("bos", "eos", "padding", "unknown", "eot", "eom")


@dataclass(frozen=True)
class GGUFTokenizer:
    tokenizer: Tokenizer
    prefix_ids: list[int]
    eos_ids: list[int]
    chat_template: str | None


def _fail(where: str, what: str) -> None:
    raise ModelFormatError(f"{where}: {what}")


def _strings(meta: dict[str, Any], key: str, where: str, *, required: bool = True) -> list[str] | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        _fail(where, f"metadata key {key!r} must be a list of strings")
    return value


def _special_id(meta: dict[str, Any], name: str, n_tokens: int, where: str) -> int | None:
    key = f"tokenizer.ggml.{name}_token_id"
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
        _fail(where, f"{key}={value!r} is not a token id (0..{n_tokens - 1})")
    return value


def _flag(meta: dict[str, Any], key: str, where: str, *, default: bool) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, bool):
        _fail(where, f"metadata key {key!r} must be a bool, got {value!r}")
    return value


def tokenizer_from_gguf(meta: dict[str, Any], where: str) -> GGUFTokenizer:
    """Build the tokenizer a GGUF's metadata describes (`tokenizer.ggml.model` "gpt2": byte-level BPE)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        _fail(where, f"tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2', byte-level BPE; "
              "SentencePiece 'llama' vocabularies are not yet)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        _fail(where, f"tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens = _strings(meta, "tokenizer.ggml.tokens", where)
    merges = _strings(meta, "tokenizer.ggml.merges", where)
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and (not isinstance(types, list) or len(types) != len(tokens)
                              or not all(isinstance(t, int) and not isinstance(t, bool) for t in types)):
        _fail(where, f"tokenizer.ggml.token_type must list one integer per token ({len(tokens)})")
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if not token or len(token.encode("utf-8")) > MAX_TOKEN_BYTES:
            _fail(where, f"token {i} is empty or longer than {MAX_TOKEN_BYTES} bytes")
        if vocab.setdefault(token, i) != i:
            _fail(where, f"token {i} {token[:40]!r} repeats token {vocab[token]}")
    pairs = []
    for i, merge in enumerate(merges):
        pair = tuple(merge.split(" "))
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            _fail(where, f"merge {i} {merge[:80]!r} is not two vocabulary tokens whose join is one")
        pairs.append(pair)
    ids = {name: _special_id(meta, name, len(tokens), where) for name in SPECIAL_IDS}
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                                  ignore_merges=pre in LLAMA3_FAMILY))
    except Exception as exc:  # the Rust side raises a bare Exception
        _fail(where, f"cannot build the BPE tokenizer ({' '.join(str(exc).split())})")
    backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) and user-defined ones (<think>) are matched whole in
    # the text, as llama.cpp does.
    control = ({i for i, t in enumerate(types) if t == CONTROL} if types is not None
               else {i for i in ids.values() if i is not None})  # no types: at least the special ids
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(control)])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types or ()) if t == USER_DEFINED and i not in control])
    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", where, default=pre in LLAMA3_FAMILY)
    prefix = [ids["bos"]] if add_bos and ids["bos"] is not None else []
    if prefix:  # so that Tokenizer.prefix_ids() and an exported tokenizer.json agree with the file
        bos = tokens[prefix[0]]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, prefix[0])])
    name = {key: tokens[i] if i is not None else None for key, i in ids.items()}
    tokenizer = Tokenizer(backend, bos_token=name["bos"], eos_token=name["eos"], pad_token=name["padding"])
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        _fail(where, "metadata key 'tokenizer.chat_template' must be a string")
    eos = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    return GGUFTokenizer(tokenizer, prefix, list(dict.fromkeys(eos)), template)
