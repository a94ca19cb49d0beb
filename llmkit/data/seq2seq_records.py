"""JSONL records for sequence-to-sequence fine-tuning, read strictly, and their tokenization.

A record is `{"source": str, "target": str}`, or the instruction form `{"instruction", "input"?,
"output"}` (source = instruction, plus a blank line and the input when there is one; target =
output). Every problem is a DatasetError naming `file:line`: invalid JSON, a non-object line, a
missing or non-string field, an empty target, non-UTF-8 bytes (the line reader is shared with the
SFT records, llmkit.data.records.iter_jsonl). Texts longer than the model's context are truncated,
never refused, and counted: sources keep their first tokens, targets too, and both keep their EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llmkit.data.records import iter_jsonl
from llmkit.errors import DatasetError
from llmkit.tokenizer import Tokenizer


@dataclass(frozen=True)
class Seq2SeqExample:
    source: str
    target: str
    where: str  # "file:line"


@dataclass
class TokenizedPairs:
    pairs: list[tuple[list[int], list[int]]]
    truncated_sources: int = 0
    truncated_targets: int = 0


def _text(obj: dict, key: str, where: str) -> str:
    if key not in obj:
        raise DatasetError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def example_from(obj: dict, where: str) -> Seq2SeqExample:
    """One record in either form (see the module docstring)."""
    if "source" in obj or "target" in obj:
        source, target, target_key = _text(obj, "source", where), _text(obj, "target", where), "target"
    elif "instruction" in obj or "output" in obj:
        source, target, target_key = _text(obj, "instruction", where), _text(obj, "output", where), "output"
        extra = obj.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DatasetError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        if extra and extra.strip():
            source += "\n\n" + extra
    else:
        raise DatasetError(f"{where}: missing field 'source'/'target' (or 'instruction'/'output')")
    if not source.strip():
        raise DatasetError(f"{where}: the source is empty")
    if not target.strip():
        raise DatasetError(f"{where}: field {target_key!r} is empty (nothing to learn)")
    return Seq2SeqExample(source, target, where)


def read_seq2seq_records(path: str | Path) -> list[Seq2SeqExample]:
    """Every record of a JSONL file, all validated before training starts."""
    examples = [example_from(obj, where) for where, obj in iter_jsonl(path)]
    if not examples:
        raise DatasetError(f"{path}: no records (the file is empty or blank)")
    return examples


def tokenize_examples(examples: Sequence[Seq2SeqExample], tokenizer: Tokenizer, *, max_source_len: int,
                      max_target_len: int) -> TokenizedPairs:
    """Token ids of (source, target), encoded as generation encodes a prompt (llmkit's tokenizers:
    text + EOS; a Hugging Face tokenizer's own post-processor, e.g. T5's text </s>), each cut to its
    limit keeping the final EOS, and counted when cut."""
    from llmkit.inference.seq2seq_generate import source_ids

    if tokenizer.eos_id is None:
        raise DatasetError("the tokenizer has no end-of-sequence token to end sources and targets")
    out = TokenizedPairs([])
    if tokenizer.backend.post_processor is None:  # llmkit's own: text + EOS, encoded in one parallel batch
        sources, targets = ([ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(texts)] for texts in
                            ([e.source for e in examples], [e.target for e in examples]))
    else:
        sources = [source_ids(tokenizer, e.source) for e in examples]
        targets = [source_ids(tokenizer, e.target) for e in examples]
    for source, target in zip(sources, targets):
        if len(source) > max_source_len:
            source, out.truncated_sources = source[: max_source_len - 1] + source[-1:], out.truncated_sources + 1
        if len(target) > max_target_len:
            target, out.truncated_targets = target[: max_target_len - 1] + target[-1:], out.truncated_targets + 1
        out.pairs.append((source, target))
    return out
