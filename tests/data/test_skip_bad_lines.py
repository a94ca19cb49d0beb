"""`skip_bad_lines=N` (`--skip-bad-lines N`, RELIABILITY D1): up to N bad lines of an SFT, preference or prompt
file are dropped and each one's file:line error is kept for the caller to print; the next bad line is the usual
one-line error, and file-level problems are never skipped."""

from __future__ import annotations

import json

import pytest

from llmkit.data.records import read_preference_pairs, read_prompts, read_sft_records
from llmkit.errors import ConfigError, DatasetError

GOOD_SFT = json.dumps({"instruction": "Add 2 and 3.", "output": "5"})
GOOD_PAIR = json.dumps({"prompt": "2+3?", "chosen": "5", "rejected": "6"})
GOOD_PROMPT = json.dumps({"prompt": "What is 2+3?"})


def write(tmp_path, body: bytes | str, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_bytes(body.encode("utf-8") if isinstance(body, str) else body)
    return path


def test_sft_bad_lines_within_the_budget_are_dropped_and_reported(tmp_path):
    path = write(tmp_path, f'{GOOD_SFT}\n{{"instruction": "a",\n\n{GOOD_SFT}\n{{"output": "b"}}\n{GOOD_SFT}\n')
    records, stats = read_sft_records(path, skip_bad_lines=2)
    assert [r.where for r in records] == [f"{path}:1", f"{path}:4", f"{path}:6"]
    assert stats.skipped == [f"{path}:2:21: invalid JSON (Expecting property name enclosed in double quotes): "
                             "'{\"instruction\": \"a\",'",
                             f"{path}:5: missing field 'instruction'"]
    assert stats.kept == 3 and stats.summary() == "3 records from 6 lines (dropped: 2 invalid)"


def test_one_bad_line_too_many_is_the_usual_error_naming_its_line(tmp_path):
    path = write(tmp_path, f'{GOOD_SFT}\n[1]\n{GOOD_SFT}\n{{oops}}\n')
    with pytest.raises(DatasetError) as info:
        read_sft_records(path, skip_bad_lines=1)
    message = str(info.value)
    assert message.startswith(f"{path}:4:2: invalid JSON") and message.endswith("(bad line 2; --skip-bad-lines 1)")
    assert "\n" not in message and isinstance(info.value.__cause__, json.JSONDecodeError)
    with pytest.raises(DatasetError) as info:  # without the option: exactly today's error, at the first bad line
        read_sft_records(path)
    assert str(info.value) == f"{path}:2: expected a JSON object, got list: '[1]'"


def test_encoding_errors_are_skippable_lines_but_a_utf16_file_is_not(tmp_path):
    body = GOOD_SFT.encode() + b'\n{"instruction": "caf\xe9"}\n{"a\x00": 1}\n' + GOOD_SFT.encode() + b"\n"
    records, stats = read_sft_records(write(tmp_path, body), skip_bad_lines=2)
    assert len(records) == 2 and [s.split(": ", 1)[1] for s in stats.skipped] == [
        "not UTF-8 text (invalid byte 0xe9 at offset 20)", "NUL byte at offset 3 (binary data, not JSONL)"]
    with pytest.raises(DatasetError, match="file is UTF-16; convert it to UTF-8"):
        read_sft_records(write(tmp_path, GOOD_SFT.encode("utf-16"), "utf16.jsonl"), skip_bad_lines=5)


def test_preference_pairs_skip_schema_errors_and_still_count_degenerate_pairs(tmp_path):
    same = json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"})
    missing = json.dumps({"prompt": "p", "chosen": "a"})
    path = write(tmp_path, f"{GOOD_PAIR}\n{missing}\n{same}\n{GOOD_PAIR}\n")
    pairs, stats = read_preference_pairs(path, skip_bad_lines=1)
    assert len(pairs) == 2 and stats.skipped == [f"{path}:2: missing field 'rejected'"]
    assert stats.dropped == {"invalid": 1, "chosen == rejected": 1}


def test_prompts_skip_bad_lines(tmp_path):
    path = write(tmp_path, f'{GOOD_PROMPT}\n{{"prompt": ""}}\n{{"prompt": 7}}\n{GOOD_PROMPT}\n')
    prompts, stats = read_prompts(path, skip_bad_lines=2)
    assert [(p.text, p.where) for p in prompts] == [("What is 2+3?", f"{path}:1"), ("What is 2+3?", f"{path}:4")]
    assert stats.skipped == [f"{path}:2: field 'prompt' is empty",
                             f"{path}:3: field 'prompt' must be a string, got int"]
    with pytest.raises(DatasetError, match=r"data.jsonl:3: field 'prompt' must be a string, got int \(bad line 2"):
        read_prompts(path, skip_bad_lines=1)


def test_a_file_of_only_bad_lines_has_no_usable_examples(tmp_path):
    path = write(tmp_path, "{oops}\n[]\n")
    with pytest.raises(DatasetError, match=r"0 usable examples in .*data.jsonl \(2 lines read; dropped: 2 invalid\)"):
        read_sft_records(path, skip_bad_lines=5)
    with pytest.raises(ConfigError, match="--skip-bad-lines must be ≥ 0, got -1"):
        read_sft_records(path, skip_bad_lines=-1)
