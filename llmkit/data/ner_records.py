"""JSONL records for token classification: `{"tokens": [word, ...], "tags": [tag, ...]}`, read strictly.

One record per line (llmkit.data.records.iter_jsonl: a regular UTF-8 file, streamed, bad JSON an
error naming file:line). Each record is a sentence already split into words and one BIO tag per
word (`O`, `B-TYPE`, `I-TYPE`, as CoNLL-2003 writes them). A missing or empty word list, a word
that is not a non-empty string without whitespace, tags of another length, or a tag that is not
BIO is a DatasetError naming the file and line, as is (with a fixed label set) an unknown tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from llmkit.errors import DatasetError
from llmkit.training.ner_metrics import split_tag

MAX_WORDS = 4096  # a "sentence" longer than this is a whole document pasted into one record


@dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]
    where: str  # "file:line"


def read_tagged(path: str | Path, labels: Sequence[str] | None = None) -> list[TaggedSentence]:
    from llmkit.data.records import iter_jsonl

    out = []
    for where, obj in iter_jsonl(path):
        words, tags = obj.get("tokens"), obj.get("tags")
        if not isinstance(words, list) or not words:
            raise DatasetError(f"{where}: field 'tokens' must be a non-empty list of words"
                               + ("" if "tokens" in obj else " (missing)"))
        if len(words) > MAX_WORDS:
            raise DatasetError(f"{where}: {len(words)} words, more than {MAX_WORDS} in one record")
        for i, word in enumerate(words):
            if not isinstance(word, str) or not word or any(c.isspace() for c in word):
                raise DatasetError(f"{where}: tokens[{i}] must be a non-empty string without whitespace, "
                                   f"got {word!r:.60}")
        if not isinstance(tags, list):
            raise DatasetError(f"{where}: field 'tags' must be a list of BIO tags"
                               + ("" if "tags" in obj else " (missing)"))
        if len(tags) != len(words):
            raise DatasetError(f"{where}: {len(tags)} tags for {len(words)} tokens (one tag per token)")
        for i, tag in enumerate(tags):
            if not isinstance(tag, str):
                raise DatasetError(f"{where}: tags[{i}] must be a string, got {tag!r:.60}")
            try:
                split_tag(tag)
            except ValueError as exc:
                raise DatasetError(f"{where}: tags[{i}]: {exc}") from None
            if labels is not None and tag not in labels:
                raise DatasetError(f"{where}: tags[{i}] {tag!r} is not one of the labels ({', '.join(labels)})")
        out.append(TaggedSentence(tuple(words), tuple(tags), where))
    if not out:
        raise DatasetError(f"{path}: no records")
    return out


def tag_set(sentences: Sequence[TaggedSentence]) -> list[str]:
    """The labels of a data set in a stable order: O first, then per type B- before I- (types sorted);
    a type seen only as I- still gets its B- (a model must be able to open an entity)."""
    kinds = sorted({split_tag(t)[1] for s in sentences for t in s.tags} - {""})
    return ["O", *(f"{p}-{k}" for k in kinds for p in ("B", "I"))]
