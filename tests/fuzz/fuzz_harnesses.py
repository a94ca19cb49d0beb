"""Mutation fuzzing of llmkit's parsers of untrusted input (RELIABILITY.md L10), without extra tools.

Each harness has seed inputs (valid files, and the L3/L4 corruption corpora) and a target that parses
one input. The fuzzer mutates seeds with a seeded RNG (byte flips, interesting integers, splices,
truncations, duplicated chunks), runs the target, and records a finding when the target raises
anything outside the harness's allowed error types, or takes longer than the time limit. A finding
keeps the input bytes, so it can be saved and turned into a named regression test.

Run long: `.venv/bin/python tests/fuzz/run_fuzz.py --seconds 3600 [harness ...]`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))  # gguf_tiny's writer
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fuzz_models, when imported from elsewhere

import fuzz_models  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402

INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]


def mutate(data: bytes, rng: random.Random, pool: list[bytes], tokens: list[bytes] = ()) -> bytes:
    """One to four random edits of `data`; with `tokens` (a dictionary of format fragments, as AFL's
    dictionaries are), some edits insert or overwrite with one of them."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(9 if tokens else 7)
        if kind >= 7:  # a dictionary token, inserted (7) or written over what is there (8)
            token = rng.choice(tokens)
            at = rng.randrange(len(buf) + 1)
            buf[at:at + (len(token) if kind == 8 else 0)] = token
            continue
        at = rng.randrange(len(buf) + 1)
        if kind == 0 and buf:  # flip bits of one byte
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1 and buf:  # a random byte
            buf[min(at, len(buf) - 1)] = rng.randrange(256)
        elif kind == 2:  # an interesting little-endian integer (lengths, counts, offsets, type ids)
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(INTERESTING) & ((1 << 8 * width) - 1)
            buf[at:at + width] = value.to_bytes(width, "little")
        elif kind == 3:  # truncate
            del buf[at:]
        elif kind == 4 and buf:  # delete a chunk
            del buf[at:at + rng.randint(1, 64)]
        elif kind == 5 and buf:  # duplicate a chunk
            start = rng.randrange(len(buf))
            buf[at:at] = buf[start:start + rng.randint(1, 64)]
        else:  # splice in part of another seed
            other = rng.choice(pool)
            start = rng.randrange(len(other) + 1)
            buf[at:at + rng.randint(0, 64)] = other[start:start + rng.randint(1, 64)]
    return bytes(buf)


@dataclass
class Finding:
    harness: str
    data: bytes
    problem: str


@dataclass
class Harness:
    name: str
    seeds: Callable[[Path], list[bytes]]
    target: Callable[[bytes, Path], object]  # parse one input (written under the given scratch dir)
    allowed: tuple[type[BaseException], ...] = (LlmkitError,)
    time_limit: float = 1.0
    tokens: list[bytes] = field(default_factory=list)  # dictionary for mutate()


@dataclass
class Report:
    runs: int = 0
    rejected: int = 0
    accepted: int = 0
    findings: list[Finding] = field(default_factory=list)


def fuzz(harness: Harness, *, seconds: float, seed: int = 0, max_findings: int = 5) -> Report:
    """Mutate and run for `seconds`; every seed input is run once first, unmutated."""
    report = Report()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{harness.name}-") as scratch:
        scratch = Path(scratch)
        seeds = harness.seeds(scratch)
        queue = list(seeds)
        try:  # warm-up, untimed: the first call imports the parser's modules
            harness.target(seeds[0], scratch)
        except Exception:  # noqa: BLE001 - the timed loop below judges every input, this one too
            pass
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and len(report.findings) < max_findings:
            data = queue.pop() if queue else mutate(rng.choice(seeds), rng, seeds, harness.tokens)
            start = time.monotonic()
            try:
                harness.target(data, scratch)
                report.accepted += 1
            except harness.allowed as exc:
                report.rejected += 1
                if "\n" in str(exc):
                    report.findings.append(Finding(harness.name, data, f"multi-line error: {exc!r}"))
            except Exception as exc:  # noqa: BLE001 - anything else is what fuzzing looks for
                report.findings.append(Finding(harness.name, data, f"{type(exc).__name__}: {exc}"[:300]))
            elapsed = time.monotonic() - start
            if elapsed > harness.time_limit:
                report.findings.append(Finding(harness.name, data, f"took {elapsed:.2f} s"))
            report.runs += 1
    return report


# ---- harnesses -----------------------------------------------------------------------------------

