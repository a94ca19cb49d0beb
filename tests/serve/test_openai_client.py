"""The official `openai` client against a real server (the scripted tiny model, in a server thread):
chat and text completions, streamed and not, n, stop, seeds, logprobs, usage, models, and errors
raised as the client's own exception classes."""

from __future__ import annotations

import openai
import pytest

import llmkit
from serve_helpers import CHAIN_ANSWER, CONTEXT, IMG, MODEL_ID, MORE, SCRIPT, running_server, save_scripted_model


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    lm = llmkit.load(save_scripted_model(tmp_path_factory.mktemp("scripted")))
    with running_server(lm) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


def ask(client, text="Hi there", **options):
    return client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": text}], **options)


def test_chat_completion_answers_with_the_models_greedy_tokens(client):
    reply = ask(client, max_tokens=3, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == CHAIN_ANSWER
    assert choice.finish_reason == "length"
    assert reply.object == "chat.completion" and reply.model == MODEL_ID
    assert reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3 and reply.usage.prompt_tokens > 3


def test_streamed_chat_equals_the_whole_answer(client):
    chunks = list(ask(client, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == SCRIPT + IMG + MORE * 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_stop_string_ends_the_answer_before_it(client):
    reply = ask(client, max_tokens=10, temperature=0, stop=["onerror"])
    assert reply.choices[0].message.content == SCRIPT + " <img src=x "
    assert reply.choices[0].finish_reason == "stop"


def test_n_choices_and_seeds(client):
    """Sampling at temperature 2 from a random model: seeded requests repeat, choices of one request
    differ from each other."""
    options = dict(prompt="hello world", max_tokens=6, temperature=2.0, seed=1234)
    first = client.completions.create(model=MODEL_ID, n=3, **options)
    again = client.completions.create(model=MODEL_ID, n=3, **options)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1  # 6 tokens drawn nearly uniformly from 303: a repeat is ~impossible
    assert 3 <= first.usage.completion_tokens <= 18  # 6 per choice, fewer where a drawn EOS ended one


def test_chat_logprobs(client):
    reply = ask(client, max_tokens=2, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert [item.token for item in content] == [SCRIPT, IMG]
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the most likely
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert bytes(item.bytes).decode("utf-8") == item.token


def test_completion_logprobs_and_token_prompt(client):
    newline = client.completions.create(model=MODEL_ID, prompt="x\n", max_tokens=1, temperature=0)
    assert newline.choices[0].text == SCRIPT
    reply = client.completions.create(model=MODEL_ID, prompt="x\n", max_tokens=2, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp.tokens == [SCRIPT, IMG] and lp.text_offset == [0, len(SCRIPT)]
    assert [len(top) for top in lp.top_logprobs] == [2, 2]
    assert SCRIPT in lp.top_logprobs[0] and IMG in lp.top_logprobs[1]


def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_errors_are_the_clients_exception_classes(client):
    with pytest.raises(openai.BadRequestError) as bad:
        ask(client, max_tokens=0)
    assert bad.value.body["param"] == "max_tokens" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as long:
        ask(client, "hello " * 200, max_tokens=CONTEXT)
    assert long.value.body["code"] in ("context_length_exceeded", "invalid_value")
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as tools:
        ask(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "not supported" in tools.value.body["message"]
    ask(client, max_tokens=1)  # still healthy


def test_chat_template_runs_the_whole_conversation(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Again"}]}]
    reply = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=1, temperature=0)
    assert reply.choices[0].message.content == SCRIPT
    short = ask(client, "Hi", max_tokens=1)
    assert reply.usage.prompt_tokens > short.usage.prompt_tokens  # the history was rendered into the prompt
