"""Texts → encoder inputs that keep character offsets, and the predict side of the per-token heads:
`tag(text)` → entities, `answer(question, context)` → a span of the context.

Framing is the tokenizer's own post-processor (`[CLS] A [SEP]`, `[CLS] A [SEP] B [SEP]` for BERT,
`<s> A </s></s> B </s>` for RoBERTa); llmkit's tokenizers have none, so they get EOS before each
text, as their encoders saw it in pretraining (llmkit.inference.embed). Offsets are characters of
the caller's text whatever the tokenizer normalises (lower-casing, accents).

Words: a token belongs to the word that holds its last character (a byte-level token's leading
space lies between words); a word's label is read at its first token, as it was trained.
Raw text is split into words the way CoNLL data is: runs of letters and digits (with inner `-`
or `'`) and single punctuation marks.

Answers: a long context is cut into windows of at most `max_len` tokens (question included),
consecutive windows sharing `doc_stride` context tokens (transformers' meaning of stride). The
answer is the span of context tokens, at most `max_answer_len` long, with the highest start + end
logit over all windows (BERT's and transformers' rule); its `score` is the probability of that
start and end under its window's softmax over context tokens. SQuAD 2.0 models can answer "no
answer": the null score is the start + end logit of position 0 (the first, special token), the
lowest over the windows, and when it beats the best span's by more than the model's
`null_threshold` the answer is "" (BERT's run_squad and transformers' rule; a model trained on
v1.1 data has no threshold and always gives a span).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tokenizers import Encoding, Tokenizer as Backend, processors
from torch import Tensor

from llmkit.errors import ConfigError
from llmkit.models.token_heads import QUESTION_ANSWERING, TOKEN_CLASSIFICATION, head_of
from llmkit.runtime import model_device
from llmkit.tokenizer import Tokenizer
from llmkit.training.ner_metrics import entities

WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")
_FRAMING: "weakref.WeakKeyDictionary[Tokenizer, Backend]" = weakref.WeakKeyDictionary()


def framing(tokenizer: Tokenizer) -> Backend:
    """A copy of the tokenizer's backend that frames one text or a pair for an encoder (cached)."""
    backend = _FRAMING.get(tokenizer)
    if backend is None:
        backend = Backend.from_str(tokenizer.backend.to_str())
        if backend.post_processor is None:
            eos, eos_id = tokenizer.eos_token, tokenizer.eos_id
            if eos_id is None:
                raise ConfigError("the tokenizer has neither a post-processor nor an EOS token to frame inputs with")
            backend.post_processor = processors.TemplateProcessing(
                single=f"{eos} $A", pair=f"{eos} $A {eos} $B:1", special_tokens=[(eos, eos_id)])
        backend.no_padding()
        _FRAMING[tokenizer] = backend
    return backend


def encode_framed(backend: Backend, first: str, second: str | None = None, *, max_len: int,
                  stride: int = 0) -> list[Encoding]:
    """The framed encoding of a text (or pair) cut to `max_len` tokens; for a pair, every window of
    the second text (sharing `stride` tokens), else the first window only."""
    backend.enable_truncation(max_len, stride=stride, strategy="only_second" if second is not None else "longest_first")
    try:
        enc = backend.encode(first, second, add_special_tokens=True)
    except BaseException as exc:  # a Rust panic or a truncation the settings cannot satisfy
        raise ConfigError(f"cannot encode the text ({' '.join(str(exc).split())[:200]})") from None
    return [enc, *enc.overflowing] if second is not None else [enc]


# ---- words and their first tokens ------------------------------------------------------------------

def word_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in WORD.finditer(text)]


@dataclass
class WordTokens:
    ids: list[int]
    types: list[int]
    first_token: list[int | None]  # per word: the token its label is read at (None: cut off, or no tokens)
    truncated: bool