def _safetensors_seeds(_: Path) -> list[bytes]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))
    from test_safetensors_corpus import CORPUS, blob

    return [blob()] + [v for v in CORPUS.values() if len(v) < 200_000]


def _safetensors_target(data: bytes, scratch: Path) -> object:
    from llmkit.io.checkpoint import load_tensors

    path = scratch / "model.safetensors"
    path.write_bytes(data)
    return load_tensors(path)


def _gguf_seeds(scratch: Path) -> list[bytes]:
    from gguf import GGMLQuantizationType as Q
    from gguf_tiny import write_gguf

    seeds = []
    for i, (arch, qtype) in enumerate((("llama", Q.F32), ("llama", Q.Q8_0), ("qwen2", Q.F16), ("gpt2", Q.Q4_1))):
        path = scratch / f"seed{i}.gguf"
        write_gguf(path, arch=arch, qtype=qtype, d=32, heads=2, kv_heads=1 if arch != "gpt2" else 2, ff=64,
                   context=32, tied=arch != "qwen2")
        seeds.append(path.read_bytes())
    return seeds


def _gguf_target(data: bytes, scratch: Path) -> object:
    from llmkit.io.gguf import load_gguf

    path = scratch / "model.gguf"
    path.write_bytes(data)
    return load_gguf(path)


def _tokenizer_seeds(_: Path) -> list[bytes]:
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello world, the tokenizer reads bytes", "def f(x):\n    return x + 1\n"] * 4,
                          vocab_size=300, min_frequency=1)
    text = tok.backend.to_str()
    return [text.encode(), json.dumps(json.loads(text), indent=1).encode()]


def _tokenizer_target(data: bytes, scratch: Path) -> object:
    from llmkit.tokenizer import Tokenizer

    path = scratch / "tokenizer.json"
    path.write_bytes(data)
    tok = Tokenizer.load(path)
    return tok.decode(tok.encode("héllo wörld 🙂"))


TEMPLATE_SEEDS = [
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "{{ bos_token }}{% for m in messages %}{{ m.role | upper }}: {{ m.content | trim }}\n{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{{ loop.index }}{% endfor %}"
    "{{ ns.n }}{{ raise_exception('no') if messages | length > 9 }}",
    "{% for i in range(3) %}{{ messages[0]['content'] * 2 }}{% endfor %}{{ 'x' | join(['a', 'b']) }}",
    "{{ ().__class__ }}{{ messages.__len__() }}{% macro f(x) %}{{ f(x) }}{% endmacro %}",
]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi {{ there }}"},
            {"role": "assistant", "content": "hello"}]


def _template_seeds(_: Path) -> list[bytes]:
    return [t.encode() for t in TEMPLATE_SEEDS]


def _template_target(data: bytes, _: Path) -> object:
    from llmkit.tokenizer.chat import render_chat

    return render_chat(data.decode("utf-8", errors="replace"), MESSAGES, bos_token="<s>", eos_token="</s>")


def _sentencepiece_seeds(scratch: Path) -> list[bytes]:
    import sentencepiece as spm

    text = scratch / "text.txt"
    text.write_text("hello world, the tokenizer reads text\n" * 20 + "naïve café 東京 🙂\n", encoding="utf-8")
    seeds = []
    for kind in ("bpe", "unigram"):
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(scratch / kind), vocab_size=300,
                                       hard_vocab_limit=False, model_type=kind, byte_fallback=True, minloglevel=2)
        seeds.append((scratch / f"{kind}.model").read_bytes())
    return seeds


def _sentencepiece_target(data: bytes, scratch: Path) -> object:
    from llmkit.tokenizer.sentencepiece import read_sentencepiece, sentencepiece_backend

    path = scratch / "tokenizer.model"
    path.write_bytes(data)
    return sentencepiece_backend(read_sentencepiece(path)).encode("héllo wörld 🙂").ids


# ---- JSON and JSONL readers (safe_json, records, checkpoint/HF JSON files) -------------------------

JSON_TOKENS = [b"[" * 200, b'{"a":' * 150, b"[" * 127, b"9" * 5000, b"-" + b"1" * 4301, b"1e999999", b"NaN",
               b"-Infinity", b'"\\ud800"', b'"\\udc00\\ud800"', b"\\ud83d", b"\\udfff", b"\\u0000", b'"',
               b"\\", b"\x00", b"\xff", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"\xff\xfe", b"\r\n", b"\n", b"\n\n",
               b"\xe2\x80\xa8", b"{}", b"[]", b"null", b"true", b'""', b",", b":", b'{"messages": []}',
               b'"role": "assistant"', b'"content": ', b'"\\n"', b" " * 70]


