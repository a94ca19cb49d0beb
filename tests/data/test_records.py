"""SFT and preference JSONL readers: every bad input is one DatasetError naming file:line (RELIABILITY D1–D6)."""

from __future__ import annotations

import json

import pytest

from llmkit.data.records import read_preference_pairs, read_sft_records
from llmkit.errors import DatasetError

GOOD_SFT = json.dumps({"instruction": "Add 2 and 3.", "output": "5"})
GOOD_CHAT = json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello!"}]})
GOOD_PAIR = json.dumps({"prompt": "2+3?", "chosen": "5", "rejected": "6"})


def write(tmp_path, body: bytes | str, name: str = "data.jsonl"):
    path = tmp_path / name
    path.write_bytes(body.encode("utf-8") if isinstance(body, str) else body)
    return path


def sft_error(tmp_path, body) -> str:
    path = write(tmp_path, body)
    with pytest.raises(DatasetError) as info:
        read_sft_records(path)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(path), "FILE")


def test_both_sft_forms_become_messages(tmp_path):
    with_input = json.dumps({"instruction": "Translate.", "input": "bonjour", "output": "hello", "system": "Be exact."})
    records, stats = read_sft_records(write(tmp_path, "\n".join([GOOD_SFT, GOOD_CHAT, with_input]) + "\n"))
    assert [r.messages for r in records] == [
        [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
        json.loads(GOOD_CHAT)["messages"],
        [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Translate.\n\nbonjour"},
         {"role": "assistant", "content": "hello"}]]
    assert [r.where.rsplit(":", 1)[1] for r in records] == ["1", "2", "3"]
    assert (stats.lines, stats.kept) == (3, 3)


def test_bom_crlf_and_blank_lines_keep_physical_line_numbers(tmp_path):
    body = b"\xef\xbb\xbf" + f"{GOOD_SFT}\r\n\r\n   \r\n{{\"instruction\": \"x\"}}\r\n".encode()
    assert sft_error(tmp_path, body) == "FILE:4: missing field 'output'"
    records, stats = read_sft_records(write(tmp_path, b"\xef\xbb\xbf" + f"{GOOD_SFT}\r\n\r\n{GOOD_SFT}\r\n".encode()))
    assert len(records) == 2 and records[1].where.endswith(":3") and stats.blank == 1


@pytest.mark.parametrize("line, expected", [
    ('{"instruction": "a", "output": "b",}', "FILE:2:36: invalid JSON (Expecting property name enclosed in "
                                             "double quotes): '{\"instruction\": \"a\", \"output\": \"b\",}'"),
    ('{"instruction": "a", "output": "b"', "FILE:2:35: invalid JSON (Expecting ',' delimiter)"),
    ("[]", "FILE:2: expected a JSON object, got list: '[]'"),
    ('"x"', "FILE:2: expected a JSON object, got str"),
    ("3", "FILE:2: expected a JSON object, got int"),
    ('{"output": "b"}', "FILE:2: missing field 'instruction'"),
    ('{"instruction": "a"}', "FILE:2: missing field 'output'"),
    ('{"input": "a"}', "FILE:2: missing field 'messages' (chat form) or 'instruction'/'output'"),
    ('{"instruction": 3, "output": "b"}', "FILE:2: field 'instruction' must be a string, got int"),
    ('{"instruction": "a", "output": "  "}', "FILE:2: field 'output' is an empty response"),
    ('{"messages": [{"role": "robot", "content": "x"}]}',
     "FILE:2: messages[0] has role 'robot'; expected one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
     "FILE:2: messages[1] is an empty assistant response"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "FILE:2: no assistant message (nothing to learn from)"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "FILE:2: messages[0] is an assistant message"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
     "FILE:2: messages[0]: missing field 'content'"),
    ('{"messages": []}', "FILE:2: field 'messages' must be a non-empty list"),
])
def test_bad_sft_line_names_file_and_line(tmp_path, line, expected):
    assert sft_error(tmp_path, f"{GOOD_SFT}\n{line}\n{GOOD_SFT}\n").startswith(expected)


def test_syntax_error_keeps_the_json_error_as_cause(tmp_path):
    with pytest.raises(DatasetError) as info:
        read_sft_records(write(tmp_path, "{oops}\n"))
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_encoding_problems(tmp_path):
    assert sft_error(tmp_path, GOOD_SFT.encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n') == \
        "FILE:2: not UTF-8 text (invalid byte 0xe9 at offset 20)"
    assert sft_error(tmp_path, GOOD_SFT.encode() + b"\n\n{\"a\x00\": 1}\n") == \
        "FILE:3: NUL byte at offset 3 (binary data, not JSONL)"
    assert sft_error(tmp_path, GOOD_SFT.encode("utf-16")) == "FILE: file is UTF-16; convert it to UTF-8"


def test_empty_and_blank_files_have_no_usable_examples(tmp_path):
    assert sft_error(tmp_path, "") == "0 usable examples in FILE (0 lines read)"
    assert sft_error(tmp_path, "\n  \n\n") == "0 usable examples in FILE (3 lines read)"
    with pytest.raises(DatasetError, match="no such file"):
        read_sft_records(tmp_path / "missing.jsonl")


def test_unknown_keys_are_counted_not_fatal(tmp_path):
    extra = json.dumps({"instruction": "a", "output": "b", "id": 7, "source": "web"})
    _, stats = read_sft_records(write(tmp_path, f"{extra}\n{extra}\n{GOOD_SFT}\n"))
    assert dict(stats.unknown_keys) == {"id": 2, "source": 2}


def test_preference_pairs_and_degenerate_ones_dropped_and_counted(tmp_path):
    same = json.dumps({"prompt": "p", "chosen": "yes", "rejected": "yes "})
    pairs, stats = read_preference_pairs(write(tmp_path, f"{GOOD_PAIR}\n{same}\n\n{GOOD_PAIR}\n"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("2+3?", "5", "6")] * 2
    assert pairs[1].where.endswith(":4")
    assert stats.dropped["chosen == rejected"] == 1 and "1 chosen == rejected" in stats.summary()
    path = write(tmp_path, f"{same}\n{same}\n", "all_same.jsonl")
    with pytest.raises(DatasetError, match=r"0 usable examples in .*all_same.jsonl \(2 lines read; dropped: "
                                           r"2 chosen == rejected\)"):
        read_preference_pairs(path)


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "p", "chosen": "a"}, "FILE:2: missing field 'rejected'"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "FILE:2: field 'prompt' is empty"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "FILE:2: field 'chosen' is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": ["b"]}, "FILE:2: field 'rejected' must be a string, got list"),
])
def test_bad_preference_pair_names_file_and_line(tmp_path, record, expected):
    path = write(tmp_path, f"{GOOD_PAIR}\n{json.dumps(record)}\n")
    with pytest.raises(DatasetError) as info:
        read_preference_pairs(path)
    assert str(info.value).replace(str(path), "FILE") == expected