def encode_words(backend: Backend, text: str, spans: Sequence[tuple[int, int]], max_len: int) -> WordTokens:
    (enc,) = encode_framed(backend, text, max_len=max_len)
    owner = [-1] * len(text)
    for w, (s, e) in enumerate(spans):
        owner[s:e] = [w] * (e - s)
    first: list[int | None] = [None] * len(spans)
    for t, ((s, e), special) in enumerate(zip(enc.offsets, enc.special_tokens_mask)):
        if special or e <= s:
            continue
        w = owner[e - 1]
        if w >= 0 and first[w] is None:
            first[w] = t
    return WordTokens(enc.ids, enc.type_ids, first, bool(enc.overflowing))


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Right-padded (B, T) tensor of `rows`, and the mask of real tokens."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


@torch.inference_mode()
def predict_word_tags(model, tokenizer: Tokenizer, encoded: Sequence[WordTokens]) -> list[tuple[list[str], list[float]]]:
    """Per text: the label of every word (O where it has no token) and its probability."""
    device, out = model_device(model), []
    for start in range(0, len(encoded), 32):
        chunk = encoded[start:start + 32]
        ids, mask = pad_rows([e.ids for e in chunk], tokenizer.pad_id or 0)
        types, _ = pad_rows([e.types for e in chunk], 0)
        probs = model(ids.to(device), mask.to(device), types.to(device)).float().softmax(-1).cpu()
        best_p, best = probs.max(-1)
        for row, e in enumerate(chunk):
            tags = [model.labels[int(best[row, t])] if t is not None else "O" for t in e.first_token]
            scores = [float(best_p[row, t]) if t is not None else 1.0 for t in e.first_token]
            out.append((tags, scores))
    return out


def tag(model, tokenizer: Tokenizer, text: str) -> list[dict[str, Any]]:
    """The entities in `text`: [{"type", "text", "start", "end", "score"}] in order, `text[start:end]`
    being the entity and `score` the mean probability of its words' tags."""
    model = head_of(model, TOKEN_CLASSIFICATION, "tag()")
    spans = word_spans(text)
    if not spans:
        return []
    encoded = encode_words(framing(tokenizer), text, spans, model.cfg.max_seq_len)
    ((tags, scores),) = predict_word_tags(model, tokenizer, [encoded])
    return [{"type": kind, "text": text[spans[a][0]:spans[b][1]], "start": spans[a][0], "end": spans[b][1],
             "score": sum(scores[a:b + 1]) / (b - a + 1)} for kind, a, b in entities(tags)]


# ---- question answering ------------------------------------------------------------------------------

@dataclass
class Window:
    ids: list[int]
    types: list[int]
    offsets: list[tuple[int, int] | None]  # a context token's characters; None elsewhere


def qa_windows(backend: Backend, question: str, context: str, *, max_len: int, stride: int) -> list[Window]:
    """The framed (question, context-window) inputs covering all of `context`."""
    backend.no_truncation()
    n_question = len(backend.encode(question, add_special_tokens=False).ids)
    room = max_len - backend.num_special_tokens_to_add(True) - n_question
    if room <= stride:
        raise ConfigError(f"the question is {n_question} tokens: with max length {max_len} that leaves {max(room, 0)} "
                          f"for the context, which must be more than the doc stride ({stride})")
    windows = []
    for enc in encode_framed(backend, question, context, max_len=max_len, stride=stride):
        offsets = [o if seq == 1 else None for o, seq in zip(enc.offsets, enc.sequence_ids)]
        windows.append(Window(enc.ids, enc.type_ids, offsets))
    return windows


def qa_types(cfg, types: list[int]) -> list[int]:
    """The framing's token types (question 0, context 1), or all 0 for a model with one type (RoBERTa)."""
    return types if cfg.type_vocab_size >= 2 else [0] * len(types)


def qa_logits(model, tokenizer: Tokenizer, windows: Sequence[Window]) -> list[tuple[Tensor, Tensor]]:
    """(start, end) logits of every window, each (T_window,), float32 on the CPU."""
    device, out = model_device(model), []
    for start in range(0, len(windows), 32):
        chunk = windows[start:start + 32]
        ids, mask = pad_rows([w.ids for w in chunk], tokenizer.pad_id or 0)
        types, _ = pad_rows([qa_types(model.cfg, w.types) for w in chunk], 0)
        with torch.inference_mode():
            s, e = model(ids.to(device), mask.to(device), types.to(device))
        out.extend((s[i, :len(w.ids)].float().cpu(), e[i, :len(w.ids)].float().cpu()) for i, w in enumerate(chunk))
    return out


