"""Encoder-decoder specifics (T5, BART): the encoder input of a text; the family's names for the shared
generation and beam search.

Sampling and greedy generation are the one loop of llmkit.inference.generate (`seq2seq_generate` is
`generate`): the encoder runs once over the source at prefill; the decoder starts from
`cfg.decoder_start_token_id` and adds one token per step, reading its own past keys and values and
the cross-attention keys/values computed at prefill. Sources of different lengths are right-padded
(T5 and BART tokenizers pad on the right; the encoder's mask hides the padding).
"""

from __future__ import annotations

from llmkit.inference.beam import beam_generate
from llmkit.inference.decoding_state import right_pad
from llmkit.inference.generate import generate, generate_stream

__all__ = ["right_pad", "seq2seq_beam_search", "seq2seq_generate", "seq2seq_generate_stream", "source_ids"]


def source_ids(tokenizer, text: str) -> list[int]:
    """The encoder input for `text`: what the tokenizer's post-processor makes of it (T5: text </s>;
    BART: <s> text </s>), or, for a tokenizer without one (llmkit's own), text + EOS, as
    llmkit's seq2seq training builds its sources."""
    with_specials = tokenizer.backend.encode(text, add_special_tokens=True).ids
    plain = tokenizer.encode(text)
    if with_specials != plain or tokenizer.eos_id is None:
        return with_specials
    return plain + [tokenizer.eos_id]


# One loop for every family: an encoder-decoder's generation is `generate_stream`'s (the decoding state
# runs the encoder at prefill and keeps the cross-attention keys/values per row).
seq2seq_generate_stream = generate_stream
seq2seq_generate = generate


# Beam search too is one implementation for every family (llmkit/inference/beam.py).
seq2seq_beam_search = beam_generate