def _records_seeds(_: Path) -> list[bytes]:
    lines = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Name a colour", "output": "blue", "system": "be brief"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "héllo 🙂"},
                      {"role": "assistant", "content": "hi"}]},
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "say hi"},
        {"source": "one two", "target": "1 2"},
    ]
    jsonl = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines).encode() + b"\n"
    return [jsonl, b"\xef\xbb\xbf" + jsonl.replace(b"\n", b"\r\n"), json.dumps(lines[2]).encode(),
            b'{"instruction": "\\ud83d\\ude00 ok", "output": "\\u00e9"}\n', b"\n  \n" + jsonl[:40]]


def _records_target(data: bytes, scratch: Path) -> object:
    from llmkit.data.records import read_preference_pairs, read_prompts, read_sft_records
    from llmkit.data.seq2seq_records import read_seq2seq_records

    path = scratch / "data.jsonl"
    path.write_bytes(data)
    kept = []
    for read in (read_sft_records, read_preference_pairs, read_prompts, read_seq2seq_records):
        try:
            kept.append(read(path) if read is read_seq2seq_records else read(path, skip_bad_lines=2)[0])
        except LlmkitError:
            pass
    for text in _strings(kept):  # what tokenization will do with every accepted string
        text.encode("utf-8")  # a lone surrogate let through raises UnicodeEncodeError: a finding
    if not kept:
        raise LlmkitError("refused by every reader")  # counted as rejected
    return kept


def _strings(value: object) -> Iterator[str]:
    """Every string inside records (dataclasses), lists, tuples and dicts (keys too)."""
    if isinstance(value, str):
        yield value
    elif dataclasses.is_dataclass(value):
        yield from _strings(list(vars(value).values()))
    elif isinstance(value, dict):
        yield from _strings([*value.keys(), *value.values()])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def _json_file_seeds(_: Path) -> list[bytes]:
    config = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": True, "eos_token_id": [1, 2], "torch_dtype": "float32"}
    index = {"metadata": {"total_size": 1024}, "weight_map": {"model.embed_tokens.weight": "a.safetensors",
                                                              "lm_head.weight": "b.safetensors"}}
    return [json.dumps(config, indent=2).encode(), json.dumps(index).encode(),
            json.dumps({**config, "model_type": "gpt2", "n_embd": 32, "n_head": 2, "n_layer": 2}).encode(),
            b'{"bos_token": {"content": "<s>"}, "chat_template": "{{ messages }}"}']


def _json_file_target(data: bytes, scratch: Path) -> object:
    from llmkit.io.checkpoint import read_json
    from llmkit.io.hf_config import config_from_hf
    from llmkit.io.hf_weights import INDEX, weight_files

    (scratch / "config.json").write_bytes(data)
    (scratch / INDEX).write_bytes(data)
    results = []
    for step in (lambda: config_from_hf(read_json(scratch / "config.json"), "config.json"),
                 lambda: weight_files(scratch)):
        try:
            results.append(step())
        except LlmkitError:
            pass
    if not results:
        raise LlmkitError("refused by both readers")  # counted as rejected
    return results


HARNESSES = {h.name: h for h in (
    Harness("safetensors", _safetensors_seeds, _safetensors_target),
    Harness("gguf", _gguf_seeds, _gguf_target),
    Harness("tokenizer", _tokenizer_seeds, _tokenizer_target),
    Harness("sentencepiece", _sentencepiece_seeds, _sentencepiece_target),
    # the template sandbox has its own 2 s wall-clock budget; a render may use all of it
    Harness("chat_template", _template_seeds, _template_target, time_limit=2.5),
    Harness("jsonl_records", _records_seeds, _records_target, tokens=JSON_TOKENS),
    Harness("json_files", _json_file_seeds, _json_file_target, tokens=JSON_TOKENS),
    # generated templates that build large values in every way Jinja allows (fuzz_models.py); the render's
    # own deadline is 2 s of wall clock, the rest is margin for a loaded machine
    Harness("template_bombs", fuzz_models.template_seeds, fuzz_models.template_target, time_limit=3.0,
            tokens=fuzz_models.TEMPLATE_TOKENS),
    # tokenizer.json regexes: probes at load, then encoding (a panic must not escape as a BaseException);
    # Oniguruma gives up on a backtracking match after its retry limit, about 0.5 s of CPU
    Harness("tokenizer_regex", fuzz_models.tokenizer_seeds, fuzz_models.tokenizer_target, time_limit=5.0,
            tokens=fuzz_models.REGEX_TOKENS),
)}