def abstains(null_margin: float, null_threshold: float | None) -> bool:
    """Whether the answer is "no answer": the null score beats the best span's by more than the threshold."""
    return null_threshold is not None and null_margin > null_threshold


def best_span(windows: Sequence[Window], logits: Sequence[tuple[Tensor, Tensor]], context: str,
              max_answer_len: int, null_threshold: float | None = None) -> dict[str, Any]:
    """The best answer over `windows` of one context: {"answer", "start", "end", "score",
    "null_margin"}, the margin being the null score minus the best span's (inf without a span).
    With a `null_threshold` the margin exceeds, the answer is "no answer": "" at 0..0, `score` the
    probability of the null start and end under its window's softmax over it and the context."""
    best: tuple[float, int, int, int] | None = None  # (logit sum, window, first token, last token)
    null, null_window = min((float(s[0] + e[0]), w) for w, (s, e) in enumerate(logits))
    for w, (window, (s_logits, e_logits)) in enumerate(zip(windows, logits)):
        is_context = torch.tensor([o is not None for o in window.offsets])
        n = len(window.offsets)
        first, last = torch.arange(n)[:, None], torch.arange(n)[None, :]
        valid = is_context[:, None] & is_context[None, :] & (last >= first) & (last - first < max_answer_len)
        if not bool(valid.any()):
            continue
        pair = (s_logits[:, None] + e_logits[None, :]).masked_fill(~valid, float("-inf"))
        flat = int(pair.argmax())
        if best is None or float(pair.view(-1)[flat]) > best[0]:
            best = (float(pair.view(-1)[flat]), w, flat // n, flat % n)
    margin = null - best[0] if best is not None else float("inf")
    if abstains(margin, null_threshold):
        s_logits, e_logits = logits[null_window]
        null_or_context = torch.tensor([t == 0 or o is not None for t, o in enumerate(windows[null_window].offsets)])
        p_null = (s_logits.masked_fill(~null_or_context, float("-inf")).softmax(-1)[0]
                  * e_logits.masked_fill(~null_or_context, float("-inf")).softmax(-1)[0])
        return {"answer": "", "start": 0, "end": 0, "score": float(p_null), "null_margin": margin}
    if best is None:
        return {"answer": "", "start": 0, "end": 0, "score": 0.0, "null_margin": margin}
    _, w, a, b = best
    window, (s_logits, e_logits) = windows[w], logits[w]
    is_context = torch.tensor([o is not None for o in window.offsets])
    p_start = s_logits.masked_fill(~is_context, float("-inf")).softmax(-1)[a]
    p_end = e_logits.masked_fill(~is_context, float("-inf")).softmax(-1)[b]
    start, end = window.offsets[a][0], window.offsets[b][1]
    text = context[start:end]
    start += len(text) - len(text.lstrip())  # a byte-level token's leading space is not part of the answer
    end -= len(text) - len(text.rstrip())
    return {"answer": context[start:end], "start": start, "end": end, "score": float(p_start * p_end),
            "null_margin": margin}


def answer(model, tokenizer: Tokenizer, question: str, context: str, *, max_answer_len: int | None = None,
           max_len: int | None = None, doc_stride: int | None = None,
           null_threshold: float | None = None) -> dict[str, Any]:
    """The span of `context` that answers `question`: {"answer", "start", "end", "score",
    "null_margin"}, or "" at 0..0 for "no answer" (see best_span). The settings default to those
    the model was trained with; `null_threshold=float("inf")` never abstains."""
    model = head_of(model, QUESTION_ANSWERING, "answer()")
    settings = model.settings
    max_len = min(max_len or settings["max_len"], model.cfg.max_seq_len)
    windows = qa_windows(framing(tokenizer), question, context, max_len=max_len,
                         stride=settings["doc_stride"] if doc_stride is None else doc_stride)
    threshold = settings.get("null_threshold") if null_threshold is None else null_threshold
    return best_span(windows, qa_logits(model, tokenizer, windows), context,
                     max_answer_len or settings["max_answer_len"], threshold)
