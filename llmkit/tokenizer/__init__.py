"""Tokenizers: byte-level BPE trained and stored with the Hugging Face `tokenizers` library."""

from llmkit.tokenizer.bpe import SPECIAL_TOKENS, Tokenizer

__all__ = ["SPECIAL_TOKENS", "Tokenizer"]
