"""Corpus loading and batching: text files → token stream → (x, y) batches."""

from llmkit.data.batches import TokenBatches, eval_batches
from llmkit.data.corpus import find_text_files, read_text_file, split_files, tokenize_files

__all__ = [
    "TokenBatches",
    "eval_batches",
    "find_text_files",
    "read_text_file",
    "split_files",
    "tokenize_files",
]
