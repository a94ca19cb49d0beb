"""`llmkit convert --to hf` keeps the chat format: `transformers`' apply_chat_template renders the same text as
llmkit, its tokenizer gives the same ids, and llmkit loads the export back with the same template.

Two kinds of model: an llmkit-trained one (no template of its own: llmkit's default role-token template is
exported, and the export loads back as "no template of its own"), and a fine-tune of a model with its own
template (ChatML, kept in the fine-tuned checkpoint's config.json), converted by the real CLI.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import llmkit
from llmkit.io.hf import save_hf
from llmkit.tokenizer.chat import DEFAULT_CHAT_TEMPLATE
from llmkit.training.sft import sft
from post_training_helpers import (CHATML, addition_records, fast_config, save_tiny_hf_chat_model, save_tiny_model,
                                   write_jsonl)
from llmkit_command import llmkit_cmd

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "And again, twice?"}],
]


def assert_same_chats(lm: "llmkit.LanguageModel", out: Path) -> None:
    """transformers renders (and tokenizes) every conversation exactly as llmkit does."""
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for messages in CONVERSATIONS:
        ours = lm.chat_ids(messages)
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == lm.tokenizer.decode(ours[len(lm.prefix_ids):])  # the prompt text, without llmkit's prefix
        assert theirs(text)["input_ids"] == ours  # the exported post-processor adds that prefix back


def test_llmkit_model_exports_its_default_template(tmp_path):
    lm = llmkit.load(save_tiny_model(tmp_path / "run"))
    assert lm.chat_template is None  # llmkit's own models render with DEFAULT_CHAT_TEMPLATE
    out = save_hf(lm.model, lm.tokenizer, tmp_path / "hf", prefix_ids=lm.prefix_ids, eos_ids=lm.eos_ids,
                  chat_template=lm.chat_template)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert_same_chats(lm, out)
    again = llmkit.load(out)
    assert again.chat_template is None  # loads back as it was: no template of its own
    assert [again.chat_ids(m) for m in CONVERSATIONS] == [lm.chat_ids(m) for m in CONVERSATIONS]


def test_fine_tuned_model_keeps_its_own_template_through_convert(tmp_path):
    source = save_tiny_hf_chat_model(tmp_path / "source")  # a Hugging Face model with ChatML, like SmolLM2
    data = write_jsonl(tmp_path / "sft.jsonl", addition_records(8))
    sft(source, data, tmp_path / "sft", fast_config(steps=1, eval_interval=1))
    tuned = llmkit.load(tmp_path / "sft")
    assert tuned.chat_template == CHATML
    out = tmp_path / "hf"
    run = subprocess.run([*llmkit_cmd(), "convert", "--model", str(tmp_path / "sft"), "--out", str(out), "--to", "hf"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert_same_chats(tuned, out)
    again = llmkit.load(out)
    assert again.chat_template == CHATML and again.eos_ids == tuned.eos_ids
    assert [again.chat_ids(m) for m in CONVERSATIONS] == [tuned.chat_ids(m) for m in CONVERSATIONS]


def test_tokenizer_without_role_tokens_has_no_template_to_export():
    import tokenizers

    from llmkit.io.hf import export_chat_template
    from llmkit.tokenizer import Tokenizer

    plain = Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel({"hi": 0, "<unk>": 1}, unk_token="<unk>")))
    assert export_chat_template(plain, None) is None  # a model with no chat format: nothing is written
    assert export_chat_template(plain, CHATML) == CHATML
