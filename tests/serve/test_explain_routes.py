"""/explain on a real server: each view is the page (and the JSON) `llmkit explain` writes for the served
model; the views run on a copy of the module tree that shares the served weights, so the engine's model
never records (checked while requests generate beside them); bad queries are 400s in OpenAI's shape; the
API key guards /explain; headless Chromium draws the heatmap under the page's own CSP, reached through
the index's form."""

from __future__ import annotations

import argparse
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import llmkit
from llmkit.explain import run_view
from llmkit.explain.page import CSP, json_document, render_html, render_png
from llmkit.explain.subject import Subject
from llmkit.layers.attention import Attention
from llmkit.serve.errors import APIError
from llmkit.serve.explain_routes import MAX_TEXT_CHARS, MAX_TOKENS, SERVED_VIEWS, Explainer
from serve_helpers import CHAIN_ANSWER, MODEL_ID, running_server, save_scripted_model

CHROMIUM = Path("/usr/bin/chromium")
TEXT = "The cat sat on the mat."
KEY = "explain-key"
OPTIONS = {"sampling": {"seed": "3", "max_new_tokens": "4", "temperature": "0.9", "top_k": "20"},
           "knockout": {"head": "0.1"}, "positions": {"head": "1.0"}, "cache": {"context": "300"}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_scripted_model(tmp_path_factory.mktemp("scripted"))


@pytest.fixture(scope="module")
def lm(model_dir):
    return llmkit.load(model_dir)


@pytest.fixture(scope="module")
def url(lm):
    with running_server(lm, max_batch=2) as url:
        yield url


def test_each_view_is_the_page_and_json_the_cli_writes(url, model_dir):
    from llmkit.commands.explain import view_options
    from llmkit.serve.explain_routes import parse_query, view_parsers

    apart = llmkit.load(model_dir)  # the model as `llmkit explain` loads it, apart from the served one
    parsers = view_parsers()
    for view in SERVED_VIEWS:
        params = {"text": TEXT, **OPTIONS.get(view, {})}
        document = httpx.get(f"{url}/explain/{view}", params={**params, "format": "json"}, timeout=60)
        assert document.status_code == 200, (view, document.text)
        assert document.headers["content-type"] == "application/json"
        args = parse_query(view, parsers[view], list(params.items()))  # the CLI's parser and checks
        expected = run_view(view, Subject.create(apart, TEXT, label=MODEL_ID), **view_options(view, args))
        assert document.content == json_document(expected), view
        if view == "attention":  # one page, matplotlib's PNG inside
            page = httpx.get(f"{url}/explain/{view}", params=params, timeout=60)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert page.headers.get_list("content-security-policy") == [CSP]  # the page's own, alone
            assert page.text == render_html(expected, render_png(expected))


def attention_state(model):
    return {(m.impl, m.probe is None) for m in model.modules() if isinstance(m, Attention)} | \
        {("hooks", bool(m._forward_hooks or m._forward_pre_hooks)) for m in model.modules()}


def test_views_never_touch_the_served_model(url, lm):
    before = attention_state(lm.model)
    assert before == {("sdpa", True), ("hooks", False)}
    seen, answers, failures, done = set(), [], [], threading.Event()

    def watch():
        while not done.is_set():
            seen.update(attention_state(lm.model))
            time.sleep(0.001)

    def explain():
        try:
            for view in ("attention", "logit-lens", "knockout") * 2:
                response = httpx.get(f"{url}/explain/{view}", params={"text": TEXT, "format": "json"}, timeout=60)
                if response.status_code != 200:
                    failures.append(response.text)
        finally:
            done.set()

    threads = [threading.Thread(target=watch), threading.Thread(target=explain)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=url, timeout=60) as client:
        while not done.is_set():
            answer = client.post("/v1/chat/completions", json={
                "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "temperature": 0})
            answers.append(answer.json()["choices"][0]["message"]["content"])
    for thread in threads:
        thread.join()
    assert not failures and answers and set(answers) == {CHAIN_ANSWER}
    assert seen == before  # never the reference kernel, a probe or a hook on the engine's modules


def test_the_copy_shares_the_weights_and_runs_one_view_at_a_time(lm):
    explainer = Explainer(lm, MODEL_ID)
    copy = explainer.model_copy()
    served, own = dict(lm.model.named_parameters()), dict(copy.model.named_parameters())
    assert served.keys() == own.keys() and all(served[n] is own[n] for n in served)  # no second set of weights
    served_modules = {id(m) for m in lm.model.modules()}
    assert not any(id(m) in served_modules for m in copy.model.modules())
    assert copy.tokenizer is lm.tokenizer and explainer.model_copy() is copy
    args = argparse.Namespace(text=TEXT, target=None)
    with explainer.lock:  # a view is running
        with pytest.raises(APIError) as refused:
            explainer.render("tokens", args, True, {})
    assert refused.value.status == 429 and refused.value.headers["retry-after"]


BAD = [("attention", {"text": ""}, "text", None),
       ("attention", {"text": "a" * (MAX_TEXT_CHARS + 1)}, "text", "characters"),
       ("attention", {"text": "0123456789" * 20}, "text", f"at most {MAX_TOKENS}"),  # digits: ~a token each
       ("attention", {"context": "5"}, "context", "takes no parameter"),
       ("attention", {"top": "x"}, "top", "invalid int value"),
       ("attention", {"top": "0"}, "top", "top must be in"),
       ("attention", {"top": "--"}, "top", "'--' cannot be a value"),  # argparse dropped it: a 500 before
       ("attention", {"text": "--"}, "text", "'--' cannot be a value"),
       ("attention", {"query": "dog", "keys": "b"}, "query", "not in the text"),
       ("attention", {"format": "xml"}, "format", None),
       ("attention", {"model": "/etc/passwd"}, "model", "not offered"),
       ("knockout", {"every_head": "1"}, "every_head", "not offered"),
       ("knockout", {"top": ["1", "2"]}, "top", "2 times"),
       ("knockout", {"head": "x.y"}, "head", "LAYER.HEAD"),
       ("sampling", {"temperature": "-1"}, "temperature", "temperature"),
       ("sampling", {"max_new_tokens": "1000"}, "max_new_tokens", None)]


@pytest.mark.parametrize("view, params, param, words", BAD, ids=[f"{v}-{'-'.join(p)}" for v, p, _, _ in BAD])
def test_bad_queries_are_400s_in_openais_shape(url, view, params, param, words):
    response = httpx.get(f"{url}/explain/{view}", params=params, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and "\n" not in error["message"] and "Traceback" not in error["message"]
    assert words is None or words in error["message"], error["message"]


def test_index_redirects_and_unknown_views(url):
    index = httpx.get(url + "/explain")
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    assert all(f'value="{view}"' in index.text for view in SERVED_VIEWS) and 'action="/explain"' in index.text
    moved = httpx.get(url + "/explain", params={"view": "tokens", "text": "猫 & co"})
    assert moved.status_code == 303 and moved.headers["location"] == "/explain/tokens?text=%E7%8C%AB+%26+co"
    assert httpx.get(url + "/explain", params={"view": "compare"}).status_code == 400
    missing = httpx.get(url + "/explain/compare")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_model_text_stays_text_in_the_page(url):
    hostile = "猫坐在</script><script>alert(1)</script><img src=x onerror=alert(2)>垫子上"
    page = httpx.get(url + "/explain/tokens", params={"text": hostile}, timeout=60)
    assert page.status_code == 200
    assert "<img src=x" not in page.text and page.text.count("</script>") == 2


def test_the_key_guards_explain(lm):
    with running_server(lm, api_key=KEY, max_batch=1) as url:
        for path in ("/explain", "/explain/tokens"):
            assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + path, headers={"authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing (make test installs it via apt)")
def test_chromium_draws_the_heatmap_from_the_form(url):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra)")
    requests, errors, blocked = [], [], []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
            page.goto(url + "/explain")
            page.fill("input[name=text]", TEXT)
            page.select_option("select[name=view]", "attention")
            page.click("button[type=submit]")
            canvas = page.locator("canvas.heatmap").first
            canvas.wait_for(timeout=30_000)
            shot = canvas.screenshot()
            title = page.locator("#title").text_content()
        finally:
            browser.close()
    assert not errors and not blocked, errors + blocked
    assert title == f"Attention: {MODEL_ID}"
    assert all(u.startswith((url + "/", "data:")) for u in requests), requests
    from llmkit.plots import pyplot

    pixels = pyplot().imread(io.BytesIO(shot), format="png")[..., :3]
    blue = pixels[..., 2] > pixels[..., 0] + 0.03  # cells run from white to dark blue; labels are grey
    assert blue.mean() > 0.15, "no heatmap cells drawn"  # the causal triangle fills ~40% of the canvas
    assert len(np.unique((pixels[blue] * 20).round(), axis=0)) > 5  # many weights, many shades: a map
