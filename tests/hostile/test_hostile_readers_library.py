"""The bounded readers in-process (llmkit.io.safe_json, llmkit.io.input_files, the JSONL and corpus
readers): hostile variants of each class, the exact edges of each bound, and streaming memory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from llmkit.data.records import iter_jsonl, read_preference_pairs, read_sft_records
from llmkit.errors import CheckpointError, ConfigError, DatasetError
from llmkit.io.input_files import iter_lines, open_regular, read_regular_bytes
from llmkit.io.safe_json import MAX_DEPTH, nesting_depth, parse_json, read_json


@pytest.fixture
def watchdog():
    """Fail, instead of hanging the suite, if a read blocks (a FIFO opened without O_NONBLOCK)."""
    def expired(*_):
        raise TimeoutError("blocked for 10 s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def refused(text: str | bytes, *needles: str, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        parse_json(text, where="f.jsonl:7", **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith("f.jsonl:7"), message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("text", [
    "[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 100_000, "[{" * 60_000, '{"x": ' + "[" * 200 + "1",
    "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1),
])
def test_deep_nesting_is_refused_before_json_runs(text):
    refused(text, f"nested deeper than {MAX_DEPTH} levels")


def test_nesting_at_the_bound_parses_and_brackets_inside_strings_do_not_count():
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, where="f") == eval("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    tricky = json.dumps({"s": "[" * 10_000 + '\\"{' * 500, "t": ["]]]", '"[[[']})  # escaped quotes too
    assert nesting_depth(tricky) == 2 and parse_json(tricky, where="f") == json.loads(tricky)


@pytest.mark.parametrize("number", ["9" * 4301, "-" + "1" * 5000, "1" * 100_000])
def test_integers_past_pythons_digit_limit_are_one_line_errors(number):
    refused(f'{{"n": {number}}}', "more than 4300 digits")
    assert parse_json("9" * 4300, where="f") == int("9" * 4300)  # the limit itself parses


@pytest.mark.parametrize("text, field", [
    ('{"a": "\\ud800"}', "a"), ('{"a": "x\\udfff"}', "a"), ('{"a": "\\udc00\\ud800"}', "a"),
    ('{"m": [{"c": "ok"}, {"c": "\\ud83d"}]}', "m[1].c"), ('{"\\ud800": 1}', "['\\ud800']"),
    ('{"a\\nb": {"k": "\\udbff"}}', "['a\\nb'].k"), ('"\\ud800"', "(top level)"),
])
def test_lone_surrogates_name_their_field_on_one_line(text, field):
    refused(text, f"field {field} holds a lone UTF-16 surrogate")


def test_surrogate_pairs_and_escaped_backslashes_are_text():
    assert parse_json('["\\ud83d\\ude00", "\\\\ud800"]', where="f") == ["😀", "\\ud800"]


def test_syntax_errors_name_line_and_column():
    refused('{"a": 1,}', "f.jsonl:7:9: invalid JSON", one_line=True)
    with pytest.raises(ConfigError, match=r"^cfg:3:3: invalid JSON \(Expecting ',' delimiter\): '1 x}'$"):
        parse_json('{\n"a":\n1 x}', where="cfg", error=ConfigError)
    refused(b'{"a": "\xff"}', "not UTF-8 text (invalid byte 0xff at offset 7)")


def test_a_hook_error_becomes_the_callers_error_class():
    def no_dupes(pairs):
        if len({k for k, _ in pairs}) < len(pairs):
            raise ValueError("key appears twice")
        return dict(pairs)
    with pytest.raises(CheckpointError, match="^idx: invalid JSON \\(key appears twice\\)$"):
        parse_json('{"a": 1, "a": 2}', where="idx", error=CheckpointError, object_pairs_hook=no_dupes)


def special_files(tmp_path: Path) -> dict[str, Path]:
    os.mkfifo(tmp_path / "fifo")
    return {"FIFO": tmp_path / "fifo", "directory": tmp_path, "character device": Path("/dev/zero")}


def test_non_regular_files_are_refused_without_blocking(tmp_path, watchdog):
    for kind, path in special_files(tmp_path).items():
        for read in (open_regular, read_regular_bytes, lambda p, **k: list(iter_lines(p, **k)),
                     lambda p, **k: read_json(p, **k)):
            with pytest.raises(ConfigError, match=f"^{path}: is (a|an) {kind}.*, not a regular"):
                read(path, error=ConfigError)
    with pytest.raises(DatasetError, match="no such file or directory"):
        open_regular(tmp_path / "missing")
    (tmp_path / "file").write_text("{}")
    with pytest.raises(DatasetError, match="cannot read file \\(Not a directory\\)"):
        open_regular(tmp_path / "file" / "below")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_an_unreadable_file_is_one_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("{}")
    path.chmod(0)
    with pytest.raises(ConfigError, match=f"^{path}: cannot read config file \\(Permission denied\\)$"):
        read_json(path, what="config file", error=ConfigError)


def test_a_link_to_a_fifo_is_refused_too(tmp_path, watchdog):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "config.json").symlink_to(tmp_path / "fifo")
    with pytest.raises(CheckpointError, match="FIFO"):
        read_json(tmp_path / "config.json", error=CheckpointError)


def test_whole_file_reads_stop_at_the_limit(tmp_path):
    path = tmp_path / "f.json"
    path.write_bytes(b"[" + b"0," * 50 + b"0]")
    assert read_regular_bytes(path, limit=path.stat().st_size) == path.read_bytes()
    with pytest.raises(DatasetError, match=f"{path.stat().st_size:,} bytes, over the 100-byte limit"):
        read_json(path, limit=100)


def test_whole_file_reads_allocate_what_the_file_holds_not_the_cap(tmp_path):
    """read(n) allocates n bytes up front: asking for the 1 GiB cap to read a small file failed
    with MemoryError under a 256 MiB address-space limit (a container, a shell's ulimit)."""
    path = tmp_path / "small.txt"
    path.write_text("hello\n" * 1000)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20)); "
            "from llmkit.io.input_files import read_regular_bytes; "
            "print(len(read_regular_bytes(sys.argv[1], limit=1 << 30)))")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "6000", run.stderr[-500:]


