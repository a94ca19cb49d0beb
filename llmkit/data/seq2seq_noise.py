"""Denoising objectives for encoder-decoder pretraining: T5 span corruption and BART text infilling.

T5 (Raffel et al., arXiv 1910.10683, §3.1.4; t5.data.preprocessors.random_spans_noise_mask): 15% of
the tokens, in spans of mean length 3, are cut out; each span becomes one sentinel in the input and
the target lists `sentinel_i span_i` for every span. The number and lengths of spans depend only on
the length, so a raw window of fixed length always corrupts to fixed input/target lengths.

BART (Lewis et al., arXiv 1910.13461, §2.2): sentence permutation, then text infilling: span lengths
drawn from Poisson(λ=3) until 30% of the tokens are covered; each span becomes ONE mask token (a
zero-length span inserts a mask), so the model must also infer how many tokens are missing. The
target is the original text. Masking is per token here (fairseq masks whole words).

Every function takes a numpy Generator, so a batch is a pure function of its seed (exact resume).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from llmkit.errors import ConfigError

# T5's sentinels are tokens added to the tokenizer after its whole vocabulary, as BART's (and BERT's)
# mask is, so the ids of existing tokenizers never move; T5 puts them at the top of its vocabulary too.
NUM_SENTINELS = 100
SENTINEL_TOKENS = tuple(f"<|sentinel_{i}|>" for i in range(NUM_SENTINELS))


# ---- T5 span corruption -----------------------------------------------------------------------

def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens, as T5 rounds them."""
    length = max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    return num_noise, num_spans


