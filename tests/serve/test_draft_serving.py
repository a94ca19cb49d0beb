"""`llmkit serve --draft`: a server whose engine speculates for a greedy request running alone answers
exactly what a server without a draft answers, streamed and whole, alone and beside a sampled request."""

from __future__ import annotations

import httpx
import pytest

import llmkit
from llmkit.cli import main
from llmkit.inference.engine import Engine
from llmkit.serve.app import create_app
from llmkit.serve.server import ServerThread
from serve_helpers import MODEL_ID, metric, save_scripted_model, sse_payloads

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return llmkit.load(save_scripted_model(tmp_path_factory.mktemp("scripted")))


def answers(lm, draft) -> tuple[list, dict]:
    engine = Engine(lm.model, lm.tokenizer, max_batch=2, eos_ids=lm.eos_ids, draft=draft, draft_tokens=3)
    out = []
    try:
        with ServerThread(create_app(lm, engine, model_id=MODEL_ID)) as url, httpx.Client(timeout=30) as client:
            body = {"model": MODEL_ID, "prompt": "What is 2+3?", "max_tokens": 16, "temperature": 0}  # random text
            out.append(client.post(url + COMPLETIONS, json=body).json()["choices"][0]["text"])
            streamed = sse_payloads(client.post(url + COMPLETIONS, json={**body, "stream": True}).text)
            out.append("".join(p["choices"][0]["text"] for p in streamed[:-1]))
            chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
            out.append(client.post(url + CHAT, json={**chat, "temperature": 0}).json()["choices"][0]["message"])
            out.append(client.post(url + CHAT, json={**chat, "temperature": 0.8, "seed": 3}).json()["choices"])
            stats = engine.stats()
            assert metric(url, "llmkit_draft_tokens_proposed_total") == stats["draft_proposed"]
            assert metric(url, "llmkit_draft_tokens_accepted_total") == stats["draft_accepted"]
        return out, stats
    finally:
        engine.close()


def test_a_server_with_a_draft_answers_what_it_answers_without(lm):
    plain, _ = answers(lm, None)
    drafted, stats = answers(lm, lm.model)  # the model itself as the draft: every guess is kept
    assert drafted == plain and plain[0] == plain[1] and plain[0]
    assert stats["draft_proposed"] > 0 and stats["draft_accepted"] == stats["draft_proposed"]


def test_serve_refuses_bad_draft_flags_before_loading(capsys):
    assert main(["serve", "--model", "nowhere", "--draft", "x", "--draft-tokens", "0"]) == 2
    assert "--draft-tokens must be in [1, 16]" in capsys.readouterr().err