def test_lines_stream_with_a_per_line_cap(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"x" * 10 + b"\n" + b"y" * 11 + b"\n" + b"z" * 12)
    assert [n for n, _ in iter_lines(path, max_line_bytes=12)] == [1, 2, 3]  # the cap itself is allowed
    lines = iter_lines(path, max_line_bytes=11)
    assert next(lines) == (1, b"x" * 10) and next(lines) == (2, b"y" * 11)
    with pytest.raises(DatasetError, match=f"^{path}:3: line longer than 11 bytes$"):
        next(lines)


def test_jsonl_records_refuse_each_hostile_class_naming_line_and_field(tmp_path):
    good = json.dumps({"instruction": "a", "output": "b"})
    cases = {"[" * 100_000: "nested deeper", '{"instruction": ' + "7" * 5000 + "}": "4300 digits",
             '{"instruction": "a\\ud800", "output": "b"}': "field instruction holds a lone",
             '{"messages": [{"role": "user", "content": "\\udc00"}]}': "field messages[0].content holds a lone"}
    for line, needle in cases.items():
        path = tmp_path / "d.jsonl"
        path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
        with pytest.raises(DatasetError, match=f"^{path}:3: .*{re.escape(needle)}"):
            read_sft_records(path)
        records, stats = read_sft_records(path, skip_bad_lines=1)  # a bad line is skippable like any other
        assert len(records) == 1 and stats.skipped[0].startswith(f"{path}:3: ")
    pair = tmp_path / "p.jsonl"
    pair.write_text('{"prompt": "p", "chosen": "\\ud800\\udc00", "rejected": "\\udc00\\ud800"}\n')
    with pytest.raises(DatasetError, match="field rejected holds a lone"):
        read_preference_pairs(pair)


@pytest.mark.parametrize("shard", ["9" * 5000 + ".safetensors", "a\u0000b.safetensors"])
def test_a_shard_name_the_file_system_cannot_hold_is_one_line(tmp_path, shard):
    """Found by the json_files fuzzer: a 5,000-character shard name raised OSError (name too long)."""
    from llmkit.errors import ModelFormatError
    from llmkit.io.hf_weights import INDEX, weight_files

    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    with pytest.raises(ModelFormatError) as info:
        weight_files(tmp_path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


def test_jsonl_streams_in_memory_independent_of_file_size(tmp_path):
    """Python allocations while reading 200,000 records (~20 MB) stay under 1 MB: one line at a
    time. The records a caller keeps are its own memory; here none are kept."""
    path = tmp_path / "big.jsonl"
    row = json.dumps({"instruction": "x" * 40, "output": "y" * 40}) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(row for _ in range(200_000))
    tracemalloc.start()
    count = sum(1 for _ in iter_jsonl(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 200_000 and peak < 1 << 20, f"peak {peak:,} bytes for a {path.stat().st_size:,}-byte file"


def test_corpus_text_without_a_split_point_is_an_error_not_a_huge_encode(tmp_path):
    from llmkit.data.corpus import MAX_CHUNK_CHARS, tokenize_files
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.train(["ab ba abba"] * 20, vocab_size=270)
    path = tmp_path / "one_line.txt"
    run = "ab" * (MAX_CHUNK_CHARS // 2 + 8)
    path.write_text(run, encoding="utf-8")
    with pytest.raises(DatasetError, match=f"^{path}:1: the {MAX_CHUNK_CHARS:,} characters from this line on hold no"):
        tokenize_files(tok, [path], eos_id=None)
    path.write_text("ab ba\n" * 300_000 + run, encoding="utf-8")  # cut into 1 MB chunks up to the run
    with pytest.raises(DatasetError) as info:
        tokenize_files(tok, [path], eos_id=None)
    assert 100_000 < int(re.match(f"^{re.escape(str(path))}:(\\d+): ", str(info.value)).group(1)) <= 300_001