def corrupted_lengths(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """Lengths of the (input, target) that span corruption makes from `length` tokens, EOS included."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def raw_length_for(max_len: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> int:
    """The longest raw window whose corrupted input AND target both fit in `max_len` tokens."""
    if max_len < 4:
        raise ConfigError(f"span corruption needs a context of at least 4 tokens, got {max_len}")
    length = 2
    while max(corrupted_lengths(length + 1, noise_density, mean_span_length)) <= max_len:
        length += 1
    return length


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random split of `num_items` into `num_segments` parts, each at least 1."""
    first_in_segment = np.zeros(num_items, dtype=np.int64)
    first_in_segment[1 + rng.choice(num_items - 1, num_segments - 1, replace=False)] = 1
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def span_noise_mask(length: int, rng: np.random.Generator, *, noise_density: float = 0.15,
                    mean_span_length: float = 3.0) -> np.ndarray:
    """Boolean mask, True on noise: alternating non-noise/noise spans, starting with non-noise."""
    padded = max(length, 2)  # as T5: a 1-token window is masked as 2 tokens, then cut (no noise left)
    num_noise, num_spans = span_counts(padded, noise_density, mean_span_length)
    num_spans = min(num_spans, padded - num_noise)  # a tiny window: one kept token before each span
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    keep_lengths = _random_segmentation(padded - num_noise, num_spans, rng)
    spans = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # keep, noise, keep, noise, …
    return np.repeat(np.arange(len(spans)) % 2 == 1, spans)[:length]


def span_corrupt(tokens: Sequence[int], sentinel_ids: Sequence[int], rng: np.random.Generator, *,
                 noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[list[int], list[int]]:
    """T5's (input, target) from `tokens` (no EOS added): each noise span becomes sentinel i in the
    input; the target is `sentinel_0 span_0 sentinel_1 span_1 …`."""
    mask = span_noise_mask(len(tokens), rng, noise_density=noise_density, mean_span_length=mean_span_length)
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, (token, noisy) in enumerate(zip(tokens, mask.tolist())):
        starts_span = noisy and (i == 0 or not mask[i - 1])
        if starts_span:
            span += 1
            if span >= len(sentinel_ids):
                raise ConfigError(f"span corruption of {len(tokens)} tokens needs more than "
                                  f"{len(sentinel_ids)} sentinel tokens; use a shorter --seq-len")
            inputs.append(sentinel_ids[span])
            targets.append(sentinel_ids[span])
        (targets if noisy else inputs).append(int(token))
    return inputs, targets


def reassemble_spans(inputs: Sequence[int], targets: Sequence[int], sentinel_ids: Sequence[int]) -> list[int]:
    """Undo span_corrupt: put each target span back where its sentinel stands in the input."""
    sentinel_at = {s: i for i, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets:
        if token in sentinel_at:
            current = spans.setdefault(sentinel_at[token], [])
        elif current is not None:
            current.append(token)
    out: list[int] = []
    for token in inputs:
        out.extend(spans.get(sentinel_at[token], []) if token in sentinel_at else [token])
    return out


# ---- BART text infilling and sentence permutation ----------------------------------------------

def _poisson_spans(num_to_mask: int, poisson_lambda: float, rng: np.random.Generator) -> np.ndarray:
    """Span lengths drawn from Poisson(λ) until they cover num_to_mask tokens; the last is trimmed."""
    lengths: list[int] = []
    total = 0
    while total < num_to_mask:
        lengths.append(int(rng.poisson(poisson_lambda)))
        total += lengths[-1]
    lengths[-1] -= total - num_to_mask
    return np.array(lengths, dtype=np.int64)


def text_infill(tokens: Sequence[int], mask_id: int, rng: np.random.Generator, *, mask_ratio: float = 0.3,
                poisson_lambda: float = 3.0) -> list[int]:
    """BART's text infilling: ceil(mask_ratio·n) tokens, in Poisson-length spans, each span replaced
    by one mask token; zero-length spans insert a mask. Spans never touch, so the masked count is exact."""
    if not 0 < mask_ratio < 0.5:
        raise ConfigError(f"mask_ratio must be in (0, 0.5), got {mask_ratio}")
    n = len(tokens)
    num_to_mask = math.ceil(n * mask_ratio)
    if num_to_mask == 0:
        return list(tokens)
    lengths = _poisson_spans(num_to_mask, poisson_lambda, rng)
    inserts, spans = int((lengths == 0).sum()), lengths[lengths > 0]
    rng.shuffle(spans)
    kept = n - num_to_mask
    # Gaps of kept tokens between spans: the inner ones at least 1 so neighbouring spans stay apart.
    if len(spans) - 1 > kept:  # (only for very short inputs) merge the surplus spans into the last one
        spans = np.append(spans[:kept], spans[kept:].sum())
    k = len(spans)
    free = kept - (k - 1)
    cuts = np.sort(rng.choice(free + k, k, replace=False))
    gaps = np.diff(np.concatenate([[-1], cuts, [free + k]])) - 1
    gaps[1:-1] += 1
    out: list[int] = []
    pos = 0
    for gap, span in zip(gaps[:-1].tolist(), spans.tolist()):
        out.extend(int(t) for t in tokens[pos:pos + gap])
        out.append(mask_id)
        pos += gap + span
    out.extend(int(t) for t in tokens[pos:])
    for _ in range(inserts):
        out.insert(int(rng.integers(0, len(out) + 1)), mask_id)
    return out


def permute_sentences(tokens: Sequence[int], ends_sentence: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Shuffle the sentences of `tokens`; a sentence ends after a token where ends_sentence[id] is True."""
    sentences: list[list[int]] = [[]]
    for token in tokens:
        sentences[-1].append(int(token))
        if ends_sentence[token]:
            sentences.append([])
    sentences = [s for s in sentences if s]
    order = rng.permutation(len(sentences))
    return [t for i in order.tolist() for t in sentences[i]]


def sentence_end_table(decoded_tokens: Sequence[str]) -> np.ndarray:
    """ends_sentence[id]: the token's text ends a sentence (., !, ? or a newline at its end)."""
    return np.array([t.rstrip(" \t").endswith((".", "!", "?", "\n")) for t in decoded_tokens], dtype=bool)


def bart_noise(tokens: Sequence[int], mask_id: int, ends_sentence: np.ndarray, rng: np.random.Generator, *,
               mask_ratio: float = 0.3, poisson_lambda: float = 3.0, permute: bool = True) -> list[int]:
    """BART's pretraining input: sentence permutation, then text infilling (the target is `tokens`)."""
    shuffled = permute_sentences(tokens, ends_sentence, rng) if permute else list(tokens)
    return text_infill(shuffled, mask_id, rng, mask_ratio=mask_ratio, poisson_lambda=poisson_lambda)
